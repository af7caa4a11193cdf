"""The materialiser (the hot path of a search) and the recipe formats that feed it.

A merge candidate is a `Plan`: the method name and, per declared parameter of the method, a
float32 tensor of shape (n_tensors, n_experts or 1, C_max) giving the value for every tensor,
expert and chunk (tensor i uses its first c_i chunks; the rest repeat its last chunk's value).
A search space produces plans directly; users write recipes, which resolve to plans:

* our recipe (written by `export`, read and written here without loss):

      method: ties                       # any name in mergesearch.operators.names()
      base_model: ./base                 # paths relative to the recipe file (or the cwd)
      models:
        - model: ./expert-a
          parameters: {weight: 0.6, density: [0.3, 0.5, 0.7, 0.9]}   # per-layer list
        - model: ./expert-b
          parameters:
            weight: {default: 0.4, attn_q: 0.5, lm_head: 0.0}      # per module kind
            density: [[0.2, 0.4], [0.3, 0.5], [0.4, 0.6], [0.5, 0.7]]  # per layer x chunk
      parameters: {lambda: 1.0, density: 0.5}   # method-level ones; per-expert ones = default for all
      dtype: float32
      chunks: 2                          # split each tensor along dim 0 as torch.chunk does; or one
                                         # count per layer ([2, 1, 3], chunks: auto studies; tensors
                                         # outside the layers then have 1); lists give max(chunks) values
      seed: 0                            # DARE/DELLA random masks

  A value is a scalar; a per-layer list (num_layers entries); a per-layer list of per-chunk
  lists (`chunks` entries each); or a mapping whose keys are `default`, module kinds
  (mergesearch.checkpoints.MODULE_KINDS) or exact tensor names (whose value is a scalar or a
  list of per-chunk values). Precedence: tensor name > module kind > default > the top-level
  `parameters` > the method's declared default. Tensors outside the layers take a per-layer
  list's entry for layer 0 if they are embeddings, and for the LAST layer otherwise (final
  norm, lm_head); give them their own value with an `embed:` / `norm:` / `lm_head:` key.

* mergekit YAML (`merge_method`, `base_model`, `models` with `parameters`, `parameters`,
  `dtype`), resolved exactly as mergekit does: a list of numbers is a gradient interpolated
  at t = layer / (num_layers - 1); tensors outside the layers use t = 0; a list of
  `{filter, value}` entries takes the first whose filter is a substring of the tensor name.
  `slices`/`modules` are not supported.

`Materializer` loads the sources once (on the device, in the chosen dtype), keeps the task
vectors and each method's precomputed state, allocates one transformers model and writes
every candidate into its parameters in place: no new model, no disk I/O, one host sync per
candidate (the final finiteness check).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from mergesearch import operators
from mergesearch.checkpoints import (
    MODULE_KINDS,
    Checkpoint,
    TensorInfo,
    check_compatible,
    open_checkpoint,
    parse_dtype,
    resolve_device,
    save_model,
)
from mergesearch.errors import CandidateError, CheckpointError, ConfigError, OperatorError, did_you_mean
from mergesearch.operators import Operator, Scratch, chunk_bounds, num_chunks

log = logging.getLogger(__name__)

__all__ = [
    "Plan", "Recipe", "Materializer", "load_recipe", "recipe_from_dict", "plan_to_recipe", "plan_to_mergekit",
    "write_recipe", "materialize_recipe", "merge_recipe",
]


# --- Plan ----------------------------------------------------------------------------------------


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
        cs = tuple(num_chunks(t.shape, c) for t, c in zip(tensors, _per_tensor(chunks, len(tensors))))
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
        if "epsilon" in self.params:
            d, eps = self.params["density"], self.params["epsilon"]
            bad = used & (d < 1) & (d > 0) & ((d + eps >= 1) | (d - eps <= 0))
            if bool(bad.any()):
                i, e, c = (int(x) for x in bad.nonzero()[0])
                raise OperatorError(
                    f"{self.method}: density {float(d[i, e, c]):g} +/- epsilon {float(eps[i, e, c]):g} must stay "
                    f"inside (0, 1) (tensor {self.tensor_names[i]}, expert {e}); lower epsilon")


def recipe_chunk_counts(chunks: int | Sequence[int], tensors: Sequence[TensorInfo], num_layers: int) -> list[int]:
    """Requested chunks per tensor for a recipe's `chunks`: one count for every tensor, or one per layer
    (what a `chunks: auto` study allocates), where the tensors outside the layers take 1."""
    if isinstance(chunks, int):
        return [chunks] * len(tensors)
    if len(chunks) != num_layers:
        raise ConfigError(f"chunks: a list gives one chunk count per layer ({num_layers}), got {len(chunks)}")
    return [int(chunks[t.layer]) if t.layer is not None and t.layer < num_layers else 1 for t in tensors]


def _chunk_width(chunks: int | Sequence[int]) -> int:
    return chunks if isinstance(chunks, int) else max(chunks, default=1)


def _per_tensor(chunks: int | Sequence[int], n: int) -> list[int]:
    """Requested chunk count per tensor: one int for all, or one per tensor (chunks: auto)."""
    if isinstance(chunks, int):
        return [chunks] * n
    if len(chunks) != n:
        raise ConfigError(f"{len(chunks)} chunk counts given for {n} tensors")
    return [int(c) for c in chunks]


# --- value grammar (our recipe) --------------------------------------------------------------------


def _layer_of(t: TensorInfo, num_layers: int) -> int:
    """Which entry of a per-layer list a tensor takes (non-layer tensors: see module docstring)."""
    if t.layer is not None:
        return min(t.layer, max(num_layers - 1, 0))
    return 0 if t.kind == "embed" else max(num_layers - 1, 0)


def _scalar(v: Any, where: str) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    raise ConfigError(f"{where}: expected a number, got {v!r}")


def _apply_value(arr: np.ndarray, value: Any, idx: Sequence[int], tensors: Sequence[TensorInfo], num_layers: int,
                 chunks: int, where: str, *, allow_mapping: bool = True) -> None:
    """Write `value` into arr[i, :] for tensors i in idx (arr: (n_tensors, C_max) float64)."""
    cmax = arr.shape[1]
    if isinstance(value, Mapping):
        if not allow_mapping:
            raise ConfigError(f"{where}: a mapping cannot be nested inside another mapping")
        by_name = {tensors[i].name: i for i in idx}
        unknown = [k for k in value if k != "default" and k not in MODULE_KINDS and k not in by_name]
        if unknown:
            k = str(unknown[0])
            raise ConfigError(f"{where}: unknown key {k!r}{did_you_mean(k, ['default', *MODULE_KINDS])}; "
                              "keys are `default`, a module kind or an exact tensor name")
        if "default" in value:
            _apply_value(arr, value["default"], idx, tensors, num_layers, chunks, f"{where}.default",
                         allow_mapping=False)
        for kind in MODULE_KINDS:
            if kind in value:
                sub = [i for i in idx if tensors[i].kind == kind]
                _apply_value(arr, value[kind], sub, tensors, num_layers, chunks, f"{where}.{kind}",
                             allow_mapping=False)
        for name, v in value.items():
            if name in by_name and name not in MODULE_KINDS and name != "default":
                i = by_name[name]
                if isinstance(v, list):
                    if len(v) != chunks:
                        raise ConfigError(f"{where}.{name}: a tensor's list gives one value per chunk "
                                          f"({chunks}), got {len(v)}")
                    vals = [_scalar(x, f"{where}.{name}") for x in v]
                    arr[i, :] = (vals + [vals[-1]] * cmax)[:cmax]
                else:
                    arr[i, :] = _scalar(v, f"{where}.{name}")
        return
    if isinstance(value, list):
        if len(value) != num_layers:
            raise ConfigError(f"{where}: a list gives one value per layer ({num_layers}), got {len(value)}")
        rows = []
        for li, row in enumerate(value):
            if isinstance(row, list):
                if len(row) != chunks:
                    raise ConfigError(f"{where}[{li}]: a layer's list gives one value per chunk ({chunks}), "
                                      f"got {len(row)}")
                vals = [_scalar(x, f"{where}[{li}]") for x in row]
            else:
                vals = [_scalar(row, f"{where}[{li}]")]
            rows.append((vals + [vals[-1]] * cmax)[:cmax])
        for i in idx:
            arr[i, :] = rows[_layer_of(tensors[i], num_layers)]
        return
    v = _scalar(value, where)
    for i in idx:
        arr[i, :] = v


# --- recipe files ----------------------------------------------------------------------------------


class _ModelEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _OurFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    method: str
    base_model: str
    models: list[_ModelEntry]
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str = "float32"
    chunks: PositiveInt | list[PositiveInt] = 1
    seed: int = 0


_MERGEKIT_IGNORED = {"tokenizer_source", "tokenizer", "chat_template", "out_dtype", "name"}
_MERGEKIT_REQUIRED = {"weight", "t"}  # mergekit has no default for these


class _MergekitFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[_ModelEntry] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    slices: Any = None
    modules: Any = None
    tokenizer_source: Any = None
    tokenizer: Any = None
    chat_template: Any = None
    out_dtype: Any = None
    name: Any = None


@dataclass
class Recipe:
    """A merge recipe resolved to model paths; `to_plan` turns it into a Plan for given tensors."""

    method: str
    base_model: Path
    models: list[Path]
    parameters: dict[str, Any]  # top-level (method-level, and per-expert defaults)
    model_parameters: list[dict[str, Any]]  # one per expert
    dtype: str = "float32"
    chunks: int | list[int] = 1  # one count, or one per layer
    seed: int = 0
    format: str = "mergesearch"  # or "mergekit"
    source: dict = field(default_factory=dict)  # the file's content, for provenance

    @property
    def operator(self) -> Operator:
        return operators.get(self.method)

    def to_plan(self, tensors: Sequence[TensorInfo], num_layers: int) -> Plan:
        """Resolve every parameter for every tensor/expert/chunk; ConfigError/OperatorError on bad input."""
        op = self.operator
        op.check_experts(len(self.models))
        if self.format == "mergekit":
            plan = _mergekit_plan(self, op, tensors, num_layers)
        else:
            plan = _our_plan(self, op, tensors, num_layers)
        plan.validate()
        return plan


def _check_names(op: Operator, params: Mapping[str, Any], where: str, *, per_expert_only: bool = False,
                 ignored: frozenset[str] = frozenset()) -> None:
    for k in params:
        if k in ignored:
            continue
        if k not in op.param_names:
            raise ConfigError(f"{where}: method {op.name!r} has no parameter {k!r}"
                              f"{did_you_mean(str(k), op.param_names)}; it takes {', '.join(op.param_names) or 'none'}")
        if per_expert_only and not op.param(k).per_expert:
            raise ConfigError(f"{where}: {k!r} is a method-level parameter: set it under the top-level `parameters:`")


def _our_plan(r: Recipe, op: Operator, tensors: Sequence[TensorInfo], num_layers: int) -> Plan:
    _check_names(op, r.parameters, "parameters")
    for e, mp in enumerate(r.model_parameters):
        _check_names(op, mp, f"models[{e}].parameters", per_expert_only=True)
    cs = tuple(num_chunks(t.shape, c) for t, c in zip(tensors, recipe_chunk_counts(r.chunks, tensors, num_layers)))
    width = _chunk_width(r.chunks)
    cmax = max(cs, default=1)
    idx = list(range(len(tensors)))
    params = {}
    for p in op.params:
        layers = []
        for e in range(len(r.models) if p.per_expert else 1):
            arr = np.full((len(tensors), cmax), p.default, dtype=np.float64)
            if p.name in r.parameters:
                _apply_value(arr, r.parameters[p.name], idx, tensors, num_layers, width, f"parameters.{p.name}")
            if p.per_expert and p.name in r.model_parameters[e]:
                _apply_value(arr, r.model_parameters[e][p.name], idx, tensors, num_layers, width,
                             f"models[{e}].parameters.{p.name}")
            layers.append(arr)
        params[p.name] = torch.from_numpy(np.stack(layers, axis=1)).float()
    return Plan(op.name, tuple(t.name for t in tensors), cs, len(r.models), params).canonical()


def _mk_eval(setting: Any, name: str, t: float, kind: str, where: str) -> float | None:
    """mergekit's config.evaluate_setting for one tensor name at gradient position t."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float)):
        return float(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(x, (bool, int, float)) for x in setting):
            vals = [float(x) for x in setting]
            if kind == "bool" or any(isinstance(x, bool) for x in setting):
                return vals[int(t * (len(vals) - 1))]
            scaled = t * (len(vals) - 1)
            i0 = int(scaled)
            i1 = min(len(vals) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * vals[i0] + frac * vals[i1]
        for cond in setting:
            if not isinstance(cond, Mapping) or "value" not in cond:
                raise ConfigError(f"{where}: expected a number, a list of numbers or a list of "
                                  f"{{filter, value}} entries, got {cond!r}")
            f = cond.get("filter")
            if f is None or f == "*" or (name and f in name):
                return _mk_eval(cond["value"], name, t, kind, where)
        return None
    raise ConfigError(f"{where}: unexpected value {setting!r}")


def _mergekit_plan(r: Recipe, op: Operator, tensors: Sequence[TensorInfo], num_layers: int) -> Plan:
    ignored = op.ignored_mergekit_keys
    _check_names(op, r.parameters, "parameters", ignored=ignored)
    for e, mp in enumerate(r.model_parameters):
        _check_names(op, mp, f"models[{e}].parameters", ignored=ignored)
    cs = tuple(1 for _ in tensors)
    params = {}
    for p in op.params:
        width = len(r.models) if p.per_expert else 1
        arr = np.empty((len(tensors), width, 1), dtype=np.float64)
        for e in range(width):
            scopes = ([r.model_parameters[e]] if p.per_expert else []) + [r.parameters]
            for i, t in enumerate(tensors):
                pos = (t.layer / (num_layers - 1) if num_layers > 1 else 1.0) if t.layer is not None else 0.0
                value = None
                for scope in scopes:
                    if p.name in scope:
                        value = _mk_eval(scope[p.name], t.name, pos, p.kind, f"parameters.{p.name}")
                        if value is not None:
                            break
                if value is None:
                    if p.name in _MERGEKIT_REQUIRED:
                        who = f"model {r.models[e]}" if p.per_expert else "the merge"
                        raise ConfigError(f"missing required parameter {p.name!r} for {who} (tensor {t.name}); "
                                          f"mergekit has no default for it: add `{p.name}:` to its parameters")
                    value = p.default
                arr[i, e, 0] = value
        params[p.name] = torch.from_numpy(arr).float()
    return Plan(op.name, tuple(t.name for t in tensors), cs, len(r.models), params)


def _resolve_path(p: str, root: Path | None) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and root is not None and (root / path).exists():
        return (root / path).resolve()
    return path.resolve() if path.exists() else path


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def recipe_from_dict(data: Mapping, *, root: str | os.PathLike | None = None, where: str = "recipe") -> Recipe:
    """Parse either recipe format (ours: `method:`, mergekit: `merge_method:`) without touching the models."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    root_p = Path(root) if root is not None else None
    try:
        if "merge_method" in data:
            mk = _MergekitFile.model_validate(dict(data))
        else:
            ours = _OurFile.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        hint = ""
        if err["type"] == "extra_forbidden":
            keys = _MergekitFile.model_fields if "merge_method" in data else _OurFile.model_fields
            hint = did_you_mean(str(err["loc"][-1]), keys)
        elif loc == "method":
            hint = " (our recipes start with `method:`, mergekit's with `merge_method:`)"
        raise ConfigError(f"{where}: {loc}: {err['msg']}{hint}") from None
    if "merge_method" in data:
        if mk.slices is not None or mk.modules is not None:
            raise ConfigError(f"{where}: mergekit `slices:`/`modules:` recipes are not supported; "
                              "use `models:` (one entry per model)")
        for key in _MERGEKIT_IGNORED:
            if getattr(mk, key) is not None:
                log.warning("%s: mergekit key %r is ignored (the merged model keeps the base's tokenizer)", where, key)
        op = operators.get(mk.merge_method)
        entries = list(mk.models or [])
        if not entries:
            raise ConfigError(f"{where}: `models:` is empty; list the models to merge")
        base = _resolve_path(mk.base_model, root_p) if mk.base_model else None
        if op.name == "linear":
            if base is not None and not any(_same(_resolve_path(m.model, root_p), base) for m in entries):
                entries.append(_ModelEntry(model=mk.base_model))  # as mergekit: base joins the inputs
            if base is None:
                base = _resolve_path(entries[0].model, root_p)
        else:
            if base is None:
                raise ConfigError(f"{where}: merge_method {op.name!r} needs `base_model:`")
            entries = [m for m in entries if not _same(_resolve_path(m.model, root_p), base)]
        return Recipe(method=op.name, base_model=base, models=[_resolve_path(m.model, root_p) for m in entries],
                      parameters=dict(mk.parameters or {}), model_parameters=[dict(m.parameters) for m in entries],
                      dtype=mk.dtype or "float32", chunks=1, seed=0, format="mergekit", source=dict(data))
    op = operators.get(ours.method)
    parse_dtype(ours.dtype)
    return Recipe(method=op.name, base_model=_resolve_path(ours.base_model, root_p),
                  models=[_resolve_path(m.model, root_p) for m in ours.models], parameters=dict(ours.parameters),
                  model_parameters=[dict(m.parameters) for m in ours.models], dtype=ours.dtype, chunks=ours.chunks,
                  seed=ours.seed, format="mergesearch", source=dict(data))


def load_recipe(path: str | os.PathLike | Mapping) -> Recipe:
    """Read a recipe YAML file (either format); paths inside resolve relative to the file."""
    if isinstance(path, Mapping):
        return recipe_from_dict(path)
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return recipe_from_dict(data, root=p.parent, where=str(p))


# --- writers ---------------------------------------------------------------------------------------


def _f(x: float, kind: str = "float") -> Any:
    if kind == "bool":
        return bool(x >= 0.5)
    v = operators.exact(x)
    return int(v) if v.is_integer() and abs(v) < 1e15 else v


def _chunk_rows(vals: np.ndarray, cs: Sequence[int]) -> list[list[float]]:
    return [list(vals[i, :c]) for i, c in enumerate(cs)]


def _group_consistent(rows: list[list[float]], members: Sequence[int], width: int) -> list[float] | None:
    """One chunk vector (length `width`) agreeing with every member's used chunks, or None."""
    out: list[float | None] = [None] * width
    for i in members:
        for j, v in enumerate(rows[i]):
            if out[j] is None:
                out[j] = v
            elif out[j] != v:
                return None
    last = None
    for j in range(width):
        out[j] = out[j] if out[j] is not None else last
        last = out[j]
    return out  # type: ignore[return-value]


def _encode(rows: list[list[float]], idx: list[int], tensors: Sequence[TensorInfo], num_layers: int, chunks: int,
            kind: str) -> Any | None:
    """Scalar or per-layer form for tensors idx, or None if they do not fit one."""
    vals = {v for i in idx for v in rows[i]}
    if len(vals) <= 1:
        return _f(vals.pop() if vals else 0.0, kind)
    if num_layers < 1:
        return None
    per_layer = []
    for layer in range(num_layers):
        members = [i for i in idx if _layer_of(tensors[i], num_layers) == layer]
        vec = _group_consistent(rows, members, chunks)
        if vec is None:
            return None
        per_layer.append(vec)
    filled, last = [], None
    for vec in per_layer:  # layers with no member take a neighbour's value (never read back)
        if vec[0] is None:
            vec = last or next((v for v in per_layer if v[0] is not None), None)
        filled.append(vec)
        last = vec
    if all(len(set(v)) == 1 for v in filled):
        return [_f(v[0], kind) for v in filled]
    return [[_f(x, kind) for x in v] for v in filled]


def _encode_value(rows: list[list[float]], tensors: Sequence[TensorInfo], num_layers: int, chunks: int,
                  kind: str) -> Any:
    idx = list(range(len(tensors)))
    whole = _encode(rows, idx, tensors, num_layers, chunks, kind)
    if whole is not None:
        return whole
    mapping: dict[str, Any] = {}
    for mk in MODULE_KINDS:
        sub = [i for i in idx if tensors[i].kind == mk]
        if not sub:
            continue
        enc = _encode(rows, sub, tensors, num_layers, chunks, kind)
        if enc is not None:
            mapping[mk] = enc
            continue
        for i in sub:
            r = rows[i]
            mapping[tensors[i].name] = (_f(r[0], kind) if len(set(r)) == 1
                                        else [_f(x, kind) for x in (r + [r[-1]] * chunks)[:chunks]])
    return mapping


def plan_to_recipe(plan: Plan, tensors: Sequence[TensorInfo], num_layers: int, *, base_model: str | os.PathLike,
                   models: Sequence[str | os.PathLike], dtype: str = "float32", chunks: int | Sequence[int] = 1,
                   seed: int = 0) -> dict:
    """Our recipe (a dict ready for YAML) that reads back to exactly `plan` (`chunks`: one count or one per layer)."""
    op = plan.operator
    if tuple(t.name for t in tensors) != plan.tensor_names:
        raise OperatorError("plan_to_recipe: the tensors do not match the plan's tensor names")
    if len(models) != plan.n_experts:
        raise OperatorError(f"plan_to_recipe: {len(models)} model paths for {plan.n_experts} experts")
    top: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in models]
    for p in op.params:
        v = plan.params[p.name].double().numpy()
        for e in range(v.shape[1]):
            enc = _encode_value(_chunk_rows(v[:, e, :], plan.chunks), tensors, num_layers, _chunk_width(chunks),
                                p.kind)
            (per_model[e] if p.per_expert else top)[p.name] = enc
    recipe = {
        "method": plan.method,
        "base_model": str(base_model),
        "models": [{"model": str(m), "parameters": pm} for m, pm in zip(models, per_model)],
        "parameters": top,
        "dtype": dtype,
        "chunks": chunks if isinstance(chunks, int) else [int(c) for c in chunks],
        "seed": seed,
    }
    back = recipe_from_dict(recipe).to_plan(tensors, num_layers)
    if not back.same_as(plan):
        raise OperatorError("plan_to_recipe: internal error, the written recipe does not read back to the plan")
    return recipe


