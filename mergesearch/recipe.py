"""Recipe formats <-> the canonical merge plan: our recipe and mergekit's YAML, read and written.

Users write recipes; `Recipe.to_plan` resolves one to a `Plan` (mergesearch.plan) for given tensors,
and `plan_to_recipe` / `plan_to_mergekit` write a plan back out (what `export` does).

* our recipe (read and written here without loss):

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

Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from mergesearch import operators
from mergesearch.checkpoints import MODULE_KINDS, TensorInfo, parse_dtype, same_path
from mergesearch.config import MERGE_DTYPE, MERGE_SEED
from mergesearch.errors import ConfigError, OperatorError, did_you_mean
from mergesearch.fileio import atomic_write
from mergesearch.operators import Operator, num_chunks
from mergesearch.plan import Plan

log = logging.getLogger(__name__)

__all__ = [
    "Recipe", "load_recipe", "recipe_from_dict", "recipe_chunk_counts", "plan_to_recipe", "plan_to_mergekit",
    "write_recipe",
]


# --- chunks ----------------------------------------------------------------------------------------


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
    dtype: str = MERGE_DTYPE
    chunks: PositiveInt | list[PositiveInt] = 1
    seed: int = MERGE_SEED


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
    dtype: str = MERGE_DTYPE
    chunks: int | list[int] = 1  # one count, or one per layer
    seed: int = MERGE_SEED
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
            if base is not None and not any(same_path(_resolve_path(m.model, root_p), base) for m in entries):
                entries.append(_ModelEntry(model=mk.base_model))  # as mergekit: base joins the inputs
            if base is None:
                base = _resolve_path(entries[0].model, root_p)
        else:
            if base is None:
                raise ConfigError(f"{where}: merge_method {op.name!r} needs `base_model:`")
            entries = [m for m in entries if not same_path(_resolve_path(m.model, root_p), base)]
        return Recipe(method=op.name, base_model=base, models=[_resolve_path(m.model, root_p) for m in entries],
                      parameters=dict(mk.parameters or {}), model_parameters=[dict(m.parameters) for m in entries],
                      dtype=mk.dtype or MERGE_DTYPE, chunks=1, seed=MERGE_SEED, format="mergekit", source=dict(data))
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
                   models: Sequence[str | os.PathLike], dtype: str = MERGE_DTYPE, chunks: int | Sequence[int] = 1,
                   seed: int = MERGE_SEED) -> dict:
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
                     models: Sequence[str | os.PathLike], dtype: str = MERGE_DTYPE) -> dict:
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
    return atomic_write(p, yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=None, width=120))


