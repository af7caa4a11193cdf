"""Benchmark: the cost of one coefficient-fit step, and the memory a fit holds.

For the demo zoo (4 experts, 0.7M parameters) and a 134M-parameter Llama with 3 experts (random
weights, bench_merge's shape, scored on the demo zoo's prompts), in the same run:

  fwd+bwd s   forward + backward of the fit's batch through the plain model (parameter gradients on)
  merge s     one task-arithmetic candidate written by the Materializer
  step s      one fit step: forward, backward with the gradient contracted per parameter in a hook,
              coefficient update, weights rewritten (median of --steps)
  ratio       step / (fwd+bwd + merge)          target <= 1.5

and, for the 134M model, the peak memory of a process (the VmHWM of /proc after loading, with glibc told
to map every large block so that a freed tensor leaves the resident set; max_memory_allocated on CUDA)
that runs a few fit steps, against processes that hold the same model + sources and run the same batches
(a) forward only, keeping the graph a backward needs (model + sources + one batch's activations: the
floor of any fit) and (b) forward and backward keeping every parameter gradient (an ordinary backward).
The fit may add one parameter's gradient at a time to the floor.

Per-task step times and peaks are noisy on a shared machine: read the ratios. Each target prints an `ok`
or `MISS` line; exit code 1 on a MISS.

    .venv/bin/python benchmarks/bench_fit.py              # demo zoo (seed 0, built if needed) + 134M
    .venv/bin/python benchmarks/bench_fit.py --quick      # a 30M model instead of 134M
"""

from __future__ import annotations

import argparse
import json
import os
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _checks import Checks  # noqa: E402

TARGET_RATIO = 1.5  # fit step / (fwd+bwd + merge), at most, per model
MEMORY_SLACK_MIB = 64  # fit peak - floor, at most: one gradient of the largest tensor + this


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _setup(base, experts, zoo, *, granularity: str, chunks: int, batch: int, dtype: str = "float32"):
    from transformers import AutoTokenizer

    from mergesearch.checkpoints import open_checkpoint
    from mergesearch.config import SpaceConfig
    from mergesearch.evaluate import load_task
    from mergesearch.fit import CoefficientFitter, FitOptions, split_calib
    from mergesearch.materializer import Materializer
    from mergesearch.plan import Plan
    from mergesearch.space import SearchSpace
    from mergesearch.zoo import load_manifest

    m = load_manifest(zoo)
    b = open_checkpoint(base)
    tensors = [t for t in b.tensors.values() if t.dtype.is_floating_point]
    names = [f"e{i}" for i in range(len(experts))]
    sc = SpaceConfig(granularity=granularity, chunks=chunks, parameters={"lambda": {"fixed": 1.0},
                                                                        "weight": {"low": 0.0, "high": 1.5}})
    space = SearchSpace(sc, "task_arithmetic", tensors, names, b.num_layers)
    mat = Materializer(base, experts, "task_arithmetic", dtype=dtype, chunks=space.want_chunks)
    tasks = [load_task(str(zoo / m["data"][s]["calib"]), name=s, limit=64, seed=0) for s in m["skills"]]
    train, val = zip(*[split_calib(t, 0.25, 0) for t in tasks])
    fitter = CoefficientFitter(mat, AutoTokenizer.from_pretrained(zoo / m["base"]), train, val)
    plan = Plan.full("task_arithmetic", mat.tensors, len(experts), chunks=mat.chunks, weight=0.7,
                     **{"lambda": 1.0})
    return fitter, space, mat, plan, FitOptions(batch_size=batch)


def time_steps(base, experts, zoo, *, steps: int, batch: int, label: str) -> dict:
    """Same-run times of fwd+bwd, one merge and one fit step on the fit's own batches."""
    from mergesearch.fit import BalancedSampler

    fitter, space, mat, plan, opts = _setup(base, experts, zoo, granularity="per_tensor", chunks=4, batch=batch)
    train, _ = fitter.sequences("supervised")
    weights = {s.task: 1.0 for s in train}
    sampler = BalancedSampler(train, opts.batch_size, torch.Generator().manual_seed(0))
    batches = [sampler.next() for _ in range(steps + 1)]
    dev = mat.device
    params = [p for p in mat.model.parameters()]
    fb, mg, st = [], [], []
    theta = torch.full((space.n_params,), 0.7)
    for k, b in enumerate(batches):
        # plain forward + backward, every parameter's gradient kept (as an ordinary training step)
        for p in params:
            p.requires_grad_(True)
        _sync(dev)
        t0 = time.perf_counter()
        loss = fitter.loss(b, weights, opts, train=True)
        loss.backward()
        _sync(dev)
        t1 = time.perf_counter()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        mat.materialize(plan)
        _sync(dev)
        t2 = time.perf_counter()
        with fitter.session(plan, space) as sess:
            sess.write(theta)
            _sync(dev)
            t3 = time.perf_counter()
            _, g = sess.grad(b, weights, opts)
            theta = (theta - 1e-3 * g.sign().float()).clamp(0, 1.5)  # the update is negligible next to the rest
            sess.write(theta)
            _sync(dev)
            t4 = time.perf_counter()
        if k:  # the first round warms up allocators and kernels
            fb.append(t1 - t0)
            mg.append(t2 - t1)
            st.append(t4 - t3)
    out = {"model": label, "n_coef": space.n_params, "batch": batch, "fwd_bwd_s": statistics.median(fb),
           "merge_s": statistics.median(mg), "step_s": statistics.median(st)}
    out["ratio"] = out["step_s"] / (out["fwd_bwd_s"] + out["merge_s"])
    return out


