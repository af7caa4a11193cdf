"""Benchmark: zoo build time per preset, and the demo zoo's merge targets.

For each preset the table gives

  wall s      seconds to build the zoo (data, base, experts, report), as the user waits for it
  cpu s       CPU seconds the build used (all its threads; other users of the machine excluded)
  budget s    the issue's limit: test 60 s, demo 300 s, on this 2-core CPU
  ref s       same-run reference: 20 training steps of the preset's base model (batch and shape
              of the preset); wall s / ref s tracks the build against this machine's current speed
  load        1-minute load average before / after (other engineers share the CPU: if load > 2,
              wall s overstates the build time on an idle machine; cpu s / threads bounds it from below)

then, for every demo zoo, the targets of issue 4 (in accuracy points on the test splits):

  each expert beats the base on its skill by >= 15; best single model's mean >= 15 below the mean
  of the experts' own-skill scores; best simple merge >= best single model and >= 10 below that mean.

and issue 19's composition question on every demo zoo, on the chain skill's test split: does a merge of the
single-step experts (reverse, uppercase; the chain's own expert left out) do the chain better than each of them?

  task arithmetic  of the parts' experts, the scale chosen on calib (zoo.tables.composition_report), minus the
                   best part expert: printed, not a target. The issue asks to show a zoo where it is above, if
                   one is found; on the demo preset it is above only where the base already knows the chain's
                   format, which float rounding decides (README "Composition": +9.7, +2.0, +0.0, -0.5, -0.8
                   points on five zoos). Until 2026-12-07 this was a target, and it stopped `make bench` here.
  fitted           studies/demo_compose.yaml's fit (312 coefficients, on the chain's calib split) over the parts'
                   experts, and the same fit over two unrelated experts (the control: what the fit learns from
                   the labels by itself), one trial each (~80 s each on 2 idle cores); targets: the fitted merge
                   above the best part expert and above the control (the claim the README makes; met on all five
                   zoos measured). --no-fit skips them.

The `test` preset is weak on purpose (mergesearch/zoo/presets.py): its report is printed, its merge
targets are not checked. Each target checked prints an `ok` or `MISS` line; exit code 1 on a MISS.

Usage:
    .venv/bin/python benchmarks/bench_zoo.py                    # test and demo presets (~10 min on 2 idle cores)
    .venv/bin/python benchmarks/bench_zoo.py --presets test     # ~20 s
    .venv/bin/python benchmarks/bench_zoo.py --presets demo --seeds 0,1,2
    .venv/bin/python benchmarks/bench_zoo.py --presets demo --no-fit   # build and issue 4 only (~3 min less)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergesearch.config import load_config  # noqa: E402
from mergesearch.study import records, run_study  # noqa: E402
from mergesearch.zoo import build_zoo, get_preset, study_inputs  # noqa: E402
from mergesearch.zoo import composition_report, format_composition, format_report  # noqa: E402
from mergesearch.zoo.skills import train_stream  # noqa: E402
from mergesearch.zoo.tokenizer import build_char_tokenizer  # noqa: E402
from mergesearch.zoo.train import CharCodec, make_model, mixed_pairs  # noqa: E402

from _checks import Checks  # noqa: E402

BUDGET_S = {"test": 60.0, "demo": 300.0}  # wall seconds of a build, at most, per preset
# issue 4, in accuracy points on the test splits, for these presets' zoos
MERGE_TARGET_PRESETS = ("demo",)
EXPERT_GAIN_TARGET = 15.0  # each expert over the base on its own skill, at least
SINGLE_GAP_TARGET = 15.0  # experts' own-skill mean - best single model's mean, at least
MERGE_OVER_SINGLE_TARGET = 0.0  # best simple merge's mean - best single model's mean, at least
MERGE_HEADROOM_TARGET = 10.0  # experts' own-skill mean - best simple merge's mean, at least
FITTED_COMPOSITION_TARGET = 0.0  # the fit over the parts' experts - the best part expert, and - the control
COMPOSE_STUDY = Path(__file__).resolve().parent.parent / "studies" / "demo_compose.yaml"


def reference_seconds(preset: str, steps: int = 20) -> float:
    """Wall time of `steps` base-training steps of the preset's model: the machine's speed right now."""
    p = get_preset(preset)
    old = torch.get_num_threads()
    torch.set_num_threads(p.threads)
    try:
        tok = build_char_tokenizer()
        codec = CharCodec(tok)
        model = make_model(p.model, tok, seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        streams = {s: train_stream(s, 0, set(), "bench") for s in p.skills}
        rng = random.Random(0)
        batches = [codec.batch(mixed_pairs(streams, p.base.batch, rng)) for _ in range(steps + 2)]
        t0 = 0.0
        for i, (ids, mask) in enumerate(batches):
            if i == 2:  # two warm-up steps
                t0 = time.perf_counter()
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)


def targets(report: dict) -> list[tuple[str, float, float]]:
    """(target, measured points, required points) for issue 4's targets: met when measured >= required."""
    s = report["summary"]
    out = [(f"expert-{k} gain over base", 100 * g, EXPERT_GAIN_TARGET) for k, g in s["expert_gain_over_base"].items()]
    out.append(("own-skill mean - best single mean", 100 * s["single_gap"], SINGLE_GAP_TARGET))
    out.append(("best merge - best single mean", 100 * s["merge_minus_best_single"], MERGE_OVER_SINGLE_TARGET))
    out.append(("own-skill mean - best merge mean", 100 * s["merge_headroom"], MERGE_HEADROOM_TARGET))
    return out


