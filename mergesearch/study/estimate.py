"""A rough time per trial from this machine's measured copy bandwidth and matmul speed (for `validate`).

A micro-benchmark of a few milliseconds: three in-place adds over 64 MiB and five 512x512 matmuls on
the device the study would use; a trial's merge is priced as (experts + 2) passes over the weights,
its evaluation as two flops per parameter and token, and a fitted trial's fit as its steps, each a forward
and backward pass over one batch (six flops per parameter and token) plus one merge.
"""

from __future__ import annotations

import time


def estimate_trial_seconds(n_params: int, n_experts: int, dtype: str, n_examples: int,
                           tokens_per_example: int = 48, fit_steps: int = 0, fit_batch: int = 0) -> dict:
    """A rough time per trial from this machine's measured copy bandwidth and matmul speed. `fit_steps`,
    `fit_batch`: a fitted study's most steps per trial and its batch (`fit_s` is 0 without them)."""
    import torch

    from mergesearch.checkpoints import parse_dtype, resolve_device

    dev = resolve_device("auto")
    size = torch.finfo(parse_dtype(dtype)).bits // 8
    a = torch.empty(1 << 24, device=dev)
    b = torch.empty_like(a)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.add(a, b, out=a)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bw = 3 * 3 * a.numel() * 4 / (time.perf_counter() - t0)
    m = torch.randn(512, 512, device=dev)
    t0 = time.perf_counter()
    for _ in range(5):
        m @ m
    if dev.type == "cuda":
        torch.cuda.synchronize()
    flops = 5 * 2 * 512 ** 3 / (time.perf_counter() - t0)
    merge_s = (n_experts + 2) * n_params * size / bw
    eval_s = 2 * n_params * n_examples * tokens_per_example / flops
    fit_s = fit_steps * (6 * n_params * fit_batch * tokens_per_example / flops + merge_s)
    return {"merge_s": merge_s, "eval_s": eval_s, "fit_s": fit_s, "total_s": merge_s + eval_s + fit_s,
            "note": "estimate from this machine's add bandwidth and 512x512 matmul speed"}
