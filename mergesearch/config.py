"""Pydantic models of the study YAML (frozen, extra="forbid"); the defaults of a study live here only.

A study file has six sections: `models`, `merge`, `space` (inline, or a YAML file beside the study,
in search_spaces/ or shipped in mergesearch/search_spaces/), `objectives`, `constraints` and `study`.
Relative paths are resolved against the YAML's folder.
Merge-method parameters (names, ranges, defaults) are NOT declared here: they come from the
operator registry, and `space.parameters` may only narrow or fix them.
"""

from __future__ import annotations

import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergesearch.errors import ConfigError, did_you_mean


DEFAULT_BATCH_SIZE = 64  # examples per forward pass when scoring, and per step of a fit; the CLI reads it too
# Decoding defaults of our own (JSONL, BIG-bench) exact-match tasks, where a task sets no `until` / `max_new_tokens`
# (evaluate.tasks applies them; the task keys, the eval command's help and the memory estimate read them here).
DEFAULT_UNTIL = ("\n",)
DEFAULT_MAX_NEW_TOKENS = 32
MERGE_DTYPE = "float32"  # a merge's dtype where neither the study file nor a recipe gives one
MERGE_SEED = 0  # the DARE/DELLA masks' seed where neither gives one
LMEVAL_MAX_GEN_TOKS = 256  # lm-eval's default max_gen_toks, for an lm-eval task whose YAML sets none (as HFLM)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelsConfig(_Frozen):
    """The base model and the experts fine-tuned from it (local HF folders)."""

    base: Path
    experts: dict[str, Path] = Field(description="expert name -> folder; a list uses the folder names")
    merge_common_vocab: bool = Field(False, description="merge only the vocabulary rows shared with the base")

    @field_validator("experts", mode="before")
    @classmethod
    def _names_from_folders(cls, v: Any) -> Any:
        if isinstance(v, list):
            names = [Path(str(p)).name.removeprefix("expert-") for p in v]
            if len(set(names)) != len(names):
                raise ValueError("two experts share a folder name: give them as a mapping name: path")
            return dict(zip(names, v))
        return v

    @field_validator("experts")
    @classmethod
    def _at_least_one(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one expert is needed")
        return v


class MergeConfig(_Frozen):
    """How candidates are materialised."""

    method: str = Field("task_arithmetic", description="a registered merge method, e.g. ties, dare_ties, slerp")
    dtype: Literal["float32", "bfloat16", "float16"] = MERGE_DTYPE
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    streaming: bool | Literal["auto"] = Field(
        False, description="keep sources in CPU memory and copy per tensor to the device; auto: only when the "
                           "sources do not fit the device's free memory (mergesearch.memory)")
    seed: int = Field(MERGE_SEED, description="seed of the DARE/DELLA random masks")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N")
        return v


class ParamSpec(_Frozen):
    """Narrow the searched range of a method parameter, or fix it."""

    low: float | None = None
    high: float | None = None
    fixed: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.fixed is not None and (self.low is not None or self.high is not None):
            raise ValueError("give either fixed or low/high, not both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}")
        return self


class _Chunking(_Frozen):
    """Row chunks per tensor (dim 0), each with its own value: the space's and the fit's, one rule."""

    chunks: int | Literal["auto"] = Field(1, description="intra-tensor chunks along dim 0, each its own value")
    chunk_budget: int | None = Field(None, ge=1, description="with chunks: auto, total chunks over all layers")
    max_chunks: int = Field(8, ge=1, description="with chunks: auto, most chunks one layer may get")

    @field_validator("chunks")
    @classmethod
    def _chunks(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("chunks must be >= 1 or 'auto'")
        return v

    @model_validator(mode="after")
    def _budget(self) -> _Chunking:
        if self.chunks == "auto" and self.chunk_budget is None:
            raise ValueError("chunks: auto needs chunk_budget (total chunks to allocate over the layers)")
        return self


class SpaceConfig(_Chunking):
    """Which coefficients are searched and at what granularity."""

    granularity: Literal["global", "per_layer", "per_tensor"] = Field(
        "per_layer", description="global: one value per expert; per_layer: one per expert and layer; "
                                 "per_tensor: one per expert and tensor (for fitted coefficients)")
    layer_groups: int | None = Field(None, ge=1, description="K contiguous layer groups instead of every layer")
    per_module: bool = Field(False, description="separate values for attention, MLP and norm tensors")
    parameters: dict[str, ParamSpec] = Field(default_factory=dict,
                                             description="method parameter -> narrowed range or fixed value")

    @model_validator(mode="after")
    def _groups(self) -> SpaceConfig:
        if self.layer_groups is not None and self.granularity != "per_layer":
            raise ValueError("layer_groups needs granularity: per_layer")
        return self


class TaskConfig(_Frozen):
    """One calibration task: a JSONL file, a BIG-bench JSON file or an lm-eval task."""

    name: str
    calib: str = Field(description="task used by the search (path, or lmeval:NAME)")
    test: str | None = Field(None, description="held-out split, only for final reporting")
    limit: int | None = Field(None, ge=1, description="use at most this many calibration examples")
    metric: Literal["exact_match", "acc", "acc_norm", "logprob"] | None = Field(
        None, description="score used by the search (default: the task's declared metric)")
    num_fewshot: int = Field(0, ge=0)
    fewshot: str | None = Field(None, description="file the few-shot examples are drawn from")
    until: list[str] | None = Field(None, description="stop strings of an exact-match task: the generated text is "
                                    "cut at the first of them (default: the newline)")
    max_new_tokens: int | None = Field(None, ge=1, description="most tokens generated per example (default: "
                                       f"{DEFAULT_MAX_NEW_TOKENS}, or the longest gold answer + 1)")
    extract: str | None = Field(None, description="regex finding the answer in the output: group 1, or the whole "
                                "match; no match is wrong (default: the whole output is the answer)")

    @model_validator(mode="after")
    def _distinct_splits(self) -> TaskConfig:
        if self.test is not None and self.test == self.calib:
            raise ValueError(f"task {self.name!r} uses the same file for calib and test: give a held-out test split")
        return self

    @model_validator(mode="after")
    def _decoding(self) -> TaskConfig:
        problem = decoding_problem(self.until, self.max_new_tokens, self.extract)
        if problem:
            raise ValueError(f"task {self.name!r}: {problem}")
        return self


def decoding_problem(until, max_new_tokens, extract) -> str | None:
    """What is wrong with a task's decoding keys (until, max_new_tokens, extract) and how to fix it; None if
    nothing. The one check behind both the study file and `load_task`."""
    if until is not None:
        if isinstance(until, str) or not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            return 'until must be a list of strings, e.g. until: ["\\n"]'
        if not any(until):
            return "until needs at least one non-empty stop string"
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        return f"max_new_tokens must be an integer >= 1 (got {max_new_tokens!r})"
    if extract is not None:
        if not isinstance(extract, str) or not extract:
            return "extract must be a non-empty regex string"
        try:
            re.compile(extract)
        except re.error as exc:
            return (f"extract regex {extract!r} does not compile ({exc}); escape special characters such as "
                    ". ( [ with a backslash")
    return None


class ObjectivesConfig(_Frozen):
    """What the search maximises."""

    tasks: list[TaskConfig]
    mode: Literal["mean", "per_task"] = Field("mean", description="one mean objective, or one per task (Pareto)")
    smooth: float = Field(0.0, ge=0.0, le=1.0, description="weight of the gold log-prob signal blended into the"
                          " score to separate candidates with equal accuracy (0 = accuracy only)")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="examples per forward pass")

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[TaskConfig]) -> list[TaskConfig]:
        if not v:
            raise ValueError("at least one task is needed")
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return v


