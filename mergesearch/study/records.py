"""What a mergesearch study stores in Optuna, and readers for it (used by status, export and reports).

The searched study holds only searched trials, so Optuna's samplers and pruners see nothing else
through its public API. Everything else lives in study user attributes:
  META_KEY ("mergesearch"): {"version", "config" (the study YAML as a dict), "space" (SearchSpace.describe()),
      "space_fingerprint", "experts" [names], "num_layers", "tasks" [names], "objectives" [names],
      "directions" ["maximize", ...], "sampler", "sampler_reason", "device", "base_scores" {task: score},
      "start" {"from", "x0"}}
  BASELINES_KEY ("baselines"): {name: {"weights" [per expert], "values" [objectives], "record" {...},
      "start", "complete" (ISO times)}} for base, each expert alone, the uniform merge and task arithmetic
      at a few global scales, in the order they were scored. Readers get them as FrozenTrials with
      negative numbers (-1, -2, ...), so they never collide with a searched trial's number.
  TEST_KEY ("test_scores"): {trial_key: {"calib": {task: score}, "test": {task: score}, "calib_mean",
      "test_mean", "baseline"}} for the baselines and the top trials, written after the search.
Trial user attributes (searched trials):
  TRIAL_KEY ("mergesearch"): one JSON record, written once per trial (one storage call):
      "scores" {task: {metric: value}} on the calibration set, "objective_scores" {task: value},
      "merge_s", "eval_s", "device", "fail_reason" (FAILED/PRUNED trials), FIT_KEY (fitted trials).
  OWNER_KEY ("owner"): {"trial", "host", "machine", "pid", "started"}, written as the trial starts: the
      process running it (study.owners fails the trial at once if that process, on this host, is gone).
  "start": the start point's name, on the one trial the study queued first.
Parameter names are the search-space slot keys (see mergesearch.space.parse_key).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import StudyError

META_KEY = "mergesearch"
BASELINES_KEY = "baselines"
TEST_KEY = "test_scores"
TRIAL_KEY = "mergesearch"
OWNER_KEY = "owner"
FIT_KEY = "fit"  # in a trial's record: fitted coefficients and the fit's history (study.fitting)
BASELINE = "baseline"  # user attribute of a baseline's FrozenTrial (as read back): its name
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count towards n_trials


def meta(study: optuna.Study) -> dict:
    return dict(study.user_attrs.get(META_KEY, {}))


def record(trial: FrozenTrial) -> dict:
    """What the runner stored with a trial (scores, timings, device, fit, failure reason)."""
    return trial.user_attrs.get(TRIAL_KEY) or {}


def owner(trial: FrozenTrial) -> dict | None:
    """The process that runs (or ran) a trial, as study.owners recorded it; None before it was recorded."""
    return trial.user_attrs.get(OWNER_KEY)


def objective_scores(trial: FrozenTrial) -> dict[str, float]:
    return record(trial).get("objective_scores") or {}


# --- baselines -------------------------------------------------------------------------------------


def add_baseline(study: optuna.Study, name: str, weights, values, rec: dict, started: dt.datetime) -> None:
    """Store one scored baseline (one storage call; a resumed study keeps those already stored)."""
    stored = dict(study.user_attrs.get(BASELINES_KEY, {}))
    stored[name] = {"weights": list(weights), "values": list(values), "record": rec,
                    "start": started.isoformat(), "complete": dt.datetime.now().isoformat()}
    study.set_user_attr(BASELINES_KEY, stored)


def baseline_name(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get(BASELINE)


def is_search_trial(trial: FrozenTrial) -> bool:
    return BASELINE not in trial.user_attrs


def baseline_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The stored baselines, in the order they were scored, as COMPLETE FrozenTrials numbered -1, -2, ...
    (a baseline keeps its number as more are stored, and no number is a searched trial's)."""
    out = []
    for i, (name, b) in enumerate(study.user_attrs.get(BASELINES_KEY, {}).items()):
        number = -1 - i
        out.append(FrozenTrial(
            number=number, state=TrialState.COMPLETE, value=None, values=b["values"],
            datetime_start=dt.datetime.fromisoformat(b["start"]), datetime_complete=dt.datetime.fromisoformat(b["complete"]),
            params={}, distributions={}, user_attrs={BASELINE: name, "weights": b["weights"], TRIAL_KEY: b["record"]},
            system_attrs={}, intermediate_values={}, trial_id=number))
    return out


def merge_baselines(study: optuna.Study) -> list[FrozenTrial]:
    """The baselines that are merges: the uniform merge and task arithmetic at each global scale."""
    return [t for t in baseline_trials(study)
            if baseline_name(t) == "uniform" or baseline_name(t).startswith("task_arithmetic@")]


def counted(study: optuna.Study) -> int:
    """Searched trials that count towards n_trials: COMPLETE and PRUNED (FAILED ones are retried)."""
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def search_trials(study: optuna.Study, states=(TrialState.COMPLETE,)) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


