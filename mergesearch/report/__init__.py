"""Reports of a study: figure data (testable without a browser), plotly figures, the HTML report, the dashboard.

    from mergesearch.report import write_report, pareto_info, plot_pareto
    write_report("studies/demo.yaml", "report.html")   # one self-contained HTML file, opens offline
    fig = plot_pareto(pareto_info(study))              # any figure on its own, e.g. in a notebook
"""

from __future__ import annotations

from mergesearch.report._info import (
    FitInfo,
    HeatmapInfo,
    HeatmapPanel,
    HistoryInfo,
    ImportanceInfo,
    OverfitInfo,
    ParetoInfo,
    SummaryInfo,
    TimingInfo,
    fit_info,
    fitted_coefficients,
    heatmap_info,
    history_info,
    importance_info,
    key_coefficients,
    non_dominated,
    overfit_info,
    pareto_info,
    pick_trial,
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
from mergesearch.report.dashboard import make_dashboard_server
from mergesearch.report.html import Report, build_report, save_report, write_report

__all__ = [
    "FitInfo", "fit_info", "fitted_coefficients", "plot_fit",
    "HeatmapInfo", "HeatmapPanel", "HistoryInfo", "ImportanceInfo", "OverfitInfo", "ParetoInfo", "SummaryInfo",
    "TimingInfo", "heatmap_info", "history_info", "importance_info", "key_coefficients", "non_dominated",
    "overfit_info", "pareto_info", "pick_trial", "summary_info", "timing_info", "plot_heatmap", "plot_history",
    "plot_importance", "plot_overfit", "plot_pareto", "plot_timing", "make_dashboard_server", "Report",
    "build_report", "save_report", "write_report",
]
