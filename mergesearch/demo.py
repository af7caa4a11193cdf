"""The demo: on the shipped demo zoo (other seeds: built and cached), run studies/demo.yaml (the fitted merge)
and studies/demo_global.yaml (a global search), print the comparison table."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from mergesearch.config import load_config
from mergesearch.errors import ConfigError
from mergesearch.study import records

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEMO_STUDY = ROOT / "studies" / "demo.yaml"
GLOBAL_STUDY = ROOT / "studies" / "demo_global.yaml"


def prepare_zoo(seed: int = 0, progress: bool = True) -> Path:
    """Point zoo/demo, where studies/demo.yaml looks, at the demo zoo: the shipped one for seed 0 (the same
    weights on every machine, so the README's tables), else one built here and cached under zoo/."""
    from mergesearch.zoo import get_zoo

    zoo = get_zoo(ROOT / "zoo", "demo", seed=seed, progress=progress)
    link = ROOT / "zoo" / "demo"
    target = Path(os.path.relpath(zoo, link.parent))  # relative: the clone may move
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() or not link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return link
        tmp = link.with_name(".demo.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)  # atomic: a concurrent reader sees the old or the new zoo
        return link
    raise ConfigError(f"{link} exists and is not a link made by the demo: move it away")


def comparison(study, global_study=None) -> dict:
    """Rows of the demo table: base, experts, uniform, best baseline merge, the global search's best and the
    best found; calib and test. A fitted study's calib column is its held-out validation slice of calib."""
    rows = []

    def add(label: str, trial, source=study) -> None:
        t = records.test_score(source, trial) or {}
        rows.append({"label": label, "trial": trial.number, "calib": records.objective_scores(trial),
                     "test": t.get("test", {})})

    baselines = {records.baseline_name(t): t for t in records.baseline_trials(study)}
    for name in ["base"] + sorted(n for n in baselines if n.startswith("expert:")) + ["uniform"]:
        if name in baselines:
            add(name, baselines[name])
    merges = records.merge_baselines(study)
    if merges:
        best = max(merges, key=records.trial_mean)
        add(f"best baseline merge ({records.baseline_name(best)})", best)
    if global_study is not None:
        found = records.best_trials(global_study, 1)
        if found:
            n = records.meta(global_study).get("space", {}).get("n_params")
            add(f"global search ({n} weights, trial {found[0].number})", found[0], global_study)
            if records.meta(study).get("fit"):
                rows[-1]["calib"] = {}  # scored on the whole calib split, not on the fit's validation slice
    found = records.best_trials(study, 1)
    if found:
        fit = records.record(found[0]).get(records.FIT_KEY)
        what = f"fitted, {len(fit['coef'])} coefficients" if fit else "best found"
        add(f"{what} (trial {found[0].number})", found[0])
    calib = "the calib validation slice" if records.meta(study).get("fit") else "the calib splits"
    return {"rows": rows, "tasks": records.meta(study).get("tasks", []), "calib_label": calib}


def format_comparison(table: dict) -> str:
    tasks = table["tasks"]
    width = max(len(r["label"]) for r in table["rows"]) if table["rows"] else 10
    head = f"{'':<{width}}  " + " ".join(f"{t[:9]:>9}" for t in tasks) + f" {'mean':>7}"
    lines = []
    for split in ("calib", "test"):
        where = table.get("calib_label", "the calib splits") if split == "calib" else "the held-out test splits"
        lines += ["", f"accuracy on {where}:", head]
        for r in table["rows"]:
            s = r[split]
            if not s:
                continue
            vals = [s.get(t, float("nan")) for t in tasks]
            lines.append(f"{r['label']:<{width}}  " + " ".join(f"{100 * v:>9.1f}" for v in vals)
                         + f" {100 * sum(vals) / len(vals):>7.1f}")
    return "\n".join(lines)


def run_demo(*, seed: int = 0, n_trials: int | None = None, timeout: float | None = None, zoo_seed: int = 0,
             progress: bool = True, report: bool = True, compare: bool = True) -> dict:
    """Build the zoo, run (or resume) the demo's fitted study and, with `compare`, the global search beside it;
    write the fitted study's report; return the comparison table."""
    from mergesearch.study import run_study

    if not DEMO_STUDY.is_file():
        raise ConfigError(f"{DEMO_STUDY} not found: run the demo from a clone of the mergesearch repository")
    t0 = time.perf_counter()
    prepare_zoo(zoo_seed, progress)
    zoo_s = time.perf_counter() - t0

    def overrides(name: str) -> dict:
        # seed 0 is the YAML's own study, so `mergesearch run studies/demo.yaml` resumes it
        out = {"study.seed": seed} if seed == 0 else {"study.seed": seed, "study.name": f"{name}-s{seed}"}
        if timeout is not None:
            out["study.timeout"] = timeout
        return out

    glob = None
    if compare:
        log.info("global search (one weight per expert), for comparison")
        glob = run_study(load_config(GLOBAL_STUDY, overrides("demo-global")), progress=progress)
    over = overrides("demo")
    if n_trials is not None:
        over["study.n_trials"] = n_trials
    cfg = load_config(DEMO_STUDY, over)
    log.info("fitted coefficients (the demo study)")
    study = run_study(cfg, progress=progress)
    out = {"study": study.study_name, "storage": cfg.storage_url, "config": str(DEMO_STUDY),
           "zoo_seconds": zoo_s, "table": comparison(study, glob), "report": None,
           "seconds": time.perf_counter() - t0}
    if report:
        try:
            from mergesearch.report import write_report
        except ImportError:  # the reporting module is optional for the demo
            write_report = None
        if write_report is not None:
            path = ROOT / "runs" / f"{study.study_name}.html"
            out["report"] = str(write_report(study, path))
    out["seconds"] = time.perf_counter() - t0
    return out