# The fit: settings a study can search (fit.search), each with the type a trial suggests it as: float and int
# knobs take low/high, str knobs take choices among the setting's own values; clamp_high is fit.clamp's upper end.
FIT_KNOBS: dict[str, type] = {"lr": float, "steps": int, "start": float, "clamp_high": float, "pull": float,
                              "temperature": float, "objective": str, "granularity": str}
TASK_WEIGHTS_KNOB = "task_weights"  # one loss weight per calibration task, each searched in the same range


class KnobSpec(_Frozen):
    """A fit knob searched by the study: a float/int range, or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[str] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> KnobSpec:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError("give low <= high (or choices)")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class FitConfig(_Chunking):
    """Merge coefficients fitted by gradient on the calibration set (mergesearch.fit).

    Each trial starts every expert's weight at `start`, fits one coefficient per expert and
    granularity cell (e.g. per tensor and row chunk) with Adam on the training part of calib,
    keeps the coefficients with the best loss on the held-out `val_fraction` of calib, and is
    scored on that validation slice. The study searches the method's other parameters (density,
    ...) and the knobs listed in `search`.
    """

    objective: Literal["supervised", "distill"] = Field(
        "supervised", description="supervised: cross-entropy of the gold answer + stop; distill: KL to each "
                                  "task's expert on its prompts (no labels needed)")
    granularity: Literal["global", "per_layer", "per_module", "per_tensor"] = Field(
        "per_tensor", description="one coefficient per expert and: model (global), layer, layer x module group, "
                                  "or tensor; times `chunks` row chunks")
    chunks: int | Literal["auto"] = Field(4, description="row chunks per tensor (dim 0), each its own coefficient")
    start: float = Field(0.7, description="every coefficient's starting value (task arithmetic's scale)")
    clamp: tuple[float, float] = Field((0.0, 1.5), description="coefficients are kept in [low, high]")
    lr: float = Field(0.02, gt=0, description="Adam learning rate (cosine decay to 0)")
    steps: int = Field(300, ge=1, description="optimiser steps (at most: early stopping may end sooner)")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="examples per step, balanced over the tasks")
    pull: float = Field(0.0, ge=0, description="L2 pull of the coefficients toward `start`")
    temperature: float = Field(1.0, gt=0, description="distill: softmax temperature of teacher and student")
    teachers: dict[str, str] = Field(default_factory=dict,
                                     description="distill: task -> expert name (default: the expert named as the task)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of each task's calib examples held out "
                                "for early stopping and for scoring the trial")
    eval_every: int = Field(25, ge=1, description="steps between validation losses")
    patience: int = Field(4, ge=1, description="stop after this many validation checks without improvement")
    search: dict[str, KnobSpec] = Field(default_factory=dict, description="knobs the study searches: "
                                        f"{', '.join(FIT_KNOBS)}, {TASK_WEIGHTS_KNOB}")

    @field_validator("search")
    @classmethod
    def _known_knobs(cls, v: dict) -> dict:
        known = [*FIT_KNOBS, TASK_WEIGHTS_KNOB]
        for k, spec in v.items():
            if k not in known:
                raise ValueError(f"unknown knob {k!r}{did_you_mean(k, known)}; the knobs: {', '.join(known)}")
            if FIT_KNOBS.get(k) is str:
                allowed = typing.get_args(cls.model_fields[k].annotation)
                if spec.choices is None:
                    raise ValueError(f"{k} takes choices: a list of {', '.join(allowed)}")
                wrong = [c for c in spec.choices if c not in allowed]
                if wrong:
                    raise ValueError(f"{k}: {wrong[0]!r} is not one of {', '.join(allowed)}"
                                     f"{did_you_mean(wrong[0], allowed)}")
            elif spec.choices is not None:
                raise ValueError(f"{k} is a number: give low and high, not choices")
        return v

    def knob_value(self, name: str):
        """The value this section gives a searchable knob (FIT_KNOBS), what a trial that does not search it uses."""
        return self.clamp[1] if name == "clamp_high" else getattr(self, name)

    @model_validator(mode="after")
    def _consistent(self) -> FitConfig:
        lo, hi = self.clamp
        if lo > hi:
            raise ValueError(f"fit.clamp low {lo} > high {hi}")
        if not lo <= self.start <= hi:
            raise ValueError(f"fit.start {self.start} is outside fit.clamp [{lo}, {hi}]")
        return self


class ConstraintsConfig(_Frozen):
    """Feasibility rules, honoured by samplers that support Optuna constraints."""

    max_drop_vs_base: float | None = Field(None, ge=0.0, le=1.0,
                                           description="no task may fall more than this below the base")


class StudyConfig(_Frozen):
    """The Optuna study: storage, sampler, budget."""

    name: str = Field("study", pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str | None = Field(None, description="default sqlite:///<yaml folder>/<name>.db")
    seed: int = 0
    n_trials: int | None = Field(50, ge=1)
    timeout: float | None = Field(None, gt=0, description="seconds")
    sampler: Literal["auto", "tpe", "cmaes", "gp", "nsga2", "random"] = "auto"
    pruner: Literal["none", "median", "halving"] = "median"
    n_slices: int = Field(4, ge=1, description="calibration slices; the running score is reported after each")
    baselines: bool = Field(True, description="evaluate each expert, uniform and task arithmetic first")
    top_k_test: int = Field(5, ge=0, description="re-score the top trials on the test splits")

    @model_validator(mode="after")
    def _budget(self) -> StudyConfig:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("give n_trials or timeout")
        return self


def sampler_objectives_problem(sampler: str, n_objectives: int) -> str | None:
    """Why `sampler` cannot search `n_objectives` objectives, and what to use; None if it can. The one check behind
    the study file and study.samplers.make_sampler."""
    if n_objectives > 1 and sampler in ("cmaes", "gp"):
        return (f"sampler {sampler!r} handles one objective; use nsga2, tpe, random or auto for {n_objectives} "
                "objectives (objectives.mode: per_task)")
    return None


class Config(_Frozen):
    """A whole study file."""

    models: ModelsConfig
    merge: MergeConfig = MergeConfig()
    space: SpaceConfig = SpaceConfig()
    objectives: ObjectivesConfig
    constraints: ConstraintsConfig = ConstraintsConfig()
    study: StudyConfig = StudyConfig()
    fit: FitConfig | None = Field(None, description="fit merge coefficients by gradient in every trial")
    source: Path | None = Field(None, description="the YAML file this was read from (set by load_config)")

    @model_validator(mode="after")
    def _sampler_fits_objectives(self) -> Config:
        # Checked here, not when the sampler is built, so that the study's storage is never created for it.
        n_obj = len(self.objectives.tasks) if self.objectives.mode == "per_task" else 1
        problem = sampler_objectives_problem(self.study.sampler, n_obj)
        if problem:
            raise ValueError(problem)
        if self.fit is not None and self.space.chunks != 1:
            raise ValueError("with fit:, chunks belong to fit.chunks (the fitted coefficients); set space.chunks to 1")
        return self

    @property
    def storage_url(self) -> str:
        if self.study.storage:
            return self.study.storage
        folder = self.source.parent if self.source else Path.cwd()
        return f"sqlite:///{folder / (self.study.name + '.db')}"


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(exc, 'problem', exc)}): fix the syntax") from None


def _resolve_paths(raw: dict, folder: Path) -> dict:
    """Make model and task paths relative to the YAML's folder (URLs and lmeval: names left alone)."""

    def fix(p: Any) -> Any:
        if not isinstance(p, str) or ":" in p.split("/")[0]:
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (folder / path))

    models = raw.get("models")
    if isinstance(models, dict):
        models = dict(models)
        if "base" in models:
            models["base"] = fix(models["base"])
        ex = models.get("experts")
        if isinstance(ex, list):
            models["experts"] = [fix(p) for p in ex]
        elif isinstance(ex, dict):
            models["experts"] = {k: fix(p) for k, p in ex.items()}
        raw["models"] = models
    objectives = raw.get("objectives")
    if isinstance(objectives, dict) and isinstance(objectives.get("tasks"), list):
        tasks = []
        for t in objectives["tasks"]:
            if isinstance(t, dict):
                t = {k: (fix(v) if k in ("calib", "test", "fewshot") else v) for k, v in t.items()}
            tasks.append(t)
        raw["objectives"] = {**objectives, "tasks": tasks}
    return raw


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config model of the mapping at `loc` (pydantic's error location from the file's top: field names,
    list indices, mapping keys), or None where the path passes a union of several models or ends elsewhere."""
    ann: Any = Config
    steps, i = list(loc), 0
    while True:
        while True:  # through Optional[...], list[...] (an index) and dict[str, ...] (a key) to what is inside
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            origin = typing.get_origin(ann)
            if origin in (typing.Union, types.UnionType) and len(args) == 1:
                ann = args[0]
            elif origin in (list, tuple) and args and i < len(steps) and isinstance(steps[i], int):
                ann, i = args[0], i + 1
            elif origin is dict and len(args) == 2 and i < len(steps):
                ann, i = args[1], i + 1
            else:
                break
        is_model = isinstance(ann, type) and issubclass(ann, BaseModel)
        if i == len(steps):
            return ann if is_model else None
        if not is_model or str(steps[i]) not in ann.model_fields:
            return None
        ann, i = ann.model_fields[str(steps[i])].annotation, i + 1


def _explain(exc: ValidationError, path: Path, raw: dict) -> ConfigError:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        parent = tuple(err["loc"][:-1])
        model = _model_at(parent)
        if model is None:
            return ConfigError(f"{path}: unknown key {loc!r}")
        keys = [k for k in model.model_fields if k != "source"]
        return ConfigError(f"{path}: unknown key {loc!r}{did_you_mean(key, keys)}; "
                           f"{'.'.join(map(str, parent)) or 'the file'} takes {', '.join(keys)}")
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    msg = err["msg"].removeprefix("Value error, ")
    return ConfigError(f"{path}: {loc or 'file'}: {msg}{more}")


def shipped_spaces() -> list[str]:
    """File names of the search spaces shipped in the package (mergesearch/search_spaces/)."""
    return sorted(p.name for p in resources.files("mergesearch").joinpath("search_spaces").iterdir()
                  if p.name.endswith(".yaml"))


def load_space(spec: str | Path | dict, folder: Path) -> dict:
    """An inline space mapping, or one read from a YAML file: looked up beside the study, in a
    search_spaces/ folder beside the study's folder or the working directory, then among the spaces
    shipped in the package (so a study copied anywhere still finds `per_layer_ties.yaml`)."""
    if isinstance(spec, dict):
        return spec
    candidates = [folder / spec, folder.parent / "search_spaces" / spec, Path.cwd() / "search_spaces" / spec,
                  Path(spec)]
    found = next((Path(c) for c in candidates if Path(c).is_file()), None)
    if found is None and Path(str(spec)).name == str(spec) and str(spec) in shipped_spaces():
        with resources.as_file(resources.files("mergesearch").joinpath("search_spaces", str(spec))) as shipped:
            return _space_file(shipped)
    if found is None:
        raise ConfigError(f"search space file {spec!r} not found beside the study, in search_spaces/ or among the "
                          f"shipped spaces{did_you_mean(str(spec), shipped_spaces())} "
                          f"({', '.join(shipped_spaces())})")
    return _space_file(found)


def _space_file(path: Path) -> dict:
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search space must be a mapping of keys to values")
    return raw


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read and validate a study YAML (safe_load + pydantic) before any work starts.

    `overrides` maps dotted keys (e.g. {"study.n_trials": 10}) to values, as CLI flags give them.
    """
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file must be a mapping with models, objectives, ... sections")
    folder = path.parent.resolve()
    raw = _resolve_paths(dict(raw), folder)
    if "space" in raw:
        raw["space"] = load_space(raw["space"], folder)
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        raw[section] = {**(raw.get(section) or {}), key: value}
    try:
        return Config.model_validate({**raw, "source": path.resolve()})
    except ValidationError as exc:
        raise _explain(exc, path, raw) from None


def config_from_dict(raw: dict, source: Path | None = None) -> Config:
    """Validate an in-memory study mapping (Python API, demo); paths are taken as given."""
    try:
        return Config.model_validate({**raw, "source": source})
    except ValidationError as exc:
        raise _explain(exc, source or Path("<dict>"), raw) from None
