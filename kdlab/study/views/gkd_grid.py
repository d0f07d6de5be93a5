"""The GKD grid of a study: student data fraction λ × divergence, with the SFT and SeqKD baselines.

Reads only the store. A finished ``gkd`` run sits in the cell (divergence, λ)
of its resolved config (JSD named with its β); ``scratch`` runs are the SFT
baseline and ``gkd`` runs with ``seqkd: true`` and the ``ce`` divergence are
SeqKD. Each cell is the mean ± 95% t-interval over its seeds. The teacher's own
metric comes from its recipe run (:mod:`kdlab.study.teacher_runs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kdlab.errors import KdlabError
from kdlab.report.table import Table, render
from kdlab.study.views.base import Options, Selection, View, ViewFigure, method_name, register_view

if TYPE_CHECKING:
    from kdlab.store import RunRecord, Store
    from kdlab.study.stats import MeanCI

DIVERGENCE_ORDER = ("forward_kl", "jsd(0.1)", "jsd(0.5)", "jsd(0.9)", "reverse_kl")


@dataclass(frozen=True)
class GKDGrid:
    metric: str
    lambdas: tuple[float, ...]
    divergences: tuple[str, ...]
    cells: dict[tuple[str, float], "MeanCI"]  # (divergence, λ) -> summary
    baselines: dict[str, "MeanCI"]  # "SFT", "SeqKD", "teacher" -> summary


def _cell_key(method: dict) -> tuple[str, float] | str | None:
    if method.get("name") == "scratch":
        return "SFT"
    if method.get("name") != "gkd":
        return None
    divergence = method.get("divergence", "jsd")
    if method.get("seqkd"):
        label = "SeqKD" if divergence == "ce" else f"SeqKD+{divergence}"
        lam = float(method.get("on_policy_fraction", 0.5))
        return label if lam == 0 else f"{label} λ={lam:g}"
    if divergence == "jsd":
        beta = float(method.get("beta", 0.5))
        divergence = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else f"jsd({beta:g})"
        if method.get("scaled_jsd") and 0 < beta < 1:  # a different loss: its own row
            divergence += " scaled"
    return divergence, float(method.get("on_policy_fraction", 0.5))


@register_view
class GKDGridView(View):
    """GKD grid: student metric per divergence × student data fraction λ, with the SFT and SeqKD baselines."""

    name = "gkd_grid"

    def applies(self, runs: Sequence["RunRecord"]) -> bool:
        return any(method_name(r) == "gkd" for r in runs)

    def build(self, selection: Selection, options: Options) -> GKDGrid:
        return gkd_grid(selection.store, selection.experiment(self.name), metric=options.metric)

    def tables(self, result: GKDGrid) -> list[Table]:
        return [gkd_table(result)]

    def figures(self, result: GKDGrid, out_dir: Path) -> list[ViewFigure]:
        return [ViewFigure(tuple(plot_gkd_grid(result, out_dir)),
                           f"GKD grid: {result.metric} per divergence × student data fraction λ")]


def gkd_grid(store: "Store", experiment: str, *, metric: str = "test/acc") -> GKDGrid:
    from kdlab.study.stats import mean_ci
    from kdlab.study.teacher_runs import teacher_metric_values

    runs = store.runs(experiment=experiment, status="finished")
    if not runs:
        raise KdlabError(f"experiment {experiment!r} has no finished runs; run it first (kdlab run CONFIG)")
    values: dict = {}
    for run in runs:
        key = _cell_key(run.config.get("method", {}))
        if key is None or metric not in run.final:
            continue
        values.setdefault(key, []).append(run.final[metric])
    teacher_values = teacher_metric_values(store, runs, metric)  # the teacher's own metric, once per teacher
    cells = {k: mean_ci(v) for k, v in values.items() if isinstance(k, tuple)}
    if not cells:
        raise KdlabError(f"experiment {experiment!r} has no finished gkd runs with {metric!r}")
    lambdas = tuple(sorted({lam for _, lam in cells}))
    present = {d for d, _ in cells}
    divergences = tuple([d for d in DIVERGENCE_ORDER if d in present] + sorted(present - set(DIVERGENCE_ORDER)))
    baselines = {k: mean_ci(v) for k, v in values.items() if isinstance(k, str)}
    if teacher_values:
        baselines["teacher"] = mean_ci(teacher_values)
    return GKDGrid(metric, lambdas, divergences, cells, baselines)


def gkd_table(grid: GKDGrid, *, digits: int = 3) -> Table:
    """Rows: divergences; columns: λ; then the baselines, each as mean ± 95% CI (n seeds)."""
    from kdlab.study.stats import format_mean_ci

    headers = ["divergence"] + [f"λ={lam:g}" for lam in grid.lambdas]
    rows = []
    for d in grid.divergences:
        rows.append([d] + [format_mean_ci(grid.cells[(d, lam)], digits=digits) if (d, lam) in grid.cells else "-"
                           for lam in grid.lambdas])
    for name, summary in sorted(grid.baselines.items()):
        rows.append([name, format_mean_ci(summary, digits=digits)] + [""] * (len(grid.lambdas) - 1))
    return Table(headers, rows, numeric=[False] + [True] * len(grid.lambdas),
                 caption=f"{grid.metric} (mean ± 95% CI over seeds)")


def render_gkd_grid(grid: GKDGrid, *, fmt: str = "text", digits: int = 3) -> str:
    return render(gkd_table(grid, digits=digits), fmt=fmt)


def plot_gkd_grid(grid: GKDGrid, out_dir: str | Path) -> list[Path]:
    """A divergence × λ heatmap of the metric, with the SFT/SeqKD baselines in the title."""
    from kdlab.report.plots import capacity_heatmap

    means = [[grid.cells[(d, lam)].mean if (d, lam) in grid.cells else float("nan") for lam in grid.lambdas]
             for d in grid.divergences]
    shown = ", ".join(f"{k} {v.mean:.3f}" for k, v in sorted(grid.baselines.items()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = capacity_heatmap(list(grid.divergences), [f"λ={lam:g}" for lam in grid.lambdas], means,
                             out / "gkd_grid", metric=grid.metric, title=f"GKD: {grid.metric} ({shown})",
                             row_label="divergence", column_label="student data fraction λ")
    return list(paths)
