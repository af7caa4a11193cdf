"""Figure data of the report, checked on small studies built here, and the HTML file (no browser)."""

from __future__ import annotations

import datetime
import hashlib
import math
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from mergesearch.cli import main
from mergesearch.errors import StudyError
from mergesearch.report import (
    build_report,
    heatmap_info,
    history_info,
    importance_info,
    overfit_info,
    pareto_info,
    summary_info,
    timing_info,
    write_report,
)
from mergesearch.study import load_study
from mergesearch.study import records
from report_helpers import BASELINES, CHUNKS, EXPERTS, GROUPS, make_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> str:
    """A 2-objective study in SQLite like the runner writes (built once for the module)."""
    return make_study(tmp_path_factory.mktemp("study"), 2, n_search=24)


def _study(n_obj: int, meta: dict | None = None) -> optuna.Study:
    s = optuna.create_study(directions=["maximize"] * n_obj)
    s.set_user_attr(records.META_KEY, {"objectives": [f"t{i}" for i in range(n_obj)], "experts": ["a", "b"],
                                 **(meta or {})})
    return s


def _add(s: optuna.Study, values, baseline: str | None = None, params: dict | None = None, **record) -> int:
    """A searched trial (or a baseline, beside the searched trials) with its record, as the runner stores it."""
    if baseline:
        records.add_baseline(s, baseline, [], values, record, datetime.datetime(2025, 1, 1))
        return records.baseline_trials(s)[-1].number
    params = params or {}
    s.add_trial(create_trial(values=values, params=params, distributions={k: FloatDistribution(0.0, 1.0) for k in params},
                             user_attrs={records.TRIAL_KEY: record}))
    return s.trials[-1].number


# --- Pareto front -------------------------------------------------------------------------------


def test_pareto_membership_written_out():
    s = _study(2)
    a = _add(s, [0.5, 0.5])
    b = _add(s, [0.6, 0.4])
    c = _add(s, [0.4, 0.6])
    _add(s, [0.45, 0.45])  # dominated by a
    e = _add(s, [0.6, 0.4])  # equal to b: neither dominates the other
    _add(s, [0.6, 0.35])  # dominated by b (equal on one objective, worse on the other)
    x = _add(s, [0.7, 0.1], baseline="expert:a")  # a baseline nothing beats on t0
    _add(s, [0.3, 0.3], baseline="base")
    s.add_trial(create_trial(state=TrialState.FAIL))
    info = pareto_info(s)
    assert info.kind == "objectives" and info.axes == ["t0", "t1"]
    assert sorted(info.front) == sorted([a, b, c, e, x])
    assert {p.number: p.label for p in info.points if p.label} == {x: "expert:a", -2: "base"}
    assert len(info.points) == 8  # COMPLETE trials only
    assert info.best_number == a  # best searched mean (0.5) ties b/c/e... lowest number wins
    assert info.best_number in info.front


@pytest.mark.parametrize("n_obj", [2, 3, 4])
def test_pareto_front_matches_optuna(n_obj):
    """Our front on searched trials equals Optuna's own Pareto front (study.best_trials), ties included."""
    rng = random.Random(n_obj)
    s = _study(n_obj)
    for _ in range(60):
        _add(s, [round(rng.random(), 1) for _ in range(n_obj)])  # coarse values: many ties
    assert sorted(pareto_info(s).front) == sorted(t.number for t in s.best_trials)


def test_parallel_coordinates_name_the_baselines_and_have_no_trial_axis():
    from mergesearch.report import plot_pareto

    s = _study(4)
    _add(s, [0.1, 0.2, 0.3, 0.4], baseline="base")
    _add(s, [0.5, 0.1, 0.1, 0.1], baseline="expert:a")
    front = _add(s, [0.6, 0.6, 0.6, 0.6])
    _add(s, [0.2, 0.2, 0.2, 0.2])  # dominated
    info = pareto_info(s)
    dims = plot_pareto(info).data[0].dimensions
    assert [d.label for d in dims] == ["merge", "t0", "t1", "t2", "t3"]
    merge = dims[0]
    ticks = dict(zip(merge.tickvals, merge.ticktext))
    shown = {p.label or p.number: ticks[v] for p, v in zip(info.points, merge["values"])}
    assert shown == {"base": "base", "expert:a": "expert:a", front: "searched: Pareto front",
                     front + 1: "searched: dominated"}


