"""Benchmark: the demo study's targets (issue 6) on demo zoos of several seeds.

For each zoo seed, runs the demo study (studies/demo.yaml: per-layer task arithmetic, CMA-ES) and the
same study with one weight per expert (mergesearch/search_spaces/global_task_arithmetic.yaml) at the same trial
budget, sampler and study seed, then compares on the mean over skills of the `test` splits:

  best expert      the single expert with the best test mean (the strictest bar: picked on test)
  TA tuned         task arithmetic at the global scale (0.3/0.5/0.7/1.0) that scored best on calib
  global search    the best calib trial of the global study (one weight per expert)
  per-layer        the best calib trial of the demo study (what `mergesearch demo` reports)

Targets: per-layer >= best expert + 5 and >= TA tuned + 2 points; per-layer > global search.
Every pick is made on the calibration splits; only the reported number is read from test.

    python benchmarks/bench_demo.py                       # zoo seeds 0,1,2 (built under zoo/ if needed)
    python benchmarks/bench_demo.py --zoo-seeds 0 --trials 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mergesearch.config import config_from_dict, load_space  # noqa: E402
from mergesearch.study import records as R  # noqa: E402
from mergesearch.study import run_study  # noqa: E402
from mergesearch.zoo import ensure_zoo, study_inputs  # noqa: E402


def study_config(zoo: Path, space: str, storage: str, name: str, trials: int, seed: int):
    """studies/demo.yaml with its models and tasks pointed at `zoo` and the given space."""
    raw = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    raw["models"], raw["objectives"]["tasks"] = study_inputs(zoo)
    raw["space"] = load_space(space, ROOT / "studies")
    raw["study"].update(name=name, storage=storage, n_trials=trials, seed=seed)
    return config_from_dict(raw)


def test_mean(study, trial) -> float:
    t = R.test_scores(study).get(trial.number)
    return float("nan") if t is None else 100 * t["test_mean"]


def summarize(per_layer, glob) -> dict:
    bases = {R.baseline_name(t): t for t in R.baseline_trials(per_layer)}
    experts = {n: test_mean(per_layer, t) for n, t in bases.items() if n.startswith("expert:")}
    ta = [t for n, t in bases.items() if n.startswith("task_arithmetic")]
    ta_best = max(ta, key=R.trial_mean)
    found = R.best_trials(per_layer, 1)[0]
    gfound = R.best_trials(glob, 1)[0]
    return {
        "best_expert": max(experts.values()), "best_expert_name": max(experts, key=experts.get),
        "ta_tuned": test_mean(per_layer, ta_best), "ta_tuned_name": R.baseline_name(ta_best),
        "global_search": test_mean(glob, gfound), "global_calib": 100 * R.trial_mean(gfound),
        "per_layer": test_mean(per_layer, found), "per_layer_calib": 100 * R.trial_mean(found),
        "per_layer_trial": found.number,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-seeds", default="0,1,2", help="comma-separated demo zoo seeds")
    ap.add_argument("--zoo-root", type=Path, default=ROOT / "zoo", help="where the demo zoos are cached")
    ap.add_argument("--trials", type=int, default=None, help="trials per study (default: the demo's)")
    ap.add_argument("--study-seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    trials = args.trials or yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())["study"]["n_trials"]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        for zs in [int(s) for s in args.zoo_seeds.split(",") if s]:
            zoo = ensure_zoo(args.zoo_root, "demo", seed=zs, progress=False)
            studies, secs = {}, {}
            for label, space in (("per_layer", "per_layer_task_arithmetic.yaml"),
                                 ("global", "global_task_arithmetic.yaml")):
                cfg = study_config(zoo, space, f"sqlite:///{tmp}/z{zs}-{label}.db", f"bench-{label}", trials,
                                   args.study_seed)
                t0 = time.perf_counter()
                studies[label] = run_study(cfg, progress=False)
                secs[label] = time.perf_counter() - t0
                print(f"zoo seed {zs}: {label} study, {trials} trials, {secs[label]:.0f} s", flush=True)
            row = {"zoo_seed": zs, **summarize(studies["per_layer"], studies["global"]),
                   "per_layer_s": secs["per_layer"], "global_s": secs["global"]}
            rows.append(row)

    print(f"\nmean test accuracy over skills (points); {trials} trials per study, study seed {args.study_seed}")
    print(f"{'zoo':>4} {'best expert':>12} {'TA tuned':>9} {'global':>7} {'per-layer':>10} "
          f"{'vs expert':>10} {'vs TA':>7} {'vs global':>10} {'study s':>8}")
    for r in rows:
        print(f"{r['zoo_seed']:>4} {r['best_expert']:12.1f} {r['ta_tuned']:9.1f} {r['global_search']:7.1f} "
              f"{r['per_layer']:10.1f} {r['per_layer'] - r['best_expert']:+10.1f} "
              f"{r['per_layer'] - r['ta_tuned']:+7.1f} {r['per_layer'] - r['global_search']:+10.1f} "
              f"{r['per_layer_s']:8.0f}")
    for r in rows:
        ok = [r["per_layer"] - r["best_expert"] >= 5, r["per_layer"] - r["ta_tuned"] >= 2,
              r["per_layer"] > r["global_search"]]
        print(f"zoo seed {r['zoo_seed']}: >= expert+5 {'ok' if ok[0] else 'MISS'}, >= TA+2 {'ok' if ok[1] else 'MISS'}, "
              f"> global {'ok' if ok[2] else 'MISS'}  (calib: per-layer {r['per_layer_calib']:.1f}, "
              f"global {r['global_calib']:.1f}; TA pick {r['ta_tuned_name']}, best expert {r['best_expert_name']})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
