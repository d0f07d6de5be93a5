"""The capacity-gap view: student accuracy for every teacher × student pair, gain over scratch.

The numbers come from :func:`kdlab.study.capacity.capacity_table`; this file lays them out (one
table per method block: rows = teachers by size, columns = students by size) and draws the
heatmap and the accuracy-against-teacher-size lines. ``kdlab compare EXPERIMENT --capacity`` is
``kdlab compare EXPERIMENT --view capacity-gap``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kdlab.errors import KdlabError
from kdlab.report.table import Table, render
from kdlab.study.compare import MISSING, format_difference
from kdlab.study.views.base import Options, Selection, View, ViewFigure, register_view

if TYPE_CHECKING:
    from kdlab.store import RunRecord
    from kdlab.study.capacity import CapacityTable


@dataclass(frozen=True)
class CapacityResult:
    table: "CapacityTable"
    method: str | None  # the block the figures draw (None: kd when present, else the first)


@register_view
class CapacityGapView(View):
    """Capacity gap: student accuracy per teacher × student, paired gain over scratch, teacher size."""

    name = "capacity_gap"

    def applies(self, runs: Sequence["RunRecord"]) -> bool:
        from kdlab.study.teacher_runs import canonical

        teachers = {canonical(r.config.get("teacher")) for r in runs if r.config.get("teacher")}
        students = {canonical(r.config.get("student")) for r in runs}
        return bool(teachers) and (len(teachers) > 1 or len(students) > 1)

    def build(self, selection: Selection, options: Options) -> CapacityResult:
        from kdlab.study.capacity import capacity_table

        table = capacity_table(selection.store, selection.experiment(self.name), metric=options.metric)
        if options.method is not None:
            pick_method(table, options.method)  # an unknown --method fails before anything is drawn
        return CapacityResult(table, options.method)

    def title(self, result: CapacityResult) -> str:
        return capacity_title(result.table)

    def tables(self, result: CapacityResult) -> list[Table]:
        return capacity_tables(result.table)

    def figures(self, result: CapacityResult, out_dir: Path) -> list[ViewFigure]:
        paths = plot_capacity(result.table, out_dir, method=result.method)
        metric = result.table.metric
        return [ViewFigure(tuple(p for p in paths if "heatmap" in p.name),
                           f"Capacity gap: student {metric} per teacher × student, Δ = paired gain over scratch"),
                ViewFigure(tuple(p for p in paths if "lines" in p.name), f"Student {metric} against teacher size")]


def _params(value: float | None) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{int(round(value)):,}"


def capacity_title(table: "CapacityTable") -> str:
    percent = f"{table.confidence * 100:g}%"
    return f"capacity gap of {table.experiment}: student {table.metric}, mean ± {percent} CI over seeds"


def capacity_tables(table: "CapacityTable", *, digits: int = 4) -> list[Table]:
    """One table per method block: rows = teachers (by size), first the teacher's own metric and
    params, then one column per student (by size) with ``mean ± ci (Δ gain ± ci)``; last a
    scratch row. The last table carries the notes explaining the numbers."""
    from kdlab.study.stats import format_mean_ci

    percent = f"{table.confidence * 100:g}%"
    max_n = max((len(cell.seeds) for cell in table.cells.values()), default=0)
    max_n = max([max_n, *(s.n for s in table.scratch.values())])
    out = []
    for method in table.methods:
        teachers = table.teachers_of(method)
        students = table.students_of(method)
        headers = ["teacher", f"teacher {table.metric}", "teacher params"]
        headers += [f"{s.name} ({_params(s.params)} params)" for s in students]
        numeric = [False, True, True] + [True] * len(students)
        body = []
        for teacher in teachers:
            row = [teacher.name, MISSING if teacher.accuracy is None else f"{teacher.accuracy:.{digits}f}",
                   _params(teacher.params)]
            for student in students:
                cell = table.cells.get((method, teacher.name, student.name))
                if cell is None:
                    row.append(MISSING)
                    continue
                text = format_mean_ci(cell.summary, digits=digits)
                if cell.summary.n != max_n:
                    text += f" (n={cell.summary.n})"
                gain = MISSING if cell.gain is None else format_difference(cell.gain, digits)[0]
                row.append(f"{text} (Δ {gain})")
            body.append(row)
        scratch_row = ["scratch (no teacher)", MISSING, MISSING]
        for student in students:
            base = table.scratch.get((method, student.name))
            text = MISSING if base is None else format_mean_ci(base, digits=digits)
            scratch_row.append(text if base is None or base.n == max_n else f"{text} (n={base.n})")
        body.append(scratch_row)
        out.append(Table(headers, body, numeric=numeric, caption=f"method {method}"))
    notes = [f"cells: mean ± {percent} Student-t CI half-width over seeds; (n=k): k seeds; -: no run",
             "Δ: mean same-seed difference (method − scratch) for the same student ± CI; (n=1): one paired seed, "
             "no CI",
             f"teacher {table.metric} and params: the teacher's own recipe run (-: not found); "
             "scratch: per seed, the mean of that seed's scratch runs over the grid's teachers",
             *(f"note: {note}" for note in table.notes)]
    if out:
        out[-1] = Table(out[-1].columns, out[-1].rows, numeric=out[-1].numeric, caption=out[-1].caption, notes=notes)
    else:
        out = [Table(["teacher"], [], notes=notes)]
    return out


def render_capacity(table: "CapacityTable", *, fmt: str = "text", digits: int = 4) -> str:
    """The capacity tables as text or Markdown (see :func:`capacity_tables`)."""
    return render(capacity_tables(table, digits=digits), fmt=fmt, title=capacity_title(table))


def pick_method(table: CapacityTable, method: str | None = None) -> str:
    """``method`` if it is a block of ``table``; by default ``kd`` when present, else the first block."""
    if method is None:
        if not table.methods:
            raise KdlabError(f"experiment {table.experiment!r} has no method block to plot")
        return "kd" if "kd" in table.methods else table.methods[0]
    if method not in table.methods:
        raise KdlabError(f"--method {method!r} is not a method of experiment {table.experiment!r}; "
                         f"methods: {', '.join(table.methods)}")
    return method


def plot_capacity(table: CapacityTable, out_dir: str | Path, *, method: str | None = None) -> list[Path]:
    """Write ``capacity_gap_heatmap.{png,svg}`` and ``capacity_gap_lines.{png,svg}`` to ``out_dir``."""
    from kdlab.report.plots import capacity_heatmap, capacity_lines

    method = pick_method(table, method)
    out_dir = Path(out_dir)
    teachers = table.teachers_of(method)
    students = table.students_of(method)
    if not teachers or not students:
        raise KdlabError(f"method {method!r} of experiment {table.experiment!r} has no teacher × student cell to plot")
    nan = math.nan

    def cell(teacher, student):
        return table.cells.get((method, teacher.name, student.name))

    means = [[cell(t, s).summary.mean if cell(t, s) else nan for s in students] for t in teachers]
    half = [[cell(t, s).summary.half_width if cell(t, s) else nan for s in students] for t in teachers]
    deltas = [[cell(t, s).gain.mean if cell(t, s) and cell(t, s).gain else nan for s in students] for t in teachers]
    baseline = [table.scratch[(method, s.name)].mean if (method, s.name) in table.scratch else nan for s in students]
    teacher_labels = [t.name if t.params is None else f"{t.name}\n({_params(t.params)} params)" for t in teachers]
    student_labels = [s.name if s.params is None else f"{s.name}\n({_params(s.params)} params)" for s in students]
    title = f"{table.experiment}: {method}, student {table.metric}"
    paths = list(capacity_heatmap(teacher_labels, student_labels, means, out_dir / "capacity_gap_heatmap",
                                  deltas=deltas, baseline=baseline, metric=table.metric, title=title))
    sized = [i for i, t in enumerate(teachers) if t.params is not None and t.params > 0]
    if not sized:
        raise KdlabError(f"no teacher of {table.experiment!r} has a known parameter count (a recipe run in the "
                         "store); the lines plot needs teacher sizes")
    series = {s.name: ([means[i][j] for i in sized], [half[i][j] for i in sized]) for j, s in enumerate(students)}
    paths += capacity_lines([teachers[i].params for i in sized], series, out_dir / "capacity_gap_lines",
                            baselines={s.name: baseline[j] for j, s in enumerate(students)},
                            teacher_labels=[teachers[i].name for i in sized],
                            joined=[not teachers[i].variant for i in sized],
                            metric=table.metric, confidence=table.confidence, title=title)
    return paths
