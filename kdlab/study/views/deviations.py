"""The deviation view: does the distilled student exaggerate its teacher's confidence? (Nagarajan et al. 2023)

For the first configuration of the experiment that has a teacher, its first seed's saved student
and teacher are evaluated on the test split (:func:`kdlab.study.deviations.compute_deviations`):
a table of the OLS slope of φ_student on φ_teacher and a scatter. It evaluates saved models, so
``kdlab report --no-eval`` skips it; sequence runs are refused with a one-line reason.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kdlab.errors import KdlabError
from kdlab.report.table import Table
from kdlab.study.views.base import Options, Selection, View, ViewFigure, register_view

if TYPE_CHECKING:
    from kdlab.store import RunRecord

SPLITS = ("test",)


def _distilled(runs: Sequence["RunRecord"]) -> list["RunRecord"]:
    return [r for r in runs if r.status == "finished" and r.config.get("teacher")]


@register_view
class DeviationView(View):
    """Deviations: slope of the student's confidence on its teacher's, per sample, of one distilled run."""

    name = "deviations"
    evaluates = True

    def applies(self, runs: Sequence["RunRecord"]) -> bool:
        return bool(_distilled(runs))

    def build(self, selection: Selection, options: Options) -> tuple[dict, dict]:
        from kdlab.study.compare import compare_table
        from kdlab.study.deviations import compute_deviations

        if not options.evaluate:
            raise KdlabError("the deviations view evaluates the saved models; it is skipped with --no-eval")
        distilled = _distilled(selection.runs)
        if not distilled:
            raise KdlabError("no finished run with a teacher: the deviation view compares a student with its teacher")
        first = compare_table(distilled, metrics=()).rows[0].run_ids[0]  # first configuration, lowest seed
        return compute_deviations(selection.store, first, splits=SPLITS)

    def tables(self, result: tuple[dict, dict]) -> list[Table]:
        summary = result[0]
        rows = []
        for split, s in summary["splits"].items():
            fit = s["fit"]
            ci = f"[{fit['low']:.3f}, {fit['high']:.3f}]" if math.isfinite(fit["half_width"]) else "—"
            rows.append([split, str(s["n"]), f"{fit['slope']:.3f}", ci,
                         s["verdict"], f"{s['fraction_student_less_confident']:.3f}", f"{s['agreement']:.3f}"])
        conf = round(100 * summary["confidence"])
        return [Table(["split", "n", "slope", f"{conf}% CI", "verdict", "student less confident", "agreement"],
                      rows, numeric=[False, True, True, True, False, True, True],
                      caption=f"run {summary['run_id']} [{summary['label']}] against teacher {summary['teacher']}",
                      notes=["slope of φ_student on φ_teacher (φ(p) = log(p/(1−p)) of each model's probability of "
                             "the teacher's class), by OLS; slope > 1: the student exaggerates the teacher's "
                             "confidence"])]

    def figures(self, result: tuple[dict, dict], out_dir: Path) -> list[ViewFigure]:
        from kdlab.study.deviations import PLOT_FILE, draw_deviations

        summary, points = result
        path = draw_deviations(summary, points, Path(out_dir) / "deviations" / PLOT_FILE)
        return [ViewFigure((path,), f"Deviation scatter of run {summary['run_id']} [{summary['label']}] on the "
                                    "test split: does the student exaggerate its teacher's confidence?")]