def fitted_composition(zoo: Path, comp: dict, workdir: Path) -> dict:
    """Per chain of `composition_report`'s result: the chain's test accuracy of studies/demo_compose.yaml's plain
    fit (the study's first trial) over the experts of the chain's parts ("fitted") and over as many experts of
    unrelated skills ("control")."""
    raw = yaml.safe_load(COMPOSE_STUDY.read_text())
    models, tasks = study_inputs(zoo)
    out = {}
    for chain, c in comp.items():
        control = tuple(s for s in models["experts"] if s != chain and s not in c["parts"])[:len(c["parts"])]
        out[chain] = {"control_experts": control}
        for label, experts in (("fitted", c["parts"]), ("control", control)):
            cfg = {**raw, "models": {"base": models["base"], "experts": {e: models["experts"][e] for e in experts}},
                   "objectives": {**raw["objectives"], "tasks": [t for t in tasks if t["name"] == chain]},
                   "study": {**raw["study"], "name": f"{chain}-{label}", "n_trials": 1}}
            path = workdir / f"{chain}-{label}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            study = run_study(load_config(path), progress=False)
            first = min(records.search_trials(study), key=lambda t: t.number)
            out[chain][label] = records.test_score(study, first)["test"][chain]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="test,demo", help="comma-separated presets to build")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (each builds once)")
    ap.add_argument("--keep", help="keep the built zoos under this folder instead of a temporary one")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-fit", dest="fit", action="store_false",
                    help="skip the fitted composition on each demo zoo (two ~80 s fits per zoo; see above)")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-zoo-"))
    results = []
    try:
        for preset in presets:
            for seed in seeds:
                ref = reference_seconds(preset)
                load0 = os.getloadavg()[0]
                cpu0, t0 = time.process_time(), time.perf_counter()
                out = build_zoo(root / f"{preset}-s{seed}", preset, seed, overwrite=True, progress=False)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                load1 = os.getloadavg()[0]
                man = json.loads((out / "zoo.json").read_text())
                report = json.loads((out / man["report"]).read_text()) if "report" in man else None
                comp = composition_report(out, man, progress=False) if preset in MERGE_TARGET_PRESETS else {}
                if comp and args.fit:
                    work = root / f"{preset}-s{seed}-compose"
                    work.mkdir(exist_ok=True)
                    for chain, fitted in fitted_composition(out, comp, work).items():
                        comp[chain]["fit"] = fitted
                results.append({"preset": preset, "seed": seed, "wall_s": wall, "cpu_s": cpu, "ref_s": ref,
                                "load": [load0, load1], "threads": man["threads"],
                                "train_seconds": man["train_seconds"], "report": report, "composition": comp})
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    checks = Checks()
    print(f"{'preset':8} {'seed':>4} {'wall s':>8} {'cpu s':>8} {'budget s':>9} {'ref s':>7} "
          f"{'wall/ref':>9} {'load':>11}")
    for r in results:
        budget = BUDGET_S.get(r["preset"], float("nan"))
        print(f"{r['preset']:8} {r['seed']:>4} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {budget:9.0f} "
              f"{r['ref_s']:7.2f} {r['wall_s'] / r['ref_s']:9.1f} {r['load'][0]:5.1f}/{r['load'][1]:<5.1f}")
        if r["preset"] in BUDGET_S:
            checks.check(f"{r['preset']} seed {r['seed']}: built in {r['wall_s']:.1f} s (budget {budget:g} s)",
                         r["wall_s"] <= budget)
    for r in results:
        print(f"\n{r['preset']} seed {r['seed']}: stage seconds {r['train_seconds']}")
        if r["report"]:
            print(format_report(r["report"]))
            if r["preset"] in MERGE_TARGET_PRESETS:
                for name, got, need in targets(r["report"]):
                    checks.check(f"{r['preset']} seed {r['seed']}: {name} {got:+.1f} points (target >= {need:g})",
                                 got >= need)
        if r["composition"]:
            print(format_composition(r["composition"]))
            for chain, c in r["composition"].items():
                print(f"  task arithmetic of {' + '.join(c['parts'])} - best part expert {100 * c['margin']:+.1f} "
                      "points (measured, not a target: see above)")
                if "fit" in c:
                    f, best_part = c["fit"], c["rows"][f"expert-{c['best_part']}"]
                    print(f"  fitted ({' + '.join(c['parts'])}) {100 * f['fitted']:.1f}%; control, the "
                          f"same fit over {' + '.join(f['control_experts'])}: {100 * f['control']:.1f}%")
                    for what, other in (("best part expert", best_part), ("control", f["control"])):
                        got = 100 * (f["fitted"] - other)
                        checks.check(f"{r['preset']} seed {r['seed']}: {chain}: fitted merge of {' + '.join(c['parts'])}"
                                     f" - {what} {got:+.1f} points (target > {FITTED_COMPOSITION_TARGET:g})",
                                     got > FITTED_COMPOSITION_TARGET)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print()
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
