"""Export a trial: its merged model (HF folder), its recipe in our format and, where expressible, mergekit's.

The merge is rebuilt from what the trial stored (parameters, fitted coefficients, or a baseline's
weights) with the study's own config, so the exported model is the one the trial scored.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mergesearch.errors import OperatorError, StudyError
from mergesearch.study import records
from mergesearch.study.reading import resolve_study

log = logging.getLogger(__name__)


def export_trial(spec, which: str | int, out: str | Path, *, force: bool = False, study_name: str | None = None,
                 device: str | None = None) -> Path:
    """Write a trial's merged model (HF folder), its recipe in our format and, where expressible, mergekit's."""
    from mergesearch.checkpoints import save_model
    from mergesearch.recipe import plan_to_mergekit, plan_to_recipe, write_recipe
    from mergesearch.study.workbench import Workbench

    out = Path(out).expanduser()
    if out.exists() and not force:
        raise StudyError(f"{out} already exists: choose another --out or pass --force to replace it")
    study, cfg = resolve_study(spec, study_name)
    if cfg is None:
        raise StudyError("the study stores no config: export it with its study YAML")
    trial = records.pick_trial(study, which)
    if device:
        cfg = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"device": device})})
    if str(which) == "best":
        log.info("exporting trial %d: best = %s", trial.number, records.best_rule(study))
    runner = Workbench(cfg, load_evaluator=False)
    if runner.fingerprint != records.meta(study).get("space_fingerprint"):
        raise StudyError("the config's search space differs from the study's: export with the study's own YAML")
    baseline = records.baseline_name(trial)
    plan = runner.plan_for_trial(trial)
    runner.mat.materialize(plan)
    models = [str(p) for p in cfg.models.experts.values()]
    recipe_kw = dict(base_model=str(cfg.models.base), models=models, dtype=cfg.merge.dtype)
    recipe = plan_to_recipe(plan, runner.mat.tensors, runner.mat.num_layers, chunks=_recipe_chunks(runner),
                            seed=cfg.merge.seed, **recipe_kw)
    try:
        mk = plan_to_mergekit(plan, runner.mat.tensors, runner.mat.num_layers, **recipe_kw)
    except OperatorError as exc:
        mk, mk_reason = None, str(exc)
    else:
        mk_reason = None
    fitted = records.record(trial).get(records.FIT_KEY) if not baseline else None
    if fitted and mk is None:
        mk_reason = (f"{mk_reason} (fitted coefficients: {len(fitted['coef'])} per expert and "
                     f"{fitted['granularity']} cell)")
    provenance = {
        "tool": f"mergesearch export (study {study.study_name}, trial {baseline or trial.number})",
        "fit": ({k: fitted[k] for k in ("granularity", "objective", "best_step", "steps_run", "history")}
                if fitted else None),
        "study": study.study_name, "trial": None if baseline else trial.number, "baseline": baseline,
        "calib_scores": records.objective_scores(trial), "values": trial.values,
        "test_scores": records.test_score(study, trial),
        "picked_by": records.best_rule(study) if str(which) == "best" else f"--trial {which}",
        "feasible": records.is_feasible(study, trial),
        "recipe": recipe, "base": runner.mat.base.fingerprint(),
        "experts": [e.fingerprint() for e in runner.mat.experts],
    }
    path = save_model(runner.mat.model, out, base=runner.mat.base, provenance=provenance, force=force)
    write_recipe(path / "recipe.yaml", recipe)
    if mk is not None:
        write_recipe(path / "mergekit.yaml", mk)
    else:
        log.warning("no mergekit.yaml: %s", mk_reason)
    return path


def _recipe_chunks(runner) -> int | list[int]:
    # chunks: auto gives each layer its own count (and the tensors outside the layers 1): only the
    # per-layer form of the recipe reproduces that.
    chunks = runner.chunk_space.cfg.chunks
    return list(runner.chunk_space.layer_chunks) if chunks == "auto" else int(chunks)
