"""Where a study's time goes: opening phases in the meta, per-baseline and per-trial breakdowns in `status`."""

from __future__ import annotations

import pytest
from study_helpers import write_study

from mergesearch.cli import main
from mergesearch.config import load_config
from mergesearch.study import records, run_study, study_status
from mergesearch.timings import PhaseTimer, format_timings, trial_times


def test_phase_timer_adds_up_and_keeps_order(monkeypatch):
    import mergesearch.timings

    clock = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0])  # b: 1 s, a: 2 s, b again: 3 s (a fake clock, no waiting)
    monkeypatch.setattr(mergesearch.timings.time, "perf_counter", lambda: next(clock))
    t = PhaseTimer()
    for name in ("b_s", "a_s", "b_s"):
        with t.phase(name):
            pass
    assert list(t.seconds) == ["b_s", "a_s"] and t.seconds == {"b_s": 4.0, "a_s": 2.0}
    monkeypatch.undo()
    with pytest.raises(KeyError):
        with t.phase("c_s"):
            raise KeyError("x")
    assert "c_s" not in t.seconds  # a phase that raised is not timed (nor logged beside the error)


def test_trial_times_are_medians_and_the_rest_is_duration_minus_merge_and_eval():
    recs = [{"merge_s": 0.1, "eval_s": 1.0}, {"merge_s": 0.3, "eval_s": 2.0}, {"merge_s": 0.2, "eval_s": 3.0}]
    t = trial_times(recs, [1.5, 2.5, 3.5])
    assert t["merge_s"] == pytest.approx(0.2) and t["eval_s"] == pytest.approx(2.0)
    assert t["other_s"] == pytest.approx(0.3) and t["total_s"] == pytest.approx(7.5) and t["n"] == 3


def test_a_fitted_trials_fit_is_its_own_line_not_other():
    recs = [{"merge_s": 0.1, "eval_s": 1.0, "fit_s": 20.0}, {"merge_s": 0.1, "eval_s": 1.0, "fit_s": 30.0}]
    t = trial_times(recs, [21.5, 31.5])
    assert t["fit_s"] == pytest.approx(25.0) and t["other_s"] == pytest.approx(0.4)
    assert format_timings({"trials": t}) == [
        "per trial (median): fit 25.0 s, merge 0.100 s, evaluation 1.000 s, other (sampler, storage) 0.400 s"]
    assert trial_times([{"merge_s": 0.1, "eval_s": 1.0}], [1.5])["fit_s"] is None  # no fitted trial


def test_the_estimate_prices_a_fit_by_its_steps():
    from mergesearch.study.estimate import estimate_trial_seconds

    plain = estimate_trial_seconds(10 ** 6, 3, "float32", 100)
    assert plain["fit_s"] == 0 and plain["total_s"] == pytest.approx(plain["merge_s"] + plain["eval_s"])
    fitted = estimate_trial_seconds(10 ** 6, 3, "float32", 100, fit_steps=300, fit_batch=64)
    assert fitted["fit_s"] > 0 and fitted["total_s"] == pytest.approx(fitted["merge_s"] + fitted["eval_s"]
                                                                      + fitted["fit_s"])


def test_status_shows_where_the_time_went(zoo_test, tmp_path, capsys):
    path = write_study(zoo_test, tmp_path, n_trials=2, top_k_test=0)
    study = run_study(load_config(path), progress=False)
    opening = records.meta(study)["timings"]
    assert {"checkpoints_s", "read_sources_s", "prepare_s", "model_s", "tokenizer_s", "evaluator_s"} <= set(opening)
    st = study_status(path)["timings"]
    assert st["opening"] == opening and st["baselines"]["n"] == len(records.baseline_trials(study))
    assert st["trials"]["n"] == 2 and st["trials"]["merge_s"] > 0 and st["trials"]["eval_s"] > 0
    lines = format_timings(st)
    assert lines[0].startswith("opening: checkpoints") and "per trial (median): merge" in lines[-1]
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "opening: " in out and "baselines: " in out and "per trial (median): merge" in out
