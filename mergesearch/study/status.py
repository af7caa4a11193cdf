"""A study's status: trials done, best so far, baselines, failures and an ETA (the CLI's `status`)."""

from __future__ import annotations

import datetime as dt
import statistics

from optuna.trial import TrialState

from mergesearch.study import records
from mergesearch.study.owners import dead_reason
from mergesearch.study.reading import resolve_study
from mergesearch.study.storage import heartbeat_settings
from mergesearch.timings import format_timings, study_timings


def study_status(spec, study_name: str | None = None) -> dict:
    """Trials done, best so far, baselines, failures and an ETA."""
    study, cfg = resolve_study(spec, study_name)
    search = study.get_trials(deepcopy=False)
    by_state = {s.name.lower(): sum(1 for t in search if t.state == s) for s in TrialState}
    counted = by_state["complete"] + by_state["pruned"]
    target = cfg.study.n_trials if cfg else None
    durations = [t.duration.total_seconds() for t in search if t.duration and t.state != TrialState.RUNNING]
    per_trial = statistics.median(durations) if durations else None
    eta = (max(0, target - counted) * per_trial) if (target and per_trial) else None
    best = records.best_trials(study, 1)
    baselines = {records.baseline_name(t): records.trial_mean(t) for t in records.baseline_trials(study)}
    feasible = records.feasibility(study)
    infeasible = sum(not feasible(t) for t in search if t.state == TrialState.COMPLETE)
    now, grace = dt.datetime.now(), heartbeat_settings()[1]
    # read-only: a run or worker opening the study fails these and queues them again
    gone = [t.number for t in search if t.state == TrialState.RUNNING and dead_reason(t, now, grace) is not None]
    done = [t for t in search if t.state == TrialState.COMPLETE]
    timing = study_timings(records.meta(study), [records.record(t) for t in records.baseline_trials(study)],
                           [records.record(t) for t in done],
                           [t.duration.total_seconds() if t.duration else None for t in done])
    return {
        "study": study.study_name,
        "objectives": records.meta(study).get("objectives"),
        "n_trials_target": target,
        "trials": by_state,
        "counted": counted,
        "running_gone": gone,
        "best": ({"number": best[0].number, "mean": records.trial_mean(best[0]),
                  "scores": records.objective_scores(best[0])} if best else None),
        "best_rule": records.best_rule(study),
        "infeasible": infeasible if records.max_drop(study) is not None else None,
        "baselines": baselines,
        "best_baseline": max(baselines.items(), key=lambda kv: kv[1]) if baselines else None,
        "seconds_per_trial": per_trial,
        "eta_seconds": eta,
        "test_scores": records.test_scores(study),
        "timings": timing,
    }


def format_status(st: dict) -> str:
    lines = [f"study {st['study']}: {st['counted']}/{st['n_trials_target'] or '?'} trials counted "
             f"({', '.join(f'{v} {k}' for k, v in st['trials'].items() if v)})"]
    if st["running_gone"]:
        lines.append(f"running trial(s) {', '.join(map(str, st['running_gone']))}: their process on this host is "
                     "gone; `mergesearch run` (or a worker) fails them and runs their parameters again")
    if st["infeasible"] is not None:
        lines.append(f"best = {st['best_rule']}; {st['infeasible']} completed trial(s) infeasible")
    if st["best"]:
        lines.append(f"best: trial {st['best']['number']}  mean {st['best']['mean']:.4f}  "
                     + "  ".join(f"{k} {v:.3f}" for k, v in (st['best']['scores'] or {}).items()))
    elif st["infeasible"]:
        lines.append("best: none yet (no completed trial meets the constraints)")
    if st["best_baseline"]:
        name, v = st["best_baseline"]
        lines.append(f"best baseline: {name}  mean {v:.4f}")
        if st["best"]:
            lines.append(f"margin over the best baseline: {st['best']['mean'] - v:+.4f}")
    if st["seconds_per_trial"]:
        eta = st["eta_seconds"]
        lines.append(f"{st['seconds_per_trial']:.2f} s per trial" + (f", ETA {eta / 60:.1f} min" if eta else ""))
    lines += format_timings(st.get("timings") or {})
    return "\n".join(lines)
