"""A rough time per trial from this machine's measured copy bandwidth and matmul speed (for `validate`).

A micro-benchmark of a few milliseconds: three in-place adds over 64 MiB and five 512x512 matmuls on
the device the study would use; a trial's merge is priced as (experts + 2) passes over the weights,
its evaluation as two flops per parameter and token.
"""

from __future__ import annotations

import time


def estimate_trial_seconds(n_params: int, n_experts: int, dtype: str, n_examples: int,
                           tokens_per_example: int = 48) -> dict:
    """A rough time per trial from this machine's measured copy bandwidth and matmul speed."""
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
    return {"merge_s": merge_s, "eval_s": eval_s, "total_s": merge_s + eval_s,
            "note": "estimate from this machine's add bandwidth and 512x512 matmul speed"}
