"""The GPU check in one script, under 5 minutes on a single-GPU machine: the `gpu` tests, then four benchmarks.

1. `pytest -m gpu`: every merge method materialised on CUDA against the CPU (fp32, bf16; the CPU
   also running the GPU's block policy), streaming from host memory equal to resident sources for every
   method, evaluation on CUDA, a short study on CUDA, the fit on CUDA. Any failure, or any skip, is a MISS.
2. Merge table: a Llama-shaped model (--size; default ~0.55B parameters) and 3 experts, bf16 checkpoints.
   For each dtype and EVERY method, ms per candidate, GB/s = (experts + 2) x model bytes / time against
   the same run's device add bandwidth (torch.add(a, b, out=c) over the same bytes), and the time
   against task arithmetic's, and where the task-arithmetic family ran its compiled formula
   (operators/fused.py) the eager block kernel's time beside it, and where it merged the candidate in one call
   (mergesearch.groups) the same formula's time chunk by chunk ("chunks ms"); task arithmetic with `streaming`
   (sources in pinned host memory, (experts + 1) x model bytes copied per candidate) against the same
   run's pinned host-to-device copy.
3. Evaluator throughput: the calibration evaluator against batched HF `generate` on the same model,
   device, examples and batch size, with identical exact-match decisions per example.
4. A ~1B study end to end (random Llama, 3 experts, bf16, per-layer task arithmetic, 10 trials, two
   exact-match tasks): where the time goes (opening phases, per baseline, per trial merge / evaluation /
   other, mergesearch.timings), how many prompts the evaluator decided in one pass and how many fell
   back to generation, and whether each one-pass decision in bf16 is generation's (every example generated
   again: the check of the bf16 tie guard); opening against the time to read the same checkpoints from the
   page cache.
5. One gradient-fit step at that size against the same run's forward + backward on a batch of the
   same shape plus one merge.

Targets (the issue's; each prints an `ok` or `MISS` line): every method <= 3x task arithmetic per
candidate (each dtype); task arithmetic >= 0.5 of device add bandwidth (each dtype); streaming >= 0.85
of pinned host-to-device bandwidth; evaluator >= 2x generate with the same decisions; gpu tests all
passed, none skipped; study opening <= 2x reading its checkpoints from the page cache; bf16 one-pass
decisions all equal generation's; fit step <= 1.5x
forward + backward + one merge; what mergesearch adds to a study trial beyond Optuna's own time for the same
parameters on the same storage <= 1% of the trial; the whole script <= 300 s.

Exit codes: 0 every target met, 1 a MISS, 77 no CUDA device here (nothing was measured).

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --device cpu --size tiny --skip-tests   # smoke run (tiny study)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _checks import Checks  # noqa: E402

from mergesearch.fileio import atomic_write  # noqa: E402

NO_DEVICE = 77
GPU_TEST_WORKERS = 4
BUDGET_S = 300.0  # the whole script, seconds, at most
TARGETS = {"vs_ta": 3.0,  # every method's time / task arithmetic's, at most
           "ta_vs_add": 0.5, "stream_vs_h2d": 0.85, "eval_vs_generate": 2.0,  # each: at least
           "open_vs_read": 2.0, "fit_vs_fb": 1.5,  # each: at most
           "added_share": 0.01}  # mergesearch's time per study trial beyond Optuna's own, share of the trial, at most
SIZES = {  # hidden, intermediate, layers, heads, vocab
    "tiny": (128, 256, 2, 4, 1000),
    "small": (768, 2048, 12, 12, 32000),
    "gpu": (1536, 4096, 16, 12, 32000),  # ~0.55B, the merge table
}
STUDY_SIZES = {  # hidden, intermediate, layers, heads (vocab: the char tokenizer's)
    "tiny": (64, 128, 2, 4),
    "1b": (2048, 5632, 20, 16),  # ~1.0B
}
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear", "slerp", "model_stock")
W3, D3 = [0.5, 0.3, 0.2], [0.5, 0.4, 0.3]
PARAMS = {"linear": {"weight": W3}, "task_arithmetic": {"weight": W3}, "ties": {"weight": W3, "density": D3},
          "dare_linear": {"weight": W3, "density": D3}, "dare_ties": {"weight": W3, "density": D3},
          "breadcrumbs": {"weight": W3, "density": D3, "gamma": [0.01] * 3},
          "breadcrumbs_ties": {"weight": W3, "density": D3, "gamma": [0.01] * 3},
          "della": {"weight": W3, "density": D3, "epsilon": [0.1] * 3},
          "della_linear": {"weight": W3, "density": D3, "epsilon": [0.1] * 3},
          "slerp": {"t": 0.4}, "model_stock": {}}


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


def gpu_test_files() -> list[str]:
    """The test files holding `gpu` tests: only those are collected, so that a GPU machine needs none of
    the other files' test-only dependencies (mergekit, lm-eval, a browser)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def run_gpu_tests(folder: Path) -> tuple[dict[str, int], str]:
    """The gpu tests in a pytest of their own; in GPU_TEST_WORKERS processes where pytest-xdist is installed (a
    fresh machine compiles each Triton formula the tests force, and a process lowers one graph at a time)."""
    import importlib.util

    xml = folder / "gpu-tests.xml"
    workers = ["-n", str(GPU_TEST_WORKERS)] if importlib.util.find_spec("xdist") else []
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                          *workers, f"--junitxml={xml}", *gpu_test_files()], cwd=ROOT, capture_output=True, text=True)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            kind = ("failed" if case.find("failure") is not None or case.find("error") is not None
                    else "skipped" if case.find("skipped") is not None else "passed")
            counts[kind] += 1
    tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
    return counts, tail


