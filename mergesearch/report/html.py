"""The study report: one self-contained HTML file (plotly.js inline, no network) with every figure.

Only reads the study, so it can be regenerated while workers are still adding trials.
"""

from __future__ import annotations

import datetime
import html
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import plotly.io as pio
from plotly.offline import get_plotlyjs

from mergesearch.errors import MergeSearchError, StudyError
from mergesearch.fileio import atomic_write
from mergesearch.report._info import (
    SummaryInfo,
    fit_info,
    heatmap_info,
    history_info,
    importance_info,
    overfit_info,
    pareto_info,
    summary_info,
    timing_info,
)
from mergesearch.report._plots import (
    plot_fit,
    plot_heatmap,
    plot_history,
    plot_importance,
    plot_overfit,
    plot_pareto,
    plot_timing,
)
from mergesearch.study import records

log = logging.getLogger(__name__)

_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}


@dataclass
class Report:
    """A rendered report: its HTML, the figures it holds and why the others are missing."""

    html: str
    figures: list[str] = field(default_factory=list)  # ids of the drawn figures, in page order
    notes: dict[str, str] = field(default_factory=dict)  # figure id -> why it is not drawn
    summary: SummaryInfo | None = None


@dataclass
class _Drawn:
    fig: object | None  # a plotly Figure, or None with `note` saying why
    note: str | None = None
    how: str = ""  # more words for the section's "how to read it"
    title: str | None = None  # replaces the section's title


_PARETO_HOW = {
    "objectives": ("Trade-offs between objectives",
                   "Each point is a merge, placed by its scores on the objectives. Large blue: the Pareto front (no "
                   "other merge is at least as good on every objective and better on one). Orange diamonds: "
                   "baselines. Green star: the best mean. Hover for scores and coefficients."),
    "tasks": ("Trade-offs between tasks",
              "The study maximises the mean score; each point is a merge placed by its per-task scores, so the "
              "trade-offs between skills show. Large blue: the Pareto front over the tasks (no other merge is at "
              "least as good on every task and better on one). Orange diamonds: baselines. Green star: the best "
              "mean. Hover for scores and coefficients."),
    "trials": ("Score of every merge",
               "The score of each merge by trial number. Orange diamonds: baselines. Green star: the best. Hover "
               "for the coefficients."),
    "parcoords": (None, "Each line is a merge, crossing each axis at its score there. Blue lines: the Pareto "
                        "front; orange: baselines; grey: dominated. Drag along an axis to keep a range."),
}


def _draw_pareto(study, _trial) -> _Drawn:
    info = pareto_info(study)
    title, how = _PARETO_HOW[info.kind]
    if len(info.axes) >= 4 and info.kind != "trials":
        how = _PARETO_HOW["parcoords"][1]
    return _Drawn(plot_pareto(info), how=how, title=title)


def _draw_history(study, _trial) -> _Drawn:
    return _Drawn(plot_history(history_info(study)))


def _draw_heatmap(study, trial) -> _Drawn:
    info = heatmap_info(study, trial)
    return _Drawn(plot_heatmap(info), how=f" Shown: {info.label}.")


def _draw_fit(study, trial) -> _Drawn | None:
    if not records.meta(study).get("fit"):
        return None  # a study without a fit: section has no such section
    info = fit_info(study, trial)
    return _Drawn(plot_fit(info), how=f" Shown: {info.label}, {info.objective} objective, "
                                        f"{info.n_coefficients} coefficients ({info.granularity}).")


def _draw_importance(study, _trial) -> _Drawn:
    info = importance_info(study)
    if info.note:
        return _Drawn(None, info.note)
    return _Drawn(plot_importance(info),
                  how=f" {info.evaluator} over {info.n_trials} searched trials, target: {info.target}.")


def _draw_overfit(study, _trial) -> _Drawn:
    info = overfit_info(study)
    return _Drawn(None, info.note) if info.note else _Drawn(plot_overfit(info))


def _draw_timing(study, _trial) -> _Drawn:
    info = timing_info(study)
    return _Drawn(plot_timing(info)) if info.numbers else _Drawn(None, "no trial has stored its timings yet")


# id, title, how to read it, draw(study, trial) -> _Drawn
_SECTIONS: list[tuple[str, str, str, Callable[..., _Drawn]]] = [
    ("pareto", "Trade-offs", "", _draw_pareto),
    ("history", "Is the search still improving?",
     "Score of every completed trial in the order they ran, with the best so far (green). Orange crosses: pruned "
     "trials at their last reported score; red crosses: failed trials (hover for the reason).", _draw_history),
    ("heatmap", "Which layers take which expert",
     "The merge coefficients of one trial: rows are layers (io = embeddings, final norm and head; with fitted "
     "per-tensor coefficients, layer.tensor), columns are experts (and chunks), one panel per searched or "
     "fitted parameter.", _draw_heatmap),
    ("fit", "How the coefficients were fitted",
     "Loss of the fitted merge on the training part of calib (blue, mean since the previous check) and on the "
     "held-out validation slice (orange); the star marks the coefficients kept (best validation loss).", _draw_fit),
    ("importance", "Which coefficients matter",
     "fANOVA importance of each searched coefficient for the score, summed by layer group and by expert.",
     _draw_importance),
    ("overfit", "Calibration vs held-out test",
     "The top trials and the baselines re-scored on the test splits after the search. Points below the dashed "
     "line score worse on unseen questions than on the calibration set they were selected on.", _draw_overfit),
    ("timing", "Time per trial",
     "Seconds spent merging, evaluating, and outside both (sampler and storage) for every trial.", _draw_timing),
]

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 0; color: #212529;
       background: #f8f9fa; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