def test_single_objective_shows_tasks_or_trials():
    s = _study(1, {"objectives": ["mean"], "tasks": ["x", "y"]})
    n1 = _add(s, [0.5], objective_scores={"x": 0.9, "y": 0.1})
    n2 = _add(s, [0.4], objective_scores={"x": 0.2, "y": 0.6})
    _add(s, [0.3], objective_scores={"x": 0.2, "y": 0.4})  # dominated on the tasks
    info = pareto_info(s)
    assert info.kind == "tasks" and info.axes == ["x", "y"]
    assert sorted(info.front) == [n1, n2]
    assert [p.values for p in info.points][0] == [0.9, 0.1]
    s1 = _study(1, {"objectives": ["mean"], "tasks": ["x"]})
    _add(s1, [0.5])
    assert pareto_info(s1).kind == "trials"


def test_pareto_hover_coefficients(stored):
    info = pareto_info(load_study(stored))
    base = {p.label: p for p in info.points if p.label}
    assert set(base) == set(BASELINES)
    assert base["expert:arith"].coefficients == {"weight[arith]": 1.0, "weight[reverse]": 0.0}
    searched = next(p for p in info.points if p.label is None)
    assert set(searched.coefficients) == {f"{p}[{e}]" for p in ("weight", "density") for e in EXPERTS}


# --- history ------------------------------------------------------------------------------------


def test_history_best_so_far_and_states():
    s = _study(2)
    seq = [[0.1, 0.5], [0.3, 0.2], [0.2, 0.6], [0.25, 0.1]]
    _add(s, seq[0], baseline="base")
    for v in seq[1:]:
        _add(s, v)
    s.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={0: 0.05, 1: 0.07},
                             user_attrs={records.TRIAL_KEY: {"fail_reason": "pruned after slice 2/3"}}))
    s.add_trial(create_trial(state=TrialState.FAIL, user_attrs={records.TRIAL_KEY: {"fail_reason": "NaN weights"}}))
    s.add_trial(create_trial(state=TrialState.RUNNING))
    h = history_info(s)
    assert h.series == ["t0", "t1", "mean"]
    assert h.numbers == [0, 1, 2] and h.baselines == ["base"]  # baselines apart from the searched trials
    np.testing.assert_allclose(h.baseline_values, [[0.1, 0.5, 0.3]])
    # running maxima over the searched trials, written out by hand
    np.testing.assert_allclose(h.best_so_far[:, 0], [0.3, 0.3, 0.3])
    np.testing.assert_allclose(h.best_so_far[:, 1], [0.2, 0.6, 0.6])
    np.testing.assert_allclose(h.best_so_far[:, 2], [0.25, 0.4, 0.4])
    np.testing.assert_allclose(h.best_baseline, [0.1, 0.5, 0.3])
    assert h.pruned == [(3, 0.07, "pruned after slice 2/3")]
    assert h.failed == [(4, "NaN weights")]
    assert h.running == [5]


def test_history_best_so_far_never_falls_and_baselines_keep_their_scoring_order():
    """The demo's report: baselines scored from best to worst drew a best-so-far line falling from 0.396 to
    0.146 (accumulated in scoring order, drawn in ascending trial number -10 ... -1)."""
    from mergesearch.report import plot_history

    s = _study(1)
    scored = {"task_arithmetic@0.7": 0.396, "uniform": 0.3, "expert:a": 0.2, "base": 0.146}
    for name, v in scored.items():
        _add(s, [v], baseline=name)
    for v in (0.2, 0.41, 0.39, 0.45):
        _add(s, [v])
    h = history_info(s)
    assert h.baselines == list(scored) and h.baseline_values[:, 0].tolist() == list(scored.values())
    assert h.best_baseline[0] == 0.396
    fig = plot_history(h)
    line = next(tr for tr in fig.data if tr.name.startswith("best so far"))
    order = np.argsort(line.x)
    assert np.all(np.diff(np.asarray(line.y)[order]) >= 0) and list(line.y) == [0.2, 0.41, 0.41, 0.45]
    base = next(tr for tr in fig.data if tr.name.startswith("baseline"))
    assert [base.text[i] for i in np.argsort(base.x)] == list(scored)  # left to right as they were scored
    assert max(base.x) < min(line.x)


# --- heatmap ------------------------------------------------------------------------------------