def child_memory(mode: str, base: str, experts: list[str], zoo: str, batch: int) -> dict:
    """Peak memory of one process after loading: `forward` (3 batches forward with the graph a backward
    needs: model + sources + one batch's activations, the floor of any fit), `grads` (forward and backward,
    every parameter gradient kept) or `fit` (3 fit steps on the same batches)."""
    fitter, space, mat, plan, opts = _setup(Path(base), [Path(e) for e in experts], Path(zoo),
                                            granularity="per_tensor", chunks=4, batch=batch)
    from mergesearch.fit import BalancedSampler

    train, _ = fitter.sequences("supervised")
    weights = {s.task: 1.0 for s in train}
    sampler = BalancedSampler(train, opts.batch_size, torch.Generator().manual_seed(0))
    dev = mat.device
    mat.materialize(plan)  # the model's pages are resident in every mode (an unwritten model is not)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM): loading is not measured
    if mode == "fit":
        with fitter.session(plan, space) as sess:
            theta = torch.full((space.n_params,), 0.7)
            for _ in range(3):
                sess.write(theta)
                sess.grad(sampler.next(), weights, opts)
    else:
        for p in mat.model.parameters():
            p.requires_grad_(True)
        for _ in range(3):
            for p in mat.model.parameters():
                p.grad = None
            loss = fitter.loss(sampler.next(), weights, opts, train=True)  # the graph holds the activations
            if mode == "grads":
                loss.backward()
            del loss
    _sync(dev)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        peak = int(hwm.split()[1]) * 1024
    largest = max(p.numel() * p.element_size() for p in mat.model.parameters())
    return {"mode": mode, "peak_bytes": peak, "largest_param_bytes": largest, "device": str(dev)}


def make_big(root: Path, quick: bool) -> tuple[Path, list[Path], int]:
    from bench_merge import make_models

    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(root / "base")
        experts = []
        for i in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            model.save_pretrained(root / f"expert{i}")
            experts.append(root / f"expert{i}")
        return root / "base", experts, sum(p.numel() for p in model.parameters())
    return make_models(root, quick=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 30M model instead of the 134M one")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (median)")
    ap.add_argument("--batch", type=int, default=16, help="examples per step on the big model (demo zoo: 64)")
    ap.add_argument("--zoo-root", type=Path, default=ROOT / "zoo")
    ap.add_argument("--memory-only", action="store_true", help="skip the step timings")
    ap.add_argument("--zoo", type=Path, default=None, help="a prebuilt demo zoo folder (default: seed 0, built if needed)")
    ap.add_argument("--child", nargs=5, metavar=("MODE", "BASE", "EXPERTS", "ZOO", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, base, experts, zoo, batch = args.child
        print(json.dumps(child_memory(mode, base, experts.split(","), zoo, int(batch))))
        return 0

    from mergesearch.zoo import get_zoo, load_manifest

    zoo = args.zoo or get_zoo(args.zoo_root, "demo", seed=0, progress=False)
    m = load_manifest(zoo)
    rows = []
    if not args.memory_only:
        rows.append(time_steps(zoo / m["base"], [zoo / m["experts"][s] for s in m["skills"]], zoo, steps=args.steps,
                               batch=64, label="demo zoo (0.7M, 4 experts)"))
        print(json.dumps(rows[-1]), flush=True)
    mem = {}
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        base, experts, n = make_big(Path(tmp), args.quick)
        label = f"Llama {n / 1e6:.0f}M, 3 experts"
        if not args.memory_only:
            rows.append(time_steps(base, experts, zoo, steps=args.steps, batch=args.batch, label=label))
            print(json.dumps(rows[-1]), flush=True)
        # every block of 64 KiB or more mmap'ed: freed tensors leave the resident set at once
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        for mode in ("forward", "grads", "fit"):
            cmd = [sys.executable, __file__, "--child", mode, str(base), ",".join(map(str, experts)), str(zoo),
                   str(args.batch)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            mem[mode], largest = got["peak_bytes"], got["largest_param_bytes"]
        model_bytes = n * 4

    print(f"\nfit step vs the same run's forward+backward and one merge (per_tensor x 4 chunks, task arithmetic)")
    print(f"{'model':<28} {'coef':>6} {'batch':>5} {'fwd+bwd s':>10} {'merge s':>8} {'step s':>8} {'ratio':>6}")
    checks = Checks()
    for r in rows:
        print(f"{r['model']:<28} {r['n_coef']:>6} {r['batch']:>5} {r['fwd_bwd_s']:>10.3f} {r['merge_s']:>8.3f} "
              f"{r['step_s']:>8.3f} {r['ratio']:>6.2f}")
        checks.check(f"{r['model']}: fit step {r['ratio']:.2f}x fwd+bwd + merge (target <= {TARGET_RATIO:g})",
                     r["ratio"] <= TARGET_RATIO)
    gib, mib = 1 << 30, 1 << 20
    floor = mem["forward"]
    print(f"\npeak memory, {label} (model {model_bytes / gib:.2f} GiB in fp32, largest tensor {largest / mib:.0f} MiB):")
    print(f"  floor: model + sources + one batch's activations (forward)   {floor / gib:6.2f} GiB")
    print(f"  ordinary backward, every parameter gradient kept             {mem['grads'] / gib:6.2f} GiB")
    print(f"  fit (gradients contracted in hooks and freed)                {mem['fit'] / gib:6.2f} GiB")
    extra = mem["fit"] - floor
    print(f"  fit vs ordinary backward: {(mem['fit'] - mem['grads']) / mib:+.0f} MiB\n")
    checks.check(f"{label}: fit - floor = {extra / mib:.0f} MiB (target <= one gradient of the largest tensor, "
                 f"{largest / mib:.0f} MiB, + {MEMORY_SLACK_MIB} MiB)", extra <= largest + MEMORY_SLACK_MIB * mib)
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
