"""The robustness view: robust accuracy against ε, and the accuracy–robustness trade-off.

From the final metrics of robust runs: ``robust/curve/<ε>`` (``robust.eps_curve``) drawn as
one line per configuration, and ``robust/worst/acc`` against ``test/acc`` as one point per
configuration, each mean ± 95% CI over seeds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kdlab.errors import KdlabError
from kdlab.report.table import Table
from kdlab.study.views.base import Options, Selection, View, ViewFigure, register_view

if TYPE_CHECKING:
    from kdlab.store import RunRecord

CLEAN, ROBUST = "test/acc", "robust/worst/acc"
_CURVE = re.compile(r"^robust/curve/(.+)$")


@dataclass(frozen=True)
class Robustness:
    experiment: str
    curves: dict  # {config: (eps values, means, half widths)}
    tradeoff: dict  # {config: (clean mean, clean half width, robust mean, robust half width)}


@register_view
class RobustnessView(View):
    """Robustness: robust accuracy against ε per configuration, and clean against worst-case robust accuracy."""

    name = "robustness"

    def applies(self, runs: Sequence["RunRecord"]) -> bool:
        return any(_CURVE.match(key) or key == ROBUST for r in runs for key in r.final)

    def build(self, selection: Selection, options: Options) -> Robustness:
        from kdlab.study.compare import compare_table

        finished = selection.finished
        rows = compare_table(finished, metrics=()).rows
        records = {r.run_id: r for r in finished}
        result = Robustness(", ".join(sorted({r.experiment for r in finished})), _curves(rows, records),
                            _tradeoff(rows, records))
        if not result.curves and not result.tradeoff:
            raise KdlabError(f"no finished run has {ROBUST} or robust/curve/<ε> metrics; set robust: in the "
                             "config (or run `kdlab eval`)")
        return result

    def tables(self, result: Robustness) -> list[Table]:
        if not result.tradeoff:
            return []
        rows = [[config, f"{x:.4f}", f"{y:.4f}"] for config, (x, _, y, _) in result.tradeoff.items()]
        return [Table(["config", CLEAN, ROBUST], rows, numeric=[False, True, True],
                      notes=["mean over seeds; the figure shows the 95% CIs"])]

    def figures(self, result: Robustness, out_dir: Path) -> list[ViewFigure]:
        from kdlab.report import plots

        out, title = [], result.experiment
        if result.curves:
            paths = plots.metric_curves(result.curves, Path(out_dir) / "robustness_vs_eps", xlabel="ε (input units)",
                                        ylabel="robust accuracy (mean ± 95% CI)", title=f"{title}: robustness vs ε")
            out.append(ViewFigure(tuple(paths), "Robust accuracy of the first attack against ε (robust.eps_curve)"))
        if result.tradeoff:
            paths = plots.tradeoff_scatter(result.tradeoff, Path(out_dir) / "accuracy_robustness",
                                           xlabel=f"clean {CLEAN}", ylabel=ROBUST,
                                           title=f"{title}: accuracy–robustness")
            out.append(ViewFigure(tuple(paths), "Accuracy–robustness trade-off: clean test accuracy against "
                                                "worst-case robust accuracy"))
        return out


def _curves(rows, records) -> dict:
    from kdlab.study.stats import mean_ci

    series = {}
    for row in rows:
        per_eps: dict[float, list[float]] = {}
        for run_id in row.run_ids:
            for key, value in records[run_id].final.items():
                match = _CURVE.match(key)
                if match:
                    try:
                        per_eps.setdefault(float(match.group(1)), []).append(value)
                    except ValueError:
                        continue
        if per_eps:
            xs = sorted(per_eps)
            summaries = [mean_ci(per_eps[x]) for x in xs]
            series[row.label] = (xs, [s.mean for s in summaries], [s.half_width for s in summaries])
    return series


def _tradeoff(rows, records) -> dict:
    from kdlab.study.stats import mean_ci

    points = {}
    for row in rows:
        pairs = [(records[r].final[CLEAN], records[r].final[ROBUST]) for r in row.run_ids
                 if CLEAN in records[r].final and ROBUST in records[r].final]
        if pairs:
            x, y = mean_ci([p[0] for p in pairs]), mean_ci([p[1] for p in pairs])
            points[row.label] = (x.mean, x.half_width, y.mean, y.half_width)
    return points
