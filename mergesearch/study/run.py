"""Run a study: create or resume it, baselines, the search to its n_trials total, the held-out check.

Python API (the CLI's `run` and `worker` call this):

    from mergesearch.config import load_config
    from mergesearch.study import run_study
    study = run_study(load_config("studies/demo.yaml"))
"""

from __future__ import annotations

import logging
import warnings

import optuna

from mergesearch.config import Config
from mergesearch.study import records
from mergesearch.study.storage import quiet_optuna

log = logging.getLogger(__name__)


def run_study(cfg: Config, *, extra_trials: int | None = None, worker: bool = False, progress: bool = True,
              runner=None) -> optuna.Study:
    """Create or resume the study of `cfg` and run it to its n_trials total (or `extra_trials` more).

    A `worker` joins an existing study: no baselines and no held-out scoring, which the `run`
    process does. Several workers may share one storage (SQLite, PostgreSQL, MySQL, journal file).
    """
    from mergesearch.study.baselines import run_baselines, score_test
    from mergesearch.study.opening import open_study, warm_start
    from mergesearch.study.owners import fail_dead_trials
    from mergesearch.study.runner import StudyRunner

    quiet_optuna()
    runner = runner or StudyRunner(cfg)
    study = open_study(runner, create=not worker)
    if not worker and cfg.study.baselines:
        run_baselines(runner, study, progress=(lambda name, v: log.info("baseline %-22s %s", name,
                                                                        " ".join(f"{x:.4f}" for x in v)))
                      if progress else None)
    if not worker:
        warm_start(runner, study)
    done = records.counted(study)
    target = (done + extra_trials) if extra_trials is not None else cfg.study.n_trials
    runner.optimize(study, target, timeout=cfg.study.timeout, progress=progress)
    # trials of dead processes go to the retry callback now: this host's at once (study.owners), other
    # hosts' once past the heartbeat grace (a storage without heartbeats, journal or in-memory, has none)
    fail_dead_trials(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if not worker:
        score_test(runner, study, cfg.study.top_k_test)
    return study
