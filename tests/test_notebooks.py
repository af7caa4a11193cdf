"""The notebooks run top to bottom (nbclient) on the test zoo: quickstart, then analysis on its study."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ZOO_SEED
from study_helpers import write_study

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"

pytestmark = pytest.mark.slow


def _run(name: str, cwd: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is stored with outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _outputs(nb, mime: str) -> list:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "data" in o and mime in o["data"]]


def test_quickstart_then_analysis(zoo_test, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESEARCH_REPO", str(REPO))
    monkeypatch.setenv("MERGESEARCH_NB_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("MERGESEARCH_NB_PRESET", "test")  # the zoo the zoo_test fixture uses
    monkeypatch.setenv("MERGESEARCH_NB_ZOO_SEED", str(ZOO_SEED))
    monkeypatch.setenv("MERGESEARCH_NB_TRIALS", "4")
    monkeypatch.setenv("MERGESEARCH_NB_LIMIT", "8")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MERGESEARCH_NB_STUDY", raising=False)

    quick = _run("quickstart", tmp_path)
    work = tmp_path / "work"
    assert (work / "quickstart.db").exists()
    html = (work / "quickstart.html").read_text()
    assert "Best found: trial" in html and "Merge search: quickstart" in html
    text = "".join(o["text"] for c in quick.cells if c.cell_type == "code" for o in c.outputs if "text" in o)
    assert "best baseline" in text and "Best found: trial" in text
    assert len(_outputs(quick, "application/vnd.plotly.v1+json")) == 3  # Pareto, history, heatmap

    from mergesearch.study import load_study, records

    study = load_study(work / "quickstart.db")
    counted = records.search_trials(study, states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(counted) >= 4 and len(records.baseline_trials(study)) >= 6

    analysis = _run("analysis", tmp_path)
    tables = _outputs(analysis, "text/html")
    assert any("calib mean" in t and "test mean" in t for t in tables)
    assert len(_outputs(analysis, "application/vnd.plotly.v1+json")) >= 2  # overfit view and heatmap
    exported = work / "best-merge"
    assert (exported / "recipe.yaml").exists() and (exported / "provenance.json").exists()
    assert list(exported.glob("*.safetensors"))


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_analysis_of_a_study_whose_best_is_a_baseline(zoo_test, tmp_path, monkeypatch):
    """Every searched trial pruned: the readers say so and point at the best baseline, the analysis
    notebook runs to the end and exports that baseline."""
    from mergesearch.config import load_config
    from mergesearch.errors import StudyError
    from mergesearch.report import build_report, heatmap_info, summary_info
    from mergesearch.study import records
    from mergesearch.study.baselines import run_baselines
    from mergesearch.study.opening import open_study
    from mergesearch.study.runner import StudyRunner

    path = write_study(zoo_test, tmp_path, name="pruned", n_trials=2, top_k_test=0, limit=8)
    runner = StudyRunner(load_config(path))
    study = open_study(runner)
    run_baselines(runner, study)
    study.pruner = _AlwaysPrune()
    runner.optimize(study, 2, progress=False)
    assert not records.search_trials(study) and len(records.search_trials(study, (TrialState.PRUNED,))) == 2
    top = records.best_trials(study, 1, include_baselines=True)[0]
    with pytest.raises(StudyError, match=rf"best merge so far is the baseline .*pass --trial {records.baseline_name(top)}"):
        heatmap_info(study, "best")
    assert "No searched trial has completed yet." in summary_info(study).sentences
    assert "no completed searched trial" in build_report(study).notes["heatmap"]

    work = tmp_path / "work"
    monkeypatch.setenv("MERGESEARCH_NB_STUDY", str(path))
    monkeypatch.setenv("MERGESEARCH_NB_WORK", str(work))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    analysis = _run("analysis", tmp_path)
    text = "".join(o["text"] for c in analysis.cells if c.cell_type == "code" for o in c.outputs if "text" in o)
    assert "no searched trial has completed" in text and "the best merge is the baseline" in text
    prov = json.loads((work / "best-merge" / "provenance.json").read_text())
    assert prov["trial"] is None and prov["baseline"] == records.baseline_name(top)
