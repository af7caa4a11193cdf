"""The Optuna study: create or resume, run workers, report status, export a trial as a model.

Python API (the CLI's `run`, `worker`, `status`, `export` and `validate` call these):

    from mergesearch.config import load_config
    from mergesearch.study import run_study, load_study, study_status, export_trial
    cfg = load_config("studies/demo.yaml")
    study = run_study(cfg)                 # baselines, then the search, then the held-out check
    print(study_status(cfg))
    export_trial(cfg, "best", "merged/")

This file only re-exports; each function lives in the module named after what it does.
"""

from mergesearch.study.estimate import estimate_trial_seconds
from mergesearch.study.export import export_trial
from mergesearch.study.reading import load_study, resolve_storage, resolve_study
from mergesearch.study.run import run_study
from mergesearch.study.status import format_status, study_status
from mergesearch.study.validate import validate_study

__all__ = ["run_study", "load_study", "study_status", "format_status", "export_trial", "validate_study",
           "estimate_trial_seconds", "resolve_study", "resolve_storage"]
