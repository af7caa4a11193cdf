"""Benchmark: time to materialise one merge candidate, against memory bandwidth and mergekit.

A Llama-shaped model (>= 100M parameters) and 3 experts with random weights are made on the
fly and written to a temporary folder. For each dtype and method the table gives

  ms/cand     time to write one candidate into the preallocated model (median of --repeat)
  GB/s        bytes the merge must touch, (experts + 2) x model size, divided by that time
  add GB/s    same-run streaming bandwidth of torch.add(a, b, out=c) over the same bytes
  vs add      GB/s / add GB/s  (target: >= 0.60 for linear and task_arithmetic in fp32)
  vs TA       ms/cand / task_arithmetic's ms/cand, a task-arithmetic candidate timed between each of the
              method's (slerp: the task_arithmetic row's); target: <= 3 for every method, in each dtype
  prep s      one-off set-up (load sources, task vectors, sorted magnitudes, random fields),
              shared by the methods that need the same precomputation (listed after the first)
  eager ms    where the task-arithmetic family runs its compiled formula (operators/fused.py: float32, a
              model of >= COMPILED_MIN_MODEL entries; MERGESEARCH_FUSED=0/1 forces it off/on), the eager
              block kernel's time for the same candidate, interleaved with the compiled one's
  x eager     eager ms / ms/cand (target: >= 1/1.10, i.e. the compiled path is never slower)
  chunks ms   where the candidate's compiled chunks ran in one call (mergesearch.groups), the same formula's time
              chunk by chunk, interleaved (MERGESEARCH_GROUPED=0 turns the group off)
  x chunks    chunks ms / ms/cand (target: >= 1/1.10)
  first s     the first candidate (with the compiled path: the compile, ~1-3 s per formula, more on a
              cold cache)

and, for fp32, the time of mergekit-yaml (CLI, subprocess) and of mergekit's in-process
run_merge for the same recipe, with our speed-up (targets: >= 20x and >= 5x).

Timings are noisy on a shared machine: read the ratios, which compare numbers taken in the
same run. Each target the run measured prints an `ok` or `MISS` line; exit code 1 on a MISS. Usage:

    .venv/bin/python benchmarks/bench_merge.py            # 134M Llama: all methods fp32, 4 in bf16
    .venv/bin/python benchmarks/bench_merge.py --quick    # small model, 3 methods, no bf16
    .venv/bin/python benchmarks/bench_merge.py --no-mergekit --methods ties,della
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from _checks import Checks

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ADD_SHARE_TARGET = 0.60  # GB/s / same-run torch.add GB/s, at least, in fp32 ...
ADD_SHARE_METHODS = ("linear", "task_arithmetic")  # ... for these methods
VS_TA_TARGET = 3.0  # ms/cand / task_arithmetic's ms/cand, at most, in each dtype ...
VS_TA_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
                 "della_linear", "slerp", "model_stock")  # ... for every method (issue 18)
VS_EAGER_TARGET = 1.10  # compiled s / eager s, at most, same run (the eager kernel was the path before issue 18)
CLI_SPEEDUP_TARGET = 20.0  # mergekit-yaml s / our s per candidate, at least (fp32)
RUN_MERGE_SPEEDUP_TARGET = 5.0  # mergekit's in-process run_merge s / our s, at least (fp32)

ALL_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "slerp", "model_stock")
QUICK_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")

# Parameters of the benchmark candidate, per method (the same recipe for mergekit).
MODEL_PARAMS = {
    "linear": {"weight": [0.5, 0.3, 0.2]},
    "task_arithmetic": {"weight": [0.5, 0.3, 0.2]},
    "ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3]},
    "dare_linear": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3]},
    "dare_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3]},
    "breadcrumbs": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3], "gamma": [0.01, 0.01, 0.01]},
    "breadcrumbs_ties": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3], "gamma": [0.01, 0.01, 0.01]},
    "della": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3], "epsilon": [0.1, 0.1, 0.1]},
    "della_linear": {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.3], "epsilon": [0.1, 0.1, 0.1]},
    "slerp": {},
    "model_stock": {},
}
SHARED_PARAMS = {"slerp": {"t": 0.4}}


def make_models(root: Path, *, quick: bool, n_experts: int = 3) -> tuple[Path, list[Path], int]:
    """A random Llama-shaped base and experts (base + small noise) as safetensors folders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        cfg = LlamaConfig(vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False)
    else:  # 134M parameters
        cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    base = root / "base"
    model.save_pretrained(base)
    experts = []
    for i in range(n_experts):
        with torch.no_grad():
            state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
        ex = LlamaForCausalLM(cfg)
        ex.load_state_dict(state)
        path = root / f"expert{i}"
        ex.save_pretrained(path)
        experts.append(path)
        del ex, state
    del model
    gc.collect()
    return base, experts, n_params


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def add_bandwidth(numel: int, dtype: torch.dtype, repeat: int) -> float:
    """GB/s of torch.add(a, b, out=c) streaming `numel` elements per operand (3 operands touched)."""
    a, b, c = (torch.randn(numel).to(dtype) for _ in range(3))
    torch.add(a, b, out=c)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        times.append(time.perf_counter() - t0)
    del a, b, c
    return 3 * numel * torch.finfo(dtype).bits / 8 / statistics.median(times) / 1e9


