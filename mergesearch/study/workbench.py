"""Everything a study process loads once: sources, search space, tokenizer, calibration set, fit stage.

`Workbench(cfg)` checks the checkpoints, builds the search space from their metadata, reads the
calibration tasks (bad input fails before any weight is loaded), loads the sources into the
materialiser and tokenises the calibration set. It turns a point of the space, a stored trial or
a baseline into a merge plan, and scores a plan. The trial loop (runner.py), the baselines and
held-out scoring (baselines.py) and export all work on one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch

from mergesearch import memory
from mergesearch.checkpoints import check_compatible, open_checkpoint, resolve_device, task_vector_stats
from mergesearch.config import Config, SpaceConfig, load_config
from mergesearch.errors import CandidateError, ConfigError, StudyError
from mergesearch.fit import require_fittable
from mergesearch.materializer import Materializer
from mergesearch.plan import Plan
from mergesearch.space import SearchSpace, allocate_chunks, layer_importance
from mergesearch.study import records
from mergesearch.study.fitting import FitStage, fit_fingerprint, fit_space_config, method_space_config
from mergesearch.timings import PhaseTimer

log = logging.getLogger(__name__)

class PrunedWithRecord(optuna.TrialPruned):
    """A pruned trial with what it measured before it was stopped (timings, why), for the runner to store."""

    def __init__(self, record: dict):
        super().__init__(record.get("fail_reason", "pruned"))
        self.record = record


def expert_dirs(cfg: Config) -> list[Path]:
    return [cfg.models.experts[n] for n in cfg.models.experts]


def build_space(cfg: Config, base=None, experts=None, space_cfg: SpaceConfig | None = None,
                layer_chunks: Sequence[int] | None = None) -> SearchSpace:
    """The study's search space from checkpoint metadata only (no weights loaded unless chunks: auto).

    With a fit, the space holds the method's other parameters (the weights are fitted, see study.fitting);
    `space_cfg` builds another space (e.g. a fit's coefficient space) over the same tensors; `layer_chunks`
    gives `chunks: auto` an allocation already made (it reads every task vector)."""
    base = base or open_checkpoint(cfg.models.base)
    experts = experts or [open_checkpoint(p) for p in expert_dirs(cfg)]
    tensors = [t for t in base.tensors.values() if t.dtype.is_floating_point]
    if cfg.fit is not None:
        require_fittable(cfg.merge.method)
    if space_cfg is None:
        space_cfg = method_space_config(cfg) if cfg.fit is not None else cfg.space
    if space_cfg.chunks == "auto" and layer_chunks is None:
        delta_sq, _, _ = task_vector_stats(base, experts)
        layer_chunks = allocate_chunks(layer_importance(delta_sq, base.num_layers), space_cfg.chunk_budget,
                                       space_cfg.max_chunks)
    return SearchSpace(space_cfg, cfg.merge.method, tensors, list(cfg.models.experts), base.num_layers, layer_chunks)


def study_fingerprint(cfg: Config, space: SearchSpace) -> str:
    """Identity of what a study searches: its space, and its fit section if any."""
    fp = space.fingerprint()
    return fp if cfg.fit is None else f"{fp}+fit:{fit_fingerprint(cfg.fit)}"


def load_tasks(cfg: Config, split: str) -> list:
    """The study's tasks on one split ("calib" or "test"); tasks without that split are left out."""
    from mergesearch.evaluate import load_task

    tasks = []
    for t in cfg.objectives.tasks:
        spec = t.calib if split == "calib" else t.test
        if spec is None:
            continue
        tasks.append(load_task(spec, limit=t.limit if split == "calib" else None, seed=cfg.study.seed,
                               num_fewshot=t.num_fewshot, fewshot_spec=t.fewshot, name=t.name, metric=t.metric,
                               until=t.until, max_new_tokens=t.max_new_tokens, extract=t.extract))
    return tasks


def study_tasks(path: str | Path, split: str) -> list:
    """The tasks of the study YAML at `path` on one split, as the study loads them (`mergesearch eval --study`)."""
    tasks = load_tasks(load_config(path), split)
    if not tasks:
        raise ConfigError(f"{path}: no task has a {split} split; use the other split")
    return tasks


class Workbench:
    """The sources, space, tokenizer and calibration set of one study, loaded once."""

    # Tests set a callable(stage) here that raises (simulated failures) or pauses (crash tests) at
    # "merge", "evaluate" or "store"; users never do.
    fault_hook = None

    def __init__(self, cfg: Config, *, load_evaluator: bool = True):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.timer = PhaseTimer()  # where opening went, stored in the study's meta (mergesearch.timings)
        with self.timer.phase("checkpoints_s"):
            base = open_checkpoint(cfg.models.base)
            experts = [open_checkpoint(p) for p in expert_dirs(cfg)]
            check_compatible(base, experts, merge_common_vocab=cfg.models.merge_common_vocab)
        self.expert_names = list(cfg.models.experts)
        with self.timer.phase("space_s"):
            self.space = build_space(cfg, base, experts)
        self.fingerprint = study_fingerprint(cfg, self.space)
        # With a fit, the materialiser's chunks are the fitted coefficients' (the method space has one chunk).
        self.chunk_space = (build_space(cfg, base, experts, fit_space_config(cfg.fit, cfg.merge.method))
                            if cfg.fit is not None else self.space)
        self.want_chunks, self.chunk_counts = self.chunk_space.want_chunks, tuple(self.chunk_space.chunk_counts)
        # Tasks are read (and checked) before the weights are loaded: bad input fails fast.
        need_calib = load_evaluator or cfg.fit is not None
        with self.timer.phase("tasks_s"):
            self.calib_tasks = load_tasks(cfg, "calib") if need_calib else []
        streaming = cfg.merge.streaming
        if streaming == "auto":  # decided against the free memory, and said (mergesearch.memory)
            tensors = [t for t in base.tensors.values() if t.dtype.is_floating_point]
            plans = memory.study_estimates(cfg, tensors, len(experts))
            streaming = plans["streams"]
            log.info(plans["why"])
            if plans["host_warning"]:
                log.warning(plans["host_warning"])
        dev = resolve_device(cfg.merge.device)
        if dev.type == "cuda":
            # this process's GPU: what a bare torch.cuda call means (streams, synchronize, pinned memory's
            # context), or `worker --device cuda:1` would also open a context on GPU 0
            torch.cuda.set_device(dev)
        self.mat = Materializer(base, experts, cfg.merge.method, dtype=cfg.merge.dtype, device=cfg.merge.device,
                                chunks=self.want_chunks, streaming=streaming, seed=cfg.merge.seed,
                                merge_common_vocab=cfg.models.merge_common_vocab)
        self.timer.update(self.mat.timer.seconds)
        with self.timer.phase("tokenizer_s"):
            self.tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=False)
        self.fit_stage = None
        if cfg.fit is not None:
            # every granularity shares the chunk allocation (and the default one is the space just built)
            self.fit_stage = FitStage(cfg, self.mat, self.tokenizer, self.calib_tasks, self.expert_names,
                                      lambda sc: build_space(cfg, base, experts, sc, self.chunk_space.layer_chunks),
                                      spaces={cfg.fit.granularity: self.chunk_space})
            # a fitted trial is scored on the calib examples the fit held out
            self.calib_tasks = self.fit_stage.val_tasks
        self.evaluator = None
        if load_evaluator:
            from mergesearch.evaluate import Evaluator

            with self.timer.phase("evaluator_s"):
                self.evaluator = Evaluator(self.mat.model, self.tokenizer, self.calib_tasks,
                                           batch_size=cfg.objectives.batch_size,
                                           gold_logprob=cfg.objectives.smooth > 0)
        self.task_names = [t.name for t in cfg.objectives.tasks]
        self.per_task = cfg.objectives.mode == "per_task"
        self.objective_names = self.task_names if self.per_task else ["mean"]
        self.device = str(self.mat.device)
        self.base_scores: dict[str, float] = {}  # the base model's objective scores, once known (constraints)
        self.sampler_seed = cfg.study.seed  # this process's sampler seed (study.opening)

    # --- plans ---------------------------------------------------------------------------------

    def plan_for(self, values: dict[str, float]) -> Plan:
        """The merge of a point of the method space (with a fit: before fitting, weights at fit.start)."""
        cmax = max(self.chunk_counts, default=1)
        arrays = {k: v.expand(-1, -1, cmax).contiguous() if v.shape[2] != cmax else v
                  for k, v in self.space.arrays(values).items()}
        return Plan(self.space.op.name, tuple(t.name for t in self.mat.tensors), self.chunk_counts,
                    len(self.expert_names), arrays)

    def plan_for_trial(self, t: optuna.trial.FrozenTrial) -> Plan:
        """The exact merge a stored trial scored: a baseline, a searched point, or a fitted one."""
        if records.baseline_name(t) is not None:
            return self.baseline_plan(t.user_attrs["weights"])
        plan = self.plan_for(t.params)
        if self.fit_stage is not None:
            fitted = records.record(t).get(records.FIT_KEY)
            if fitted is None:
                raise StudyError(f"trial {t.number} stores no fitted coefficients: it did not complete its fit")
            plan = self.fit_stage.plan_from_record(plan, t.params, fitted)
        return plan

    def baseline_plan(self, weights: Sequence[float]) -> Plan:
        """Task arithmetic with one global weight per expert (lambda 1): what every baseline is."""
        return Plan.weighted_sum(self.mat.tensors, weights, chunks=self.want_chunks)

    @property
    def n_search_params(self) -> int:
        """Parameters the sampler sees: the space's slots, plus the fit's knobs and task weights."""
        return self.space.n_params + (len(self.fit_stage.knobs.defaults()) if self.fit_stage is not None else 0)

    def start_point_guess(self) -> dict:
        """Where the search starts before any baseline is known: the uniform merge, or the plain fit."""
        return ({**self.space.point(), **self.fit_stage.knobs.defaults()} if self.fit_stage is not None
                else self.space.point())

    # --- scoring -------------------------------------------------------------------------------

    def task_score(self, result, task: str) -> float:
        """The searched score of a task: its metric, blended with the gold answer's probability if asked."""
        score = result.primary(task)
        smooth = self.cfg.objectives.smooth
        if smooth > 0:
            recs = result.records.get(task) or []
            probs = [math.exp(r["logprob"]) for r in recs if r.get("logprob") is not None]
            if probs:
                score = (1 - smooth) * score + smooth * (sum(probs) / len(probs))
        return float(score)

    def objective_values(self, result) -> list[float]:
        per = [self.task_score(result, t) for t in self.task_names]
        return per if self.per_task else [sum(per) / len(per)]

    def score_plan(self, plan: Plan, trial: optuna.Trial | None = None) -> tuple[list[float], dict]:
        """Materialise and score a plan; with a trial, report running scores and prune.

        Returns (objective values, the trial record: scores, objective_scores, merge_s, eval_s, device).
        A pruned trial raises PrunedWithRecord, which carries its record (timings and why)."""
        t0 = time.perf_counter()
        if self.fault_hook:
            self.fault_hook("merge")
        self.mat.materialize(plan)
        t1 = time.perf_counter()
        if self.fault_hook:
            self.fault_hook("evaluate")
        n_slices = self.cfg.study.n_slices
        # running scores are stored (one storage write each) only for a pruner to read: none without one
        reports = trial is not None and not self.per_task and not isinstance(trial.study.pruner,
                                                                              optuna.pruners.NopPruner)
        result = None
        for step, result in enumerate(self.evaluator.iter_slices(n_slices)):
            if reports and step < n_slices - 1:
                # step = slices scored so far: successive halving's first rung is at step min_resource = 1
                trial.report(self.objective_values(result)[0], step + 1)
                if trial.should_prune():
                    raise PrunedWithRecord({"merge_s": t1 - t0, "eval_s": time.perf_counter() - t1,
                                            "device": self.device,
                                            "fail_reason": f"pruned after slice {step + 1}/{n_slices}"})
        values = self.objective_values(result)
        if not all(math.isfinite(v) for v in values):
            raise CandidateError(f"evaluation gave a non-finite score {values}")
        rec = {"scores": {t: dict(result.scores[t]) for t in self.task_names},
               "objective_scores": {t: self.task_score(result, t) for t in self.task_names},
               "merge_s": t1 - t0, "eval_s": time.perf_counter() - t1, "device": self.device}
        return values, rec


def failure_reason(exc: BaseException) -> str:
    """One line saying why a candidate failed; out-of-memory errors (CUDA's or the CPU allocator's) say so."""
    text = (str(exc).strip().splitlines() or [""])[0]
    low = str(exc).lower()
    is_oom = isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))
    if is_oom or any(s in low for s in ("out of memory", "can't allocate memory", "not enough memory")):
        return f"out of memory: {text or type(exc).__name__}"
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, CandidateError) else text
