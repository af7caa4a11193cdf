"""Figure data of the report: one function per figure, computed from a stored study, no plotting.

Each `*_info(study)` returns a small dataclass that `_plots.py` draws. As in Optuna's
visualization module the split lets tests check the numbers without a browser. Everything
here reads the study (never writes), so a report can be made while workers are running.
All objectives are maximised (records.py).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import StudyError
from mergesearch.space import parse_key
from mergesearch.study import records
from mergesearch.study.records import pick_trial

log = logging.getLogger(__name__)

MIN_IMPORTANCE_TRIALS = 8  # fANOVA's forest says little about fewer searched trials than this
_MODULE_ORDER = ("", "attn", "mlp", "norm", "embed", "lm_head", "other")


# --- shared helpers -----------------------------------------------------------------------------


def objective_names(study: optuna.Study) -> list[str]:
    """The objectives' names from the study metadata, or obj0.. when the study stores none."""
    names = records.meta(study).get("objectives")
    n = len(study.directions)
    return list(names) if names and len(names) == n else [f"obj{i}" for i in range(n)]


def trial_label(trial: FrozenTrial) -> str:
    name = records.baseline_name(trial)
    return name if name is not None else f"trial {trial.number}"


def task_scores(trial: FrozenTrial, objectives: list[str]) -> dict[str, float]:
    """Per-task calibration scores of a trial (its objective_scores, else its objective values)."""
    scores = records.objective_scores(trial)
    if scores:
        return {k: float(v) for k, v in scores.items()}
    return dict(zip(objectives, trial.values or []))


def key_coefficients(trial: FrozenTrial, experts: list[str]) -> dict[str, float]:
    """A few numbers that say what a trial merged: each searched parameter per expert, averaged over
    layers, modules and chunks (baselines: their per-expert task-arithmetic weights)."""
    if not trial.params:
        weights = trial.user_attrs.get("weights")
        if weights and len(weights) == len(experts):
            return {f"weight[{e}]": float(w) for e, w in zip(experts, weights)}
        return {}
    sums: dict[str, list[float]] = {}
    for key, value in trial.params.items():
        try:
            k = parse_key(key)
        except ValueError:
            continue
        name = k["param"] + (f"[{k['expert']}]" if k["expert"] else "")
        sums.setdefault(name, []).append(float(value))
    return {name: sum(v) / len(v) for name, v in sums.items()}


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Mask of the rows of `values` (n_trials, n_objectives) that no other row dominates (maximising)."""
    n = len(values)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        ge = np.all(values >= values[i], axis=1)
        gt = np.any(values > values[i], axis=1)
        if np.any(ge & gt):
            mask[i] = False
    return mask


def _group_sort_key(row: str) -> tuple:
    group, _, module = row.partition(".")
    m = re.fullmatch(r"([LG])(\d+)", group)
    rank = (0, 0, "") if group == "all" else (1, int(m.group(2)), m.group(1)) if m else (2, 0, group)
    mod = _MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER)
    return rank + (mod, module)


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    """The baselines (numbered below 0) in the order they were scored, then the COMPLETE searched trials."""
    return records.baseline_trials(study) + [t for t in records.search_trials(study) if t.values]


def _points(d: float, scale100: bool) -> str:
    return f"{d * 100:+.1f} points" if scale100 else f"{d:+.4f}"


# --- summary (the header) -----------------------------------------------------------------------


@dataclass
class Row:
    """One row of the header's comparison table."""

    label: str
    number: int
    mean: float
    scores: dict[str, float]
    test_mean: float | None = None
    is_baseline: bool = True


@dataclass
class SummaryInfo:
    study_name: str
    objectives: list[str]
    tasks: list[str]
    method: str | None
    granularity: str | None
    n_params: int | None
    sampler: str | None
    counts: dict[str, int]  # searched trials by state (complete, pruned, fail, running, waiting)
    n_baselines: int
    best: Row | None
    best_baseline: Row | None
    rows: list[Row]  # baselines, then the best found
    sentences: list[str]  # the plain-words summary at the top of the report
    scale100: bool  # scores look like fractions: margins are shown in points (x100)


