"""The fit stage of a study: per trial, fit the merge coefficients by gradient, search what gradients cannot.

With a `fit:` section, a trial suggests the method's other parameters (density, ...) from the
space and the fit's knobs listed in `fit.search` (lr, steps, start, clamp_high, pull, temperature,
objective, granularity, per-task loss weights), fits one coefficient per expert and granularity
cell on the training part of calib, and is scored on the held-out validation slice of calib. The
fitted coefficients are stored with the trial (user attribute `fit`), so export, report, the
held-out test and a resumed study rebuild the same merge exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence

import optuna
import torch

from mergesearch import operators
from mergesearch.config import FIT_KNOBS, TASK_WEIGHTS_KNOB, Config, FitConfig, SpaceConfig
from mergesearch.errors import ConfigError
from mergesearch.fit import CoefficientFitter, FitOptions, FitResult, split_calib
from mergesearch.plan import Plan
from mergesearch.space import SearchSpace

log = logging.getLogger(__name__)

KNOB_PREFIX = "fit."
TASK_WEIGHT = "task_weight[{}]"


def fit_space_config(fit: FitConfig, method: str, granularity: str | None = None) -> SpaceConfig:
    """The coefficient space of a fit granularity: one `weight` per expert and cell, everything else fixed
    (the other parameters come from the study's own space)."""
    g = granularity or fit.granularity
    fixed = {p.name: {"fixed": p.default} for p in operators.get(method).params if p.name != "weight"}
    return SpaceConfig(granularity="per_layer" if g == "per_module" else g, per_module=g == "per_module",
                       chunks=fit.chunks, chunk_budget=fit.chunk_budget, max_chunks=fit.max_chunks,
                       parameters={**fixed, "weight": {"low": fit.clamp[0], "high": fit.clamp[1]}})


def method_space_config(cfg: Config) -> SpaceConfig:
    """The study's own space with a fit: weights start at fit.start (then fitted) and lambda is 1 (the fitted
    coefficients absorb it); the other method parameters are searched as the space says."""
    raw = cfg.space.model_dump()
    raw["parameters"].update({"weight": {"fixed": cfg.fit.start}, "lambda": {"fixed": 1.0}})
    return SpaceConfig.model_validate(raw)


def fit_fingerprint(fit: FitConfig) -> str:
    return hashlib.sha256(json.dumps(fit.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class FitKnobs:
    """The fit: knobs a study searches (fit.search): what a trial suggests, their plain values, and a trial's
    FitOptions. Each knob's type is read from config.FIT_KNOBS, its plain value from the fit: section."""

    def __init__(self, fit: FitConfig, task_names: Sequence[str]):
        self.fit = fit
        self.task_names = list(task_names)

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict:
        """Ask the trial for every searched knob (names `fit.<knob>` and `task_weight[<task>]`)."""
        out = {}
        for name, spec in self.fit.search.items():
            if name == TASK_WEIGHTS_KNOB:
                for t in self.task_names:
                    out[TASK_WEIGHT.format(t)] = trial.suggest_float(TASK_WEIGHT.format(t), spec.low, spec.high,
                                                                     log=spec.log)
                continue
            key, kind = KNOB_PREFIX + name, FIT_KNOBS[name]
            if kind is str:
                out[key] = trial.suggest_categorical(key, list(spec.choices))
            elif kind is int:
                out[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
            else:
                out[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
        return out

    def defaults(self) -> dict:
        """The knobs at the config's own values (the plain fit), clipped into their searched ranges."""
        out = {}
        for name, spec in self.fit.search.items():
            if name == TASK_WEIGHTS_KNOB:
                for t in self.task_names:
                    out[TASK_WEIGHT.format(t)] = min(max(1.0, spec.low), spec.high)
                continue
            v, kind = self.fit.knob_value(name), FIT_KNOBS[name]
            if kind is str:
                out[KNOB_PREFIX + name] = v if v in spec.choices else spec.choices[0]
            else:
                v = min(max(v, spec.low), spec.high)
                out[KNOB_PREFIX + name] = int(round(v)) if kind is int else float(v)
        return out

    def options(self, params: Mapping, seed: int) -> tuple[FitOptions, str]:
        """(FitOptions, granularity) of a trial's parameters: its searched knobs, the fit: section's values for
        the others; the start is kept at or below a searched clamp_high."""
        f = self.fit
        knobs = {name: kind(params.get(KNOB_PREFIX + name, f.knob_value(name))) for name, kind in FIT_KNOBS.items()}
        hi = knobs.pop("clamp_high")
        granularity = knobs.pop("granularity")
        knobs["start"] = min(knobs["start"], hi)
        opts = FitOptions.from_config(
            f, **knobs, clamp=(f.clamp[0], hi),
            task_weights={t: float(params.get(TASK_WEIGHT.format(t), 1.0)) for t in self.task_names}, seed=seed)
        return opts, granularity


class FitStage:
    """Everything a fitted trial needs beyond the plain study: the calib split, the fitter, the coefficient
    spaces and the knobs."""

    def __init__(self, cfg: Config, mat, tokenizer, calib_tasks: Sequence, expert_names: Sequence[str],
                 space_for, *, spaces: Mapping[str, SearchSpace] | None = None, progress: bool = False):
        self.cfg = cfg
        self.fit: FitConfig = cfg.fit
        self.mat = mat
        self.expert_names = list(expert_names)
        self.task_names = [t.name for t in calib_tasks]
        splits = [split_calib(t, self.fit.val_fraction, cfg.study.seed) for t in calib_tasks]
        self.train_tasks = [a for a, _ in splits]
        self.val_tasks = [b for _, b in splits]
        teachers = {}
        for t in self.task_names:
            name = self.fit.teachers.get(t, t)
            if name in self.expert_names:
                teachers[t] = self.expert_names.index(name)
            elif t in self.fit.teachers:
                raise ConfigError(f"fit.teachers.{t}: no expert named {name!r} (experts: {', '.join(expert_names)})")
        objectives = self.fit.search["objective"].choices if "objective" in self.fit.search else [self.fit.objective]
        if "distill" in objectives:
            missing = [t for t in self.task_names if t not in teachers]
            if missing:
                raise ConfigError(f"fit: distill needs an expert per task, none is named {missing[0]!r}: add "
                                  f"fit.teachers: {{{missing[0]}: EXPERT}} (experts: {', '.join(expert_names)})")
        self.knobs = FitKnobs(self.fit, self.task_names)
        self.fitter = CoefficientFitter(mat, tokenizer, self.train_tasks, self.val_tasks, teachers=teachers,
                                        batch_size=self.fit.batch_size, progress=progress)
        self._space_for = space_for  # SpaceConfig -> SearchSpace over the model's tensors
        self._spaces: dict[str, SearchSpace] = dict(spaces or {})  # granularity -> coefficient space

    # -- spaces and knobs --

    def granularities(self) -> list[str]:
        spec = self.fit.search.get("granularity")
        return list(spec.choices) if spec is not None else [self.fit.granularity]

    def coef_space(self, granularity: str) -> SearchSpace:
        if granularity not in self._spaces:
            self._spaces[granularity] = self._space_for(fit_space_config(self.fit, self.cfg.merge.method,
                                                                         granularity))
        return self._spaces[granularity]

    def keys(self) -> dict[str, list[str]]:
        """Coefficient names per granularity (stored in the study meta for the report)."""
        return {g: [s.key for s in self.coef_space(g).slots] for g in self.granularities()}

    # -- plans --

    def start_plan(self, plan: Plan, opts: FitOptions) -> Plan:
        """The trial's merge at the start of the fit: every weight at the start value."""
        params = dict(plan.params)
        params["weight"] = torch.full_like(params["weight"], opts.start)
        return Plan(plan.method, plan.tensor_names, plan.chunks, plan.n_experts, params)

    def fitted_plan(self, plan: Plan, granularity: str, coef: Sequence[float]) -> Plan:
        """`plan` with its weights replaced by fitted coefficients (one per slot of the coefficient space)."""
        space = self.coef_space(granularity)
        if len(coef) != space.n_params:
            raise ConfigError(f"stored fit has {len(coef)} coefficients, the {granularity} space {space.n_params}: "
                              "the study was fitted with another fit: section")
        weight = space.arrays(dict(zip((s.key for s in space.slots), coef)))["weight"]
        return Plan(plan.method, plan.tensor_names, plan.chunks, plan.n_experts, {**plan.params, "weight": weight})

    def run(self, plan: Plan, params: Mapping) -> tuple[FitResult, Plan, dict]:
        """Fit the coefficients of a trial whose method parameters give `plan`; (result, fitted plan, record)."""
        opts, granularity = self.knobs.options(params, self.cfg.study.seed)
        start = self.start_plan(plan, opts)
        result = self.fitter.fit(start, self.coef_space(granularity), opts)
        record = {**result.record(), "granularity": granularity, "objective": opts.objective}
        return result, self.fitted_plan(start, granularity, result.coef.tolist()), record

    def plan_from_record(self, plan: Plan, params: Mapping, record: Mapping) -> Plan:
        opts, _ = self.knobs.options(params, self.cfg.study.seed)
        return self.fitted_plan(self.start_plan(plan, opts), record["granularity"], record["coef"])
