"""Contract: every sampler and both pruners see the searched trials only, through Optuna's public API.

A study with baselines is run the way `mergesearch run` runs it (open, baselines, warm start, trial
loop) for each sampler (tpe, cmaes, gp, nsga2, random, auto) and each pruner (median, halving). The
baselines score 10 above anything a merge can, so a sampler or pruner that saw them would show it:
a relative sampler would find an empty joint search space (a parameter-less trial empties the
intersection) and fall back to independent sampling, and a pruner would prune trials for being
below the baselines. Scores are a cheap function of the merge plan, not a model evaluation, so each
study runs in seconds; the real scoring path is covered by test_study.py.
"""

from __future__ import annotations

import math

import pytest
from optuna.trial import TrialState

from mergesearch.config import load_config
from mergesearch.study import records
from mergesearch.study.baselines import run_baselines
from mergesearch.study.opening import open_study, warm_start
from mergesearch.study.runner import StudyRunner
from mergesearch.study.workbench import PrunedWithRecord

from study_helpers import write_study

SAMPLERS = ["tpe", "cmaes", "gp", "nsga2", "random", "auto"]
PRUNERS = ["median", "halving"]
STARTUP = 10  # TPE's and GP's random start-up trials (study.samplers.make_sampler)
BASELINE_BONUS = 10.0


@pytest.fixture(scope="module")
def bench(zoo_test, tmp_path_factory) -> StudyRunner:
    """One runner on the test zoo (12 per-layer weights); each test gives it its own study config."""
    tmp = tmp_path_factory.mktemp("contract")
    return StudyRunner(load_config(write_study(zoo_test, tmp, name="c", n_trials=1, top_k_test=0, limit=4)))


def _fake_score_plan(bench: StudyRunner):
    """Score = a smooth function of the plan's weights; baselines (no trial) 10 higher. Two slices, each
    reported to the trial's pruner as the runner does."""
    def score_plan(plan, trial=None):
        w = plan.params["weight"].double()
        x = float(1.0 - ((w - 0.6) ** 2).mean())
        if trial is None:
            x += BASELINE_BONUS
        for step in range(bench.cfg.study.n_slices - 1):
            if trial is not None:
                trial.report(x - 0.01 * (1 - step), step + 1)
                if trial.should_prune():
                    raise PrunedWithRecord({"fail_reason": f"pruned after slice {step + 1}"})
        rec = {"objective_scores": {t: x for t in bench.task_names}, "merge_s": 0.0, "eval_s": 0.0}
        return [x] * len(bench.objective_names), rec
    return score_plan


def _run(bench: StudyRunner, tmp_path, monkeypatch, *, sampler: str, pruner: str, n_trials: int):
    """Open a fresh study with baselines, then run n_trials searched trials, as run_study does."""
    study_cfg = bench.cfg.study.model_copy(update={
        "sampler": sampler, "pruner": pruner, "name": f"{sampler}-{pruner}", "n_slices": 2,
        "storage": f"sqlite:///{tmp_path / f'{sampler}-{pruner}.db'}"})
    monkeypatch.setattr(bench, "cfg", bench.cfg.model_copy(update={"study": study_cfg}))
    monkeypatch.setattr(bench, "score_plan", _fake_score_plan(bench))
    study = open_study(bench)
    run_baselines(bench, study)
    warm_start(bench, study)
    independent: list[int] = []  # trial numbers whose searched parameters were sampled independently
    real = study.sampler.sample_independent

    def spy(st, trial, name, dist):
        independent.append(trial.number)
        return real(st, trial, name, dist)

    monkeypatch.setattr(study.sampler, "sample_independent", spy)
    bench.optimize(study, n_trials, progress=False)
    return study, independent


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_sample_jointly_and_pruners_ignore_the_baselines(bench, tmp_path, monkeypatch, sampler, pruner):
    n_trials = 24 if sampler in ("tpe", "gp") else 16
    study, independent = _run(bench, tmp_path, monkeypatch, sampler=sampler, pruner=pruner, n_trials=n_trials)
    baselines = records.baseline_trials(study)
    assert len(baselines) >= 6 and all(records.trial_mean(t) > BASELINE_BONUS for t in baselines)
    trials = study.get_trials(deepcopy=False)  # what any sampler or pruner reads: searched trials only
    assert trials and all(records.is_search_trial(t) and t.params for t in trials)
    assert records.counted(study) == n_trials
    keys = {s.key for s in bench.space.slots}
    assert all(set(t.params) == keys for t in trials)

    # Joint sampling: the relative search space is the whole space, and past the start-up trials no
    # searched parameter is drawn independently (random sampling is independent by design).
    chosen = type(study.sampler).__name__
    if chosen != "RandomSampler":
        assert set(study.sampler.infer_relative_search_space(study, trials[-1])) == keys
        startup = {"TPESampler": STARTUP, "GPSampler": STARTUP, "CmaEsSampler": 0}.get(chosen)
        if startup is not None:  # start-up: fewer than STARTUP searched trials had completed
            complete_before = {t.number: sum(u.state == TrialState.COMPLETE and u.number < t.number for u in trials)
                               for t in trials}
            assert not [n for n in independent if complete_before[n] >= startup], (chosen, independent)
        if chosen == "CmaEsSampler":
            assert all("cma:generation" in t.system_attrs for t in trials[1:])
    if sampler == "auto":
        assert chosen == "CmaEsSampler"  # 12 parameters, one objective, no constraints

    # Pruning: a trial is pruned only for being below searched trials, never for being below the
    # baselines (every searched trial is); the median pruner waits for 5 searched trials.
    best_before, pruned = -math.inf, []
    for t in sorted(trials, key=lambda t: t.number):
        x = t.intermediate_values.get(1)
        if t.state == TrialState.PRUNED:
            pruned.append(t.number)
            assert x is not None and x < best_before, (t.number, x, best_before)
        if x is not None:
            best_before = max(best_before, x)
    if pruner == "median":
        assert not [n for n in pruned if n < 5]


def test_the_pruner_does_prune_here(bench, tmp_path, monkeypatch):
    """The pruning checks above are not vacuous: on this study the pruners do prune searched trials."""
    for pruner in PRUNERS:
        study, _ = _run(bench, tmp_path, monkeypatch, sampler="random", pruner=pruner, n_trials=30)
        assert study.get_trials(states=(TrialState.PRUNED,)), pruner
