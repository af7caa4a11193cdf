"""Linear merge (model soups): a weighted average of the models themselves.

mergekit's `linear`: out = sum_i w_i * x_i / sum_i w_i (normalize, the default) or sum_i w_i * x_i.
Here the inputs are the experts only (a recipe that lists the base among `models` gives it a
zero task vector, so it still counts in the weights). With x_i = base + d_i the same value is

    normalize:   base + sum_i (w_i / W) d_i          W = sum_i w_i
    otherwise:   W * base + sum_i w_i d_i

which streams each source once (`add(out=)` then `add_(alpha=)`), no temporaries.
"""

from __future__ import annotations

import torch

from mergesearch.errors import CandidateError
from mergesearch.operators.registry import WEIGHT, is_on, normalize_param, register


@register(
    "linear",
    params=(WEIGHT, normalize_param(True)),
    doc="weighted average of the expert models (model soups)",
    reference="https://arxiv.org/abs/2203.05482",
)
def linear(out, base, deltas, p, state, scratch) -> None:
    w = p["weight"]
    total = sum(w)
    if is_on(p["normalize"]):
        if total == 0.0:
            # mergekit divides by zero here (NaN weights); a search must see a failed candidate.
            raise CandidateError("linear: the weights sum to 0, so normalize=true divides by zero")
        coefs, base_scale = [wi / total for wi in w], 1.0
    else:
        coefs, base_scale = list(w), total
    terms = [(d, c) for d, c in zip(deltas, coefs) if c != 0.0]
    if base_scale != 1.0:
        torch.mul(base, base_scale, out=out)
    elif terms:
        d, c = terms.pop(0)
        torch.add(base, d, alpha=c, out=out)  # fuses the copy of base with the first term
    else:
        out.copy_(base)
    for d, c in terms:
        out.add_(d, alpha=c)
