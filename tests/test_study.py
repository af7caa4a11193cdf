import datetime
import json
import os
import warnings

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from mergesearch.cli import main
from mergesearch.config import load_config
from mergesearch.errors import CandidateError, StudyError
from mergesearch.study import export_trial, run_study, study_status
from mergesearch.study.status import format_status
from mergesearch.study import records
from mergesearch.study.baselines import start_point
from mergesearch.study.opening import open_study, warm_start
from mergesearch.study.runner import StudyRunner

from study_helpers import write_study


def _search(study, states=(TrialState.COMPLETE,)):
    return records.search_trials(study, states=states)


def test_run_baselines_trials_and_held_out(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=4))
    study = run_study(cfg, progress=False)
    names = {records.baseline_name(t) for t in records.baseline_trials(study)}
    experts = list(cfg.models.experts)
    assert {"base", "uniform", *(f"expert:{e}" for e in experts)} <= names
    assert any(n.startswith("task_arithmetic@") for n in names)
    searched = _search(study)
    assert len(searched) == 4
    merges = [t for t in records.baseline_trials(study)
              if records.baseline_name(t) == "uniform" or records.baseline_name(t).startswith("task_arithmetic@")]
    start = max(merges, key=lambda t: (records.trial_mean(t), -t.number))
    assert searched[0].user_attrs.get("start") == records.baseline_name(start)  # warm start first: the best merge
    assert records.meta(study)["start"] == {"from": records.baseline_name(start), "x0": searched[0].params}
    for t in searched:
        rec = records.record(t)
        assert set(rec["scores"]) == set(experts)
        assert set(t.user_attrs) <= {records.TRIAL_KEY, records.OWNER_KEY, "start"}
        owner = records.owner(t)  # the process that ran it: this one
        assert owner["trial"] == t.number and owner["pid"] == os.getpid()
        assert rec["merge_s"] > 0 and rec["eval_s"] > 0 and rec["device"] == "cpu"
        assert t.params and all(k.startswith("weight[") for k in t.params)
    # The start point in task arithmetic IS that baseline: every weight at its value, same score.
    weights = dict(zip(experts, start.user_attrs["weights"]))
    assert all(v == weights[k.split("[")[1].split("]")[0]] for k, v in searched[0].params.items())
    assert searched[0].values == pytest.approx(start.values, abs=1e-9)
    uniform = next(t for t in records.baseline_trials(study) if records.baseline_name(t) == "uniform")
    tests = records.test_scores(study)
    best = records.best_trials(study, 1)[0]
    assert str(best.number) in tests and "baseline:uniform" in tests
    assert set(tests[str(best.number)]["test"]) == set(experts)
    assert records.pick_trial(study, "uniform").values == uniform.values
    # the searched study holds searched trials only: the baselines are beside it
    assert all(t.params for t in study.get_trials()) and len(study.get_trials()) == 4
    meta = records.meta(study)
    assert meta["space"]["n_params"] == len(searched[0].params) and meta["base_scores"]


def test_same_seed_same_trials(zoo_test, tmp_path):
    seqs = []
    for i in range(2):
        d = tmp_path / f"run{i}"
        d.mkdir()
        cfg = load_config(write_study(zoo_test, d, n_trials=3, sampler="cmaes", baselines=False, top_k_test=0))
        study = run_study(cfg, progress=False)
        seqs.append([(t.params, t.values) for t in _search(study)])
    assert seqs[0] == seqs[1]


def test_resume_continues_to_total_and_refuses_new_space(zoo_test, tmp_path):
    path = write_study(zoo_test, tmp_path, n_trials=2, top_k_test=0)
    study = run_study(load_config(path), progress=False)
    n_baselines = len(records.baseline_trials(study))
    study = run_study(load_config(path, {"study.n_trials": 4}), progress=False)
    assert len(_search(study)) == 4 and len(records.baseline_trials(study)) == n_baselines
    study = run_study(load_config(path, {"study.n_trials": 4}), extra_trials=1, progress=False)
    assert len(_search(study)) == 5
    with pytest.raises(StudyError, match="another search space"):
        run_study(load_config(path, {"space.granularity": "global"}), progress=False)


def test_failing_candidate_becomes_failed_trial(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=3, baselines=False, top_k_test=0))
    runner = StudyRunner(cfg)
    calls = {"n": 0}

    def hook(stage):
        if stage == "evaluate":
            calls["n"] += 1
            if calls["n"] == 2:
                raise CandidateError("simulated evaluator crash")

    runner.fault_hook = hook
    study = run_study(cfg, runner=runner, progress=False)
    failed = _search(study, states=(TrialState.FAIL,))
    assert len(failed) == 1 and records.record(failed[0])["fail_reason"] == "simulated evaluator crash"
    assert len(_search(study)) == 3