def summary_info(study: optuna.Study) -> SummaryInfo:
    """What was found vs the baselines, in numbers and in a few sentences."""
    meta = records.meta(study)
    objectives = objective_names(study)
    tasks = list(meta.get("tasks") or objectives)
    space = meta.get("space") or {}
    tests = records.test_scores(study)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    baselines = records.baseline_trials(study)

    def row(t: FrozenTrial, is_baseline: bool) -> Row:
        test = tests.get(records.trial_key(t), {}).get("test_mean")
        return Row(trial_label(t) if is_baseline else f"best found (trial {t.number})", t.number,
                   records.trial_mean(t), task_scores(t, objectives), float(test) if test is not None else None,
                   is_baseline)

    rows = [row(t, True) for t in baselines]  # in the order they were scored
    best_t = records.best_trials(study, 1)
    best = row(best_t[0], False) if best_t else None
    if best:
        rows.append(best)
    ranked = [r for r in rows if r.is_baseline and math.isfinite(r.mean)]
    best_baseline = max(ranked, key=lambda r: r.mean) if ranked else None
    every = [v for r in rows for v in r.scores.values()] + [r.mean for r in rows]
    scale100 = bool(every) and all(0.0 <= v <= 1.0 for v in every if math.isfinite(v))

    n_obj = len(objectives)
    score_word = "mean calibration score" + (f" over {n_obj} objectives" if n_obj > 1 else "")
    s = _verdict(best, best_baseline, score_word, bool(tests), scale100)
    s.append(_search_sentence(meta, counts, len(baselines)))
    if records.max_drop(study) is not None:
        n_bad = sum(not ok for ok in map(records.feasibility(study), records.search_trials(study)))
        s.append(f"Best = {records.best_rule(study)}; {n_bad} completed trial(s) break that constraint and are "
                 "not picked.")
    return SummaryInfo(study.study_name, objectives, tasks, space.get("method"), space.get("granularity"),
                       space.get("n_params"), meta.get("sampler"), counts, len(baselines), best, best_baseline,
                       rows, s, scale100)


def _verdict(best: Row | None, best_baseline: Row | None, score_word: str, any_tests: bool,
             scale100: bool) -> list[str]:
    """The summary's first sentences: the best found against the best baseline, on calib, test and per task."""
    if best is None:
        return ["No searched trial has completed yet."]
    if best_baseline is None:
        return [f"Best found: trial {best.number}, {score_word} {best.mean:.4f}. No baseline is stored."]
    d = best.mean - best_baseline.mean
    verdict = "above" if d > 0 else "below" if d < 0 else "level with"
    s = [f"Best found: trial {best.number}, {score_word} {best.mean:.4f}, "
         f"{_points(abs(d), scale100).lstrip('+')} {verdict} the best baseline, {best_baseline.label} "
         f"({best_baseline.mean:.4f})" + ("." if d > 0 else ": the search has not beaten it yet.")]
    if best.test_mean is not None and best_baseline.test_mean is not None:
        dt = best.test_mean - best_baseline.test_mean
        s.append(f"On the held-out test split: best found {best.test_mean:.4f} vs {best_baseline.label} "
                 f"{best_baseline.test_mean:.4f} ({_points(dt, scale100)})"
                 + (": the calibration gain does not carry over." if dt <= 0 < d else "."))
    elif any_tests:
        s.append("Held-out test scores are stored for other trials only.")
    else:
        s.append("Held-out test scores are written when the search finishes.")
    if best.scores and best_baseline.scores:
        gains = {k: best.scores[k] - best_baseline.scores.get(k, float("nan")) for k in best.scores}
        gains = {k: v for k, v in gains.items() if math.isfinite(v)}
        if len(gains) > 1:
            order = sorted(gains, key=gains.get, reverse=True)
            s.append(f"Per task vs {best_baseline.label}: "
                     + ", ".join(f"{k} {_points(gains[k], scale100)}" for k in order) + ".")
    return s


def _search_sentence(meta: dict, counts: dict[str, int], n_baselines: int) -> str:
    """How much was searched, over what, with which sampler."""
    space = meta.get("space") or {}
    states = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    what = ""
    fit = (meta.get("config") or {}).get("fit")
    if space and fit:
        n_coef = {g: len(k) for g, k in (meta.get("fit") or {}).items()}
        what = (f"; each trial fits {', '.join(f'{n} {g} coefficients' for g, n in n_coef.items())} by gradient "
                f"({space.get('method')}, {fit.get('objective')}, {fit.get('chunks')} chunks)")
    elif space:
        what = (f" over {space.get('n_params')} coefficients ({space.get('method')}, {space.get('granularity')}"
                + (f", {space.get('layer_groups')} layer groups" if space.get("layer_groups") else "")
                + (", per module" if space.get("per_module") else "")
                + (f", chunks {space.get('chunks')}" if space.get("chunks") not in (None, 1) else "") + ")")
    return (f"Search so far: {sum(counts.values())} trials ({states or 'none yet'}) and {n_baselines} baselines"
            f"{what}" + (f", sampler {meta['sampler']}" if meta.get("sampler") else "") + ".")


