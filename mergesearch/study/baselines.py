"""The bars a search has to beat, and the held-out check after it.

Baselines (the base model, each expert alone, the uniform merge and task arithmetic at a few global
scales) are scored on the calibration set before the search and stored in a study user attribute
(records.BASELINES_KEY), outside the searched trials: Optuna's samplers and pruners then see only
searched trials. The best baseline merge the space expresses is where the search starts. After
the search, the top trials and the baselines are re-scored on the test splits.
"""

from __future__ import annotations

import datetime as dt

import optuna

from mergesearch.plan import WEIGHTED_SUM_METHOD
from mergesearch.study import records
from mergesearch.study.workbench import Workbench, load_tasks

TA_SCALES = (0.3, 0.5, 0.7, 1.0)  # per-expert weights of the task-arithmetic baselines


def baseline_weights(expert_names: list[str]) -> dict[str, list[float]]:
    """Baseline name -> per-expert task-arithmetic weights."""
    n = len(expert_names)
    out = {"base": [0.0] * n}
    for i, name in enumerate(expert_names):
        out[f"expert:{name}"] = [1.0 if j == i else 0.0 for j in range(n)]
    if n > 1:
        out["uniform"] = [1.0 / n] * n
        for s in TA_SCALES:
            out[f"task_arithmetic@{s:g}"] = [s] * n
    return out


def run_baselines(bench: Workbench, study: optuna.Study, progress=None) -> None:
    """Score the baselines not yet stored (a resumed study skips those it has); the base model's
    scores also go to the study's meta, where the constraints read them."""
    done = {records.baseline_name(t) for t in records.baseline_trials(study)}
    for name, weights in baseline_weights(bench.expert_names).items():
        if name in done:
            continue
        started = dt.datetime.now()
        values, rec = bench.score_plan(bench.baseline_plan(weights))
        if name == "base":
            bench.base_scores = rec["objective_scores"]  # the sampler's constraints read them from now on
            m = records.meta(study)
            m["base_scores"] = rec["objective_scores"]
            study.set_user_attr(records.META_KEY, m)
        records.add_baseline(study, name, weights, values, rec, started)
        if progress is not None:
            progress(name, values)


def start_point(bench: Workbench, study: optuna.Study) -> tuple[str, dict[str, float]]:
    """(name, point) where the search starts: the best baseline merge the space expresses exactly.

    In task arithmetic a baseline (uniform, or every weight at the tuned global scale) is a point of
    the space when its weights lie in the weight range and lambda can be 1: the search then starts
    from the bar it has to beat instead of rediscovering it. Other methods start at the uniform merge.
    """
    if bench.fit_stage is not None:
        return "plain fit", bench.start_point_guess()
    uniform = ("uniform", bench.space.point())
    if bench.space.op.name != WEIGHTED_SUM_METHOD:
        return uniform
    index = {e: i for i, e in enumerate(bench.expert_names)}
    for t in sorted(records.merge_baselines(study), key=lambda t: (-records.trial_mean(t), t.number)):
        weights = t.user_attrs["weights"]
        point = {}
        for s in bench.space.slots:
            v = weights[index[s.expert]] if s.param == "weight" else 1.0 if s.param == "lambda" else None
            if v is None or not s.low <= v <= s.high:
                break
            point[s.key] = v
        else:
            return records.baseline_name(t), point
    return uniform


def score_test(bench: Workbench, study: optuna.Study, k: int) -> dict:
    """Re-score the top-k searched trials (feasible first) and the baselines on the test splits."""
    from mergesearch.evaluate import Evaluator

    test_tasks = load_tasks(bench.cfg, "test")
    if not test_tasks or k <= 0:
        return {}
    ev = Evaluator(bench.mat.model, bench.tokenizer, test_tasks, batch_size=bench.cfg.objectives.batch_size,
                   gold_logprob=bench.cfg.objectives.smooth > 0)
    stored = records.test_scores(study)
    top = records.best_trials(study, k)
    seen = {t.number for t in top}
    top += [t for t in records.best_trials(study, k, feasible_only=False) if t.number not in seen][:k - len(top)]
    for t in top + records.baseline_trials(study):
        key = records.trial_key(t)
        if key in stored:
            continue
        bench.mat.materialize(bench.plan_for_trial(t))
        res = ev.evaluate()
        test = {name: bench.task_score(res, name) for name in res.scores}
        calib = records.objective_scores(t)
        stored[key] = {
            "calib": calib, "test": test,
            "calib_mean": sum(calib.values()) / len(calib) if calib else None,
            "test_mean": sum(test.values()) / len(test),
            "baseline": records.baseline_name(t),
        }
    study.set_user_attr(records.TEST_KEY, stored)
    return stored
