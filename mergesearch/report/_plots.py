"""Plotly drawings of the report's figure data (`_info.py`); nothing here reads a study."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mergesearch.report._info import (
    FitInfo,
    HeatmapInfo,
    HistoryInfo,
    ImportanceInfo,
    OverfitInfo,
    ParetoInfo,
    TimingInfo,
)

SEARCH = "#9aa5b1"  # dominated searched trials
FRONT = "#1f6feb"  # non-dominated searched trials
BASELINE = "#d9480f"
BEST = "#2b8a3e"
PRUNED = "#f59f00"
FAILED = "#c92a2a"
FIT = "#7048e8"  # a fitted trial's fit of its coefficients (time per trial)
_FONT = dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=13)


def _layout(fig: go.Figure, height: int, **kw) -> go.Figure:
    kw.setdefault("margin", dict(l=60, r=30, t=40, b=50))
    fig.update_layout(template="plotly_white", height=height, font=_FONT,
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0), hoverlabel=dict(align="left"),
                      **kw)
    return fig


def _hover(number: int, label: str | None, names: list[str], values: list[float], coefs: dict[str, float]) -> str:
    head = f"<b>{label}</b> (trial {number})" if label else f"<b>trial {number}</b>"
    lines = [head] + [f"{n}: {v:.4f}" for n, v in zip(names, values)]
    if len(values) > 1:
        lines.append(f"mean: {sum(values) / len(values):.4f}")
    if coefs:
        lines.append("coefficients (mean over layers):")
        lines += [f"  {k} = {v:.3f}" for k, v in list(coefs.items())[:8]]
    return "<br>".join(lines)


# --- Pareto front -------------------------------------------------------------------------------


def _marker_text(labels: list[str], coords: list[list[float]]) -> tuple[list[str], list[str]]:
    """Marker labels that stay readable: one label for markers at the same spot, alternating above and below."""
    seen: dict[tuple, int] = {}
    text: list[str] = []
    for i, label in enumerate(labels):
        key = tuple(round(c, 6) for c in coords[i])
        if key in seen:
            text[seen[key]] += f" = {label}"
            text.append("")
        else:
            seen[key] = i
            text.append(label)
    order = sorted(range(len(labels)), key=lambda i: coords[i])
    pos = [""] * len(labels)
    for rank, i in enumerate(order):
        pos[i] = "top center" if rank % 2 == 0 else "bottom center"
    return text, pos


def plot_pareto(info: ParetoInfo) -> go.Figure:
    """2 axes: scatter; 3: 3-D scatter; more: parallel coordinates; one score: score per trial."""
    n = 1 if info.kind == "trials" else len(info.axes)
    if n >= 4:
        return _pareto_parcoords(info)
    groups = {
        "searched, dominated": [p for p in info.points if p.label is None and not p.on_front],
        "searched, Pareto front": [p for p in info.points if p.label is None and p.on_front],
        "baselines": [p for p in info.points if p.label is not None],
    }
    if n == 1:
        groups = {"searched": [p for p in info.points if p.label is None], "baselines": groups["baselines"]}
    style = {
        "searched, dominated": dict(color=SEARCH, size=7, symbol="circle", opacity=0.7),
        "searched": dict(color=FRONT, size=7, symbol="circle", opacity=0.75),
        "searched, Pareto front": dict(color=FRONT, size=11, symbol="circle", line=dict(width=1, color="white")),
        "baselines": dict(color=BASELINE, size=12, symbol="diamond", line=dict(width=1, color="white")),
    }

    def coords(p) -> list[float]:
        return [p.number, p.values[0]] if n == 1 else p.values[:n]

    fig = go.Figure()
    for name, pts in groups.items():
        if not pts:
            continue
        hover = [_hover(p.number, p.label, info.axes, p.values, p.coefficients) for p in pts]
        xyz = [coords(p) for p in pts]
        text, pos = _marker_text([p.label or "" for p in pts], xyz) if name == "baselines" else (None, None)
        mode = "markers+text" if text else "markers"
        font = dict(size=11, color=BASELINE)
        if n < 3:
            tr = go.Scatter(x=[c[0] for c in xyz], y=[c[1] for c in xyz], mode=mode, text=text, textposition=pos,
                            textfont=font)
        else:
            tr = go.Scatter3d(x=[c[0] for c in xyz], y=[c[1] for c in xyz], z=[c[2] for c in xyz], mode=mode,
                              text=text, textposition=pos, textfont=font)
            style[name] = {k: v for k, v in style[name].items() if k != "opacity"}
            style[name]["size"] = style[name]["size"] * 0.6
        tr.update(name=f"{name} ({len(pts)})", marker=style[name], hovertext=hover, hoverinfo="text")
        fig.add_trace(tr)
    _add_front_and_best(fig, info, n, coords)
    if n == 1:
        _layout(fig, 460, xaxis_title="trial", yaxis_title=info.axes[0])
    elif n == 2:
        _layout(fig, 520, xaxis_title=info.axes[0], yaxis_title=info.axes[1])
    else:
        _layout(fig, 620, scene=dict(xaxis_title=info.axes[0], yaxis_title=info.axes[1], zaxis_title=info.axes[2]))
    return fig


def _add_front_and_best(fig: go.Figure, info: ParetoInfo, n: int, coords) -> None:
    """The Pareto front as a step line (2 axes) and the best-mean trial as a star, over the scatter."""
    if n == 2:
        front = sorted((p for p in info.points if p.on_front), key=lambda p: p.values[0])
        if len(front) > 1:
            fig.add_trace(go.Scatter(x=[p.values[0] for p in front], y=[p.values[1] for p in front], mode="lines",
                                     line=dict(color=FRONT, width=1, dash="dot", shape="hv"), hoverinfo="skip",
                                     showlegend=False))
    best = next((p for p in info.points if p.number == info.best_number), None)
    if best is not None:
        c = coords(best)
        hover = [_hover(best.number, None, info.axes, best.values, best.coefficients)]
        if n < 3:
            tr = go.Scatter(x=[c[0]], y=[c[1]], marker=dict(color=BEST, size=16, symbol="star",
                                                            line=dict(width=1, color="white")))
        else:
            tr = go.Scatter3d(x=[c[0]], y=[c[1]], z=[c[2]], marker=dict(color=BEST, size=8, symbol="diamond"))
        tr.update(mode="markers", name=f"best mean (trial {best.number})", hovertext=hover, hoverinfo="text")
        fig.add_trace(tr)


def _merge_axis(points: list) -> dict:
    """The parallel coordinates' first axis: which merge a line is, each baseline by its name and the
    searched trials in two groups (front, dominated), never a trial number, which says nothing of a trade-off."""
    names = list(dict.fromkeys(p.label for p in points if p.label))
    ticks = names + ["searched: Pareto front", "searched: dominated"]
    where = [names.index(p.label) if p.label else len(names) + (0 if p.on_front else 1) for p in points]
    return dict(label="merge", values=where, tickvals=list(range(len(ticks))), ticktext=ticks,
                range=[-0.5, len(ticks) - 0.5])


def _pareto_parcoords(info: ParetoInfo) -> go.Figure:
    pts = info.points
    vals = np.array([p.values for p in pts], dtype=float).reshape(len(pts), len(info.axes))
    # colour: 0 dominated searched, 1 front, 2 baseline
    colour = [2 if p.label else 1 if p.on_front else 0 for p in pts]
    dims = [_merge_axis(pts)] + [dict(label=name, values=vals[:, i]) for i, name in enumerate(info.axes)]
    fig = go.Figure(go.Parcoords(
        line=dict(color=colour, colorscale=[[0, SEARCH], [0.5, FRONT], [1, BASELINE]], cmin=0, cmax=2,
                  showscale=False),
        dimensions=dims))
    _layout(fig, 520, margin=dict(l=70, r=70, t=80, b=40))
    fig.add_annotation(text=f"<span style='color:{FRONT}'>■ Pareto front</span>  "
                            f"<span style='color:{SEARCH}'>■ dominated</span>  "
                            f"<span style='color:{BASELINE}'>■ baselines</span>",
                       xref="paper", yref="paper", x=0, y=1.15, showarrow=False, align="left")
    return fig


# --- optimisation history -----------------------------------------------------------------------


def plot_history(info: HistoryInfo) -> go.Figure:
    """Searched trials and their best-so-far line; the baselines left of trial 0 in the order they were
    scored, and the best of them as a dashed line the search has to pass."""
    k = len(info.series)
    fig = make_subplots(rows=k, cols=1, shared_xaxes=True, vertical_spacing=0.06 if k > 1 else 0.0,
                        subplot_titles=info.series if k > 1 else None)
    nums = np.array(info.numbers)
    n_base = len(info.baselines)
    base_x = np.arange(-n_base, 0)  # first scored leftmost, the last just before trial 0
    every = np.concatenate([info.values, info.baseline_values]) if n_base else info.values
    lows = np.nanmin(every, axis=0) if len(every) else np.zeros(k)
    right = max(info.numbers[-1] if info.numbers else 0, max((f[0] for f in info.failed), default=0),
                max((p[0] for p in info.pruned), default=0))
    for i, name in enumerate(info.series):
        first = i == 0
        row = i + 1
        if len(nums):
            fig.add_trace(go.Scatter(
                x=nums, y=info.values[:, i], mode="markers", name="searched trial", legendgroup="s",
                showlegend=first, marker=dict(color=FRONT, size=6, opacity=0.7),
                hovertemplate="trial %{x}<br>" + name + " %{y:.4f}<extra></extra>"), row=row, col=1)
            fig.add_trace(go.Scatter(
                x=nums, y=info.best_so_far[:, i], mode="lines", name="best so far (searched)", legendgroup="best",
                showlegend=first, line=dict(color=BEST, width=2, shape="hv"),
                hovertemplate="best so far after trial %{x}: %{y:.4f}<extra></extra>"), row=row, col=1)
        if n_base:
            fig.add_trace(go.Scatter(
                x=base_x, y=info.baseline_values[:, i], mode="markers", name="baseline (in scoring order)",
                legendgroup="b", showlegend=first, marker=dict(color=BASELINE, size=9, symbol="diamond"),
                text=info.baselines, hovertemplate="baseline %{text}<br>" + name + " %{y:.4f}<extra></extra>"),
                row=row, col=1)
            top = float(info.best_baseline[i])
            if math.isfinite(top):
                fig.add_trace(go.Scatter(
                    x=[-n_base, right], y=[top, top], mode="lines", name="best baseline", legendgroup="bb",
                    showlegend=first, line=dict(color=BASELINE, width=1, dash="dash"),
                    hovertemplate="best baseline: %{y:.4f}<extra></extra>"), row=row, col=1)
        if info.pruned and i == 0:  # pruning reports one value: drawn on the first objective
            py = [v if v is not None else float(lows[i]) for _, v, _ in info.pruned]
            fig.add_trace(go.Scatter(
                x=[p[0] for p in info.pruned], y=py, mode="markers", name="pruned (last reported)",
                legendgroup="p", showlegend=first, marker=dict(color=PRUNED, size=8, symbol="x"),
                text=[p[2] for p in info.pruned],
                hovertemplate="trial %{x} pruned at %{y:.4f}<br>%{text}<extra></extra>"), row=row, col=1)
        if info.failed:
            fy = float(lows[i]) if len(every) and math.isfinite(float(lows[i])) else 0.0
            fig.add_trace(go.Scatter(
                x=[f[0] for f in info.failed], y=[fy] * len(info.failed), mode="markers", name="failed",
                legendgroup="f", showlegend=first, marker=dict(color=FAILED, size=9, symbol="x-thin-open",
                                                               line=dict(width=2, color=FAILED)),
                text=[f[1] for f in info.failed],
                hovertemplate="trial %{x} failed<br>%{text}<extra></extra>"), row=row, col=1)
        fig.update_yaxes(title_text=name if k == 1 else None, row=row, col=1)
    title = "trial" + (" (left of 0: the baselines, scored before the search, in that order)" if n_base else "")
    fig.update_xaxes(title_text=title, row=k, col=1)
    return _layout(fig, 300 + 170 * (k - 1) if k > 1 else 420)


# --- coefficient heatmap ------------------------------------------------------------------------


def plot_heatmap(info: HeatmapInfo) -> go.Figure:
    """One panel per searched parameter: rows are layer groups (depth goes down), columns experts
    (x chunks)."""
    panels = info.panels
    widths = [max(1, len(p.experts) * p.n_chunks) for p in panels]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p.param for p in panels],
                        column_widths=[w / sum(widths) for w in widths], horizontal_spacing=0.12)
    n_rows = max(len(p.rows) for p in panels)
    for i, p in enumerate(panels):
        cols = [e if p.n_chunks == 1 else f"{e} #{c}" for e in p.experts for c in range(p.n_chunks)]
        z = p.values.reshape(len(p.rows), -1)  # (rows, experts * chunks), expert-major like `cols`
        text = [["" if not math.isfinite(v) else f"{v:.2f}" for v in r] for r in z]
        axis = "coloraxis" if i == 0 else f"coloraxis{i + 1}"
        fig.add_trace(go.Heatmap(
            z=np.where(np.isfinite(z), z, None).tolist(), x=cols, y=p.rows, coloraxis=axis, text=text,
            texttemplate="%{text}" if z.size <= 300 else None, textfont=dict(size=10), xgap=1, ygap=1,
            hovertemplate=f"{p.param}<br>%{{y}} · %{{x}}<br>value %{{z:.4f}}<extra></extra>"), row=1, col=i + 1)
        dom_end = fig.layout[f"xaxis{i + 1 if i else ''}"].domain[1]
        fig.layout[axis] = dict(colorscale="Viridis", cmin=p.low, cmax=p.high,
                                colorbar=dict(x=dom_end + 0.005, len=0.9, thickness=12, title=dict(text=p.param)))
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=i + 1)
        fig.update_xaxes(type="category", tickangle=-30 if len(cols) > 4 else 0, row=1, col=i + 1)
    return _layout(fig, max(320, 120 + 26 * n_rows), margin=dict(l=70, r=60, t=50, b=70))


def plot_fit(info: FitInfo) -> go.Figure:
    """Training and validation loss of a fit against its steps; the kept step marked."""
    fig = go.Figure()
    tr = [(s, v) for s, v in zip(info.steps, info.train_loss) if v is not None]
    fig.add_trace(go.Scatter(x=[s for s, _ in tr], y=[v for _, v in tr], mode="lines+markers", name="train loss",
                             line=dict(color="#1c7ed6")))
    fig.add_trace(go.Scatter(x=info.steps, y=info.val_loss, mode="lines+markers", name="validation loss",
                             line=dict(color="#e8590c")))
    if info.best_step in info.steps:
        fig.add_trace(go.Scatter(x=[info.best_step], y=[info.val_loss[info.steps.index(info.best_step)]],
                                 mode="markers", name="kept", marker=dict(symbol="star", size=14, color="#2b8a3e")))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text=f"{info.objective} loss")
    return _layout(fig, 360)


# --- parameter importances ----------------------------------------------------------------------


def plot_importance(info: ImportanceInfo, top: int = 12) -> go.Figure:
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.2,
                        subplot_titles=["by layer group", "by expert", f"top {top} coefficients"])
    layer = list(info.by_layer.items())
    expert = sorted(info.by_expert.items(), key=lambda kv: kv[1])
    single = sorted(info.by_param.items(), key=lambda kv: kv[1], reverse=True)[:top][::-1]
    for col, items, colour in ((1, layer, FRONT), (2, expert, BASELINE), (3, single, BEST)):
        fig.add_trace(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h",
                             marker_color=colour, showlegend=False,
                             hovertemplate="%{y}: %{x:.3f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="importance", rangemode="tozero", row=1, col=col)
    fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
    n = max(len(layer), len(expert), len(single), 1)
    return _layout(fig, max(320, 100 + 22 * n), margin=dict(l=110, r=30, t=50, b=50))


# --- calibration vs test ------------------------------------------------------------------------


def plot_overfit(info: OverfitInfo) -> go.Figure:
    fig = go.Figure()
    pts = info.points
    lo = min([min(p.calib_mean, p.test_mean) for p in pts], default=0.0)
    hi = max([max(p.calib_mean, p.test_mean) for p in pts], default=1.0)
    pad = 0.05 * (hi - lo or 1.0)
    fig.add_trace(go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="test = calibration",
                             line=dict(color="#868e96", dash="dash", width=1), hoverinfo="skip"))
    for is_base, name, colour, symbol in ((False, "searched (top trials)", FRONT, "circle"),
                                          (True, "baselines", BASELINE, "diamond")):
        sel = [p for p in pts if p.is_baseline == is_base]
        if not sel:
            continue
        hover = []
        for p in sel:
            lines = [f"<b>{p.label}</b> (trial {p.number})", f"calibration mean {p.calib_mean:.4f}",
                     f"test mean {p.test_mean:.4f} ({p.test_mean - p.calib_mean:+.4f})"]
            lines += [f"  {t}: calib {p.calib.get(t, float('nan')):.3f} / test {v:.3f}" for t, v in p.test.items()]
            hover.append("<br>".join(lines))
        text, pos = _marker_text([p.label if is_base else f"#{p.number}" for p in sel],
                                 [[p.calib_mean, p.test_mean] for p in sel])
        fig.add_trace(go.Scatter(
            x=[p.calib_mean for p in sel], y=[p.test_mean for p in sel], mode="markers+text", name=name,
            text=text, textposition=pos,
            textfont=dict(size=10, color=colour), marker=dict(color=colour, size=10, symbol=symbol),
            hovertext=hover, hoverinfo="text"))
    return _layout(fig, 480, xaxis_title="calibration mean", yaxis_title="held-out test mean")


# --- time per trial -----------------------------------------------------------------------------


def plot_timing(info: TimingInfo) -> go.Figure:
    fig = go.Figure()
    x = info.numbers
    text = info.labels
    other = np.nan_to_num(info.other_s, nan=0.0)
    for name, y, colour in (("fit", info.fit_s, FIT), ("merge", info.merge_s, FRONT), ("evaluation", info.eval_s, BEST),
                            ("other (sampler, storage)", other, SEARCH)):
        if name == "fit" and not info.fit_s.any():
            continue  # not a fitted study
        fig.add_trace(go.Bar(x=x, y=y, name=name, marker_color=colour, text=text, textposition="none",
                             hovertemplate="trial %{x} (%{text})<br>" + name + " %{y:.3f} s<extra></extra>"))
    return _layout(fig, 380, barmode="stack", xaxis_title="trial", yaxis_title="seconds", bargap=0.1)