# --- Pareto front -------------------------------------------------------------------------------


@dataclass
class Point:
    number: int
    values: list[float]
    label: str | None  # the baseline's name, None for searched trials
    on_front: bool
    coefficients: dict[str, float]


@dataclass
class ParetoInfo:
    axes: list[str]  # what `Point.values` hold: the objectives, or the per-task scores of a single objective
    kind: str  # "objectives", "tasks" (single objective, trade-offs between its tasks) or "trials" (one score)
    points: list[Point]  # every COMPLETE trial, searched and baselines
    best_number: int | None  # best searched trial by mean

    @property
    def front(self) -> list[int]:
        return [p.number for p in self.points if p.on_front]


def pareto_info(study: optuna.Study) -> ParetoInfo:
    """COMPLETE trials with their objective values; the non-dominated ones (among searched trials and
    baselines alike, so a baseline on the front shows that the search has not passed it) flagged.

    With a single (mean) objective over several tasks, the trade-off is shown between the tasks'
    scores instead, which is where merges differ; with a single task, the score per trial.
    """
    objectives = objective_names(study)
    experts = list(records.meta(study).get("experts") or [])
    trials = _complete(study)
    kind, axes = "objectives", objectives
    if len(objectives) == 1:
        tasks = list(records.meta(study).get("tasks") or [])
        if len(tasks) > 1 and all(set(tasks) <= set(records.objective_scores(t)) for t in trials):
            kind, axes = "tasks", tasks
        else:
            kind = "trials"
    rows = [[float(records.objective_scores(t)[k]) for k in axes] if kind == "tasks" else list(t.values)
            for t in trials]
    vals = np.array(rows, dtype=float).reshape(len(trials), len(axes))
    front = non_dominated(vals) if len(trials) and kind != "trials" else np.zeros(len(trials), dtype=bool)
    points = [Point(t.number, row, records.baseline_name(t), bool(f), key_coefficients(t, experts))
              for t, row, f in zip(trials, rows, front)]
    best = records.best_trials(study, 1)
    return ParetoInfo(axes, kind, points, best[0].number if best else None)


# --- optimisation history -----------------------------------------------------------------------


@dataclass
class HistoryInfo:
    """The search over time, with the baselines apart: they are scored before it, not by it."""

    series: list[str]  # the objectives, plus "mean" when there are several
    numbers: list[int]  # COMPLETE searched trials in trial order
    values: np.ndarray  # (n_complete, n_series)
    best_so_far: np.ndarray  # (n_complete, n_series) running maximum over the searched trials: never falls
    baselines: list[str]  # baseline names, in the order they were scored
    baseline_values: np.ndarray  # (n_baselines, n_series)
    pruned: list[tuple[int, float | None, str]]  # (number, last reported value, reason)
    failed: list[tuple[int, str]]  # (number, reason)
    running: list[int]

    @property
    def best_baseline(self) -> np.ndarray:
        """(n_series,) the best baseline value per series (NaN without baselines): the bar the search must pass."""
        if not len(self.baselines):
            return np.full(len(self.series), np.nan)
        return np.nanmax(self.baseline_values, axis=0)


def history_info(study: optuna.Study) -> HistoryInfo:
    objectives = objective_names(study)
    series = objectives + (["mean"] if len(objectives) > 1 else [])

    def rows(trials: list[FrozenTrial]) -> np.ndarray:
        out = [list(t.values) + ([records.trial_mean(t)] if len(objectives) > 1 else []) for t in trials]
        return np.array(out, dtype=float).reshape(len(trials), len(series))

    searched = sorted((t for t in records.search_trials(study) if t.values), key=lambda t: t.number)
    baselines = records.baseline_trials(study)  # in the order they were scored
    values = rows(searched)
    best = np.maximum.accumulate(values, axis=0) if len(searched) else values.copy()
    pruned, failed, running = [], [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)):
        reason = str(records.record(t).get("fail_reason") or t.system_attrs.get("fail_reason") or "")
        if t.state == TrialState.PRUNED:
            last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
            pruned.append((t.number, last, reason or "pruned"))
        elif t.state == TrialState.FAIL:
            failed.append((t.number, reason or "failed"))
        else:
            running.append(t.number)
    return HistoryInfo(series, [t.number for t in searched], values, best,
                       [records.baseline_name(t) for t in baselines], rows(baselines), pruned, failed, running)


# --- coefficient heatmap ------------------------------------------------------------------------


@dataclass
class HeatmapPanel:
    param: str
    rows: list[str]  # layer groups in depth order: L00.. (or G0.., all), then io; ".module" with per_module
    experts: list[str]  # "(shared)" for a parameter that is not per expert
    n_chunks: int
    values: np.ndarray  # (n_rows, n_experts, n_chunks); NaN where the space has no such slot
    low: float | None = None
    high: float | None = None


