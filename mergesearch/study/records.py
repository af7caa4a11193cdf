"""What a mergesearch study stores in Optuna, and readers for it (used by status, export and reports).

Study user attributes:
  META_KEY ("mergesearch"): {"version", "config" (the study YAML as a dict), "space" (SearchSpace.describe()),
      "space_fingerprint", "experts" [names], "num_layers", "tasks" [names], "objectives" [names],
      "directions" ["maximize", ...], "sampler", "sampler_reason", "device", "base_scores" {task: score}}
  TEST_KEY ("test_scores"): {str(trial_number): {"calib": {task: score}, "test": {task: score},
      "calib_mean", "test_mean"}} for the baselines and the top trials, written after the search.
Trial user attributes:
  "baseline": name of a baseline ("base", "expert:<name>", "uniform", "task_arithmetic@0.5", ...),
      absent on searched trials. Baselines are COMPLETE trials that may carry no parameters.
  "scores": {task: {metric: value}} on the calibration set; "objective_scores": {task: value}
  "merge_s", "eval_s", "device", "fail_reason" (FAILED/PRUNED trials), "retry_of" (Optuna's
      RetryFailedTrialCallback sets system attr "failed_trial" instead; both are read).
Parameter names are the search-space slot keys (see mergesearch.space.parse_key).
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import StudyError

META_KEY = "mergesearch"
TEST_KEY = "test_scores"
FIT_KEY = "fit"  # trial user attribute: fitted coefficients and the fit's history (study.fitting)
BASELINE = "baseline"


def meta(study: optuna.Study) -> dict:
    return dict(study.user_attrs.get(META_KEY, {}))


def test_scores(study: optuna.Study) -> dict[int, dict]:
    return {int(k): v for k, v in study.user_attrs.get(TEST_KEY, {}).items()}


def baseline_name(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get(BASELINE)


def is_search_trial(trial: FrozenTrial) -> bool:
    return BASELINE not in trial.user_attrs


def search_trials(study: optuna.Study, states=(TrialState.COMPLETE,)) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if is_search_trial(t)]


def baseline_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not is_search_trial(t)]


def merge_baselines(study: optuna.Study) -> list[FrozenTrial]:
    """The baselines that are merges: the uniform merge and task arithmetic at each global scale."""
    return [t for t in baseline_trials(study)
            if baseline_name(t) == "uniform" or baseline_name(t).startswith("task_arithmetic@")]


def trial_mean(trial: FrozenTrial) -> float:
    """The trial's mean objective score (its single value, or the mean of per-task values)."""
    vals = trial.values or []
    return sum(vals) / len(vals) if vals else float("nan")


def best_trials(study: optuna.Study, k: int = 1, include_baselines: bool = False) -> list[FrozenTrial]:
    """The k best COMPLETE trials by mean objective (all objectives are maximised)."""
    pool = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not include_baselines:
        pool = [t for t in pool if is_search_trial(t)]
    return sorted(pool, key=lambda t: (-trial_mean(t), t.number))[:k]


def pick_trial(study: optuna.Study, which: str | int = "best") -> FrozenTrial:
    """The best searched trial ('best') or COMPLETE trial number N (for export, reports, --trial)."""
    if str(which) == "best":
        best = best_trials(study, 1)
        if not best:
            top = best_trials(study, 1, include_baselines=True)
            hint = (f"; its best merge so far is the baseline {baseline_name(top[0])} (trial {top[0].number}): "
                    f"pass --trial {top[0].number} for it" if top else "; pass --trial N")
            raise StudyError(f"study {study.study_name!r} has no completed searched trial yet (all pruned, "
                             f"failed or still running){hint}, or wait for searched trials to complete")
        return best[0]
    try:
        number = int(which)
    except ValueError:
        raise StudyError(f"--trial must be 'best' or a trial number, got {which!r}") from None
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            if t.state != TrialState.COMPLETE:
                raise StudyError(f"trial {number} is {t.state.name}: pick a COMPLETE trial or 'best'")
            return t
    raise StudyError(f"study {study.study_name!r} has no trial {number} (it has {len(study.trials)} trials)")