# --- held-out scores -------------------------------------------------------------------------------


def trial_key(trial: FrozenTrial) -> str:
    """The key of a trial in TEST_KEY: its number, or "baseline:<name>"."""
    name = baseline_name(trial)
    return f"{BASELINE}:{name}" if name is not None else str(trial.number)


def test_scores(study: optuna.Study) -> dict[str, dict]:
    return dict(study.user_attrs.get(TEST_KEY, {}))


def test_score(study: optuna.Study, trial: FrozenTrial) -> dict | None:
    return test_scores(study).get(trial_key(trial))


# --- constraints and picks -------------------------------------------------------------------------


def trial_mean(trial: FrozenTrial) -> float:
    """The trial's mean objective score (its single value, or the mean of per-task values)."""
    vals = trial.values or []
    return sum(vals) / len(vals) if vals else float("nan")


def max_drop(study: optuna.Study) -> float | None:
    """The study's `constraints.max_drop_vs_base`, or None."""
    return ((meta(study).get("config") or {}).get("constraints") or {}).get("max_drop_vs_base")


def constraint_values(scores: dict[str, float], base_scores: dict[str, float], tasks, drop: float) -> list[float]:
    """Optuna's convention: one value per task, feasible when <= 0 (a task may drop at most `drop` below base)."""
    return [base_scores.get(t, 0.0) - scores.get(t, 0.0) - drop for t in tasks]


def feasibility(study: optuna.Study) -> Callable[[FrozenTrial], bool]:
    """Whether a trial meets the study's constraints (always, when it has none or no base score yet).
    The study's meta is read once (a storage read), then applied to any number of trials."""
    m = meta(study)
    drop, base, tasks = max_drop(study), m.get("base_scores"), m.get("tasks", [])
    if drop is None or not base:
        return lambda trial: True
    return lambda trial: all(v <= 0 for v in constraint_values(objective_scores(trial), base, tasks, drop))


def is_feasible(study: optuna.Study, trial: FrozenTrial) -> bool:
    return feasibility(study)(trial)


def best_trials(study: optuna.Study, k: int = 1, include_baselines: bool = False,
                feasible_only: bool = True) -> list[FrozenTrial]:
    """The k best COMPLETE trials by mean objective (all objectives are maximised); with constraints,
    the feasible ones only unless `feasible_only` is False."""
    pool = search_trials(study) + (baseline_trials(study) if include_baselines else [])
    pool = [t for t in pool if not math.isnan(trial_mean(t))]
    if feasible_only:
        pool = list(filter(feasibility(study), pool))
    return sorted(pool, key=lambda t: (-trial_mean(t), t.number))[:k]


def best_rule(study: optuna.Study) -> str:
    """How 'best' is chosen, for status, report and export."""
    drop = max_drop(study)
    if drop is None:
        return "highest mean objective"
    return f"highest mean objective among feasible trials (no task more than {drop:g} below the base model)"


def pick_trial(study: optuna.Study, which: str | int = "best") -> FrozenTrial:
    """The best feasible searched trial ('best'), COMPLETE trial number N, or a baseline by name
    ('uniform', 'base', 'expert:<name>', 'task_arithmetic@0.7', also 'baseline:<name>')."""
    text = str(which)
    if text == "best":
        best = best_trials(study, 1)
        if best:
            return best[0]
        infeasible = best_trials(study, 1, feasible_only=False)
        if infeasible:
            raise StudyError(f"study {study.study_name!r}: no completed trial meets the constraints "
                             f"({best_rule(study)}); the best infeasible one is trial {infeasible[0].number}: "
                             f"pass --trial {infeasible[0].number} to take it anyway")
        top = best_trials(study, 1, include_baselines=True)
        hint = (f"; its best merge so far is the baseline {baseline_name(top[0])}: pass --trial "
                f"{baseline_name(top[0])} for it" if top else "; pass --trial N")
        raise StudyError(f"study {study.study_name!r} has no completed searched trial yet (all pruned, "
                         f"failed or still running){hint}, or wait for searched trials to complete")
    try:
        number = int(text)
    except ValueError:
        name = text.removeprefix(f"{BASELINE}:")
        bases = {baseline_name(t): t for t in baseline_trials(study)}
        if name in bases:
            return bases[name]
        raise StudyError(f"--trial must be 'best', a trial number or a baseline name ({', '.join(bases) or 'none stored'}), "
                         f"got {which!r}") from None
    trials = study.get_trials(deepcopy=False)
    if 0 <= number < len(trials) and trials[number].number == number:
        t = trials[number]
        if t.state != TrialState.COMPLETE:
            raise StudyError(f"trial {number} is {t.state.name}: pick a COMPLETE trial or 'best'")
        return t
    raise StudyError(f"study {study.study_name!r} has no trial {number} (it has {len(trials)} trials)")