def mergekit_recipe(method: str, base: Path, experts: Sequence[Path], dtype: str) -> dict:
    mp = MODEL_PARAMS[method]
    models = [{"model": str(e), "parameters": {k: v[i] for k, v in mp.items()}} for i, e in enumerate(experts)]
    if method == "slerp":
        models = [{"model": str(base)}, {"model": str(experts[0])}]
    recipe = {"merge_method": method, "models": models, "dtype": dtype}
    if method != "linear":
        recipe["base_model"] = str(base)
    if method in SHARED_PARAMS:
        recipe["parameters"] = SHARED_PARAMS[method]
    return recipe


class _Materializers:
    """One Materializer per precomputation: methods that share a `prepare` share its state."""

    def __init__(self, base: Path, experts: Sequence[Path], dtype: str):
        self.base, self.experts, self.dtype = base, experts, dtype
        self.key = None
        self.m = None

    def get(self, method: str):
        from mergesearch import operators
        from mergesearch.materializer import Materializer

        op = operators.get(method)
        key = (op.prepare, method == "slerp")
        prep = 0.0
        if key != self.key:
            self.m = None
            gc.collect()
            t0 = time.perf_counter()
            exps = self.experts[:1] if method == "slerp" else self.experts
            self.m = Materializer(self.base, exps, method, dtype=self.dtype, device="cpu")
            prep = time.perf_counter() - t0
            self.key = key
        return self.m, prep


def time_ours(mats: _Materializers, method: str, repeat: int, budget_s: float = 8.0,
              pair_ta: bool = False) -> tuple[float, float, float | None, float, float | None, float | None]:
    """(median s per candidate, prep s, the eager kernel's median s or None, the first candidate's s, task
    arithmetic's median s interleaved with this method's candidates or None, the compiled formula's median s
    chunk by chunk where the candidate ran in one call (mergesearch.groups), or None).

    Where the materialiser's policy merges this method with the compiled formula (operators/fused.py: float32
    chunks of large models), the eager kernel is timed too, interleaved candidate by candidate with the
    compiled one so that both see the same machine load; the first candidate's time includes the compile.
    `pair_ta`: a task-arithmetic candidate (a method without precomputation runs on any materialiser) is timed
    between each of this method's, so that "vs TA" compares times taken at the same moments: on a shared
    machine the load drifts by more than 20% between one method's row and the next."""
    from mergesearch.operators import fused
    from mergesearch.recipe import recipe_from_dict

    m, prep = mats.get(method)
    recipe = recipe_from_dict(mergekit_recipe(method, mats.base, mats.experts, mats.dtype))
    plan = recipe.to_plan(m.tensors, m.num_layers)
    policy = m.scratch.compiled_min
    before = fused.calls.copy()
    t0 = time.perf_counter()
    m.materialize(plan)  # warm-up: grows scratch buffers, compiles the formula
    first = time.perf_counter() - t0
    ran = fused.calls - before
    both = bool(ran)  # the policy ran the compiled formula: time the eager one too
    times: dict[object, list[float]] = {policy: [], None: [], "ta": [], "chunks": []}
    paths: list[object] = [policy, None] if both else [policy]
    if any(k[0].startswith("group_") for k in ran):  # one call per candidate: the same formula chunk by chunk too
        paths.append("chunks")
        m.grouped = False
        m.materialize(plan)  # its warm-up (the chunks' own graphs)
        m.grouped = True
    plans = {path: plan for path in paths}
    if pair_ta:
        ta = recipe_from_dict(mergekit_recipe("task_arithmetic", mats.base, mats.experts, mats.dtype))
        plans["ta"] = ta.to_plan(m.tensors, m.num_layers)
        m.materialize(plans["ta"])
        paths.append("ta")
    if both:
        m.scratch.compiled_min = None
        m.materialize(plan)  # the eager kernel's warm-up
    while len(times[policy]) < repeat and sum(map(sum, times.values())) < budget_s:  # slow methods: fewer
        for path in paths:
            m.scratch.compiled_min = None if path is None else policy
            m.grouped = path != "chunks"
            t0 = time.perf_counter()
            m.materialize(plans[path])
            times[path].append(time.perf_counter() - t0)
    m.scratch.compiled_min, m.grouped = policy, True
    med = {k: statistics.median(v) if v else None for k, v in times.items()}
    return med[policy], prep, med[None] if both else None, first, med["ta"], med["chunks"]