def plan_to_mergekit(plan: Plan, tensors: Sequence[TensorInfo], num_layers: int, *, base_model: str | os.PathLike,
                     models: Sequence[str | os.PathLike], dtype: str = "float32") -> dict:
    """A mergekit YAML dict for `plan`, or OperatorError when mergekit cannot express it (chunks)."""
    if plan.max_chunks > 1:
        raise OperatorError("plan_to_mergekit: mergekit has no per-chunk parameters; export our recipe instead")
    op = plan.operator
    top: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in models]
    for p in op.params:
        v = plan.params[p.name].double().numpy()[:, :, 0]
        for e in range(v.shape[1]):
            col = v[:, e]
            if len(set(col.tolist())) == 1:
                enc: Any = _f(col[0], p.kind)
            else:
                enc = None
                layer_vals: dict[int, float] = {}
                ok = True
                for i, t in enumerate(tensors):
                    if t.layer is not None:
                        if layer_vals.setdefault(t.layer, col[i]) != col[i]:
                            ok = False
                if ok and len(layer_vals) == num_layers and num_layers > 1:
                    first = layer_vals[0]
                    if all(col[i] == first for i, t in enumerate(tensors) if t.layer is None):
                        enc = [_f(layer_vals[layer], p.kind) for layer in range(num_layers)]
                if enc is None:  # exact tensor-name filters, first match wins in mergekit
                    enc = [{"filter": t.name, "value": _f(col[i], p.kind)} for i, t in enumerate(tensors)]
            (per_model[e] if p.per_expert else top)[p.name] = enc
    base = str(base_model)
    if op.name == "linear":
        data = {"merge_method": "linear", "models": [{"model": str(m), "parameters": pm}
                                                     for m, pm in zip(models, per_model)]}
    else:
        data = {"merge_method": op.name, "base_model": base,
                "models": [{"model": str(m), "parameters": pm} for m, pm in zip(models, per_model)]}
    if top:
        data["parameters"] = top
    data["dtype"] = dtype
    if not recipe_from_dict(data).to_plan(tensors, num_layers).same_as(plan):
        raise OperatorError("plan_to_mergekit: this plan cannot be expressed as a mergekit recipe")
    return data