def test_heatmap_shape_is_layers_experts_chunks(stored):
    study = load_study(stored)
    info = heatmap_info(study)
    best = records.best_trials(study, 1)[0]
    assert info.number == best.number
    assert [p.param for p in info.panels] == ["weight", "density"]
    for p in info.panels:
        assert p.values.shape == (len(GROUPS), len(EXPERTS), CHUNKS)
        assert p.rows == GROUPS and p.experts == EXPERTS and not np.isnan(p.values).any()
        assert p.values[2, 1, 1] == best.params[f"{p.param}[reverse]@L02#1"]
        assert p.values[4, 0, 0] == best.params[f"{p.param}[arith]@io#0"]
    assert (info.panels[0].low, info.panels[0].high) == (0.0, 1.0)
    other = heatmap_info(study, 10)
    assert other.number == 10 and other.panels[0].values[0, 0, 1] == study.trials[10].params["weight[arith]@L00#1"]


def test_heatmap_modules_shared_params_and_uneven_chunks():
    s = _study(1)
    params = {"weight[a]@L00.attn": 0.1, "weight[a]@L00.mlp": 0.2, "weight[b]@L00.mlp": 0.3,
              "weight[a]@L10.attn": 0.4, "weight[a]@io": 0.5,
              "lambda@L00.attn#0": 0.6, "lambda@L00.attn#2": 0.7, "lambda@L02.attn#0": 0.8}
    _add(s, [1.0], params=params)
    info = heatmap_info(s)
    w, lam = info.panels
    assert w.rows == ["L00.attn", "L00.mlp", "L10.attn", "io"]  # depth order, numeric (L10 after L00)
    assert w.experts == ["a", "b"] and w.values.shape == (4, 2, 1)
    assert w.values[1, 1, 0] == 0.3 and math.isnan(w.values[0, 1, 0])  # no attn slot for b
    assert lam.experts == ["(shared)"] and lam.values.shape == (2, 1, 3)
    assert lam.values[0, 0, 2] == 0.7 and math.isnan(lam.values[1, 0, 2])


def test_heatmap_of_a_baseline_or_unknown_trial_is_refused(stored):
    study = load_study(stored)
    for baseline in ("base", "baseline:uniform"):
        with pytest.raises(StudyError, match="no searched coefficients"):
            heatmap_info(study, baseline)
    with pytest.raises(StudyError, match="no trial 999"):
        heatmap_info(study, 999)
    with pytest.raises(StudyError, match="'best', a trial number or a baseline name"):
        heatmap_info(study, "worst")
    with pytest.raises(StudyError, match="no completed searched trial"):
        heatmap_info(_study(1))


# --- importances --------------------------------------------------------------------------------


def test_importance_finds_the_one_parameter_that_matters():
    rng = random.Random(0)
    s = _study(1)
    _add(s, [0.9], baseline="expert:a")  # no parameters: left out of the evaluator's input
    keys = ["weight[a]@L00", "weight[a]@L01", "weight[b]@L01", "weight[b]@L02"]
    for _ in range(24):
        params = {k: rng.random() for k in keys}
        _add(s, [params["weight[b]@L01"] ** 2], params=params)
    info = importance_info(s)
    assert info.note is None and info.n_trials == 24
    assert max(info.by_param, key=info.by_param.get) == "weight[b]@L01"
    assert info.by_param["weight[b]@L01"] > 0.8
    assert list(info.by_layer) == ["L00", "L01", "L02"]
    assert info.by_layer["L01"] == pytest.approx(info.by_param["weight[a]@L01"] + info.by_param["weight[b]@L01"])
    assert info.by_expert["b"] > 0.8 and sum(info.by_expert.values()) == pytest.approx(1.0)


def test_importance_guards_small_studies():
    s = _study(1)
    for i in range(3):
        _add(s, [i / 10], params={"weight[a]@L00": i / 10})
    info = importance_info(s)
    assert info.by_param == {} and "need at least" in info.note
    s2 = _study(1)
    for i in range(10):
        _add(s2, [i / 10], params={"weight[a]@L00": 0.5})
    assert "varies" in importance_info(s2).note


# --- calibration vs test, timing, summary -------------------------------------------------------


def test_overfit_points(stored):
    study = load_study(stored)
    info = overfit_info(study)
    tests = records.test_scores(study)
    assert len(info.points) == len(tests) == len(BASELINES) + 3
    assert {p.label for p in info.points if p.is_baseline} == set(BASELINES)
    assert {f"baseline:{b}" for b in BASELINES} <= set(tests)
    p = info.points[-1]  # searched trials come after the baselines
    assert not p.is_baseline and p.test_mean == pytest.approx(tests[str(p.number)]["test_mean"])
    assert "written when the search finishes" in overfit_info(_study(1)).note


