"""The canonical merge plan: one merge candidate as per-tensor, per-expert, per-chunk values.

A `Plan` holds the method name and, per declared parameter of the method, a float32 tensor of
shape (n_tensors, n_experts or 1, C_max) giving the value for every tensor, expert and chunk
(tensor i uses its first c_i chunks; the rest repeat its last chunk's value). A search space
produces plans directly; recipes (mergesearch.recipe) resolve to plans; the materialiser
(mergesearch.materializer) writes a plan into a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesearch import operators
from mergesearch.checkpoints import TensorInfo
from mergesearch.errors import ConfigError, OperatorError
from mergesearch.operators import Operator, num_chunks

WEIGHTED_SUM_METHOD = "task_arithmetic"  # Plan.weighted_sum's method: baselines mean the same whatever a study searches

__all__ = ["WEIGHTED_SUM_METHOD", "Plan", "per_tensor_chunks"]


@dataclass
class Plan:
    """One merge candidate in canonical form (see the module docstring)."""

    method: str
    tensor_names: tuple[str, ...]
    chunks: tuple[int, ...]  # c_i: chunks of tensor i
    n_experts: int
    params: dict[str, torch.Tensor]  # name -> (n_tensors, n_experts or 1, C_max) float32

    @property
    def max_chunks(self) -> int:
        return max(self.chunks, default=1)

    @property
    def operator(self) -> Operator:
        return operators.get(self.method)

    @classmethod
    def full(cls, method: str, tensors: Sequence[TensorInfo], n_experts: int, *, chunks: int | Sequence[int] = 1,
             **values: float | Sequence[float]) -> Plan:
        """A plan with one value everywhere per parameter (scalar, or per-expert list); defaults elsewhere."""
        op = operators.get(method)
        for name in values:
            op.param(name)
        cs = tuple(num_chunks(t.shape, c) for t, c in zip(tensors, per_tensor_chunks(chunks, len(tensors))))
        cmax = max(cs, default=1)
        params = {}
        for p in op.params:
            width = n_experts if p.per_expert else 1
            v = values.get(p.name, p.default)
            row = torch.tensor([float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * width,
                               dtype=torch.float32)
            if row.numel() != width:
                raise OperatorError(f"{method}: {p.name} needs {width} value(s), got {row.numel()}")
            params[p.name] = row.view(1, width, 1).expand(len(cs), width, cmax).contiguous()
        return cls(method, tuple(t.name for t in tensors), cs, n_experts, params)

    @classmethod
    def weighted_sum(cls, tensors: Sequence[TensorInfo], weights: Sequence[float], *,
                     chunks: int | Sequence[int] = 1) -> Plan:
        """base + sum_e weights[e] x (expert_e - base) everywhere: task arithmetic at lambda 1. What a study's
        baselines are (one-hot weights: an expert alone), and a distill fit's teachers."""
        return cls.full(WEIGHTED_SUM_METHOD, tensors, len(weights), chunks=chunks, weight=list(weights),
                        **{"lambda": 1.0})

    def kernel_params(self):
        """(tensor, chunk) -> the kernel's parameters there: a per-expert parameter as a tuple of floats, a
        method-level one as a float. The values are read back to the host once, here, so that no kernel call
        syncs (the kernels take Python floats as alpha=)."""
        op = self.operator
        vals = {p.name: (p.per_expert, self.params[p.name].tolist()) for p in op.params}

        def at(i: int, c: int) -> dict:
            return {name: (tuple(row[c] for row in v[i]) if per_expert else v[i][0][c])
                    for name, (per_expert, v) in vals.items()}

        return at

    def canonical(self) -> Plan:
        """A copy whose unused chunk slots repeat each tensor's last used chunk (for comparisons)."""
        out = {}
        for name, v in self.params.items():
            v = v.clone()
            for i, c in enumerate(self.chunks):
                if c < v.shape[2]:
                    v[i, :, c:] = v[i, :, c - 1:c]
            out[name] = v
        return Plan(self.method, self.tensor_names, self.chunks, self.n_experts, out)

    def same_as(self, other: Plan) -> bool:
        a, b = self.canonical(), other.canonical()
        return (a.method == b.method and a.tensor_names == b.tensor_names and a.chunks == b.chunks
                and a.n_experts == b.n_experts and a.params.keys() == b.params.keys()
                and all(torch.equal(a.params[k], b.params[k]) for k in a.params))

    def validate(self) -> None:
        """OperatorError naming the first value outside its declared range (or a shape problem)."""
        op = self.operator
        op.check_experts(self.n_experts)
        n, cmax = len(self.tensor_names), self.max_chunks
        if len(self.chunks) != n:
            raise OperatorError(f"plan has {n} tensors but {len(self.chunks)} chunk counts")
        used = torch.arange(cmax).view(1, 1, cmax) < torch.tensor(self.chunks).view(n, 1, 1)
        missing = [p.name for p in op.params if p.name not in self.params]
        extra = [k for k in self.params if k not in op.param_names]
        if missing or extra:
            raise OperatorError(f"plan for {self.method!r}: missing parameters {missing}, unknown {extra}")
        for p in op.params:
            v = self.params[p.name]
            width = self.n_experts if p.per_expert else 1
            if tuple(v.shape) != (n, width, cmax):
                raise OperatorError(f"plan parameter {p.name} has shape {tuple(v.shape)}, expected {(n, width, cmax)}")
            bad = used & ((v < p.low) | (v > p.high) | torch.isnan(v))
            if bool(bad.any()):
                i, e, c = (int(x) for x in bad.nonzero()[0])
                raise OperatorError(
                    f"{self.method}: parameter {p.name}={float(v[i, e, c]):g} for tensor {self.tensor_names[i]} "
                    f"(expert {e}, chunk {c}) is outside its range [{p.low:g}, {p.high:g}]")
        for rule in op.rules:
            values = [self.params[name] for name in rule.params]
            bad = used & rule.broken(*values)
            if bool(bad.any()):
                i, e, c = (int(x) for x in bad.nonzero()[0])
                # per-expert and method-level values broadcast alike: a method-level one has width 1
                at = [float(v[i, min(e, v.shape[1] - 1), c]) for v in values]
                msg = rule.message(*at, f" (tensor {self.tensor_names[i]}, expert {e})")
                raise OperatorError(f"{self.method}: {msg}")


def per_tensor_chunks(chunks: int | Sequence[int], n: int) -> list[int]:
    """Requested chunk count per tensor: one int for all, or one per tensor (chunks: auto)."""
    if isinstance(chunks, int):
        return [chunks] * n
    if len(chunks) != n:
        raise ConfigError(f"{len(chunks)} chunk counts given for {n} tensors")
    return [int(c) for c in chunks]
