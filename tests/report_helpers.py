"""A small stored study for the report tests, written with optuna.trial.create_trial and the attribute
names of mergesearch.study.records (what the study runner stores), without merging anything."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mergesearch.space import slot_key
from mergesearch.study import records
from mergesearch.study.storage import open_storage, quietly

EXPERTS = ["arith", "reverse"]
LAYERS = 4
CHUNKS = 2
GROUPS = [f"L{i:02d}" for i in range(LAYERS)] + ["io"]
TASKS_BY_M = {1: ["arith", "reverse"], 2: ["arith", "reverse"], 3: ["arith", "reverse", "copy"],
              4: ["arith", "reverse", "copy", "sort"]}
BASELINES = {"base": [0.0, 0.0], "expert:arith": [1.0, 0.0], "expert:reverse": [0.0, 1.0],
             "uniform": [0.5, 0.5], "task_arithmetic@0.5": [0.5, 0.5]}


def slot_keys() -> list[str]:
    return [slot_key(p, e, g, None, c) for p in ("weight", "density") for e in EXPERTS for g in GROUPS
            for c in range(CHUNKS)]


def _dist(key: str) -> FloatDistribution:
    return FloatDistribution(0.0, 1.0) if key.startswith("weight") else FloatDistribution(0.1, 1.0)


def _task_scores(params: dict[str, float], tasks: list[str]) -> dict[str, float]:
    """Deterministic scores in [0, 1]: arith wants the arith expert in the early layers, reverse wants the
    reverse expert in the late ones, and each suffers from the other expert there (interference), so a
    per-layer merge can beat both experts and the heatmap has a pattern to show."""
    def w(e: str, layers) -> float:
        ks = [slot_key("weight", e, f"L{i:02d}", None, c) for i in layers for c in range(CHUNKS)]
        return sum(params[k] for k in ks) / len(ks)

    ae, re_, al, rl = w("arith", [0, 1]), w("reverse", [0, 1]), w("arith", [2, 3]), w("reverse", [2, 3])
    out = {"arith": 0.2 + 0.6 * ae - 0.4 * re_, "reverse": 0.15 + 0.6 * rl - 0.4 * al,
           "copy": 0.6 - 0.2 * abs(ae - rl), "sort": 0.3 + 0.2 * (ae + rl) / 2}
    return {t: round(min(1.0, max(0.0, out[t])), 6) for t in tasks}


def _values(scores: dict[str, float], m: int) -> list[float]:
    vals = list(scores.values())
    return [sum(vals) / len(vals)] if m == 1 else vals[:m]


def _when(t: optuna.trial.FrozenTrial, start: dt.datetime, seconds: float) -> optuna.trial.FrozenTrial:
    t.datetime_start = start
    t.datetime_complete = start + dt.timedelta(seconds=seconds)
    return t


def make_study(folder: Path, n_objectives: int = 2, n_search: int = 30, *, seed: int = 0,
               with_test: bool = True, name: str = "demo") -> str:
    """Write a study like the runner's (baselines, searched trials, one pruned, one failed, one running,
    held-out scores) to folder/NAME.db and return its storage URL."""
    rng = random.Random(seed)
    url = f"sqlite:///{Path(folder) / (name + '.db')}"
    storage = open_storage(url, heartbeat=False)
    m = n_objectives
    tasks = TASKS_BY_M[m]
    objectives = ["mean"] if m == 1 else tasks
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize"] * m)
    quietly(study.set_metric_names, objectives)  # as the runner names them
    keys = slot_keys()
    study.set_user_attr(records.META_KEY, {
        "version": "test", "experts": EXPERTS, "num_layers": LAYERS, "tasks": tasks, "objectives": objectives,
        "directions": ["maximize"] * m, "sampler": "TPESampler", "device": "cpu",
        "space": {"method": "ties", "granularity": "per_layer", "layer_groups": None, "per_module": False,
                  "chunks": CHUNKS, "n_params": len(keys), "searched": {"weight": len(keys) // 2,
                                                                         "density": len(keys) // 2},
                  "experts": EXPERTS},
        "base_scores": {t: 0.1 for t in tasks},
    })
    t0 = dt.datetime(2025, 1, 1, 12, 0, 0)
    for i, (bname, weights) in enumerate(BASELINES.items()):
        params = {k: (weights[EXPERTS.index("arith" if "[arith]" in k else "reverse")] if k.startswith("weight")
                      else 1.0) for k in keys}
        scores = _task_scores(params, tasks)
        if bname == "base":
            scores = {t: 0.1 for t in tasks}
        records.add_baseline(study, bname, weights, _values(scores, m),
                       {"objective_scores": scores, "scores": {t: {"acc": v} for t, v in scores.items()},
                        "merge_s": 0.05, "eval_s": 0.4, "device": "cpu"}, t0 + dt.timedelta(seconds=i))
    for i in range(n_search):
        # A search that learns: later trials lean towards the good per-layer pattern.
        lean = i / max(1, n_search - 1)
        params = {}
        for k in keys:
            good = float(("[arith]" in k) == any(f"@L0{j}" in k for j in (0, 1))) if k.startswith("weight") else 0.8
            d = _dist(k)
            x = (1 - lean) * rng.uniform(d.low, d.high) + lean * (0.8 * good + 0.2 * rng.random())
            params[k] = min(d.high, max(d.low, x))
        scores = _task_scores(params, tasks)
        merge_s, eval_s = 0.04 + 0.01 * rng.random(), 0.3 + 0.1 * rng.random()
        study.add_trial(_when(create_trial(
            values=_values(scores, m), params=params, distributions={k: _dist(k) for k in keys},
            user_attrs={records.TRIAL_KEY: {"objective_scores": scores, "merge_s": merge_s, "eval_s": eval_s,
                                      "device": "cpu", "scores": {t: {"acc": v} for t, v in scores.items()}}},
            intermediate_values={0: _values(scores, m)[0]}),
            t0 + dt.timedelta(seconds=10 + i), merge_s + eval_s + 0.02))
    params = {k: 0.05 for k in keys if k.startswith("weight")} | {k: 0.5 for k in keys if k.startswith("density")}
    study.add_trial(_when(create_trial(
        state=TrialState.PRUNED, params=params, distributions={k: _dist(k) for k in keys},
        intermediate_values={0: 0.05}, user_attrs={records.TRIAL_KEY: {"merge_s": 0.05, "eval_s": 0.1,
                                                                 "fail_reason": "pruned after slice 1/3"}}),
        t0 + dt.timedelta(seconds=100), 0.2))
    study.add_trial(_when(create_trial(
        state=TrialState.FAIL, params=params, distributions={k: _dist(k) for k in keys},
        user_attrs={records.TRIAL_KEY: {"fail_reason": "evaluation gave a non-finite score [nan]", "merge_s": 0.05}}),
        t0 + dt.timedelta(seconds=101), 0.1))
    study.add_trial(create_trial(state=TrialState.RUNNING))
    if with_test:
        stored = {}
        for t in records.best_trials(study, 3) + records.baseline_trials(study):
            calib = records.objective_scores(t)
            test = {k: round(v - 0.03 - 0.01 * (t.number % 3), 6) for k, v in calib.items()}
            stored[records.trial_key(t)] = {"calib": calib, "test": test, "calib_mean": sum(calib.values()) / len(calib),
                                     "test_mean": sum(test.values()) / len(test), "baseline": records.baseline_name(t)}
        study.set_user_attr(records.TEST_KEY, stored)
    return url