@dataclass
class HeatmapInfo:
    number: int
    label: str
    panels: list[HeatmapPanel] = field(default_factory=list)


def heatmap_info(study: optuna.Study, which: str | int = "best") -> HeatmapInfo:
    """The searched coefficients of one trial as (layer group, expert, chunk) arrays, one per parameter."""
    trial = pick_trial(study, which)
    fitted = fitted_coefficients(study, trial)
    if not trial.params and not fitted:
        raise StudyError(f"{trial_label(trial)} has no searched coefficients: "
                         "pick a searched trial or 'best'")
    experts_meta = list(records.meta(study).get("experts") or [])
    by_param: dict[str, list[tuple[dict, float, str]]] = {}
    for key, value in list(trial.params.items()) + list(fitted.items()):
        try:
            k = parse_key(key)
        except ValueError:
            log.debug("parameter %s is not a mergesearch slot; left out of the heatmap", key)
            continue
        name = f"{k['param']} (fitted)" if key in fitted else k["param"]
        by_param.setdefault(name, []).append((k, float(value), key))
    panels = []
    for param, slots in by_param.items():
        rows = sorted({k["group"] + (f".{k['module']}" if k["module"] else "") for k, _, _ in slots},
                      key=_group_sort_key)
        seen = [k["expert"] or "(shared)" for k, _, _ in slots]
        experts = [e for e in experts_meta if e in seen] + sorted(set(seen) - set(experts_meta))
        n_chunks = max(k["chunk"] for k, _, _ in slots) + 1
        arr = np.full((len(rows), len(experts), n_chunks), np.nan)
        lows, highs = [], []
        for k, v, key in slots:
            r = rows.index(k["group"] + (f".{k['module']}" if k["module"] else ""))
            arr[r, experts.index(k["expert"] or "(shared)"), k["chunk"]] = v
            dist = trial.distributions.get(key)
            if isinstance(dist, optuna.distributions.FloatDistribution):
                lows.append(dist.low)
                highs.append(dist.high)
            elif key in fitted:
                clamp = ((records.meta(study).get("config") or {}).get("fit") or {}).get("clamp")
                if clamp:
                    lows.append(clamp[0])
                    highs.append(clamp[1])
        panels.append(HeatmapPanel(param, rows, experts, n_chunks, arr, min(lows, default=None),
                                   max(highs, default=None)))
    label = f"trial {trial.number}" + (" (best)" if str(which) == "best" else "")
    return HeatmapInfo(trial.number, label, panels)


def fitted_coefficients(study: optuna.Study, trial: FrozenTrial) -> dict[str, float]:
    """A fitted trial's coefficients by slot name (empty for trials without a fit)."""
    record = records.record(trial).get(records.FIT_KEY)
    keys = (records.meta(study).get("fit") or {}).get(record["granularity"]) if record else None
    return dict(zip(keys, record["coef"])) if keys else {}


@dataclass
class FitInfo:
    number: int
    label: str
    steps: list[int]
    train_loss: list[float | None]  # mean training loss since the previous check (None at step 0)
    val_loss: list[float]
    best_step: int
    granularity: str
    objective: str
    n_coefficients: int


def fit_info(study: optuna.Study, which: str | int = "best") -> FitInfo:
    """The fit of one trial: training and validation loss at every check, and the step kept."""
    trial = pick_trial(study, which)
    record = records.record(trial).get(records.FIT_KEY)
    if not record:
        raise StudyError(f"{trial_label(trial)} was not fitted: the study has no fit: "
                         "section, or this is a baseline")
    h = record["history"]
    label = f"trial {trial.number}" + (" (best)" if str(which) == "best" else "")
    return FitInfo(trial.number, label, [x["step"] for x in h], [x["train_loss"] for x in h],
                   [x["val_loss"] for x in h], record["best_step"], record["granularity"], record["objective"],
                   len(record["coef"]))


# --- parameter importances ----------------------------------------------------------------------


@dataclass
class ImportanceInfo:
    n_trials: int
    evaluator: str
    target: str
    by_param: dict[str, float]  # slot key -> importance (sums to 1), largest first
    by_layer: dict[str, float]  # layer group -> summed importance, in depth order
    by_expert: dict[str, float]
    note: str | None = None  # why there is nothing to show


