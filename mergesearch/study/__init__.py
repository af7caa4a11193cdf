"""The Optuna study: create or resume, run workers, report status, export a trial as a model.

Python API (the CLI's `run`, `worker`, `status`, `export` and `validate` call these):

    from mergesearch.config import load_config
    from mergesearch.study import run_study, load_study, study_status, export_trial
    cfg = load_config("studies/demo.yaml")
    study = run_study(cfg)                 # baselines, then the search, then the held-out check
    print(study_status(cfg))
    export_trial(cfg, "best", "merged/")
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mergesearch.config import Config, config_from_dict, load_config
from mergesearch.errors import StudyError
from mergesearch.study import records as R
from mergesearch.study.storage import open_storage, require_existing, study_exists

log = logging.getLogger(__name__)

__all__ = ["run_study", "load_study", "study_status", "export_trial", "validate_study", "resolve_study", "resolve_storage"]


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


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

    _quiet_optuna()
    runner = runner or StudyRunner(cfg)
    study = open_study(runner, create=not worker)
    if not worker and cfg.study.baselines:
        run_baselines(runner, study, progress=(lambda name, v: log.info("baseline %-22s %s", name,
                                                                        " ".join(f"{x:.4f}" for x in v)))
                      if progress else None)
    if not worker:
        warm_start(runner, study)
    done = R.counted(study)
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


def resolve_storage(spec: str | Path, study_name: str | None = None) -> tuple[str, str, Config | None]:
    """(storage URL, study name, config or None) of a study YAML, a storage URL or a .db/.log file
    (then `study_name` or the only study in it). The storage must exist: reading never creates one."""
    text = str(spec)
    cfg = None
    if text.endswith((".yaml", ".yml")):
        cfg = load_config(text)
        url, name = cfg.storage_url, study_name or cfg.study.name
    else:
        if "://" in text:
            url = text
        elif text.endswith((".log", ".journal")):
            url = f"journal:///{Path(text).resolve()}"
        else:
            if not Path(text).is_file():
                raise StudyError(f"{text} is neither a study YAML, a storage URL nor an existing .db/.log file")
            url = f"sqlite:///{Path(text).resolve()}"
        name = study_name
    require_existing(url, "start the study with `mergesearch run STUDY.yaml`")
    names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(url, heartbeat=False),
                                                                  include_best_trial=False)]
    if name is None:
        if len(names) != 1:
            raise StudyError(f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}): pass --study-name")
        name = names[0]
    if name not in names:
        raise StudyError(f"no study {name!r} in {url} (it holds: {', '.join(names) or 'none'}); "
                         "start it with `mergesearch run STUDY.yaml`")
    return url, name, cfg


def resolve_study(spec: str | Path, study_name: str | None = None) -> tuple[optuna.Study, Config | None]:
    """A study from a study YAML, a storage URL or a .db/.log file (then `study_name` or the only study)."""
    _quiet_optuna()
    url, name, cfg = resolve_storage(spec, study_name)
    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))
    if cfg is None:
        raw = R.meta(study).get("config")
        if raw:
            cfg = config_from_dict(raw, Path(R.meta(study).get("config_path") or "."))
    return study, cfg


def load_study(spec: str | Path, study_name: str | None = None) -> optuna.Study:
    """The Optuna study of a study YAML or storage (read-only use: reports, analysis)."""
    return resolve_study(spec, study_name)[0]


def study_status(spec, study_name: str | None = None) -> dict:
    """Trials done, best so far, baselines, failures and an ETA."""
    study, cfg = resolve_study(spec, study_name)
    search = study.get_trials(deepcopy=False)
    by_state = {s.name.lower(): sum(1 for t in search if t.state == s) for s in TrialState}
    counted = by_state["complete"] + by_state["pruned"]
    target = cfg.study.n_trials if cfg else None
    durations = [t.duration.total_seconds() for t in search if t.duration and t.state != TrialState.RUNNING]
    per_trial = statistics.median(durations) if durations else None
    eta = (max(0, target - counted) * per_trial) if (target and per_trial) else None
    best = R.best_trials(study, 1)
    baselines = {R.baseline_name(t): R.trial_mean(t) for t in R.baseline_trials(study)}
    feasible = R.feasibility(study)
    infeasible = sum(not feasible(t) for t in search if t.state == TrialState.COMPLETE)
    return {
        "study": study.study_name,
        "objectives": R.meta(study).get("objectives"),
        "n_trials_target": target,
        "trials": by_state,
        "counted": counted,
        "best": ({"number": best[0].number, "mean": R.trial_mean(best[0]),
                  "scores": R.objective_scores(best[0])} if best else None),
        "best_rule": R.best_rule(study),
        "infeasible": infeasible if R.max_drop(study) is not None else None,
        "baselines": baselines,
        "best_baseline": max(baselines.items(), key=lambda kv: kv[1]) if baselines else None,
        "seconds_per_trial": per_trial,
        "eta_seconds": eta,
        "test_scores": R.test_scores(study),
    }


def format_status(st: dict) -> str:
    lines = [f"study {st['study']}: {st['counted']}/{st['n_trials_target'] or '?'} trials counted "
             f"({', '.join(f'{v} {k}' for k, v in st['trials'].items() if v)})"]
    if st["infeasible"] is not None:
        lines.append(f"best = {st['best_rule']}; {st['infeasible']} completed trial(s) infeasible")
    if st["best"]:
        lines.append(f"best: trial {st['best']['number']}  mean {st['best']['mean']:.4f}  "
                     + "  ".join(f"{k} {v:.3f}" for k, v in (st['best']['scores'] or {}).items()))
    elif st["infeasible"]:
        lines.append("best: none yet (no completed trial meets the constraints)")
    if st["best_baseline"]:
        name, v = st["best_baseline"]
        lines.append(f"best baseline: {name}  mean {v:.4f}")
        if st["best"]:
            lines.append(f"margin over the best baseline: {st['best']['mean'] - v:+.4f}")
    if st["seconds_per_trial"]:
        eta = st["eta_seconds"]
        lines.append(f"{st['seconds_per_trial']:.2f} s per trial" + (f", ETA {eta / 60:.1f} min" if eta else ""))
    return "\n".join(lines)


def export_trial(spec, which: str | int, out: str | Path, *, force: bool = False, study_name: str | None = None,
                 device: str | None = None) -> Path:
    """Write a trial's merged model (HF folder), its recipe in our format and, where expressible, mergekit's."""
    from mergesearch.checkpoints import save_model
    from mergesearch.errors import OperatorError
    from mergesearch.recipe import plan_to_mergekit, plan_to_recipe, write_recipe
    from mergesearch.study.workbench import Workbench

    out = Path(out).expanduser()
    if out.exists() and not force:
        raise StudyError(f"{out} already exists: choose another --out or pass --force to replace it")
    study, cfg = resolve_study(spec, study_name)
    if cfg is None:
        raise StudyError("the study stores no config: export it with its study YAML")
    trial = R.pick_trial(study, which)
    if device:
        cfg = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"device": device})})
    if str(which) == "best":
        log.info("exporting trial %d: best = %s", trial.number, R.best_rule(study))
    runner = Workbench(cfg, load_evaluator=False)
    if runner.fingerprint != R.meta(study).get("space_fingerprint"):
        raise StudyError("the config's search space differs from the study's: export with the study's own YAML")
    baseline = R.baseline_name(trial)
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
    fitted = R.record(trial).get(R.FIT_KEY) if not baseline else None
    if fitted and mk is None:
        mk_reason = f"{mk_reason} (fitted coefficients: {len(fitted['coef'])} per expert and {fitted['granularity']} cell)"
    provenance = {
        "tool": f"mergesearch export (study {study.study_name}, trial {baseline or trial.number})",
        "fit": ({k: fitted[k] for k in ("granularity", "objective", "best_step", "steps_run", "history")}
                if fitted else None),
        "study": study.study_name, "trial": None if baseline else trial.number, "baseline": baseline,
        "calib_scores": R.objective_scores(trial), "values": trial.values,
        "test_scores": R.test_score(study, trial),
        "picked_by": R.best_rule(study) if str(which) == "best" else f"--trial {which}",
        "feasible": R.is_feasible(study, trial),
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
    est = estimate_trial_seconds(base.num_parameters, len(experts), cfg.merge.dtype, n_examples)
    fit = None
    if cfg.fit is not None:
        from mergesearch.study.fitting import fit_space_config

        coef = build_space(cfg, base, experts, fit_space_config(cfg.fit, cfg.merge.method))
        knobs = sorted(cfg.fit.search)
        n_knobs = len(knobs) + (len(cfg.objectives.tasks) - 1 if "task_weights" in knobs else 0)
        fit = {"objective": cfg.fit.objective, "granularity": cfg.fit.granularity, "coefficients": coef.n_params,
               "steps": cfg.fit.steps, "knobs": knobs, "n_knobs": n_knobs}
    n_params = space.n_params + (fit["n_knobs"] if fit else 0)
    return {"config": str(path), "method": cfg.merge.method, "n_params": n_params, "fit": fit,
            "space": space.describe(),
            "experts": list(cfg.models.experts), "parameters": base.num_parameters, "calib_examples": n_examples,
            "storage": cfg.storage_url, "estimated_seconds_per_trial": est,
            "storage_exists": _storage_has(cfg)}


def _storage_has(cfg: Config) -> bool:
    url = cfg.storage_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return False
    try:
        return study_exists(open_storage(url, heartbeat=False), cfg.study.name)
    except StudyError:
        return False


def estimate_trial_seconds(n_params: int, n_experts: int, dtype: str, n_examples: int,
                           tokens_per_example: int = 48) -> dict:
    """A rough time per trial from this machine's measured copy bandwidth and matmul speed."""
    import torch

    from mergesearch.checkpoints import parse_dtype, resolve_device

    dev = resolve_device("auto")
    size = torch.finfo(parse_dtype(dtype)).bits // 8
    a = torch.empty(1 << 24, device=dev)
    b = torch.empty_like(a)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.add(a, b, out=a)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bw = 3 * 3 * a.numel() * 4 / (time.perf_counter() - t0)
    m = torch.randn(512, 512, device=dev)
    t0 = time.perf_counter()
    for _ in range(5):
        m @ m
    if dev.type == "cuda":
        torch.cuda.synchronize()
    flops = 5 * 2 * 512 ** 3 / (time.perf_counter() - t0)
    merge_s = (n_experts + 2) * n_params * size / bw
    eval_s = 2 * n_params * n_examples * tokens_per_example / flops
    return {"merge_s": merge_s, "eval_s": eval_s, "total_s": merge_s + eval_s,
            "note": "estimate from this machine's add bandwidth and 512x512 matmul speed"}

