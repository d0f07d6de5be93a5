"""The comparison view: one row per configuration, mean ± CI over seeds, paired Δ against a baseline.

The plain ``kdlab compare`` table (:func:`kdlab.study.compare.compare_table`), the Results table
of ``kdlab report``, and the bar chart of the first metric per configuration (the loss/method
ablation figure).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kdlab.errors import KdlabError
from kdlab.report.table import Table
from kdlab.study.views.base import Options, Selection, View, ViewFigure, register_view

if TYPE_CHECKING:
    from kdlab.study.compare import CompareTable

BARS_FILE = "comparison_bars.png"


@register_view
class ComparisonView(View):
    """Comparison: a row per configuration, mean ± 95% CI over seeds, paired Δ against --baseline."""

    name = "comparison"

    def build(self, selection: Selection, options: Options) -> "CompareTable":
        from kdlab.study.compare import compare_table

        return compare_table(selection.runs, metrics=options.metrics, baseline=options.baseline)

    def tables(self, result: "CompareTable") -> list[Table]:
        from kdlab.study.compare import as_table

        return [as_table(result)]

    def figures(self, result: "CompareTable", out_dir: Path) -> list[ViewFigure]:
        metric = result.metrics[0]
        if len([row for row in result.rows if row.summaries.get(metric) is not None]) < 2:
            return []  # one bar compares nothing
        path = draw_bars(result, Path(out_dir) / BARS_FILE)
        baseline = f"; baseline {result.baseline} in orange" if result.baseline else ""
        return [ViewFigure((path,), f"{metric} per configuration (loss/method ablation), mean ± 95% CI{baseline}")]


def draw_bars(result: "CompareTable", path: Path, *, title: str | None = None) -> Path:
    """Bars of the first metric per configuration with its CI; a one-line error when no row has it."""
    from kdlab.report.plots import comparison_bars

    metric = result.metrics[0]
    rows = [row for row in result.rows if row.summaries.get(metric) is not None]
    if not rows:
        raise KdlabError(f"--plot: no finished run has metric {metric!r}; choose one with --metrics")
    experiments = sorted({row.experiment for row in rows})
    if title is None and len(experiments) == 1:
        title = f"{experiments[0]}: {metric} per configuration"
    return comparison_bars([row.label for row in rows], [row.summaries[metric].mean for row in rows],
                           [row.summaries[metric].half_width for row in rows], path, metric=metric,
                           baseline=result.baseline, title=title)
