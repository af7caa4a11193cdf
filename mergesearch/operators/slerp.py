"""Spherical linear interpolation between the base and ONE expert (mergekit's `slerp`).

Per tensor chunk, with v0 = base and v1 = expert flattened: dot = <v0/|v0|, v1/|v1|> clamped to
[-1, 1] (norms <= 1e-8 count as 1); if |dot| > 0.9995 the vectors are (anti)collinear and the
result is the linear interpolation (1 - t) v0 + t v1; otherwise, with theta = acos(dot),
out = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1.

The angle depends only on the sources, so `prepare` computes it once per chunk (in float64);
a candidate then costs two streaming passes: out = (c0 + c1) * base + c1 * d.
"""

from __future__ import annotations

import math

import torch

from mergesearch.operators.registry import Param, register

_DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8

T = Param("t", 0.0, 1.0, 0.5, "interpolation factor: 0 gives the base, 1 the expert", search=(0.0, 1.0))


def _prepare(base, deltas, gen) -> dict:
    v0 = base.reshape(-1).double()
    v1 = v0 + deltas[0].reshape(-1).double()
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    n0 = torch.where(n0 > _NORM_EPS, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > _NORM_EPS, n1, torch.ones_like(n1))
    dot = float(((v0 / n0) @ (v1 / n1)).clamp(-1.0, 1.0))  # one sync per chunk, at prepare time only
    return {"dot": dot}


@register(
    "slerp",
    params=(T,),
    doc="spherical interpolation between the base and one expert",
    min_experts=1,
    max_experts=1,
    prepare=_prepare,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def slerp(out, base, deltas, p, state, scratch) -> None:
    t = p["t"]
    dot = state["dot"]
    if abs(dot) > _DOT_THRESHOLD or base.numel() == 0:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        c0, c1 = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    # c0 * v0 + c1 * (v0 + d)
    if c0 + c1 == 1.0:
        torch.add(base, deltas[0], alpha=c1, out=out)
    else:
        torch.mul(base, c0 + c1, out=out)
        out.add_(deltas[0], alpha=c1)
