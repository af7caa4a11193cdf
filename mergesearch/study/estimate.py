"""A rough time per trial from this machine's measured copy bandwidth and matmul speed (for `validate`).

A micro-benchmark of a few milliseconds: three in-place adds over 64 MiB and five 512x512 matmuls on
the device the study would use; a trial's merge is priced as (experts + 2) passes over the weights,
its evaluation as two flops per parameter and token, and a fitted trial's fit as its steps, each a forward
and backward pass over one batch (six flops per parameter and token) plus one merge.
"""

from __future__ import annotations

import time


def estimate_trial_seconds(n_params: int, n_experts: int, dtype: str, n_examples: int,
                           tokens_per_example: int = 48, fit_steps: int = 0, fit_batch: int = 0,
                           device: str = "auto") -> dict:
    """A rough time per trial from the study device's measured copy bandwidth and matmul speed. `fit_steps`,
    `fit_batch`: a fitted study's most steps per trial and its batch (`fit_s` is 0 without them)."""
    import torch

    from mergesearch.checkpoints import parse_dtype, resolve_device
    from mergesearch.errors import CheckpointError

    try:
        dev = resolve_device(device)
    except CheckpointError:  # validating on another machine than the study's: this machine's default device
        dev = resolve_device("auto")
    size = torch.finfo(parse_dtype(dtype)).bits // 8
    a = torch.empty(1 << 24, device=dev)
    b = torch.empty_like(a)
    m = torch.randn(512, 512, device=dev)
    # one untimed call of each first: on CUDA the first add loads its kernel and the first matmul starts
    # cuBLAS, each far longer than the calls timed
    torch.add(a, b, out=a)
    m @ m
    bw = 3 * 3 * a.numel() * 4 / _seconds(lambda: torch.add(a, b, out=a), 3, dev)
    flops = 5 * 2 * 512 ** 3 / _seconds(lambda: m @ m, 5, dev)
    merge_s = (n_experts + 2) * n_params * size / bw
    eval_s = 2 * n_params * n_examples * tokens_per_example / flops
    fit_s = fit_steps * (6 * n_params * fit_batch * tokens_per_example / flops + merge_s)
    return {"merge_s": merge_s, "eval_s": eval_s, "fit_s": fit_s, "total_s": merge_s + eval_s + fit_s,
            "note": "estimate from this machine's add bandwidth and 512x512 matmul speed"}


def _seconds(fn, times: int, dev) -> float:
    """Wall seconds of `times` calls of `fn` on `dev`, its queued work finished before and after."""
    import torch

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(times):
        fn()
    sync()
    return time.perf_counter() - t0