def importance_info(study: optuna.Study, *, min_trials: int = MIN_IMPORTANCE_TRIALS, seed: int = 0,
                    evaluator: optuna.importance.BaseImportanceEvaluator | None = None) -> ImportanceInfo:
    """fANOVA importances of the searched coefficients for the mean objective, grouped by layer and expert.

    Read from the stored study (never written): it holds only searched trials. Optuna's evaluators use
    the trials that hold every parameter asked for.
    """
    evaluator = evaluator or optuna.importance.FanovaImportanceEvaluator(seed=seed)
    name = type(evaluator).__name__
    objectives = objective_names(study)
    target = "mean objective" if len(objectives) > 1 else objectives[0]
    trials = [t for t in records.search_trials(study) if t.params and t.values]
    if trials:
        common = set.intersection(*(set(t.params) for t in trials))
        trials = [t for t in trials if set(t.params) == common]
    empty = ImportanceInfo(len(trials), name, target, {}, {}, {})
    if len(trials) < min_trials:
        empty.note = (f"{len(trials)} completed searched trials: importances need at least {min_trials}; "
                      "regenerate the report later")
        return empty
    varying = [k for k in trials[0].params if len({t.params[k] for t in trials}) > 1]
    if not varying:
        empty.note = "no searched coefficient varies between trials yet"
        return empty
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying,
                                                      target=records.trial_mean)
    except (RuntimeError, ValueError) as exc:  # e.g. every target value equal
        empty.note = f"importances could not be computed: {exc}"
        return empty
    by_layer: dict[str, float] = {}
    by_expert: dict[str, float] = {}
    for key, v in imp.items():
        try:
            k = parse_key(key)
        except ValueError:
            continue
        by_layer[k["group"]] = by_layer.get(k["group"], 0.0) + v
        e = k["expert"] or "(shared)"
        by_expert[e] = by_expert.get(e, 0.0) + v
    by_layer = {g: by_layer[g] for g in sorted(by_layer, key=_group_sort_key)}
    return ImportanceInfo(len(trials), name, target, dict(imp), by_layer, by_expert)


# --- calibration vs test ------------------------------------------------------------------------


@dataclass
class OverfitPoint:
    number: int
    label: str
    is_baseline: bool
    calib_mean: float
    test_mean: float
    calib: dict[str, float]
    test: dict[str, float]


@dataclass
class OverfitInfo:
    points: list[OverfitPoint]
    note: str | None = None


def overfit_info(study: optuna.Study) -> OverfitInfo:
    """Calibration vs held-out test means of the trials the study re-scored after the search."""
    stored = records.test_scores(study)
    if not stored:
        return OverfitInfo([], "no held-out test scores yet: they are written when the search finishes")
    points = []
    for t in _complete(study):
        rec = stored.get(records.trial_key(t))
        if rec is None or rec.get("calib_mean") is None or rec.get("test_mean") is None:
            continue
        name = records.baseline_name(t)
        points.append(OverfitPoint(t.number, name or f"trial {t.number}", name is not None,
                                   float(rec["calib_mean"]), float(rec["test_mean"]),
                                   dict(rec.get("calib") or {}), dict(rec.get("test") or {})))
    return OverfitInfo(points, None if points else "the stored test scores carry no calibration/test means")


# --- time per trial -----------------------------------------------------------------------------


@dataclass
class TimingInfo:
    numbers: list[int]
    labels: list[str]  # "baseline:<name>", "complete", "pruned", "fail"
    merge_s: np.ndarray  # (n,)
    eval_s: np.ndarray  # (n,)
    other_s: np.ndarray  # (n,) wall time outside fit + merge + evaluation (sampler, storage); NaN if unknown
    fit_s: np.ndarray  # (n,) a fitted trial's fit of its coefficients; 0 for the others


def timing_info(study: optuna.Study) -> TimingInfo:
    numbers, labels, merge, ev, other, fit = [], [], [], [], [], []
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    for t in records.baseline_trials(study) + finished:
        rec = records.record(t)
        m, e = rec.get("merge_s"), rec.get("eval_s")
        if m is None and e is None:
            continue
        m, e, f = float(m or 0.0), float(e or 0.0), float(rec.get("fit_s") or 0.0)
        # A baseline's stored times span its scoring only: the wall time outside it is not known.
        wall = t.duration.total_seconds() if (t.duration is not None and records.is_search_trial(t)) else float("nan")
        numbers.append(t.number)
        name = records.baseline_name(t)
        labels.append(f"baseline:{name}" if name else t.state.name.lower())
        merge.append(m)
        ev.append(e)
        fit.append(f)
        other.append(max(0.0, wall - m - e - f) if math.isfinite(wall) else float("nan"))
    return TimingInfo(numbers, labels, np.array(merge), np.array(ev), np.array(other), np.array(fit))
