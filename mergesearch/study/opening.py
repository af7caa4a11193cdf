"""Create a study or resume one: identity checks, the seeded sampler and pruner, the start point.

A study is resumed only with the search space, fit section and objectives it was created with.
Its sampler is seeded from the config (a fresh study) or from the config and the trials already
stored (a resumed study or a joining worker, so it does not replay its predecessors' proposals).
"""

from __future__ import annotations

import hashlib
import logging
import os

import optuna

from mergesearch import __version__
from mergesearch.errors import StudyError
from mergesearch.study import records
from mergesearch.study.baselines import start_point
from mergesearch.study.owners import fail_dead_trials
from mergesearch.study.samplers import make_pruner, make_sampler
from mergesearch.study.storage import open_storage, quietly, require_existing, study_exists
from mergesearch.study.workbench import Workbench

log = logging.getLogger(__name__)


def sampler_seed(seed: int, n_existing: int, joining: bool) -> int:
    """The seed of this process's sampler. A fresh study uses the config's seed (same config, same study);
    a resumed study or a joining worker mixes in the trials already stored (and a worker its pid), or it
    would replay the proposals its predecessors or siblings already made with the same seed."""
    if n_existing == 0 and not joining:
        return seed
    salt = f"{seed}:{n_existing}:{os.getpid() if joining else ''}"
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little")


def study_meta(bench: Workbench) -> dict:
    """The study's META_KEY attribute as a fresh study stores it (see records)."""
    return {
        "version": __version__,
        "config": bench.cfg.model_dump(mode="json", exclude={"source"}),
        "config_path": str(bench.cfg.source) if bench.cfg.source else None,
        "space": bench.space.describe(),
        "space_fingerprint": bench.fingerprint,
        "fit": bench.fit_stage.keys() if bench.fit_stage is not None else None,
        "experts": bench.expert_names,
        "num_layers": bench.mat.num_layers,
        "tasks": bench.task_names,
        "objectives": bench.objective_names,
        "directions": ["maximize"] * len(bench.objective_names),
        "device": bench.device,
        "timings": dict(bench.timer.seconds),  # opening phases of the process that created the study
    }


def _check_resumable(old: optuna.Study, bench: Workbench, url: str) -> None:
    name, old_meta = old.study_name, records.meta(old)
    if old_meta.get("space_fingerprint") != bench.fingerprint:
        what = "fit: section or search space" if bench.fit_stage is not None else "search space"
        space = old_meta.get("space", {})
        raise StudyError(f"study {name!r} in {url} was created with another {what} ({space.get('n_params')} "
                         f"parameters, method {space.get('method')}); changing it would mix incomparable trials: "
                         "give the study a new name")
    if old_meta.get("objectives") != bench.objective_names:
        raise StudyError(f"study {name!r} was created with objectives {old_meta.get('objectives')}; "
                         "give the study a new name to change them")
    if any(not records.is_search_trial(t) for t in old.get_trials(deepcopy=False)):
        raise StudyError(f"study {name!r} keeps its baselines among its trials (made by an earlier mergesearch): "
                         "its samplers would sample at random; give the study a new name to start it afresh")


def attach_sampler(bench: Workbench, study: optuna.Study, x0: dict[str, float]) -> str:
    """Give the study a sampler seeded for this process and centred on x0; returns the reason it was chosen."""
    drop = bench.cfg.constraints.max_drop_vs_base
    constraints = None
    if drop is not None:
        def constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
            # reads the base scores at call time: they are known once the baselines have run
            return records.constraint_values(records.objective_scores(trial), bench.base_scores, bench.task_names, drop)
    study.sampler, reason = make_sampler(bench.cfg.study.sampler, seed=bench.sampler_seed,
                                         n_params=bench.n_search_params, n_objectives=len(bench.objective_names),
                                         x0=x0, constraints_func=constraints,
                                         consider_pruned=bench.cfg.study.n_slices > 1)
    return reason


def open_study(bench: Workbench, *, create: bool = True) -> optuna.Study:
    """Create the study, or resume (or, with create=False, join) it after checking it is the same study."""
    name, url = bench.cfg.study.name, bench.cfg.storage_url
    if not create:
        require_existing(url, "start the study with `mergesearch run` first, then add workers")
    storage = open_storage(url)
    exists = study_exists(storage, name)
    if not exists and not create:
        raise StudyError(f"no study {name!r} in {url}: start it with `mergesearch run`")
    pruner = make_pruner(bench.cfg.study.pruner, n_slices=bench.cfg.study.n_slices,
                         n_objectives=len(bench.objective_names))
    if exists:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        _check_resumable(study, bench, url)
        meta = records.meta(study)
    else:
        study = optuna.create_study(study_name=name, storage=storage, pruner=pruner,
                                    directions=["maximize"] * len(bench.objective_names))
        quietly(study.set_metric_names, bench.objective_names)
        meta = {}
    bench.base_scores = meta.get("base_scores") or {}
    bench.sampler_seed = sampler_seed(bench.cfg.study.seed, len(study.get_trials(deepcopy=False)),
                                      joining=not create)
    # A resumed study starts from the point it chose when it was new (see `warm_start`).
    reason = attach_sampler(bench, study, (meta.get("start") or {}).get("x0") or bench.start_point_guess())
    if not exists:
        study.set_user_attr(records.META_KEY, {**study_meta(bench), "sampler": type(study.sampler).__name__,
                                         "sampler_reason": reason})
    else:
        # trials left RUNNING by a process of this host that is gone (kill -9) fail now and are queued
        # again, not after the heartbeat's grace period, which a short resumed run may never reach
        fail_dead_trials(study)
    log.info("sampler: %s (%s)", type(study.sampler).__name__, reason)
    return study


def warm_start(bench: Workbench, study: optuna.Study) -> None:
    """Fix the start point once (after the baselines), centre the sampler on it and queue it first.

    The choice is stored in the study, so a resumed run (or a crash between baselines and search)
    rebuilds the same sampler; a study that already has searched trials keeps its start.
    """
    m = records.meta(study)
    if m.get("start") or study.get_trials(deepcopy=False):  # WAITING included
        return
    name, x0 = start_point(bench, study)
    m["start"] = {"from": name, "x0": x0}
    study.set_user_attr(records.META_KEY, m)
    attach_sampler(bench, study, x0)
    study.enqueue_trial(x0, user_attrs={"start": name})
    log.info("search starts from the %s merge", name)

