"""The GPU check in one script, about 5 minutes on a single-GPU machine: the `gpu` tests, then two benchmarks.

1. `pytest -m gpu`: materialise (fp32, bf16) and evaluate on CUDA against the CPU, streaming from host
   memory, a short study on CUDA (tests/test_gpu.py). Any failure, or any skip, is a MISS.
2. Merge bandwidth: a Llama-shaped model (--size; default ~0.55B parameters) and 3 experts on the device.
   For each dtype and method, ms per candidate and GB/s = (experts + 2) x model bytes / time, against
   the same run's device copy bandwidth (torch.add(a, b, out=c) over the same bytes); and with
   `streaming` (sources in pinned host memory, (experts + 1) x model bytes copied per candidate)
   against the same run's pinned host-to-device copy bandwidth.
3. Evaluator throughput: the calibration evaluator against batched HF `generate` on the same model,
   device, examples and batch size (bench_eval.py's char-level model and reverse-the-word prompts),
   with identical exact-match decisions per example.

Targets (first set without a GPU run to calibrate them; adjust them with the first measurements):
task_arithmetic >= 0.30 of device add bandwidth (fp32), streaming >= 0.50 of host-to-device copy
bandwidth (task_arithmetic, fp32), evaluator >= 2x generate, whole script <= 300 s.

Each target prints an `ok` or `MISS` line. Exit codes: 0 every target met, 1 a MISS, 77 no CUDA device
here (nothing was measured).

    .venv/bin/python benchmarks/bench_gpu.py
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --size tiny --skip-tests   # smoke run of the script
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checks import Checks  # noqa: E402

NO_DEVICE = 77
BUDGET_S = 300.0  # the whole script, seconds, at most
TARGETS = {"ta_vs_add": 0.30, "stream_vs_h2d": 0.50, "eval_vs_generate": 2.0}  # each: at least
SIZES = {  # hidden, intermediate, layers, heads, vocab
    "tiny": (128, 256, 2, 4, 1000),
    "small": (768, 2048, 12, 12, 32000),
    "gpu": (1536, 4096, 16, 12, 32000),
}
METHODS = ("task_arithmetic", "ties", "dare_ties")
PARAMS = {"task_arithmetic": {"weight": [0.5, 0.3, 0.2]},
          "ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3]},
          "dare_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3]}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() over `repeat` calls after one warm-up, the device synchronised around each."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- 1. the gpu tests ----------------------------------------------------------------------------


def run_gpu_tests(folder: Path) -> tuple[dict[str, int], str]:
    xml = folder / "gpu-tests.xml"
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                          f"--junitxml={xml}", "tests"], cwd=ROOT, capture_output=True, text=True)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            kind = ("failed" if case.find("failure") is not None or case.find("error") is not None
                    else "skipped" if case.find("skipped") is not None else "passed")
            counts[kind] += 1
    tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
    return counts, tail


# --- 2. merge bandwidth --------------------------------------------------------------------------


def make_models(root: Path, size: str, device: torch.device, n_experts: int = 3) -> tuple[Path, list[Path], int]:
    """A random Llama-shaped base and experts (base + small noise), built on the device, saved in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, vocab = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    base = root / "base"
    model.save_pretrained(base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for i in range(n_experts):
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(state[k] + 0.01 * torch.randn_like(state[k]))
        path = root / f"expert{i}"
        model.save_pretrained(path)
        experts.append(path)
    del model, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return base, experts, n_params


def add_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, repeat: int) -> float:
    """GB/s of torch.add(a, b, out=c) on the device, `numel` elements per operand (3 operands touched)."""
    a, b, c = (torch.randn(numel, device=device).to(dtype) for _ in range(3))
    s = timed(lambda: torch.add(a, b, out=c), device, repeat)
    del a, b, c
    return 3 * numel * (torch.finfo(dtype).bits // 8) / s / 1e9


def h2d_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, repeat: int) -> float:
    """GB/s of a copy from page-locked host memory to the device (the same path streaming takes)."""
    host = torch.randn(numel).to(dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    dev = torch.empty(numel, dtype=dtype, device=device)
    s = timed(lambda: dev.copy_(host, non_blocking=True), device, repeat)
    del host, dev
    return numel * (torch.finfo(dtype).bits // 8) / s / 1e9


def merge_rows(base: Path, experts: list[Path], n_params: int, device: torch.device, repeat: int) -> list[dict]:
    from mergesearch.materializer import Materializer

    rows = []
    for dtype in ("float32", "bfloat16"):
        tdt = getattr(torch, dtype)
        nbytes = n_params * (torch.finfo(tdt).bits // 8)
        add = add_bandwidth(n_params, tdt, device, repeat)
        h2d = h2d_bandwidth(n_params, tdt, device, repeat)
        ta_s = None
        for streaming in (False, True):
            for method in METHODS if not streaming else ("task_arithmetic",):
                t0 = time.perf_counter()
                m = Materializer(base, experts, method, dtype=dtype, device=device, streaming=streaming)
                prep = time.perf_counter() - t0
                plan = m.plan(**PARAMS[method])
                s = timed(lambda: m.materialize(plan), device, repeat)
                moved = (len(experts) + 1) * nbytes  # sources copied to the device per candidate
                gbs = (len(experts) + 2) * nbytes / s / 1e9
                row = {"dtype": dtype, "method": method + (" (streaming)" if streaming else ""), "ms": s * 1e3,
                       "gbs": gbs, "add": add, "vs_add": gbs / add, "prep_s": prep}
                if streaming:
                    row.update(h2d=h2d, vs_h2d=moved / s / 1e9 / h2d)
                elif method == "task_arithmetic":
                    ta_s = s
                row["vs_ta"] = s / ta_s if ta_s else None
                rows.append(row)
                del m
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


# --- 3. evaluator throughput ---------------------------------------------------------------------


def generate_answers(model, tok, task, batch_size: int, device: torch.device) -> dict[str, str]:
    """Batched HF `generate` (greedy, stops at the newline or EOS): the plain way to score exact match."""
    from bench_eval import plain_generate

    tok.padding_side = "left"
    return plain_generate(model, tok, task, batch_size, device)


def eval_row(folder: Path, device: torch.device, n: int, batch_size: int, repeat: int) -> dict:
    from bench_eval import build_model, gen_task_file

    from mergesearch.evaluate import Evaluator, load_task

    model, tok = build_model()
    path = gen_task_file(model, tok, folder / "reverse.jsonl", n, 32)
    model = model.to(device)
    task = load_task(path, name="reverse")
    ev = Evaluator(model, tok, [task], batch_size=batch_size)
    ours_s = timed(ev.evaluate, device, repeat)
    records = ev.evaluate().records["reverse"]
    gen_s = timed(lambda: generate_answers(model, tok, task, batch_size, device), device, max(1, repeat // 2))
    answers = generate_answers(model, tok, task, batch_size, device)
    plain = {e.id: float(answers[e.id] in e.answers) for e in task.examples}
    same = sum(r["exact_match"] == plain[r["id"]] for r in records)
    return {"n": n, "ours_s": ours_s, "generate_s": gen_s, "speedup": gen_s / ours_s, "same": same,
            "hits": sum(plain.values())}


# --- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N; cpu only to smoke-test this script")
    ap.add_argument("--size", choices=sorted(SIZES), default="gpu", help="model of the merge benchmark")
    ap.add_argument("--repeat", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--examples", type=int, default=512, help="prompts of the evaluator benchmark")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: needs a CUDA device and this machine has none (torch {torch.__version__}, "
              "torch.cuda.is_available() is False): nothing measured", file=sys.stderr)
        return NO_DEVICE
    logging.disable(logging.WARNING)
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    checks = Checks()

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = Path(tmp)
        if not args.skip_tests:
            counts, tail = run_gpu_tests(folder)
            print(f"\n1. gpu tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
            if not checks.check(f"gpu tests: {counts['passed']} passed, {counts['failed']} failed, "
                                f"{counts['skipped']} skipped (target: all passed, none skipped)",
                                counts["passed"] and not counts["failed"] and not counts["skipped"]):
                print(tail)

        base, experts, n_params = make_models(folder, args.size, device)
        rows = merge_rows(base, experts, n_params, device, args.repeat)
        print(f"\n2. merge: Llama-shaped, {n_params / 1e6:.0f}M parameters, {len(experts)} experts (bf16 checkpoints)")
        print(f"{'dtype':9} {'method':28} {'ms/cand':>8} {'GB/s':>8} {'add GB/s':>9} {'vs add':>7} {'vs TA':>6} "
              f"{'H2D GB/s':>9} {'vs H2D':>7} {'prep s':>7}")
        for r in rows:
            vs_ta = f"{r['vs_ta']:.2f}" if r["vs_ta"] else "-"
            h2d = f"{r['h2d']:9.1f} {r['vs_h2d']:7.2f}" if "h2d" in r else f"{'-':>9} {'-':>7}"
            print(f"{r['dtype']:9} {r['method']:28} {r['ms']:8.2f} {r['gbs']:8.1f} {r['add']:9.1f} {r['vs_add']:7.2f} "
                  f"{vs_ta:>6} {h2d} {r['prep_s']:7.1f}")
        ta = next(r for r in rows if r["dtype"] == "float32" and r["method"] == "task_arithmetic")
        st = next(r for r in rows if r["dtype"] == "float32" and r["method"] == "task_arithmetic (streaming)")
        checks.check(f"task_arithmetic float32 at {ta['vs_add']:.2f} of device add bandwidth (target "
                     f">= {TARGETS['ta_vs_add']})", ta["vs_add"] >= TARGETS["ta_vs_add"])
        checks.check(f"streaming float32 at {st['vs_h2d']:.2f} of host-to-device bandwidth (target "
                     f">= {TARGETS['stream_vs_h2d']})", st["vs_h2d"] >= TARGETS["stream_vs_h2d"])

        ev = eval_row(folder, device, args.examples, args.batch_size, max(3, args.repeat // 2))
        print(f"\n3. evaluator: {ev['n']} exact-match prompts, batch {args.batch_size}: ours {ev['ours_s'] * 1e3:.0f} ms, "
              f"HF generate {ev['generate_s'] * 1e3:.0f} ms: {ev['speedup']:.1f}x; same decision on "
              f"{ev['same']}/{ev['n']} ({ev['hits']:.0f} hits)")
        checks.check(f"evaluator and generate decide {ev['same']}/{ev['n']} examples alike (target: all)",
                     ev["same"] == ev["n"])
        checks.check(f"evaluator {ev['speedup']:.1f}x generate (target >= {TARGETS['eval_vs_generate']}x)",
                     ev["speedup"] >= TARGETS["eval_vs_generate"])

    total = time.perf_counter() - t_start
    print()
    checks.check(f"whole script {total:.0f} s (budget {BUDGET_S:.0f} s)", total <= BUDGET_S)
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