def time_mergekit(method: str, base: Path, experts: Sequence[Path], root: Path) -> tuple[float, float]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = mergekit_recipe(method, base, experts, "float32")
    out = root / f"mk-{method}"
    t0 = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(cuda=False, copy_tokenizer=False, write_model_card=False, quiet=True))
    inproc = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    yml = root / f"{method}.yaml"
    yml.write_text(yaml.safe_dump(recipe))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    t0 = time.perf_counter()
    subprocess.run([str(exe), str(yml), str(out), "--no-copy-tokenizer", "--quiet"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return cli, inproc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model (~13M), 4 methods, fp32 only")
    ap.add_argument("--all", action="store_true", help="every method in bf16 too (default: 4 in bf16)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit timings")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all; --quick: 4)")
    ap.add_argument("--mergekit-methods", default=",".join(MERGEKIT_METHODS),
                    help="methods to time in mergekit (each takes up to ~2 min on a 134M model)")
    ap.add_argument("--dtypes", default=None, help="comma-separated, default float32,bfloat16 (--quick: float32)")
    ap.add_argument("--repeat", type=int, default=3, help="timed candidates per method (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else ALL_METHODS)
    dtypes = args.dtypes.split(",") if args.dtypes else (["float32"] if args.quick else ["float32", "bfloat16"])
    # mergekit runs in fp32: it is compared with our fp32 time only
    mk_methods = ([] if args.no_mergekit or "float32" not in dtypes
                  else [m for m in args.mergekit_methods.split(",") if m in methods])
    bf16_methods = methods if (args.all or args.methods) else list(QUICK_METHODS)

    checks = Checks()
    root = Path(tempfile.mkdtemp(prefix="bench_merge."))
    try:
        t0 = time.perf_counter()
        base, experts, n_params = make_models(root, quick=args.quick)
        print(f"model: Llama-shaped, {n_params / 1e6:.1f}M parameters, {len(experts)} experts, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads (made in {time.perf_counter() - t0:.0f}s)")
        from mergesearch.operators import registry
        print(f"cpu: {cpu_model()}; inductor's C++ vectors: "
              f"{'512-bit (AVX-512)' if registry.wide_cpu() else '256-bit or narrower'} (ratios depend on both)")
        ours: dict[tuple[str, str], tuple[float, float]] = {}
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            model_bytes = n_params * torch.finfo(dt).bits / 8
            add_bw = add_bandwidth(n_params, dt, max(3, args.repeat))
            print(f"\n{dtype}: model {model_bytes / 1e9:.2f} GB; torch.add(out=) streams {add_bw:.1f} GB/s")
            print(f"{'method':18s} {'ms/cand':>9s} {'GB/s':>7s} {'add GB/s':>9s} {'vs add':>7s} {'vs TA':>6s} "
                  f"{'prep s':>7s} {'eager ms':>9s} {'x eager':>8s} {'chunks ms':>9s} {'x chunks':>8s} {'first s':>8s}")
            mats = _Materializers(base, experts, dtype)
            for method in (methods if dtype == "float32" else [m for m in methods if m in bf16_methods]):
                row = ours.get((dtype, "task_arithmetic"))
                # slerp merges one expert: its materialiser cannot run the 3-expert task arithmetic in between
                paired = method in VS_TA_METHODS and row is not None and method != "slerp"
                sec, prep, eager, first, ta_sec, chunks = time_ours(mats, method, args.repeat, pair_ta=paired)
                ours[(dtype, method)] = (sec, prep)
                n_in = 2 if method == "slerp" else len(experts)
                gbs = (n_in + 2) * model_bytes / sec / 1e9
                ta = (ta_sec,) if ta_sec else row  # task arithmetic timed between this method's candidates
                vs_ta = f"{sec / ta[0]:6.2f}" if ta else f"{'-':>6s}"
                vs_eager = (f"{eager * 1e3:9.1f} {eager / sec:8.2f}" if eager is not None
                            else f"{'-':>9s} {'-':>8s}")
                vs_chunks = (f"{chunks * 1e3:9.1f} {chunks / sec:8.2f}" if chunks is not None
                             else f"{'-':>9s} {'-':>8s}")
                print(f"{method:18s} {sec * 1e3:9.1f} {gbs:7.1f} {add_bw:9.1f} {gbs / add_bw:7.2f} {vs_ta} "
                      f"{prep:7.1f} {vs_eager} {vs_chunks} {first:8.1f}", flush=True)
                if chunks is not None:
                    checks.check(f"{method} {dtype}: one call per candidate takes {sec / chunks:.2f}x the same "
                                 f"formula's time chunk by chunk (target <= {VS_EAGER_TARGET:g})",
                                 sec <= VS_EAGER_TARGET * chunks)
                if eager is not None:
                    checks.check(f"{method} {dtype}: the compiled formula takes {sec / eager:.2f}x the eager "
                                 f"kernel's time (target <= {VS_EAGER_TARGET:g}: nothing slower than before)",
                                 sec <= VS_EAGER_TARGET * eager)
                if dtype == "float32" and method in ADD_SHARE_METHODS:
                    checks.check(f"{method} {dtype}: {gbs / add_bw:.2f} of torch.add bandwidth "
                                 f"(target >= {ADD_SHARE_TARGET:g})", gbs / add_bw >= ADD_SHARE_TARGET)
                if ta and method in VS_TA_METHODS:
                    checks.check(f"{method} {dtype}: {sec / ta[0]:.2f}x task_arithmetic's time per candidate "
                                 f"(target <= {VS_TA_TARGET:g})", sec / ta[0] <= VS_TA_TARGET)
            del mats
            gc.collect()
        if mk_methods:
            print("\nmergekit (fp32, per candidate = one full merge to disk) vs ours (fp32, one candidate in memory)")
            print(f"{'method':18s} {'yaml CLI s':>10s} {'run_merge s':>11s} {'ours s':>8s} {'x CLI':>7s} "
                  f"{'x run_merge':>11s}")
            for method in mk_methods:
                cli, inproc = time_mergekit(method, base, experts, root)
                sec = ours[("float32", method)][0]
                print(f"{method:18s} {cli:10.1f} {inproc:11.1f} {sec:8.3f} {cli / sec:7.0f} {inproc / sec:11.0f}",
                      flush=True)
                checks.check(f"{method} float32: {cli / sec:.0f}x faster than mergekit-yaml "
                             f"(target >= {CLI_SPEEDUP_TARGET:g}x)", cli / sec >= CLI_SPEEDUP_TARGET)
                checks.check(f"{method} float32: {inproc / sec:.0f}x faster than mergekit's run_merge "
                             f"(target >= {RUN_MERGE_SPEEDUP_TARGET:g}x)", inproc / sec >= RUN_MERGE_SPEEDUP_TARGET)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