# --- 2. merge table ------------------------------------------------------------------------------


def make_models(root: Path, shape: tuple[int, int, int, int, int], device: torch.device, n_experts: int = 3,
                tokenizer=None) -> tuple[Path, list[Path], int]:
    """A random Llama-shaped base and experts (base + small noise), built on the device, saved in bf16
    (with `tokenizer` saved beside the base: a study needs one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, vocab = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)
    if tokenizer is not None:
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                                tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    base = root / "base"
    model.save_pretrained(base)
    if tokenizer is not None:
        tokenizer.save_pretrained(base)
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
    free(device)
    return base, experts, n_params


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def merge_rows(base: Path, experts: list[Path], n_params: int, device: torch.device, repeat: int,
               methods=METHODS, dtypes=("float32", "bfloat16")) -> list[dict]:
    """One row per dtype and method (methods sharing a precomputation share a materialiser), then task
    arithmetic streamed from pinned host memory."""
    from mergesearch import operators
    from mergesearch.materializer import Materializer
    from mergesearch.operators import fused
    from mergesearch.plan import Plan

    rows = []
    for dtype in dtypes:
        tdt = getattr(torch, dtype)
        nbytes = n_params * (torch.finfo(tdt).bits // 8)
        add = add_bandwidth(n_params, tdt, device, repeat)
        h2d = h2d_bandwidth(n_params, tdt, device, repeat)
        ta_s = None
        key, m, prep = None, None, 0.0
        for method in [*methods, "task_arithmetic (streaming)"]:
            streaming = method.endswith("(streaming)")
            name = method.split(" ")[0]
            exps = experts[:1] if name == "slerp" else experts
            want = (operators.get(name).prepare, len(exps), streaming)
            if want != key:
                m = None
                free(device)
                t0 = time.perf_counter()
                m = Materializer(base, exps, name, dtype=dtype, device=device, streaming=streaming)
                prep, key = time.perf_counter() - t0, want
            else:
                prep = 0.0
            # the row's own method on the shared materialiser (m.plan would build the plan of the method
            # the materialiser was made for: task arithmetic timed as linear, dare_ties as dare_linear, ...)
            plan = Plan.full(name, m.tensors, len(exps), chunks=m.chunks,
                             **{k: v[:len(exps)] if isinstance(v, list) else v for k, v in PARAMS[name].items()})
            before = fused.calls.copy()
            s = timed(lambda: m.materialize(plan), device, repeat)
            gbs = (len(exps) + 2) * nbytes / s / 1e9
            row = {"dtype": dtype, "method": method, "ran": plan.method, "ms": s * 1e3, "gbs": gbs, "add": add, "vs_add": gbs / add,
                   "prep_s": prep, "eager_ms": None, "chunks_ms": None}
            ran = fused.calls - before
            if ran:  # the compiled formula ran: the eager kernel beside it
                if any(k[0].startswith("group_") for k in ran):  # in one call per candidate: chunk by chunk too
                    m.grouped = False
                    row["chunks_ms"] = timed(lambda: m.materialize(plan), device, repeat) * 1e3
                    m.grouped = True
                policy, m.scratch.compiled_min = m.scratch.compiled_min, None
                row["eager_ms"] = timed(lambda: m.materialize(plan), device, repeat) * 1e3
                m.scratch.compiled_min = policy
            if streaming:
                moved = (len(exps) + 1) * nbytes  # sources copied to the device per candidate
                row.update(h2d=h2d, vs_h2d=moved / s / 1e9 / h2d)
            elif name == "task_arithmetic":
                ta_s = s
            row["vs_ta"] = s / ta_s if ta_s and not streaming else None
            rows.append(row)
        m = None
        free(device)
    return rows


def print_merge_table(rows: list[dict], n_params: int, n_experts: int) -> None:
    print(f"\n2. merge: Llama-shaped, {n_params / 1e6:.0f}M parameters, {n_experts} experts (bf16 checkpoints)")
    print(f"{'dtype':9} {'method':28} {'ms/cand':>8} {'GB/s':>8} {'add GB/s':>9} {'vs add':>7} {'vs TA':>6} "
          f"{'H2D GB/s':>9} {'vs H2D':>7} {'prep s':>7} {'eager ms':>9} {'chunks ms':>9}")
    for r in rows:
        vs_ta = f"{r['vs_ta']:.2f}" if r["vs_ta"] else "-"
        h2d = f"{r['h2d']:9.1f} {r['vs_h2d']:7.2f}" if "h2d" in r else f"{'-':>9} {'-':>7}"
        eager = f"{r['eager_ms']:.2f}" if r.get("eager_ms") else "-"  # the eager kernel, where compiled ran
        chunks = f"{r['chunks_ms']:.2f}" if r.get("chunks_ms") else "-"  # the compiled formula chunk by chunk
        print(f"{r['dtype']:9} {r['method']:28} {r['ms']:8.2f} {r['gbs']:8.1f} {r['add']:9.1f} {r['vs_add']:7.2f} "
              f"{vs_ta:>6} {h2d} {r['prep_s']:7.1f} {eager:>9} {chunks:>9}", flush=True)


def check_merge(checks, rows: list[dict]) -> None:
    for r in rows:
        if r["method"] == "task_arithmetic":
            checks.check(f"task_arithmetic {r['dtype']} at {r['vs_add']:.2f} of device add bandwidth "
                         f"(target >= {TARGETS['ta_vs_add']})", r["vs_add"] >= TARGETS["ta_vs_add"])
        elif "h2d" in r:
            checks.check(f"streaming {r['dtype']} at {r['vs_h2d']:.2f} of pinned host-to-device bandwidth "
                         f"(target >= {TARGETS['stream_vs_h2d']})", r["vs_h2d"] >= TARGETS["stream_vs_h2d"])
        elif r["vs_ta"] is not None:
            checks.check(f"{r['method']} {r['dtype']}: {r['vs_ta']:.1f}x task arithmetic per candidate "
                         f"(target <= {TARGETS['vs_ta']:g}x)", r["vs_ta"] <= TARGETS["vs_ta"])


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


# --- 4. a ~1B study end to end, 5. a fit step at that size -----------------------------------------


def write_tasks(folder: Path, n: int, seed: int = 0) -> list[dict]:
    """Two exact-match tasks of `n` short prompts each (reverse a word, upper-case a word) as JSONL."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(n)]
    out = []
    for name, fn in (("reverse", lambda w: w[::-1]), ("upper", str.upper)):
        rows = [{"id": f"{name}-{i}", "prompt": f"Q: {name} {w}\nA: ", "answer": fn(w)} for i, w in enumerate(words)]
        calib, test = folder / f"{name}.calib.jsonl", folder / f"{name}.test.jsonl"
        calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
        test.write_text("".join(json.dumps(r) + "\n" for r in rows[: max(1, n // 8)]))
        out.append({"name": name, "calib": str(calib), "test": str(test)})
    return out


def read_checkpoints_s(paths: list[Path], device: torch.device) -> float:
    """Seconds to read every tensor of these checkpoints into the device (page cache warm: they were just
    read by the study), the floor for opening a study on them."""
    from mergesearch.checkpoints import open_checkpoint

    sync(device)
    t0 = time.perf_counter()
    held = [open_checkpoint(p).load(device=device) for p in paths]
    sync(device)
    s = time.perf_counter() - t0
    del held
    free(device)
    return s


def study_row(folder: Path, size: str, device: torch.device, n_prompts: int, n_trials: int) -> dict:
    from mergesearch.config import config_from_dict
    from mergesearch.study import records, run_study, study_status
    from mergesearch.study.runner import StudyRunner
    from mergesearch.zoo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    hidden, inter, layers, heads = STUDY_SIZES[size]
    root = folder / "study"
    root.mkdir()
    base, experts, n_params = make_models(root, (hidden, inter, layers, heads, len(tok)), device, tokenizer=tok)
    tasks = write_tasks(root, n_prompts)
    raw = {"models": {"base": str(base), "experts": {f"e{i}": str(p) for i, p in enumerate(experts)}},
           "merge": {"method": "task_arithmetic", "dtype": "bfloat16", "device": str(device)},
           "space": {"granularity": "per_layer", "parameters": {"lambda": {"fixed": 1.0}}},
           "objectives": {"tasks": tasks, "batch_size": 64},
           "study": {"name": "bench", "storage": f"sqlite:///{root / 'bench.db'}", "n_trials": n_trials,
                     "sampler": "random", "seed": 0, "top_k_test": 0, "pruner": "none"}}
    cfg = config_from_dict(raw, root)
    t0 = time.perf_counter()
    runner = StudyRunner(cfg)
    open_s = time.perf_counter() - t0
    study = run_study(cfg, progress=False, runner=runner)
    wall = time.perf_counter() - t0
    timings = study_status(str(root / "bench.db"))["timings"]
    result = runner.evaluator.evaluate()
    decided: dict[str, int] = {}
    for recs in result.records.values():
        for r in recs:
            decided[r.get("decided_by", "?")] = decided.get(r.get("decided_by", "?"), 0) + 1
    one_pass_same = one_pass_vs_generation(runner.evaluator, result)
    floor_s = optuna_window_s(str(root / "bench.db"), records.search_trials(study))
    read_s = read_checkpoints_s([base, *experts], device)
    fit = fit_row(runner, device)
    n_trials_done = len(records.search_trials(study))
    del runner, study
    free(device)
    return {"n_params": n_params, "open_s": open_s, "wall_s": wall, "timings": timings, "decided_by": decided,
            "one_pass_same": one_pass_same, "read_s": read_s, "trials": n_trials_done, "fit": fit,
            "optuna_floor_s": floor_s}


def one_pass_vs_generation(evaluator, result) -> list[int]:
    """[same, n]: of the examples one pass decided (bf16 tie guard, `_scoring.TIE_EPS_16BIT`), how many
    generation decides alike (the same model and tasks, every example generated)."""
    from mergesearch.evaluate import Evaluator

    slow = Evaluator(evaluator.model, evaluator.tokenizer, evaluator.tasks, batch_size=evaluator.batch_size,
                     shortcut=False).evaluate()
    same = n = 0
    for name, recs in result.records.items():
        gen = {r["id"]: r["exact_match"] for r in slow.records[name]}
        for r in recs:
            if r.get("decided_by") == "one-pass":
                n += 1
                same += r["exact_match"] == gen[r["id"]]
    return [same, n]


def optuna_window_s(db: str, trials: list) -> float:
    """Optuna's own time inside a trial's window (start to complete, the window `other_s` is measured in) for
    trials with the same parameters on the same storage: the median over a probe study of as many trials whose
    objective only suggests them (random sampler, as the study's; the storage's heartbeat). Measured back to
    back, hot: if anything below Optuna's cost inside a real study, so what mergesearch adds is not understated."""
    import optuna
    from bench_study import suggest_as

    from mergesearch.study.storage import open_storage

    storage = open_storage(f"sqlite:///{db}")
    probe = optuna.create_study(storage=storage, study_name="probe", sampler=optuna.samplers.RandomSampler(seed=0),
                                direction="maximize")
    dists = trials[-1].distributions

    def objective(trial):
        for name, dist in dists.items():
            suggest_as(trial, name, dist)
        return 0.0

    probe.optimize(objective, n_trials=max(10, len(trials)), gc_after_trial=False)
    return statistics.median(t.duration.total_seconds() for t in probe.trials)


def fit_row(runner, device: torch.device, steps: tuple[int, int] = (2, 6)) -> dict:
    """Seconds per gradient-fit step at this size (the difference of two fits, so set-up cancels) against
    forward + backward of the model on a batch of the same shape, plus one merge."""
    from mergesearch.fit import CoefficientFitter, FitOptions, split_calib
    from mergesearch.config import SpaceConfig
    from mergesearch.plan import Plan
    from mergesearch.study.workbench import build_space

    mat, tok = runner.mat, runner.tokenizer
    train, val = zip(*[split_calib(t, 0.25, 0) for t in runner.calib_tasks])
    fitter = CoefficientFitter(mat, tok, list(train), list(val))
    space = build_space(runner.cfg, mat.base, mat.experts,
                        SpaceConfig(granularity="per_layer", parameters={"lambda": {"fixed": 1.0},
                                                                         "weight": {"low": 0.0, "high": 1.5}}))
    plan = Plan.full("task_arithmetic", mat.tensors, len(mat.experts), chunks=mat.chunks, weight=0.7)
    def fit_s(n: int) -> float:
        opts = FitOptions(steps=n, eval_every=10 ** 6, patience=10 ** 6)
        sync(device)
        t0 = time.perf_counter()
        fitter.fit(plan, space, opts)
        sync(device)
        return time.perf_counter() - t0

    # A first fit warms the kernels and allocator up: without it the short fit paid for them and the
    # difference came out negative (-534 ms on an H200). Best of two per length.
    fit_s(steps[0])
    secs = [min(fit_s(n), fit_s(n)) for n in steps]
    step_s = (secs[1] - secs[0]) / (steps[1] - steps[0])
    # the same model, a batch of the fit's shape: batch_size rows of the longest prompt + answer
    batch = FitOptions().batch_size
    length = max(len(tok(e.prompt + e.answers[0])["input_ids"]) for t in train for e in t.examples)
    ids = torch.randint(4, len(tok), (batch, length), device=device)
    model = mat.model
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)

    def fb() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        for p in params:
            p.grad = None

    fb_s = timed(fb, device, 3)
    for p in params:
        p.requires_grad_(False)
    merge_s = timed(lambda: mat.materialize(plan), device, 3)
    return {"step_s": step_s, "fb_s": fb_s, "merge_s": merge_s, "ratio": step_s / (fb_s + merge_s),
            "batch": batch, "length": length}


def print_study(st: dict) -> None:
    t = st["timings"]
    print(f"\n4. study: random Llama {st['n_params'] / 1e6:.0f}M, 3 experts, bf16, per-layer task arithmetic, "
          f"{st['trials']} trials: {st['wall_s']:.1f} s in all")
    print(f"   opening {st['open_s']:.1f} s vs reading the checkpoints from the page cache {st['read_s']:.1f} s")
    for line in [*(f"   {k}: {v:.2f} s" for k, v in t["opening"].items())]:
        print(line)
    b, tr = t["baselines"], t["trials"]
    print(f"   baselines: {b['n']} x {b['each_s'] or 0:.2f} s (median), {b['total_s']:.1f} s")
    print(f"   per trial (median): merge {tr['merge_s'] or 0:.3f} s, evaluation {tr['eval_s'] or 0:.3f} s, "
          f"other {tr['other_s'] or 0:.3f} s")
    n = sum(st["decided_by"].values())
    print(f"   evaluator decided_by over {n} prompts: "
          + ", ".join(f"{k} {v}" for k, v in sorted(st["decided_by"].items())))
    same, n_one = st["one_pass_same"]
    print(f"   one-pass decisions equal to generation's (every example generated): {same}/{n_one}")
    f = st["fit"]
    print(f"\n5. fit step: {f['step_s'] * 1e3:.0f} ms vs forward + backward {f['fb_s'] * 1e3:.0f} ms "
          f"(batch {f['batch']} x {f['length']} tokens) + merge {f['merge_s'] * 1e3:.0f} ms: {f['ratio']:.2f}x")


# --- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N; cpu only to smoke-test this script")
    ap.add_argument("--size", choices=sorted(SIZES), default="gpu", help="model of the merge table")
    ap.add_argument("--study-size", choices=sorted(STUDY_SIZES), default=None,
                    help="model of the study and fit (default: 1b on CUDA, tiny for a CPU smoke run)")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median)")
    ap.add_argument("--examples", type=int, default=512, help="prompts of the evaluator benchmark")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per task of the study (default: 128; CPU 8)")
    ap.add_argument("--trials", type=int, default=None, help="searched trials of the study (default: 10; CPU 1)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS), help="methods of the merge table")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: merge, eval, study")
    ap.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: needs a CUDA device and this machine has none (torch {torch.__version__}, "
              "torch.cuda.is_available() is False): nothing measured", file=sys.stderr)
        return NO_DEVICE
    smoke = device.type == "cpu"  # the targets are a GPU's: on a CPU the script only shows it runs
    args.study_size = args.study_size or ("tiny" if smoke else "1b")
    args.prompts = args.prompts or (8 if smoke else 128)
    args.trials = args.trials or (1 if smoke else 10)
    skip = set(filter(None, args.skip.split(",")))
    logging.disable(logging.WARNING)
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    checks = Checks()
    out: dict = {"device": name, "torch": torch.__version__}

    def save() -> None:  # after every section: a run cut short by its time limit keeps what it measured
        if args.json:
            atomic_write(args.json, json.dumps(out, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = Path(tmp)
        if not args.skip_tests:
            with section(checks, "gpu tests"):
                tests_section(checks, out, folder, t_start)
            save()
        if "merge" not in skip:
            with section(checks, "merge table"):
                merge_section(checks, out, folder, device, args)
            save()
        if "eval" not in skip:
            with section(checks, "evaluator vs generate"):
                eval_section(checks, out, folder, device, args)
            save()
        if "study" not in skip:
            with section(checks, "1B study and fit step"):
                study_section(checks, out, folder, device, args)

    total = time.perf_counter() - t_start
    out["total_s"] = total
    out["compile_failures"] = compile_failures(checks)
    save()
    print()
    checks.check(f"whole script {total:.0f} s (budget {BUDGET_S:.0f} s)", total <= BUDGET_S)
    return checks.finish()


@contextlib.contextmanager
def section(checks: Checks, name: str):
    """A section that crashes is a MISS with its error, and the sections after it still run."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others' numbers
        traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        checks.check(f"{name}: crashed ({type(exc).__name__}: {first})", False)
    finally:
        free(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def compile_failures(checks: Checks) -> list[str]:
    """The compiled formulas that failed in this process and fell back to the eager kernel (operators/fused.py
    logs each once, and this script silences warnings): on a GPU each is a Triton failure to fix, a MISS."""
    from mergesearch.operators import fused

    def name(part) -> str:  # a sparsifier by its class, the rest (kind, flags, dtype, device type) as it prints
        return str(part) if isinstance(part, (str, bool, int, torch.dtype)) else type(part).__name__.strip("_")

    broken = sorted(" ".join(map(name, sig)) for sig in fused._BROKEN)
    checks.check(f"compiled formulas that fell back to the eager kernel: {len(broken)}"
                 + (f" ({'; '.join(broken)})" if broken else "") + " (target: none)", not broken)
    return broken


def tests_section(checks: Checks, out: dict, folder: Path, t_start: float) -> None:
    counts, tail = run_gpu_tests(folder)
    out["gpu_tests"] = counts
    print(f"\n1. gpu tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
          f"({time.perf_counter() - t_start:.0f} s)", flush=True)
    if not checks.check(f"gpu tests: {counts['passed']} passed, {counts['failed']} failed, "
                        f"{counts['skipped']} skipped (target: all passed, none skipped)",
                        counts["passed"] and not counts["failed"] and not counts["skipped"]):
        print(tail)


def merge_section(checks: Checks, out: dict, folder: Path, device: torch.device, args) -> None:
    mdir = folder / "merge"
    mdir.mkdir()
    base, experts, n_params = make_models(mdir, SIZES[args.size], device)
    rows = merge_rows(base, experts, n_params, device, args.repeat, methods=args.methods.split(","))
    out["merge"] = rows
    print_merge_table(rows, n_params, len(experts))
    check_merge(checks, rows)


def eval_section(checks: Checks, out: dict, folder: Path, device: torch.device, args) -> None:
    ev = eval_row(folder, device, args.examples, args.batch_size, max(3, args.repeat // 2))
    out["eval"] = ev
    print(f"\n3. evaluator: {ev['n']} exact-match prompts, batch {args.batch_size}: ours "
          f"{ev['ours_s'] * 1e3:.0f} ms, HF generate {ev['generate_s'] * 1e3:.0f} ms: {ev['speedup']:.1f}x; "
          f"same decision on {ev['same']}/{ev['n']} ({ev['hits']:.0f} hits)", flush=True)
    checks.check(f"evaluator and generate decide {ev['same']}/{ev['n']} examples alike (target: all)",
                 ev["same"] == ev["n"])
    checks.check(f"evaluator {ev['speedup']:.1f}x generate (target >= {TARGETS['eval_vs_generate']}x)",
                 ev["speedup"] >= TARGETS["eval_vs_generate"])


def study_section(checks: Checks, out: dict, folder: Path, device: torch.device, args) -> None:
    st = study_row(folder, args.study_size, device, args.prompts, args.trials)
    out["study"] = st
    print_study(st)
    checks.check(f"study opening {st['open_s']:.1f} s = {st['open_s'] / st['read_s']:.1f}x reading its "
                 f"checkpoints from the page cache (target <= {TARGETS['open_vs_read']:g}x)",
                 st["open_s"] <= TARGETS["open_vs_read"] * st["read_s"])
    tr = st["timings"]["trials"]
    if tr["other_s"] is None:  # no trial stored its durations: nothing was measured, which is not a pass
        checks.check("mergesearch's time per trial beyond Optuna's own: no trial durations stored", False)
    else:
        trial_s = tr["merge_s"] + tr["eval_s"] + tr["other_s"]
        added = tr["other_s"] - st["optuna_floor_s"]
        checks.check(f"mergesearch adds {added * 1e3:.1f} ms per trial beyond Optuna's own "
                     f"{st['optuna_floor_s'] * 1e3:.1f} ms = {100 * added / trial_s:.2f}% of a {trial_s:.2f} s trial "
                     f"(target <= {TARGETS['added_share']:.0%})", added <= TARGETS["added_share"] * trial_s)
    same, n_one = st["one_pass_same"]
    checks.check(f"bf16: one-pass decisions equal generation's on {same}/{n_one} (target: all)", same == n_one)
    checks.check(f"fit step {st['fit']['ratio']:.2f}x forward + backward + one merge "
                 f"(target <= {TARGETS['fit_vs_fb']:g}x; a step that measures <= 0 is a failed measurement)",
                 0 < st["fit"]["ratio"] <= TARGETS["fit_vs_fb"])


if __name__ == "__main__":
    sys.exit(main())
