"""Model Stock (mergekit's `model_stock`): interpolate toward the experts' average by their angle.

Per tensor chunk, with task vectors d_i (at least two experts): cos = mean over pairs i < j of
<d_i, d_j> / max(|d_i| |d_j|, 1e-6) (clamped to [-1, 1]); t = N cos / (1 + (N - 1) cos), or 0
where the denominator is below 1e-6 in magnitude; out = t * mean_i(expert_i) + (1 - t) * base
= base + t * mean_i(d_i). With `filter_wise`, cos and t are computed per row (dim 0).

Nothing here depends on a candidate's parameters except `filter_wise`, so `prepare` computes
both t's once. Without `filter_wise` the merge is then task arithmetic with every weight t / N (lambda 1), so it
runs task arithmetic's kernels, as `linear` does: every chunk of a candidate in one compiled pass where the
policy compiles (`group`), the eager adds elsewhere; its own adds took 1.4x task arithmetic's time in float32 and
3.4x the compiled bf16 group's (bench_merge, 134M Llama, 3 experts, 2026-12-08, AVX-512).
"""

from __future__ import annotations

import torch

from mergesearch.operators import registry
from mergesearch.operators.registry import Param, is_on, register

FILTER_WISE = Param("filter_wise", 0.0, 1.0, 0.0, "compute the angle per row (output filter) instead of per tensor",
                    kind="bool")


def _t(offsets: list[torch.Tensor]) -> torch.Tensor:
    # offsets: N tensors (rows, cols); returns t per row, shape (rows, 1)
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(offsets)
    den = 1 + (n - 1) * cos_theta
    singular = den.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(den), den)
    return torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)


def _prepare(base, deltas, gen) -> dict:
    n = len(deltas)
    whole = _t([d.reshape(1, -1) for d in deltas])  # (1, 1)
    rows = _t([d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1) for d in deltas])  # (rows, 1)
    shape = (-1,) + (1,) * max(0, base.dim() - 1)
    return {"coef": float(whole) / n,  # one sync per chunk, at prepare time only
            "row_coef": (rows / n).to(base.dtype).reshape(shape if base.dim() else ())}


def _as_task_arithmetic(coef: float, n_experts: int) -> dict:
    """Task arithmetic's parameters that give the per-tensor merge: base + coef * sum_i d_i."""
    return {"weight": (coef,) * n_experts, "normalize": 0.0, "lambda": 1.0}


def _group(out, base, deltas, state, sizes, params, scratch) -> torch.Tensor | None:
    """Task arithmetic's group kernel at each chunk's coefficient (state["coef"], one per chunk in layout order);
    None with `filter_wise` (chunk by chunk then)."""
    if any(is_on(p["filter_wise"]) for p in params):
        return None
    ta = [_as_task_arithmetic(c, len(deltas)) for c in state["coef"]]
    return registry.get("task_arithmetic").group(out, base, deltas, state, sizes, ta, scratch)


@register(
    "model_stock",
    params=(FILTER_WISE,),
    doc="Model Stock: move from the base toward the experts' average by an angle-derived factor",
    min_experts=2,
    prepare=_prepare,
    reference="https://arxiv.org/abs/2403.19522",
    scratch_chunks=1,  # filter_wise: the experts' summed deltas
    group=_group,
)
def model_stock(out, base, deltas, p, state, scratch) -> torch.Tensor | None:
    if is_on(p["filter_wise"]):
        acc = scratch.get("acc", base)
        torch.add(deltas[0], deltas[1], out=acc)
        for d in deltas[2:]:
            acc.add_(d)
        torch.addcmul(base, acc, state["row_coef"], out=out)
        return None
    ta = _as_task_arithmetic(state["coef"], len(deltas))
    return registry.get("task_arithmetic").kernel(out, base, deltas, ta, state, scratch)