.sub { color: #6c757d; margin: 0 0 16px; font-size: 0.9rem; }
.summary { background: #fff; border-left: 5px solid #2b8a3e; padding: 12px 20px; margin: 0 0 16px;
           font-size: 1.05rem; line-height: 1.5; }
.summary p { margin: 4px 0; }
table { border-collapse: collapse; background: #fff; font-size: 0.9rem; margin-bottom: 24px; }
th, td { padding: 4px 12px; text-align: right; border-bottom: 1px solid #dee2e6; }
th:first-child, td:first-child { text-align: left; }
tr.best td { font-weight: 600; background: #ebfbee; }
tr.bestbase td { background: #fff4e6; }
section.figure { background: #fff; margin: 0 0 20px; padding: 12px 16px; border-radius: 6px;
                 box-shadow: 0 1px 2px rgba(0,0,0,.08); }
section.figure h2 { font-size: 1.15rem; margin: 4px 0; }
section.figure p.how { color: #495057; margin: 0 0 6px; font-size: 0.9rem; }
section.figure p.note { color: #868e96; font-style: italic; }
"""


def _fmt(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _summary_html(s: SummaryInfo) -> str:
    tasks = [t for t in s.tasks if any(t in r.scores for r in s.rows)] or list(s.objectives)
    has_test = any(r.test_mean is not None for r in s.rows)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    rows = []
    for r in s.rows:
        cls = "best" if not r.is_baseline else ("bestbase" if s.best_baseline is r else "")
        cells = "".join(f"<td>{_fmt(r.scores.get(t))}</td>" for t in tasks)
        test = f"<td>{_fmt(r.test_mean)}</td>" if has_test else ""
        rows.append(f"<tr class='{cls}'><td>{html.escape(r.label)}</td>{cells}<td>{_fmt(r.mean)}</td>{test}</tr>")
    table = ""
    if rows:
        table = ("<table id='scores'><thead><tr><th>merge (calibration scores)</th>" + head + "<th>mean</th>"
                 + ("<th>test mean</th>" if has_test else "") + "</tr></thead><tbody>" + "".join(rows)
                 + "</tbody></table>")
    sentences = "".join(f"<p>{html.escape(x)}</p>" for x in s.sentences)
    return f"<div class='summary' id='summary'>{sentences}</div>{table}"


def build_report(study: optuna.Study, *, trial: str | int = "best") -> Report:
    """Render the report of `study`; `trial` picks the trial of the coefficient heatmap."""
    summary = summary_info(study)
    rep = Report(html="", summary=summary)
    parts = []
    for fid, title, how, draw in _SECTIONS:
        try:
            d = draw(study, trial)
            if d is None:
                continue
        except MergeSearchError as exc:  # e.g. no completed trial yet: the rest of the report still helps
            if fid in ("heatmap", "fit") and str(trial) != "best":
                raise  # a trial the user named explicitly must exist and be a searched (or fitted) one
            d = _Drawn(None, str(exc))
        fig, note = d.fig, d.note
        title, how = d.title or title, how + d.how
        body = f"<p class='note'>{html.escape(note or '')}</p>"
        if fig is not None:
            body = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{fid}",
                               config=_PLOTLY_CONFIG)
            rep.figures.append(fid)
        else:
            rep.notes[fid] = note or "nothing to show"
        parts.append(f"<section class='figure' id='{fid}' data-figure='{fid}' data-drawn='{int(fig is not None)}'>"
                     f"<h2>{html.escape(title)}</h2><p class='how'>{html.escape(how)}</p>{body}</section>")
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    objectives = ", ".join(summary.objectives)
    rep.html = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>mergesearch report: {html.escape(study.study_name)}</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<style>{_CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body><main>"
        f"<h1>Merge search: {html.escape(study.study_name)}</h1>"
        f"<p class='sub'>objectives (maximised): {html.escape(objectives)} · generated {stamp} · "
        "regenerate with <code>mergesearch report</code> while the study runs</p>"
        + _summary_html(summary) + "".join(parts) + "</main></body></html>"
    )
    return rep


def save_report(rep: Report, out: str | os.PathLike) -> Path:
    """Write a rendered report atomically (temp file + rename), so a browser never sees half a report."""
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, rep.html)
    except OSError as exc:
        raise StudyError(f"cannot write the report to {out}: {exc.strerror}: choose another --out") from None
    log.debug("report written to %s (%d figures)", out, len(rep.figures))
    return out


def write_report(study: optuna.Study | str | os.PathLike, out: str | os.PathLike = "report.html", *,
                 study_name: str | None = None, trial: str | int = "best") -> Path:
    """Write the report of a study (an optuna.Study, a study YAML, a storage URL or a .db/.log file)."""
    if not isinstance(study, optuna.Study):
        from mergesearch.study import load_study

        study = load_study(study, study_name)
    return save_report(build_report(study, trial=trial), out)
