"""Check a study YAML end to end without loading weights (the CLI's `validate`)."""

from __future__ import annotations

from pathlib import Path

from mergesearch.config import TASK_WEIGHTS_KNOB, Config, load_config
from mergesearch.errors import StudyError
from mergesearch.study.estimate import estimate_trial_seconds
from mergesearch.study.storage import open_storage, require_existing, study_exists


def validate_study(path: str | Path) -> dict:
    """Check a study YAML end to end without loading weights: config, models, tasks, search space.

    Returns a summary with the number of searched parameters and an estimated time per trial.
    """
    from mergesearch.checkpoints import check_compatible, open_checkpoint
    from mergesearch.study.workbench import build_space, load_tasks

    cfg = load_config(path)
    base = open_checkpoint(cfg.models.base)
    experts = [open_checkpoint(p) for p in cfg.models.experts.values()]
    check_compatible(base, experts, merge_common_vocab=cfg.models.merge_common_vocab)
    space = build_space(cfg, base, experts)
    tasks = load_tasks(cfg, "calib")
    load_tasks(cfg, "test")
    n_examples = sum(len(t) for t in tasks if t.kind != "lmeval")
    fit, fit_steps, fit_batch = None, 0, 0
    if cfg.fit is not None:
        from mergesearch.study.fitting import fit_space_config

        knob = cfg.fit.search.get("steps")  # the most steps a trial may take: a searched range's top
        fit_steps = max(cfg.fit.steps, int(knob.high) if knob is not None and knob.high is not None else 0)
        fit_batch = cfg.fit.batch_size

        coef = build_space(cfg, base, experts, fit_space_config(cfg.fit, cfg.merge.method))
        knobs = sorted(cfg.fit.search)
        n_knobs = len(knobs) + (len(cfg.objectives.tasks) - 1 if TASK_WEIGHTS_KNOB in knobs else 0)
        fit = {"objective": cfg.fit.objective, "granularity": cfg.fit.granularity, "coefficients": coef.n_params,
               "steps": fit_steps, "knobs": knobs, "n_knobs": n_knobs}
    n_params = space.n_params + (fit["n_knobs"] if fit else 0)
    est = estimate_trial_seconds(base.num_parameters, len(experts), cfg.merge.dtype, n_examples, fit_steps=fit_steps,
                                 fit_batch=fit_batch, device=cfg.merge.device)
    from mergesearch.memory import study_estimates

    mem = study_estimates(cfg, [t for t in base.tensors.values() if t.dtype.is_floating_point], len(experts))
    return {"config": str(path), "method": cfg.merge.method, "n_params": n_params, "fit": fit, "memory": mem,
            "space": space.describe(),
            "experts": list(cfg.models.experts), "parameters": base.num_parameters, "calib_examples": n_examples,
            "storage": cfg.storage_url, "estimated_seconds_per_trial": est,
            "storage_exists": _storage_has(cfg)}


def _storage_has(cfg: Config) -> bool:
    url = cfg.storage_url
    try:
        require_existing(url, "")  # opening a missing SQLite file would create it
        return study_exists(open_storage(url, heartbeat=False), cfg.study.name)
    except StudyError:
        return False