def test_timing_split(stored):
    study = load_study(stored)
    info = timing_info(study)
    by_number = {t.number: t for t in study.trials}
    assert len(info.numbers) == len(BASELINES) + 24 + 2  # complete, pruned and failed; not the running one
    i = info.numbers.index(10)
    t = by_number[10]
    rec = records.record(t)
    assert info.merge_s[i] == pytest.approx(rec["merge_s"])
    assert info.eval_s[i] == pytest.approx(rec["eval_s"])
    other = t.duration.total_seconds() - rec["merge_s"] - rec["eval_s"]
    assert info.other_s[i] == pytest.approx(other, abs=1e-5)
    assert info.labels[0] == "baseline:base" and math.isnan(info.other_s[0])
    assert "fail" in info.labels and "pruned" in info.labels


def test_summary_says_what_was_found(stored):
    study = load_study(stored)
    s = summary_info(study)
    best = records.best_trials(study, 1)[0]
    base_means = {records.baseline_name(t): records.trial_mean(t) for t in records.baseline_trials(study)}
    top = max(base_means, key=base_means.get)
    assert s.best.number == best.number and s.best_baseline.label == top
    assert [r.label for r in s.rows] == list(BASELINES) + [f"best found (trial {best.number})"]
    margin = (best.values[0] + best.values[1]) / 2 - base_means[top]
    assert margin > 0
    text = " ".join(s.sentences)
    assert f"trial {best.number}" in text and top in text and f"{margin * 100:.1f} points above" in text
    assert all(w in text for w in ("24 complete", "1 pruned", "1 fail", "1 running", "5 baselines"))
    assert "held-out test split" in text


def test_summary_when_the_search_is_behind_or_empty():
    s = _study(1)
    _add(s, [0.6], baseline="expert:a", objective_scores={"t0": 0.6})
    _add(s, [0.5], params={"weight[a]@L00": 0.3}, objective_scores={"t0": 0.5})
    text = " ".join(summary_info(s).sentences)
    assert "10.0 points below the best baseline, expert:a" in text and "not beaten" in text
    empty = summary_info(_study(2))
    assert empty.best is None and "No searched trial has completed yet." in empty.sentences


# --- the HTML file ------------------------------------------------------------------------------


def _fingerprint(url: str) -> str:
    db = Path(url.removeprefix("sqlite:///"))
    h = hashlib.sha256()
    for f in (db, db.with_name(db.name + "-wal")):
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()


def _external_refs(text: str) -> list[str]:
    """src/href attributes of the page's own tags (script bodies are CDATA to the parser)."""
    from html.parser import HTMLParser

    refs = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            refs.extend(f"{tag} {k}={v}" for k, v in attrs if k in ("src", "href") and v and not v.startswith("#"))

    P().feed(text)
    return refs


def test_report_html_is_self_contained_and_read_only(stored, tmp_path):
    before = _fingerprint(stored)
    out = write_report(stored, tmp_path / "r" / "report.html")
    assert _fingerprint(stored) == before  # reading never writes: safe while workers run
    text = out.read_text()
    for fid in ("pareto", "history", "heatmap", "importance", "overfit", "timing"):
        assert f"id='{fid}'" in text and f'id="fig-{fid}"' in text
    assert _external_refs(text) == []  # plotly.js is inline: the file opens offline
    assert _external_refs("<script src='https://cdn.plot.ly/x.js'></script>") != []
    assert len(text) > 3_000_000
    assert "Best found: trial" in text and "expert:arith" in text
    assert not list(out.parent.glob(".*.tmp"))


def test_report_of_a_study_with_no_searched_trial_yet():
    s = _study(2)
    _add(s, [0.2, 0.3], baseline="base")
    rep = build_report(s)
    assert rep.figures == ["pareto", "history"]  # the baseline stored no timings
    assert "no completed searched trial" in rep.notes["heatmap"]
    assert "need at least" in rep.notes["importance"] and "overfit" in rep.notes and "timing" in rep.notes


def test_report_cli(stored, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", stored, "--out", str(out), "--trial", "10"]) == 0
    printed = capsys.readouterr().out
    assert "Best found: trial" in printed and "6 figures" in printed and out.exists()
    assert "trial 10" in out.read_text()
    assert main(["report", stored, "--out", str(out), "--trial", "uniform"]) == 2  # a baseline: nothing searched
    assert "no searched coefficients" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.db"), "--out", str(out)]) == 2
    assert main(["report", stored, "--study-name", "nope", "--out", str(out)]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
