"""The search space: merge parameters declared once, turned into trial suggestions and back into a merge plan.

A searched value lives in a *slot*: (parameter, expert, layer group, module group, chunk).
Every tensor of the model maps to one slot per parameter and chunk, so one vector of searched
values expands into the per-tensor, per-expert, per-chunk arrays the materialiser consumes by a
single gather (`index` arrays are built once).

Slot names are the Optuna parameter names, e.g. `weight[reverse]@L03`, `density[upper]@L03.mlp#2`
(layer 3, MLP tensors, chunk 2), `weight[reverse]@io` (embeddings, final norm and head, which sit
outside the layers), `weight[reverse]@all` (global). `parse_key` reads them back for reports.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna
import torch

from mergesearch import operators
from mergesearch.checkpoints import MODULE_GROUPS, TensorInfo
from mergesearch.config import SpaceConfig
from mergesearch.errors import ConfigError, OperatorError


@dataclass(frozen=True)
class Slot:
    """One searched coefficient and the range it is searched in."""

    key: str
    param: str
    expert: str | None
    group: str  # "all", "io", "L03" (layer 3) or "G1" (layer group 1)
    module: str | None  # None, or attn / mlp / norm / embed / lm_head / other with per_module
    chunk: int
    low: float
    high: float
    log: bool = False


_KEY_RE = re.compile(r"^(?P<param>\w+)(\[(?P<expert>[^\]]+)\])?@(?P<group>[A-Za-z0-9]+)"
                     r"(\.(?P<module>[a-z0-9_]+))?(#(?P<chunk>\d+))?$")
_LAYER_PREFIX = re.compile(r"^.*?(?:^|\.)(?:layers|h|blocks)\.\d+\.")


def tensor_slug(name: str) -> str:
    """A tensor's name inside its layer as a slot module, e.g. `self_attn_q_proj` for
    `model.layers.3.self_attn.q_proj.weight` (per_tensor granularity)."""
    local = _LAYER_PREFIX.sub("", name).removesuffix(".weight")
    return re.sub(r"[^a-z0-9_]", "_", local.lower().replace(".", "_"))


def slot_key(param: str, expert: str | None, group: str, module: str | None, chunk: int | None) -> str:
    key = param + (f"[{expert}]" if expert is not None else "") + f"@{group}"
    if module:
        key += f".{module}"
    if chunk is not None:
        key += f"#{chunk}"
    return key


def parse_key(key: str) -> dict:
    """{'param', 'expert', 'group', 'layer', 'module', 'chunk'} of an Optuna parameter name."""
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError(f"not a mergesearch parameter name: {key!r}")
    g = m.group("group")
    return {
        "param": m.group("param"), "expert": m.group("expert"), "group": g,
        "layer": int(g[1:]) if g.startswith("L") else None, "module": m.group("module"),
        "chunk": int(m.group("chunk") or 0),
    }


def allocate_chunks(importance: Sequence[float], budget: int, max_chunks: int) -> list[int]:
    """Chunks per layer for `chunks: auto`: every layer gets one, the rest of `budget` goes to the
    layers whose task vectors carry more weight (importance-guided chunking of Expert Merging++),
    by largest remainder, at most `max_chunks` each."""
    n = len(importance)
    if n == 0:
        return []
    budget = max(budget, n)
    total = float(sum(importance)) or 1.0
    share = [(budget - n) * (w / total) for w in importance]
    counts = [min(max_chunks, 1 + int(s)) for s in share]
    order = sorted(range(n), key=lambda i: (-(share[i] - int(share[i])), i))
    left = budget - sum(counts)
    while left > 0:
        grew = False
        for i in order:
            if left > 0 and counts[i] < max_chunks:
                counts[i] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return counts


class SearchSpace:
    """Searched slots of one study, and the map from their values to a merge plan's arrays."""

    def __init__(self, cfg: SpaceConfig, method: str, tensors: Sequence[TensorInfo], experts: Sequence[str],
                 num_layers: int, layer_chunks: Sequence[int] | None = None):
        self.cfg = cfg
        self.op = operators.get(method)
        self.op.check_experts(len(experts))
        self.tensors = list(tensors)
        self.experts = list(experts)
        self.num_layers = num_layers
        if cfg.chunks == "auto":
            if layer_chunks is None or len(layer_chunks) != num_layers:
                raise ConfigError("chunks: auto needs the per-layer chunk allocation (allocate_chunks)")
            self.layer_chunks = list(layer_chunks)
        else:
            self.layer_chunks = [int(cfg.chunks)] * num_layers
        # requested chunks per tensor (what the materialiser is built with) and the resulting count,
        # which is smaller for tensors with few rows, as torch.chunk gives
        self.want_chunks = [self._chunks_of(t) for t in self.tensors]
        self.chunk_counts = [operators.num_chunks(t.shape, c) for t, c in zip(self.tensors, self.want_chunks)]
        self.max_chunks = max(self.chunk_counts, default=1)
        self.fixed: dict[str, float] = {}
        self.ranges: dict[str, tuple[float, float, bool]] = {}
        self._resolve_params()
        self.slots: list[Slot] = []
        self._slot_index: dict[str, int] = {}
        self.index: dict[str, torch.Tensor] = {}
        self._build()

    # --- construction ----------------------------------------------------------------------------

    def _chunks_of(self, t: TensorInfo) -> int:
        if t.layer is not None and t.layer < self.num_layers:
            return self.layer_chunks[t.layer]
        return int(self.cfg.chunks) if self.cfg.chunks != "auto" else 1

    def _resolve_params(self) -> None:
        declared = {p.name for p in self.op.params}
        for name in self.cfg.parameters:
            if name not in declared:
                self.op.param(name)  # raises OperatorError with a did-you-mean
        for p in self.op.params:
            spec = self.cfg.parameters.get(p.name)
            if spec is not None and spec.fixed is not None:
                if not p.low <= spec.fixed <= p.high:
                    raise OperatorError(f"{self.op.name}: fixed {p.name}={spec.fixed} is outside its allowed range "
                                        f"[{p.low}, {p.high}]")
                self.fixed[p.name] = float(spec.fixed)
                continue
            if p.kind == "bool":  # switches are fixed at their declared default unless fixed in the space
                self.fixed[p.name] = float(p.default)
                continue
            lo, hi = p.search_range
            log = False
            if spec is not None:
                lo = spec.low if spec.low is not None else lo
                hi = spec.high if spec.high is not None else hi
                log = spec.log
                if lo < p.low or hi > p.high:
                    raise OperatorError(f"{self.op.name}: searched range of {p.name} [{lo}, {hi}] leaves its allowed "
                                        f"range [{p.low}, {p.high}]: narrow it in space.parameters")
                if log and lo <= 0:
                    raise ConfigError(f"space.parameters.{p.name}: a log range needs low > 0")
            if lo == hi:
                self.fixed[p.name] = float(lo)
            else:
                self.ranges[p.name] = (float(lo), float(hi), log)

    def _group_of(self, t: TensorInfo) -> str:
        if self.cfg.granularity == "global":
            return "all"
        if t.layer is None or t.layer >= self.num_layers:
            return "io"
        if self.cfg.layer_groups:
            k = min(self.cfg.layer_groups, self.num_layers)
            return f"G{t.layer * k // self.num_layers}"
        return f"L{t.layer:02d}"

    def _module_of(self, t: TensorInfo) -> str | None:
        if self.cfg.granularity == "per_tensor":
            return tensor_slug(t.name)
        return MODULE_GROUPS[t.kind] if self.cfg.per_module else None

    def _build(self) -> None:
        chunked = self.max_chunks > 1
        n_t, c_max = len(self.tensors), self.max_chunks
        # constants first: index 0..n_fixed-1 of the gathered value vector
        self._fixed_names = list(self.fixed)
        base_ix = len(self._fixed_names)
        for pname in (p.name for p in self.op.params):
            p = self.op.param(pname)
            width = len(self.experts) if p.per_expert else 1
            ix = torch.empty(n_t, width, c_max, dtype=torch.long)
            if pname in self.fixed:
                ix.fill_(self._fixed_names.index(pname))
                self.index[pname] = ix
                continue
            lo, hi, log = self.ranges[pname]
            for i, t in enumerate(self.tensors):
                group, module = self._group_of(t), self._module_of(t)
                for e in range(width):
                    expert = self.experts[e] if p.per_expert else None
                    for c in range(c_max):
                        cc = min(c, self.chunk_counts[i] - 1)
                        key = slot_key(pname, expert, group, module, cc if chunked else None)
                        j = self._slot_index.get(key)
                        if j is None:
                            j = len(self.slots)
                            self._slot_index[key] = j
                            self.slots.append(Slot(key, pname, expert, group, module, cc, lo, hi, log))
                        ix[i, e, c] = base_ix + j
            self.index[pname] = ix
        self._consts = torch.tensor([self.fixed[n] for n in self._fixed_names], dtype=torch.float32)

    # --- use -------------------------------------------------------------------------------------

    @property
    def n_params(self) -> int:
        return len(self.slots)

    def slot_numbers(self, param: str) -> torch.Tensor:
        """(n_tensors, n_experts or 1, max_chunks) long: the slot each entry of `param` reads, -1 where fixed."""
        return self.index[param] - len(self._fixed_names)

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, float]:
        """Ask the trial for every slot's value (in slot order, so samplers see a stable space)."""
        return {s.key: trial.suggest_float(s.key, s.low, s.high, log=s.log) for s in self.slots}

    def arrays(self, values: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Per-parameter float32 arrays of shape (n_tensors, n_experts or 1, max_chunks) for `values`."""
        missing = [s.key for s in self.slots if s.key not in values]
        if missing:
            raise ConfigError(f"{len(missing)} searched value(s) missing, e.g. {missing[0]!r}: the study's search "
                              "space differs from this config")
        vec = torch.cat([self._consts, torch.tensor([float(values[s.key]) for s in self.slots],
                                                    dtype=torch.float32)])
        out = {name: vec[ix] for name, ix in self.index.items()}
        for rule in (r for r in self.op.rules if all(name in out for name in r.params)):
            # the parameters are searched independently, so the last one is moved inside the method's
            # rule where needed (DELLA: epsilon capped where a density sits near 0 or 1)
            out[rule.params[-1]] = rule.repair(*[out[name] for name in rule.params])
        return out

    def point(self, **overrides: float) -> dict[str, float]:
        """A point of the space: each parameter at its declared default clipped into its range,
        weights at 1/n_experts (the uniform merge), with per-parameter `overrides`."""
        values = {}
        for s in self.slots:
            p = self.op.param(s.param)
            v = overrides.get(s.param, 1.0 / len(self.experts) if s.param == "weight" else p.default)
            values[s.key] = min(max(v, s.low), s.high)
        return values

    def describe(self) -> dict:
        """What is searched: counts per parameter, granularity, chunks; also the space's identity."""
        per_param: dict[str, int] = {}
        for s in self.slots:
            per_param[s.param] = per_param.get(s.param, 0) + 1
        return {
            "method": self.op.name, "granularity": self.cfg.granularity, "layer_groups": self.cfg.layer_groups,
            "per_module": self.cfg.per_module, "chunks": self.cfg.chunks, "layer_chunks": self.layer_chunks,
            "n_params": self.n_params, "searched": per_param, "fixed": dict(self.fixed),
            "experts": self.experts,
        }

    def fingerprint(self) -> str:
        """Identity of the space (slots and their ranges): a study refuses to resume with another one."""
        payload = json.dumps([(s.key, s.low, s.high, s.log) for s in self.slots] + [sorted(self.fixed.items()),
                                                                                   self.op.name])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def layer_importance(delta_sq: torch.Tensor, num_layers: int) -> list[float]:
    """Per-layer weight of the task vectors (sum over experts of their norms), for chunk allocation."""
    return [float(v) for v in delta_sq[:, :num_layers].sqrt().sum(0)]
