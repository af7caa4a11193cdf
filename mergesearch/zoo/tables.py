"""The zoo's closing table: test accuracy of the base, each expert and the simple merges.

Merges come from the project's materialiser (mergesearch.materializer) and scores from its evaluator
(mergesearch.evaluate), so the table means exactly what a study's baselines mean.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

TIES_DENSITY = 0.2  # the TIES paper's default (keep the top 20% of each task vector); weight 1, lambda 1


def zoo_report(zoo: Path, manifest: dict, *, progress: bool = True, device: str = "auto") -> dict:
    """Accuracy on each skill's test split for base, experts, uniform, best-of-grid task arithmetic, TIES.

    Task arithmetic's global scale is chosen on the calib splits (mean accuracy), never on test.
    """
    from transformers import AutoTokenizer

    from mergesearch.evaluate import Evaluator, load_task
    from mergesearch.materializer import Materializer
    from mergesearch.zoo.skills import get_skill

    zoo = Path(zoo)
    skills = manifest["skills"]
    n = len(skills)
    base = zoo / manifest["base"]
    experts = [zoo / manifest["experts"][s] for s in skills]
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tasks = {split: [load_task(zoo / manifest["data"][s][split], name=s, **get_skill(s).task_settings()) for s in skills]
             for split in ("calib", "test")}

    ta = Materializer(base, experts, "task_arithmetic", dtype="float32", device=device)
    ties = Materializer(base, experts, "ties", dtype="float32", device=device)
    evals = {(id(m), split): Evaluator(m.model, tok, tasks[split]) for m in (ta, ties) for split in tasks}

    def score(mat, split: str, **values) -> dict:
        mat.materialize(mat.plan(**values))
        res = evals[(id(mat), split)].evaluate()
        accs = {s: res.primary(s) for s in skills}
        accs["mean"] = sum(accs.values()) / n
        return accs

    scales = list(manifest["config"]["ta_scales"])
    bar = tqdm(total=3 + n + len(scales), desc="report", disable=not progress, leave=False)
    rows: dict[str, dict] = {}

    def add(name: str, mat, **values) -> None:
        rows[name] = score(mat, "test", **values)
        bar.update()

    add("base", ta, weight=[0.0] * n)
    for i, s in enumerate(skills):
        add(f"expert-{s}", ta, weight=[1.0 if j == i else 0.0 for j in range(n)])
    add("uniform", ta, weight=[1.0 / n] * n)
    calib_grid = {}
    for lam in scales:
        calib_grid[f"{lam:g}"] = score(ta, "calib", weight=[lam] * n)["mean"]
        bar.update()
    best = max(scales, key=lambda lam: calib_grid[f"{lam:g}"])  # first of equals: the smallest scale
    add(f"task_arithmetic@{best:g}", ta, weight=[best] * n)
    add(f"ties@density={TIES_DENSITY:g}", ties, density=TIES_DENSITY)
    bar.close()

    return {
        "metric": ("exact match of the greedy answer (mergesearch.evaluate) on each skill's test split; a chain skill's "
                   "answer is the one its regex extracts from the generated chain"),
        "skills": skills,
        "rows": rows,
        "task_arithmetic_calib_grid": calib_grid,
        "summary": _summary(rows, skills),
    }


def composition_report(zoo: Path, manifest: dict, *, progress: bool = True, device: str = "auto") -> dict:
    """For each chain skill of the zoo whose `parts` (the one-step skills it is made of) all have experts: the
    chain's test accuracy of the base, each part's expert, the chain's own expert, and task arithmetic of the
    part experts ALONE (no chain expert), its global scale chosen on the chain's calib split. `margin` is that
    merge minus the best part expert, in accuracy (> 0: merging the single-step experts does the chain better
    than each of them). Empty where the zoo has no such skill (the `test` preset)."""
    from transformers import AutoTokenizer

    from mergesearch.evaluate import Evaluator, load_task
    from mergesearch.materializer import Materializer
    from mergesearch.zoo.skills import get_skill

    zoo = Path(zoo)
    skills = manifest["skills"]
    chains = [s for s in skills if get_skill(s).parts and set(get_skill(s).parts) <= set(skills)]
    if not chains:
        return {}
    base = zoo / manifest["base"]
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    scales = list(manifest["config"]["ta_scales"])
    out = {}
    for chain in chains:
        parts = list(get_skill(chain).parts)
        # the chain's own expert, for reference, is the last source where the zoo has it: weight 0 in every merge
        names = parts + ([chain] if chain in manifest["experts"] else [])
        split = {k: load_task(zoo / manifest["data"][chain][k], name=chain, **get_skill(chain).task_settings())
                 for k in ("calib", "test")}
        mat = Materializer(base, [zoo / manifest["experts"][s] for s in names], "task_arithmetic", dtype="float32",
                           device=device)
        evals = {k: Evaluator(mat.model, tok, [t]) for k, t in split.items()}

        def score(k: str, **weights: float) -> float:  # weights by expert name; the others 0
            mat.materialize(mat.plan(weight=[weights.get(s, 0.0) for s in names]))
            return evals[k].evaluate().primary(chain)

        bar = tqdm(total=len(parts) + len(scales) + 3, desc=f"composition: {chain}", disable=not progress,
                   leave=False)
        rows = {"base": score("test")}
        bar.update()
        for s in parts:
            rows[f"expert-{s}"] = score("test", **{s: 1.0})
            bar.update()
        grid = {}
        for lam in scales:
            grid[f"{lam:g}"] = score("calib", **{s: lam for s in parts})
            bar.update()
        best = max(scales, key=lambda lam: grid[f"{lam:g}"])  # first of equals: the smallest scale
        merge = f"task_arithmetic({'+'.join(parts)})@{best:g}"
        rows[merge] = score("test", **{s: best for s in parts})
        bar.update()
        own = score("test", **{chain: 1.0}) if chain in names else None
        bar.update()
        bar.close()
        del mat, evals
        best_part = max(parts, key=lambda s: rows[f"expert-{s}"])
        out[chain] = {"parts": parts, "rows": rows, "own_expert": own, "merge": merge, "calib_grid": grid,
                      "best_part": best_part, "margin": rows[merge] - rows[f"expert-{best_part}"]}
    return out


def format_composition(comp: dict) -> str:
    """`composition_report`'s result as text (percent on the chain's test split)."""
    lines = []
    for chain, c in comp.items():
        lines.append(f"composition: {chain} = {' then '.join(c['parts'])}, test accuracy on {chain}:")
        w = max(len(k) for k in c["rows"]) + 2
        for name, acc in c["rows"].items():
            lines.append(f"  {name.ljust(w)}{100 * acc:6.1f}%")
        if c["own_expert"] is not None:
            lines.append(f"  {('expert-' + chain + ' (not merged)').ljust(w)}{100 * c['own_expert']:6.1f}%")
        lines.append(f"  merge of the part experts - best part expert (expert-{c['best_part']}): "
                     f"{100 * c['margin']:+.1f} points")
    return "\n".join(lines)


def _summary(rows: dict[str, dict], skills: list[str]) -> dict:
    """The margins the zoo's targets are about: experts on their own skill, the best single model, the best merge."""
    n = len(skills)
    own = {s: rows[f"expert-{s}"][s] for s in skills}
    own_mean = sum(own.values()) / n
    singles = {k: r["mean"] for k, r in rows.items() if k == "base" or k.startswith("expert-")}
    merges = {k: r["mean"] for k, r in rows.items() if k not in singles}
    best_single = max(singles, key=singles.get)
    best_merge = max(merges, key=merges.get)
    return {
        "experts_own_mean": own_mean,
        "expert_gain_over_base": {s: own[s] - rows["base"][s] for s in skills},
        "best_single": best_single,
        "best_single_mean": singles[best_single],
        "best_merge": best_merge,
        "best_merge_mean": merges[best_merge],
        "single_gap": own_mean - singles[best_single],
        "merge_minus_best_single": merges[best_merge] - singles[best_single],
        "merge_headroom": own_mean - merges[best_merge],
    }


def format_report(report: dict) -> str:
    """The report as a fixed-width text table (percent)."""
    cols = report["skills"] + ["mean"]
    w = max(len(k) for k in report["rows"]) + 2
    lines = ["model".ljust(w) + "".join(c.rjust(11) for c in cols)]
    for name, r in report["rows"].items():
        lines.append(name.ljust(w) + "".join(f"{100 * r[c]:10.1f}%" for c in cols))
    s = report["summary"]
    lines.append(
        f"experts on their own skill: {100 * s['experts_own_mean']:.1f}% mean; best single model "
        f"{s['best_single']} {100 * s['best_single_mean']:.1f}%; best simple merge {s['best_merge']} "
        f"{100 * s['best_merge_mean']:.1f}% (headroom {100 * s['merge_headroom']:.1f} points)"
    )
    return "\n".join(lines)
