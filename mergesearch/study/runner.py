"""The study runner: one process that merges candidates in place and scores them for an Optuna study.

`StudyRunner(cfg)` loads the sources once (materialiser), tokenises the calibration set once
(evaluator), opens or creates the study and then runs trials: suggest -> plan -> materialise ->
score slice by slice (pruning) -> store. Baselines (base, each expert alone, the uniform merge and
task arithmetic at a few global scales) are evaluated first and stored as tagged trials.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState, create_trial

from mergesearch import __version__
from mergesearch.checkpoints import check_compatible, open_checkpoint, task_vector_stats
from mergesearch.config import Config, SpaceConfig
from mergesearch.errors import CandidateError, StudyError
from mergesearch.fit import require_fittable
from mergesearch.materializer import Materializer
from mergesearch.plan import Plan
from mergesearch.space import SearchSpace, allocate_chunks, layer_importance
from mergesearch.study import records as R
from mergesearch.study.fitting import FitStage, fit_fingerprint, fit_space_config, method_space_config
from mergesearch.study.samplers import make_pruner, make_sampler
from mergesearch.study.storage import open_storage, require_existing, study_exists

log = logging.getLogger(__name__)

TA_SCALES = (0.3, 0.5, 0.7, 1.0)  # per-expert weights of the task-arithmetic baselines
BASELINE_METHOD = "task_arithmetic"  # baselines mean the same whatever method the study searches
MAX_FAILURES_IN_A_ROW = 10  # then the cause is not the candidates: stop instead of burning the budget
PAUSE_ENV = "MERGESEARCH_PAUSE_AT"


def pause_hook_from_env():
    """A fault hook for crash tests, or None (the default: the variable is unset).

    MERGESEARCH_PAUSE_AT=STAGE[:N] makes the N-th arrival (default 1, counted from process start)
    at STAGE ("merge", "evaluate" or "store") write "mergesearch: paused at STAGE" to stderr and
    sleep, so that a test can kill -9 the process exactly there.
    """
    spec = os.environ.get(PAUSE_ENV, "").strip()
    if not spec:
        return None
    stage, _, nth = spec.partition(":")
    if stage not in ("merge", "evaluate", "store") or not (nth or "1").isdigit():
        raise StudyError(f"{PAUSE_ENV}={spec!r}: give merge, evaluate or store, optionally :N")
    seen = {"n": 0}

    def hook(at: str) -> None:
        if at == stage:
            seen["n"] += 1
            if seen["n"] == int(nth or 1):
                sys.stderr.write(f"mergesearch: paused at {at}\n")
                sys.stderr.flush()
                time.sleep(3600)

    return hook


def failure_reason(exc: BaseException) -> str:
    """One line saying why a candidate failed; out-of-memory errors (CUDA's or the CPU allocator's) say so."""
    text = (str(exc).strip().splitlines() or [""])[0]
    low = str(exc).lower()
    is_oom = isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))
    if is_oom or any(s in low for s in ("out of memory", "can't allocate memory", "not enough memory")):
        return f"out of memory: {text or type(exc).__name__}"
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, CandidateError) else text


def sampler_seed(seed: int, n_existing: int, joining: bool) -> int:
    """The seed of this process's sampler. A fresh study uses the config's seed (same config, same study);
    a resumed study or a joining worker mixes in the trials already stored (and a worker its pid), or it
    would replay the proposals its predecessors or siblings already made with the same seed."""
    if n_existing == 0 and not joining:
        return seed
    salt = f"{seed}:{n_existing}:{os.getpid() if joining else ''}"
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little")


def _expert_dirs(cfg: Config) -> list[Path]:
    return [cfg.models.experts[n] for n in cfg.models.experts]


def build_space(cfg: Config, base=None, experts=None, space_cfg: SpaceConfig | None = None,
                layer_chunks: Sequence[int] | None = None) -> SearchSpace:
    """The study's search space from checkpoint metadata only (no weights loaded unless chunks: auto).

    With a fit, the space holds the method's other parameters (the weights are fitted, see study.fitting);
    `space_cfg` builds another space (e.g. a fit's coefficient space) over the same tensors; `layer_chunks`
    gives `chunks: auto` an allocation already made (it reads every task vector)."""
    base = base or open_checkpoint(cfg.models.base)
    experts = experts or [open_checkpoint(p) for p in _expert_dirs(cfg)]
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


def _load_tasks(cfg: Config, split: str) -> list:
    from mergesearch.evaluate import load_task

    tasks = []
    for t in cfg.objectives.tasks:
        spec = t.calib if split == "calib" else t.test
        if spec is None:
            continue
        tasks.append(load_task(spec, limit=t.limit if split == "calib" else None, seed=cfg.study.seed,
                               num_fewshot=t.num_fewshot, fewshot_spec=t.fewshot, name=t.name, metric=t.metric))
    return tasks


class StudyRunner:
    """Loads everything once, then runs trials of one study (creating or resuming it)."""

    def __init__(self, cfg: Config, *, load_evaluator: bool = True):
        from transformers import AutoTokenizer

        self.cfg = cfg
        base = open_checkpoint(cfg.models.base)
        experts = [open_checkpoint(p) for p in _expert_dirs(cfg)]
        check_compatible(base, experts, merge_common_vocab=cfg.models.merge_common_vocab)
        self.expert_names = list(cfg.models.experts)
        self.space = build_space(cfg, base, experts)
        self.fingerprint = study_fingerprint(cfg, self.space)
        # With a fit, the materialiser's chunks are the fitted coefficients' (the method space has one chunk).
        self.chunk_space = (build_space(cfg, base, experts, fit_space_config(cfg.fit, cfg.merge.method))
                            if cfg.fit is not None else self.space)
        self.want_chunks, self.chunk_counts = self.chunk_space.want_chunks, tuple(self.chunk_space.chunk_counts)
        # Tasks are read (and checked) before the weights are loaded: bad input fails fast.
        need_calib = load_evaluator or cfg.fit is not None
        self.calib_tasks = _load_tasks(cfg, "calib") if need_calib else []
        self.mat = Materializer(base, experts, cfg.merge.method, dtype=cfg.merge.dtype, device=cfg.merge.device,
                                chunks=self.want_chunks, streaming=cfg.merge.streaming, seed=cfg.merge.seed,
                                merge_common_vocab=cfg.models.merge_common_vocab)
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

            self.evaluator = Evaluator(self.mat.model, self.tokenizer, self.calib_tasks,
                                       batch_size=cfg.objectives.batch_size)
        self.task_names = [t.name for t in cfg.objectives.tasks]
        self.per_task = cfg.objectives.mode == "per_task"
        self.objective_names = self.task_names if self.per_task else ["mean"]
        self.device = str(self.mat.device)
        # tests: a callable(stage) that may raise to simulate failures, or pause (MERGESEARCH_PAUSE_AT)
        self.fault_hook = pause_hook_from_env()

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
        if R.baseline_name(t) is not None:
            return self.baseline_plan(t.user_attrs["weights"])
        plan = self.plan_for(t.params)
        if self.fit_stage is not None:
            record = t.user_attrs.get(R.FIT_KEY)
            if record is None:
                raise StudyError(f"trial {t.number} stores no fitted coefficients: it did not complete its fit")
            plan = self.fit_stage.plan_from_record(plan, t.params, record)
        return plan

    def baseline_plan(self, weights: Sequence[float]) -> Plan:
        return Plan.full(BASELINE_METHOD, self.mat.tensors, len(self.expert_names),
                         chunks=self.want_chunks, weight=list(weights), **{"lambda": 1.0})

    def baselines(self) -> dict[str, list[float]]:
        """Baseline name -> per-expert task-arithmetic weights."""
        n = len(self.expert_names)
        out = {"base": [0.0] * n}
        for i, name in enumerate(self.expert_names):
            out[f"expert:{name}"] = [1.0 if j == i else 0.0 for j in range(n)]
        if n > 1:
            out["uniform"] = [1.0 / n] * n
            for s in TA_SCALES:
                out[f"task_arithmetic@{s:g}"] = [s] * n
        return out

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

    def score_plan(self, plan: Plan, trial: optuna.Trial | None = None):
        """Materialise and score a plan; with a trial, report running scores and prune. Returns
        (objective values, per-task scores, EvalResult, merge seconds, eval seconds)."""
        t0 = time.perf_counter()
        if self.fault_hook:
            self.fault_hook("merge")
        self.mat.materialize(plan)
        t1 = time.perf_counter()
        if self.fault_hook:
            self.fault_hook("evaluate")
        n_slices = self.cfg.study.n_slices
        result, intermediate = None, []
        for step, result in enumerate(self.evaluator.iter_slices(n_slices)):
            values = self.objective_values(result)
            intermediate.append(values[0])
            if trial is not None and not self.per_task and step < n_slices - 1:
                trial.report(values[0], step)
                if trial.should_prune():
                    trial.set_user_attr("merge_s", t1 - t0)
                    trial.set_user_attr("eval_s", time.perf_counter() - t1)
                    trial.set_user_attr("fail_reason", f"pruned after slice {step + 1}/{n_slices}")
                    raise optuna.TrialPruned()
        values = self.objective_values(result)
        if not all(math.isfinite(v) for v in values):
            raise CandidateError(f"evaluation gave a non-finite score {values}")
        scores = {t: dict(result.scores[t]) for t in self.task_names}
        return values, scores, result, t1 - t0, time.perf_counter() - t1, intermediate

    # --- study ---------------------------------------------------------------------------------

    def meta(self) -> dict:
        return {
            "version": __version__,
            "config": self.cfg.model_dump(mode="json", exclude={"source"}),
            "config_path": str(self.cfg.source) if self.cfg.source else None,
            "space": self.space.describe(),
            "space_fingerprint": self.fingerprint,
            "fit": self.fit_stage.keys() if self.fit_stage is not None else None,
            "experts": self.expert_names,
            "num_layers": self.mat.num_layers,
            "tasks": self.task_names,
            "objectives": self.objective_names,
            "directions": ["maximize"] * len(self.objective_names),
            "device": self.device,
        }

    def constraints(self, base_scores: dict[str, float]):
        drop = self.cfg.constraints.max_drop_vs_base
        if drop is None:
            return None

        def func(trial: optuna.trial.FrozenTrial) -> list[float]:
            got = trial.user_attrs.get("objective_scores") or {}
            return [base_scores.get(t, 0.0) - got.get(t, 0.0) - drop for t in self.task_names]

        return func

    def open_study(self, *, create: bool = True) -> optuna.Study:
        """Create the study, or resume it after checking that its search space is the same."""
        name, url = self.cfg.study.name, self.cfg.storage_url
        if not create:
            require_existing(url, "start the study with `mergesearch run` first, then add workers")
        storage = open_storage(url)
        exists = study_exists(storage, name)
        if not exists and not create:
            raise StudyError(f"no study {name!r} in {url}: start it with `mergesearch run`")
        meta = self.meta()
        if exists:
            old_study = optuna.load_study(study_name=name, storage=storage)
            old = R.meta(old_study)
            if old.get("space_fingerprint") != meta["space_fingerprint"]:
                what = "fit: section or search space" if self.fit_stage is not None else "search space"
                raise StudyError(
                    f"study {name!r} in {url} was created with another {what} "
                    f"({old.get('space', {}).get('n_params')} parameters, method {old.get('space', {}).get('method')}); "
                    "changing it would mix incomparable trials: give the study a new name")
            if old.get("objectives") != meta["objectives"]:
                raise StudyError(f"study {name!r} was created with objectives {old.get('objectives')}; "
                                 "give the study a new name to change them")
            base_scores = old.get("base_scores", {})
        else:
            base_scores = {}
        self.base_scores = base_scores
        self._constraints = self.constraints(base_scores)
        # A resumed study starts from the point it chose when it was new (see `warm_start`).
        x0 = (R.meta(old_study).get("start") or {}).get("x0") if exists else None
        n_existing = len(old_study.get_trials(deepcopy=False)) if exists else 0
        self._sampler_seed = sampler_seed(self.cfg.study.seed, n_existing, joining=not create)
        sampler, reason = self.make_sampler(x0 or self.start_point_guess())
        log.info("sampler: %s (%s)", sampler, reason)
        pruner = make_pruner(self.cfg.study.pruner, n_slices=self.cfg.study.n_slices,
                             n_objectives=len(self.objective_names))
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=meta["directions"], load_if_exists=True)
        if not exists:
            meta.update(sampler=str(sampler), sampler_reason=reason, base_scores={})
            study.set_user_attr(R.META_KEY, meta)
        self.study = study
        return study

    @property
    def n_search_params(self) -> int:
        """Parameters the sampler sees: the space's slots, plus the fit's knobs and task weights."""
        return self.space.n_params + (len(self.fit_stage.default_params()) if self.fit_stage is not None else 0)

    def start_point_guess(self) -> dict:
        return ({**self.space.point(), **self.fit_stage.default_params()} if self.fit_stage is not None
                else self.space.point())

    def make_sampler(self, x0: dict[str, float]):
        return make_sampler(self.cfg.study.sampler, seed=self._sampler_seed, n_params=self.n_search_params,
                            n_objectives=len(self.objective_names), x0=x0, constraints_func=self._constraints,
                            consider_pruned=self.cfg.study.n_slices > 1)

    def start_point(self, study: optuna.Study) -> tuple[str, dict[str, float]]:
        """(name, point) where the search starts: the best baseline merge the space expresses exactly.

        In task arithmetic a baseline (uniform, or every weight at the tuned global scale) is a point of
        the space when its weights lie in the weight range and lambda can be 1: the search then starts
        from the bar it has to beat instead of rediscovering it. Other methods start at the uniform merge.
        """
        if self.fit_stage is not None:
            return "plain fit", self.start_point_guess()
        uniform = ("uniform", self.space.point())
        if self.space.op.name != BASELINE_METHOD:
            return uniform
        merges = R.merge_baselines(study)
        index = {e: i for i, e in enumerate(self.expert_names)}
        for t in sorted(merges, key=lambda t: (-R.trial_mean(t), t.number)):
            weights = t.user_attrs["weights"]
            point = {}
            for s in self.space.slots:
                v = weights[index[s.expert]] if s.param == "weight" else 1.0 if s.param == "lambda" else None
                if v is None or not s.low <= v <= s.high:
                    break
                point[s.key] = v
            else:
                return R.baseline_name(t), point
        return uniform

    def warm_start(self, study: optuna.Study) -> None:
        """Fix the start point once (after the baselines), centre the sampler on it and queue it first.

        The choice is stored in the study, so a resumed run (or a crash between baselines and search)
        rebuilds the same sampler; a study that already has searched trials keeps its start.
        """
        m = R.meta(study)
        if m.get("start") or R.search_trials(study, states=tuple(TrialState)):  # WAITING included
            return
        name, x0 = self.start_point(study)
        m["start"] = {"from": name, "x0": x0}
        study.set_user_attr(R.META_KEY, m)
        study.sampler, _ = self.make_sampler(x0)
        study.enqueue_trial(x0, user_attrs={"start": name})
        log.info("search starts from the %s merge", name)

    def run_baselines(self, study: optuna.Study, progress=None) -> None:
        """Evaluate the baselines not yet stored (a resumed study skips those it has)."""
        done = {R.baseline_name(t) for t in R.baseline_trials(study)}
        for name, weights in self.baselines().items():
            if name in done:
                continue
            values, scores, result, merge_s, eval_s, _ = self.score_plan(self.baseline_plan(weights))
            attrs = {R.BASELINE: name, "weights": weights, "scores": scores, "merge_s": merge_s, "eval_s": eval_s,
                     "device": self.device,
                     "objective_scores": {t: self.task_score(result, t) for t in self.task_names}}
            system = {}
            if name == "base":
                self.base_scores = attrs["objective_scores"]
                m = R.meta(study)
                m["base_scores"] = self.base_scores
                study.set_user_attr(R.META_KEY, m)
            drop = self.cfg.constraints.max_drop_vs_base
            if drop is not None and self.base_scores:
                system["constraints"] = [self.base_scores[t] - attrs["objective_scores"][t] - drop
                                         for t in self.task_names]
            # No intermediate values: Optuna's pruners compare a trial with the completed trials that
            # reported at that step, and a searched trial must be judged against searched trials only.
            study.add_trial(create_trial(
                state=TrialState.COMPLETE, values=values, params={}, distributions={}, user_attrs=attrs,
                system_attrs=system))
            if progress is not None:
                progress(name, values)

    def objective(self, trial: optuna.Trial) -> list[float] | float:
        values_in = self.space.suggest(trial)
        if self.fit_stage is not None:
            values_in.update(self.fit_stage.suggest(trial))
        trial.set_user_attr("device", self.device)
        try:
            plan = self.plan_for(values_in)
            if self.fit_stage is not None:
                _, plan, record = self.fit_stage.run(plan, values_in)
                trial.set_user_attr(R.FIT_KEY, record)
            values, scores, result, merge_s, eval_s, _ = self.score_plan(plan, trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad candidate (NaN, OOM, evaluator crash) must not end the study
            reason = failure_reason(exc)
            trial.set_user_attr("fail_reason", reason)
            log.warning("trial %d failed: %s", trial.number, reason)
            raise CandidateError(reason) from exc
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("objective_scores", {t: self.task_score(result, t) for t in self.task_names})
        trial.set_user_attr("merge_s", merge_s)
        trial.set_user_attr("eval_s", eval_s)
        if self.fault_hook:
            self.fault_hook("store")
        return values if self.per_task else values[0]

    def counted(self, study: optuna.Study) -> int:
        """Searched trials that count towards n_trials: COMPLETE and PRUNED (baselines and FAILED do not)."""
        return len(R.search_trials(study, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def optimize(self, study: optuna.Study, target: int | None, *, timeout: float | None = None,
                 progress: bool = True) -> None:
        """Run trials until `target` searched trials are counted in the storage (all workers together)."""
        from tqdm.auto import tqdm

        done = self.counted(study)
        if target is not None and self.n_search_params == 0 and target > 1:
            log.info("nothing is searched (every parameter fixed): one trial is the whole study")
            target = max(1, done)
        if target is not None and done >= target:
            return
        bar = tqdm(total=target, initial=done, desc=f"study {study.study_name}", unit="trial", disable=not progress,
                   dynamic_ncols=True)

        failed_in_a_row = {"n": 0}

        def callback(st: optuna.Study, ft: optuna.trial.FrozenTrial) -> None:
            failed_in_a_row["n"] = failed_in_a_row["n"] + 1 if ft.state == TrialState.FAIL else 0
            if failed_in_a_row["n"] >= MAX_FAILURES_IN_A_ROW:
                raise StudyError(f"the last {failed_in_a_row['n']} candidates all failed (last: "
                                 f"{ft.user_attrs.get('fail_reason', 'no reason stored')}): fix the cause, then "
                                 "resume with the same command")
            n = self.counted(st)
            bar.n = n
            try:
                best = max((R.trial_mean(t) for t in R.search_trials(st)), default=float("nan"))
                bar.set_postfix(best=f"{best:.4f}", last=ft.state.name.lower())
            except Exception:  # a progress bar never stops a study
                pass
            bar.refresh()
            if target is not None and n >= target:
                st.stop()

        try:
            study.optimize(self.objective, n_trials=None if target is None else max(0, target - done) * 4 + 4,
                           timeout=timeout, callbacks=[callback], catch=(CandidateError,), gc_after_trial=False)
        finally:
            bar.close()

    def score_test(self, study: optuna.Study, k: int) -> dict:
        """Re-score the top-k searched trials and the baselines on the test splits (the overfitting view)."""
        from mergesearch.evaluate import Evaluator

        test_tasks = _load_tasks(self.cfg, "test")
        if not test_tasks or k <= 0:
            return {}
        ev = Evaluator(self.mat.model, self.tokenizer, test_tasks, batch_size=self.cfg.objectives.batch_size)
        stored = {str(n): v for n, v in R.test_scores(study).items()}
        todo = R.best_trials(study, k) + R.baseline_trials(study)
        for t in todo:
            if str(t.number) in stored:
                continue
            self.mat.materialize(self.plan_for_trial(t))
            res = ev.evaluate()
            test = {name: self.task_score(res, name) for name in res.scores}
            calib = t.user_attrs.get("objective_scores", {})
            stored[str(t.number)] = {
                "calib": calib, "test": test,
                "calib_mean": sum(calib.values()) / len(calib) if calib else None,
                "test_mean": sum(test.values()) / len(test),
                "baseline": R.baseline_name(t),
            }
        study.set_user_attr(R.TEST_KEY, stored)
        return stored