def test_nan_weights_fail_the_candidate(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=1, baselines=False, top_k_test=0))
    runner = StudyRunner(cfg)
    runner.mat.sources(3)[1][0].fill_(float("nan"))  # a poisoned task vector of the first expert
    with pytest.raises(CandidateError, match="not finite"):
        runner.score_plan(runner.plan_for(runner.space.point()))


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_pruned_trials_are_recorded(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=2, baselines=False, top_k_test=0))
    runner = StudyRunner(cfg)
    study = open_study(runner)
    study.pruner = _AlwaysPrune()
    runner.optimize(study, 2, progress=False)
    pruned = _search(study, states=(TrialState.PRUNED,))
    assert len(pruned) == 2
    assert pruned[0].intermediate_values and "pruned after slice 1/2" in records.record(pruned[0])["fail_reason"]


def test_multi_objective_pareto(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=3, mode="per_task", sampler="auto", top_k_test=0))
    study = run_study(cfg, progress=False)
    assert len(study.directions) == len(cfg.models.experts)
    assert records.meta(study)["sampler"] == "NSGAIISampler"
    assert study.best_trials


def test_export_reloads_and_scores_what_the_study_recorded(zoo_test, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.evaluate import Evaluator
    from mergesearch.study.workbench import load_tasks

    path = write_study(zoo_test, tmp_path, n_trials=3, top_k_test=0)
    cfg = load_config(path)
    study = run_study(cfg, progress=False)
    out = export_trial(path, "best", tmp_path / "merged")
    best = records.best_trials(study, 1)[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    res = Evaluator(model, AutoTokenizer.from_pretrained(out), load_tasks(cfg, "calib")).evaluate()
    assert res.mean == pytest.approx(best.values[0], abs=1e-9)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["trial"] == best.number and prov["recipe"]["method"] == "task_arithmetic"
    # The recipe reproduces the same weights through `mergesearch merge`.
    assert main(["merge", str(out / "recipe.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert yaml.safe_load((out / "mergekit.yaml").read_text())["merge_method"] == "task_arithmetic"
    with pytest.raises(StudyError, match="already exists"):
        export_trial(path, "best", out)


def test_cli_run_status_validate_export(zoo_test, tmp_path, capsys):
    path = write_study(zoo_test, tmp_path, n_trials=2, top_k_test=1)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "searched parameters: 12 (weight 12)" in out and "estimated time per trial" in out
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2/2 trials counted" in out and "best baseline" in out
    assert main(["status", str(tmp_path / "t.db"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["counted"] == 2 and st["best"] is not None
    assert main(["export", str(path), "--trial", "999", "--out", str(tmp_path / "x")]) == 2
    assert "no trial 999" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["status", str(tmp_path / "missing.db")]) == 2


def test_status_of_running_study(zoo_test, tmp_path):
    path = write_study(zoo_test, tmp_path, n_trials=2, top_k_test=0)
    study = run_study(load_config(path), progress=False)
    with warnings.catch_warnings():  # Optuna: a heartbeat storage is meant for optimize(); ask() is the stand-in
        warnings.simplefilter("ignore", UserWarning)
        study.ask()  # a trial another process has just started: running, its owner not recorded yet
    st = study_status(path)
    assert st["n_trials_target"] == 2 and st["trials"]["complete"] == 2 and st["seconds_per_trial"] > 0
    assert st["trials"]["running"] == 1 and st["counted"] == 2
    assert st["running_gone"] == []  # started within the heartbeat's grace: not taken for dead
    assert "1 running" in format_status(st)


def _shipped_studies():
    from pathlib import Path

    return sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", _shipped_studies(), ids=lambda p: p.name)
def test_shipped_studies_validate_when_given_paths(path, zoo_test, tmp_path):
    """Every shipped study parses; with the test zoo's folders and splits in place of its paths
    (and a local storage), copied outside the repository, it passes `validate` with its own method,
    space (a shipped space found by name), sampler and constraints."""
    from mergesearch.study import validate_study

    load_config(path)
    raw = yaml.safe_load(path.read_text())
    mine = yaml.safe_load(write_study(zoo_test, tmp_path, name="x").read_text())
    experts = list(mine["models"]["experts"].items())[: len(raw["models"]["experts"])]
    raw["models"] = {**raw["models"], "base": mine["models"]["base"], "experts": dict(experts)}
    raw["objectives"]["tasks"] = mine["objectives"]["tasks"]
    raw["study"]["storage"] = f"sqlite:///{tmp_path / 'v.db'}"
    target = tmp_path / path.name
    target.write_text(yaml.safe_dump(raw))
    summary = validate_study(target)
    assert summary["n_params"] > 0 and summary["method"] == raw["merge"]["method"]


def test_start_point_is_the_best_baseline_merge_and_uniform_otherwise(zoo_test, tmp_path):
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=1, top_k_test=0))
    runner = StudyRunner(cfg)
    study = open_study(runner)
    experts = list(cfg.models.experts)
    # Scores of baselines written by hand: task_arithmetic@0.5 is the best merge, an expert scores higher
    # but is not a merge.
    for name, w, v in [("uniform", [1 / len(experts)] * len(experts), 0.2), ("task_arithmetic@0.5", [0.5] * len(experts), 0.4),
                       ("task_arithmetic@1", [1.0] * len(experts), 0.3), ("expert:" + experts[0], [1.0] + [0.0] * (len(experts) - 1), 0.9)]:
        records.add_baseline(study, name, w, [v], {}, datetime.datetime.now())
    name, x0 = start_point(runner, study)
    assert name == "task_arithmetic@0.5" and set(x0) == {s.key for s in runner.space.slots}
    assert all(v == 0.5 for v in x0.values())
    warm_start(runner, study)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["start"] == "task_arithmetic@0.5"
    warm_start(runner, study)  # decided once
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1

    # A weight range that excludes 0.5 skips to the next best merge that fits.
    narrow = load_config(write_study(zoo_test, tmp_path, name="narrow", n_trials=1, top_k_test=0, space={
        "granularity": "global", "parameters": {"weight": {"low": 0.6, "high": 1.0}, "lambda": {"fixed": 1.0}}}))
    r2 = StudyRunner(narrow)
    assert start_point(r2, study)[0] == "task_arithmetic@1"
    ties = load_config(write_study(zoo_test, tmp_path, name="ties", method="ties", n_trials=1, top_k_test=0,
                                   space={"granularity": "global"}))
    r3 = StudyRunner(ties)
    assert start_point(r3, study) == ("uniform", r3.space.point())


def _constrained_study(drop: float) -> optuna.Study:
    """An in-memory study as the runner stores one with constraints.max_drop_vs_base: drop."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(records.META_KEY, {"tasks": ["a", "b"], "objectives": ["mean"], "base_scores": {"a": 0.5, "b": 0.5},
                                     "config": {"constraints": {"max_drop_vs_base": drop}}})
    for a, b in [(0.94, 0.30), (0.72, 0.48), (0.35, 0.41)]:  # means 0.62 (b drops 0.20), 0.60 (b 0.02), 0.38 (a 0.15)
        study.add_trial(optuna.trial.create_trial(value=(a + b) / 2,
                                                  user_attrs={records.TRIAL_KEY: {"objective_scores": {"a": a, "b": b}}}))
    return study


def test_best_is_the_best_feasible_trial():
    """With max_drop_vs_base, an infeasible 0.62 never beats a feasible 0.60: for status, report and export."""
    from mergesearch.report import summary_info

    study = _constrained_study(0.1)
    assert [records.is_feasible(study, t) for t in study.trials] == [False, True, False]
    assert records.pick_trial(study, "best").number == 1
    assert [t.number for t in records.best_trials(study, 3)] == [1]
    assert [t.number for t in records.best_trials(study, 3, feasible_only=False)] == [0, 1, 2]
    assert "among feasible trials" in records.best_rule(study) and "0.1 below the base model" in records.best_rule(study)
    text = " ".join(summary_info(study).sentences)
    assert "Best found: trial 1" in text and "2 completed trial(s) break that constraint" in text
    strict = _constrained_study(0.0)  # nothing feasible: 'best' refuses and names the best infeasible trial
    with pytest.raises(StudyError, match="no completed trial meets the constraints.*pass --trial 0"):
        records.pick_trial(strict, "best")
    loose = _constrained_study(1.0)
    assert records.pick_trial(loose, "best").number == 0
    free = _constrained_study(0.1)
    free.set_user_attr(records.META_KEY, {**records.meta(free), "config": {}})
    assert records.pick_trial(free, "best").number == 0 and records.best_rule(free) == "highest mean objective"


def test_constraints_use_the_base_scores_of_a_new_study(zoo_test, tmp_path, capsys):
    """The sampler's constraint values read the base model's scores once the baselines have run (a new
    study has none when its sampler is made); status and export say how 'best' was chosen."""
    path = write_study(zoo_test, tmp_path, n_trials=3, sampler="tpe", top_k_test=0, limit=8)
    raw = yaml.safe_load(path.read_text())
    # A drop of 1.0 (scores are in [0, 1]): every trial is feasible, so the export below always runs.
    raw["constraints"] = {"max_drop_vs_base": 1.0}
    path.write_text(yaml.safe_dump(raw))
    study = run_study(load_config(path), progress=False)
    base = records.meta(study)["base_scores"]
    tasks = records.meta(study)["tasks"]
    assert base and set(base) == set(tasks)
    for t in records.search_trials(study):
        scores = records.objective_scores(t)
        want = [base[k] - scores[k] - 1.0 for k in tasks]  # Optuna's convention: feasible when <= 0
        assert t.system_attrs["constraints"] == pytest.approx(want)
    st = study_status(path)
    assert "among feasible trials" in st["best_rule"] and st["infeasible"] == 0
    assert all(records.is_feasible(study, t) for t in records.search_trials(study))
    out = export_trial(path, "best", tmp_path / "best")
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["feasible"] and "among feasible trials" in prov["picked_by"]


def test_a_study_of_the_old_layout_is_refused_on_resume(zoo_test, tmp_path):
    """Baselines stored as parameter-less trials (the earlier layout) would empty the samplers' joint
    space again: such a study is not resumed."""
    cfg = load_config(write_study(zoo_test, tmp_path, n_trials=1, top_k_test=0))
    runner = StudyRunner(cfg, load_evaluator=False)
    study = open_study(runner)
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={records.BASELINE: "uniform"}))
    with pytest.raises(StudyError, match="keeps its baselines among its trials"):
        open_study(runner)