def write_recipe(path: str | os.PathLike, recipe: Mapping) -> Path:
    """Write a recipe dict as YAML atomically (temp file + rename)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(dict(recipe), fh, sort_keys=False, default_flow_style=None, width=120)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# --- the materialiser ------------------------------------------------------------------------------


class Materializer:
    """Writes merge candidates into one preallocated transformers model, in place.

    Sources (base weights and task vectors) are loaded once, on `device` in `dtype` (with
    `streaming`, kept in CPU memory and copied per tensor to the device); the method's state
    (sorted magnitudes, random fields, angles) is computed once per tensor chunk. Then
    `materialize(plan)` costs about the memory traffic of reading the sources once and
    writing the model once.
    """

    def __init__(self, base: str | os.PathLike | Checkpoint, experts: Sequence[str | os.PathLike | Checkpoint],
                 method: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto",
                 chunks: int | Sequence[int] = 1, streaming: bool = False, seed: int = 0,
                 merge_common_vocab: bool = False,
                 check_finite: bool = True):
        self.op = operators.get(method)
        self.op.check_experts(len(experts))
        if min([chunks] if isinstance(chunks, int) else list(chunks) or [1]) < 1:
            raise ConfigError(f"chunks must be >= 1, got {chunks}")
        self.base = open_checkpoint(base)
        self.experts = [open_checkpoint(e) for e in experts]
        distinct = [e for e in self.experts if not _same(e.path, self.base.path)]
        check_compatible(self.base, distinct, merge_common_vocab=merge_common_vocab)
        self.dtype = parse_dtype(dtype)
        self.device = resolve_device(device)
        self.chunks = chunks
        self.seed = seed
        # Streaming keeps the sources in host memory, apart from the model, and copies each tensor's to the
        # device when it is merged. On the CPU the copy is free, but the same path runs, so it is tested.
        self.streaming = streaming
        self.check_finite = check_finite
        self.num_layers = self.base.num_layers
        self.expert_names = [e.path.name for e in self.experts]
        self.tensors: list[TensorInfo] = [t for t in self.base.tensors.values() if t.dtype.is_floating_point]
        # chunks: one count for every tensor, or one per tensor in `tensors` order (chunks: auto)
        self._bounds = [chunk_bounds(t.shape[0], c) if t.shape else [(0, 1)]
                        for t, c in zip(self.tensors, _per_tensor(chunks, len(self.tensors)))]
        self.scratch = Scratch()
        with torch.no_grad():
            self._load_sources()
            self.model = self._build_model()

    # -- set-up (once) --

    def _load_sources(self) -> None:
        store = torch.device("cpu") if self.streaming else self.device
        names = [t.name for t in self.tensors]
        base_src = self.base.load(names, device=store)  # source precision: deltas are taken before casting
        self._deltas: list[list[torch.Tensor]] = [[] for _ in self.tensors]
        for ex in self.experts:
            if _same(ex.path, self.base.path):
                for i, n in enumerate(names):
                    self._deltas[i].append(torch.zeros_like(base_src[n], dtype=self.dtype))
                continue
            src = ex.load(names, device=store)
            for i, n in enumerate(names):
                b, x = base_src[n], src.pop(n)
                if x.shape != b.shape:  # merge_common_vocab: keep the rows the base has
                    x = x[: b.shape[0]]
                # In the wider of the source and merge dtypes: bf16 checkpoints merged in float32 get
                # exact differences (as mergekit, which casts first), float32 ones merged in bf16 are
                # rounded once, after the subtraction.
                wide = torch.promote_types(b.dtype, self.dtype)
                self._deltas[i].append((x.to(wide) - b.to(wide)).to(self.dtype))
            del src
        self._base = [base_src.pop(n).to(self.dtype) for n in names]
        if self.streaming and self.device.type == "cuda":  # page-locked: asynchronous host-to-device copies
            self._base = [t.pin_memory() for t in self._base]
            self._deltas = [[d.pin_memory() for d in ds] for ds in self._deltas]
        # Precomputed state per tensor per chunk, in plan order (the random fields draw in this order).
        gen = torch.Generator().manual_seed(self.seed)
        self._state: list[list[dict]] = []
        for i, t in enumerate(self.tensors):
            per_chunk = []
            for lo, hi in self._bounds[i]:
                b, ds = self._slice(self._base[i], lo, hi), [self._slice(d, lo, hi) for d in self._deltas[i]]
                per_chunk.append(self.op.prepare(b, ds, gen) if self.op.prepare else {})
            self._state.append(per_chunk)

    @staticmethod
    def _slice(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return x[lo:hi] if x.dim() else x

    def _build_model(self):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        try:
            # Explicitly False: left unset, transformers asks on stdin whether to run a folder's own code.
            cfg = AutoConfig.from_pretrained(self.base.path, trust_remote_code=False)
        except ValueError as exc:
            msg = str(exc)
            if "custom code" in msg or "trust_remote_code" in msg:
                raise CheckpointError(f"{self.base.path} needs its own modelling code (auto_map in config.json); "
                                      "mergesearch never runs code from a checkpoint: use an architecture that "
                                      "transformers ships") from None
            raise CheckpointError(f"{self.base.path}/config.json: transformers cannot build this model "
                                  f"({msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__})") from None
        with no_init_weights():  # every weight is overwritten by each candidate
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
        model.tie_weights()  # no_init_weights also skips tying (GPT-2's lm_head = wte)
        model.to(self.device).eval().requires_grad_(False)
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(dict(model.named_buffers()))
        self._targets: list[torch.Tensor | None] = []
        written: set[int] = set()
        for t in self.tensors:
            target = named.get(t.name)
            if target is None:
                raise CheckpointError(f"{self.base.path}: tensor {t.name} has no counterpart in "
                                      f"{type(model).__name__}; is config.json the one these weights were saved with?")
            if tuple(target.shape) != t.shape:
                raise CheckpointError(f"{t.name}: model expects {tuple(target.shape)}, checkpoint has {t.shape}")
            ptr = target.data_ptr()
            self._targets.append(None if ptr in written else target.data)  # tied weights are written once
            written.add(ptr)
        missing = [n for n, p in model.named_parameters() if p.data_ptr() not in written]
        if missing:
            raise CheckpointError(f"{self.base.path}: model parameter {missing[0]} is not in the checkpoint "
                                  f"({len(missing)} missing); the merge would leave it uninitialised")
        # Non-float tensors of the checkpoint (rare) are copied from the base once.
        extra = [t.name for t in self.base.tensors.values() if not t.dtype.is_floating_point and t.name in named]
        for n, v in self.base.load(extra, device=self.device).items():
            named[n].data.copy_(v)
        return model

    # -- per candidate --

    def plan(self, **values) -> Plan:
        """A Plan for this materialiser with one value per parameter (scalar or per-expert list)."""
        return Plan.full(self.op.name, self.tensors, len(self.experts), chunks=self.chunks, **values)

    def _check_plan(self, plan: Plan) -> None:
        # A method that precomputes nothing (task arithmetic, linear, ...) runs on any materialiser, so a
        # study can score its baselines without a second copy of the sources.
        # Methods sharing a `prepare` (ties/breadcrumbs*, dare_*, della*) share the precomputed state too.
        if plan.method != self.op.name and plan.operator.prepare not in (None, self.op.prepare):
            raise OperatorError(f"plan is for {plan.method!r} but this materialiser was prepared for "
                                f"{self.op.name!r}; build a Materializer per method")
        if plan.tensor_names != tuple(t.name for t in self.tensors):
            raise OperatorError("plan's tensor names do not match this materialiser's (build it from `.tensors`)")
        if plan.n_experts != len(self.experts):
            raise OperatorError(f"plan has {plan.n_experts} experts, materialiser {len(self.experts)}")
        want = tuple(len(b) for b in self._bounds)
        if plan.chunks != want:
            raise OperatorError(f"plan's chunk counts differ from the materialiser's (chunks={self.chunks})")
        plan.validate()

    def materialize(self, plan: Plan):
        """Write `plan` into `self.model` in place and return the model; CandidateError on NaN/inf."""
        self._check_plan(plan)
        op = plan.operator
        own_state = op.prepare is self.op.prepare  # a state-free method's kernel gets empty states
        # One conversion per candidate: the kernels take Python floats (alpha=), no per-tensor sync.
        vals = {p.name: plan.params[p.name].tolist() for p in op.params}
        per_expert = {p.name: p.per_expert for p in op.params}
        sums = []
        with torch.no_grad():
            for i, t in enumerate(self.tensors):
                target = self._targets[i]
                if target is None:
                    continue
                base, deltas = self._base[i], self._deltas[i]
                states = self._state[i] if own_state else [{}] * len(self._bounds[i])
                if self.streaming:
                    base = base.to(self.device, non_blocking=True)
                    deltas = [d.to(self.device, non_blocking=True) for d in deltas]
                    states = [_to_device(s, self.device) for s in states]
                for c, (lo, hi) in enumerate(self._bounds[i]):
                    p = {name: (tuple(row[c] for row in v[i]) if per_expert[name] else v[i][0][c])
                         for name, v in vals.items()}
                    try:
                        op.kernel(self._slice(target, lo, hi), self._slice(base, lo, hi),
                                  [self._slice(d, lo, hi) for d in deltas], p, states[c], self.scratch)
                    except CandidateError as exc:
                        raise CandidateError(f"{t.name}: {exc}") from None
                if self.check_finite:
                    sums.append(target.sum(dtype=torch.float32))
            if sums and not bool(torch.isfinite(torch.stack(sums)).all()):  # the one host sync
                bad = next(t.name for t, s in zip([t for t, g in zip(self.tensors, self._targets) if g is not None],
                                                  sums) if not math.isfinite(float(s)))
                raise CandidateError(f"merged weights are not finite (NaN/inf) in {bad}")
        return self.model

    def sources(self, i: int) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, int]], list[dict]]:
        """Tensor i's cached base, task vectors, chunk row bounds and per-chunk precomputed state
        (on the device; with `streaming`, in host memory). Read-only: the fit builds on them."""
        return self._base[i], self._deltas[i], self._bounds[i], self._state[i]

    def is_written(self, i: int) -> bool:
        """False for the second name of a tied weight (written once, through the first)."""
        return self._targets[i] is not None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current candidate's tensors by checkpoint name (views of the model's parameters)."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers()))
        return {t.name: named[t.name].data for t in self.tensors}


def _to_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, torch.Tensor):
        return state.to(device, non_blocking=True)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_device(v, device) for v in state]
    return state


# --- convenience ------------------------------------------------------------------------------------


def materialize_recipe(recipe: Recipe | str | os.PathLike | Mapping, *, device: str = "auto",
                       dtype: str | None = None, streaming: bool = False) -> Materializer:
    """Load a recipe, build a Materializer for it and materialise it; the merged model is `.model`."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    missing = [str(p) for p in [r.base_model, *r.models] if not Path(p).is_dir()]
    if missing:
        raise CheckpointError(f"model folder not found: {missing[0]} (paths in a recipe are relative to its file)")
    chunks = r.chunks
    if not isinstance(chunks, int):  # per layer -> per tensor, in the materialiser's tensor order
        base = open_checkpoint(r.base_model)
        chunks = recipe_chunk_counts(chunks, [t for t in base.tensors.values() if t.dtype.is_floating_point],
                                     base.num_layers)
    m = Materializer(r.base_model, r.models, r.method, dtype=dtype or r.dtype, device=device, chunks=chunks,
                     streaming=streaming, seed=r.seed)
    m.recipe = r
    m.materialize(r.to_plan(m.tensors, m.num_layers))
    return m


def merge_recipe(recipe_path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                 device: str = "auto", dtype: str | None = None) -> Path:
    """Merge a recipe file (either format) and save the result with its provenance; the `merge` command."""
    r = load_recipe(recipe_path)
    out_p = Path(out).expanduser()
    if out_p.exists() and not force:
        raise CheckpointError(f"{out_p} already exists: choose another --out or pass --force to replace it")
    m = materialize_recipe(r, device=device, dtype=dtype)
    provenance = {
        "tool": "mergesearch merge",
        "recipe_file": str(Path(recipe_path).resolve()),
        "recipe": r.source,
        "recipe_format": r.format,
        "method": r.method,
        "dtype": str(m.dtype).replace("torch.", ""),
        "seed": r.seed,
        "base": m.base.fingerprint(),
        "experts": [e.fingerprint() for e in m.experts],
    }
    return save_model(m.model, out_p, base=m.base, provenance=provenance, force=force)
