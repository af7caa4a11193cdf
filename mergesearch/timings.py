"""Where a study's time goes: seconds per phase of opening it, and per trial merge / evaluation / the rest.

Opening phases are timed where they run (`PhaseTimer`, held by the materialiser and the workbench),
logged as they end and stored in the study's meta ("timings"). Each trial's record already holds
`merge_s` and `eval_s`, and a fitted trial's `fit_s` (its coefficients' fit); the rest of its wall time
(sampler, storage writes, bookkeeping) is its duration minus those. `study_timings` gathers all of it for
`status`; `format_timings` prints it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

log = logging.getLogger(__name__)


class PhaseTimer:
    """Wall seconds per named phase, in the order the phases first ran (a phase run twice adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield  # a phase that raised is not timed: the error is what the user needs to see
        s = time.perf_counter() - t0
        self.seconds[name] = self.seconds.get(name, 0.0) + s
        log.info("%s: %.2f s", name, s)

    def update(self, other: Mapping[str, float], prefix: str = "") -> None:
        for k, v in other.items():
            self.seconds[prefix + k] = self.seconds.get(prefix + k, 0.0) + v


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def trial_times(records: Sequence[Mapping], durations: Sequence[float | None]) -> dict:
    """Median merge / evaluation / fit / other seconds of trials (their records and wall durations), and totals.
    `fit_s` is None where no trial was fitted."""
    merge = [float(r["merge_s"]) for r in records if "merge_s" in r]
    ev = [float(r["eval_s"]) for r in records if "eval_s" in r]
    fit = [float(r["fit_s"]) for r in records if r.get("fit_s") is not None]
    other = [d - float(r.get("merge_s", 0.0)) - float(r.get("eval_s", 0.0)) - float(r.get("fit_s") or 0.0)
             for r, d in zip(records, durations) if d is not None and "merge_s" in r]
    return {"n": len(records), "merge_s": _median(merge), "eval_s": _median(ev), "fit_s": _median(fit),
            "other_s": _median(other), "total_s": sum(d for d in durations if d is not None)}


def study_timings(meta: Mapping, baseline_records: Sequence[Mapping], trial_records: Sequence[Mapping],
                  trial_durations: Sequence[float | None]) -> dict:
    """Opening phases (from the meta), per-baseline and per-trial breakdowns."""
    base = [(float(r.get("merge_s", 0.0)) + float(r.get("eval_s", 0.0))) for r in baseline_records if "eval_s" in r]
    return {"opening": dict(meta.get("timings") or {}),
            "baselines": {"n": len(base), "each_s": _median(base), "total_s": sum(base)},
            "trials": trial_times(trial_records, trial_durations)}


def format_timings(t: Mapping) -> list[str]:
    """Lines for `status`: where the time went."""
    lines = []
    if t.get("opening"):
        lines.append("opening: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t["opening"].items()))
    b = t.get("baselines") or {}
    if b.get("n"):
        lines.append(f"baselines: {b['n']} x {b['each_s']:.2f} s (median) = {b['total_s']:.1f} s")
    tr = t.get("trials") or {}
    if tr.get("n") and tr.get("merge_s") is not None:
        fit = f"fit {tr['fit_s']:.1f} s, " if tr.get("fit_s") is not None else ""
        other = f", other (sampler, storage) {tr['other_s']:.3f} s" if tr.get("other_s") is not None else ""
        lines.append(f"per trial (median): {fit}merge {tr['merge_s']:.3f} s, evaluation {tr['eval_s']:.3f} s{other}")
    return lines
