"""Pruning judges a searched trial against searched trials only, never against the baselines.

The baselines (base, experts, uniform, task arithmetic) are COMPLETE trials. Had they stored their
running scores, Optuna's median pruner would compare the first searched trials with the experts and
could prune every one of a small study (it did, on machines whose test zoo trained differently).
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from mergesearch.config import load_config
from mergesearch.study import records as R
from mergesearch.study.runner import StudyRunner
from mergesearch.study.samplers import make_pruner

from study_helpers import write_study


def test_baselines_never_enter_the_pruners_statistics(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=4, pruner="median", n_slices=2, top_k_test=0,
                                  limit=8))
    runner = StudyRunner(cfg)
    study = runner.open_study()
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    real = runner.score_plan

    def baselines_far_above(plan, trial=None):
        values, scores, result, merge_s, eval_s, running = real(plan, trial)
        if trial is None:  # a baseline: 10 above anything a merge can score, at every slice
            return [v + 10 for v in values], scores, result, merge_s, eval_s, [v + 10 for v in running]
        return values, scores, result, merge_s, eval_s, running

    runner.score_plan = baselines_far_above
    runner.run_baselines(study)
    baselines = R.baseline_trials(study)
    assert len(baselines) >= 6 and all(R.trial_mean(t) >= 10 for t in baselines)
    assert all(not t.intermediate_values for t in baselines)
    runner.optimize(study, 4, progress=False)
    searched = R.search_trials(study, states=tuple(TrialState))
    assert [t.state for t in searched] == [TrialState.COMPLETE] * 4
    assert all(set(t.intermediate_values) == {0} for t in searched)  # they did report to the pruner


@pytest.mark.parametrize("name", ["median", "halving"])
def test_pruners_compare_searched_trials_with_each_other(name):
    """Many high-scoring baselines stored as the runner stores them (no running scores), then searched
    trials: a trial is pruned only for being below searched trials, never for being below the baselines
    (the median pruner also waits for five searched trials)."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner(name, n_slices=3, n_objectives=1),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(9):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=10.0,
                                                  user_attrs={R.BASELINE: f"b{i}"}))
    seen: list[float] = []  # x of every searched trial so far, in order
    pruned = []

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        best_before = max(seen, default=float("-inf"))
        seen.append(x)
        for step in range(2):
            trial.report(x, step)
            if trial.should_prune():
                pruned.append((trial.number, x, best_before))
                raise optuna.TrialPruned()
        return x

    study.optimize(objective, n_trials=25)
    assert pruned, "the pruner never pruned: the test would prove nothing"
    # Compared with the baselines (10 >> any x), a trial would be pruned even when it is the best so far.
    assert all(x < best_before for _, x, best_before in pruned), pruned
    if name == "median":
        assert min(n for n, _, _ in pruned) >= 9 + 5  # the first five searched trials complete
