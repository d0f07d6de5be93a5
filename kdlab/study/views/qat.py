"""The QAT distillation table of a study: weight precision × distillation signals (Kim et al. 2022).

Reads only the store. Each finished run with a quantized student (``student.quant``)
sits in the row (weight bits, signals) of its resolved config; signals name the
``qat_kd`` terms with a nonzero weight (``logits``, ``ce``, ``hidden``, ``map``,
``output``). Columns: the metric as mean ± 95% t-interval over seeds, the gap to
the full-precision teacher (teacher − student, the teacher being one run), and the
paired difference (same seeds) against the baseline row (TernaryBERT's
logits + hidden at the same precision, when present).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kdlab.errors import KdlabError
from kdlab.report.table import Table, render
from kdlab.study.compare import format_difference
from kdlab.study.views.base import Options, Selection, View, ViewFigure, register_view

if TYPE_CHECKING:
    from kdlab.store import RunRecord, Store
    from kdlab.study.stats import MeanCI, PairedDifference

_SIGNALS = (("logit_weight", "logits"), ("ce_weight", "ce"), ("hidden_weight", "hidden"), ("map_weight", "map"),
            ("output_weight", "output"))
BASELINE_SIGNALS = "logits+hidden"  # TernaryBERT's recipe
_BITS_ORDER = {"ternary": 0, 2: 1, 4: 2, 8: 3}


@dataclass(frozen=True)
class QatRow:
    bits: str
    signals: str
    summary: "MeanCI"
    gap: "MeanCI | None"  # teacher − student
    versus_baseline: "PairedDifference | None"


@dataclass(frozen=True)
class QatTable:
    metric: str
    rows: list[QatRow]
    teacher: "MeanCI | None"


def _quantized(run: "RunRecord") -> bool:
    student = run.config.get("student")
    return isinstance(student, dict) and bool(student.get("quant"))


@register_view
class QatView(View):
    """QAT distillation: student metric per weight precision × distillation signals, gap to the teacher."""

    name = "qat"

    def applies(self, runs: Sequence["RunRecord"]) -> bool:
        return any(_quantized(r) for r in runs)

    def build(self, selection: Selection, options: Options) -> QatTable:
        return qat_table(selection.store, selection.experiment(self.name), metric=options.metric)

    def tables(self, result: QatTable) -> list[Table]:
        return [qat_rows(result)]

    def figures(self, result: QatTable, out_dir: Path) -> list[ViewFigure]:
        return [ViewFigure(tuple(plot_qat_table(result, out_dir)),
                           f"QAT distillation: {result.metric} by weight precision and distillation signals "
                           "(mean ± 95% CI), the full-precision teacher as a line")]


def signals_of(method: dict) -> str:
    if method.get("name") != "qat_kd":
        return method.get("name", "?")
    from kdlab.methods.qat_kd import QatKdHparams

    # What a resolved config leaves out is the method's default.
    defaults = {f.name: f.default for f in dataclasses.fields(QatKdHparams)}
    used = [label for key, label in _SIGNALS if float(method.get(key, defaults[key])) > 0]
    return "+".join(used) or "none"


def qat_table(store: "Store", experiment: str, *, metric: str = "test/acc") -> QatTable:
    from kdlab.quant.model import QuantSpec
    from kdlab.study.stats import mean_ci, paired_difference
    from kdlab.study.teacher_runs import teacher_metric_values

    runs = [r for r in store.runs(experiment=experiment, status="finished") if _quantized(r) and metric in r.final]
    if not runs:
        raise KdlabError(f"experiment {experiment!r} has no finished runs with a quantized student (student.quant) "
                         f"and {metric!r}; run it first (kdlab run CONFIG)")
    teacher_values = teacher_metric_values(store, runs, metric)
    teacher = mean_ci(teacher_values) if teacher_values else None
    by_row: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:
        bits = str(run.config["student"]["quant"].get("weight_bits", QuantSpec.weight_bits))
        row = by_row.setdefault((bits, signals_of(run.config.get("method", {}))), {})
        if run.seed in row:  # two configurations share a row: a table keyed by bits and signals would mix them
            raise KdlabError(f"experiment {experiment!r}: two runs with seed {run.seed} have {bits} weights and "
                             f"signals {signals_of(run.config.get('method', {}))} but differ elsewhere; compare them "
                             "with `kdlab compare` (the qat table keys rows by weight precision and signals only)")
        row[run.seed] = run.final[metric]
    order = sorted(by_row, key=lambda k: (_BITS_ORDER.get(int(k[0]) if k[0].isdigit() else k[0], 9),
                                          k[1].count("+"), k[1]))
    rows = []
    for bits, signals in order:
        values = by_row[(bits, signals)]
        baseline = by_row.get((bits, BASELINE_SIGNALS))
        versus = None
        if baseline is not None and signals != BASELINE_SIGNALS:
            seeds = sorted(set(values) & set(baseline))
            if len(seeds) >= 2:
                versus = paired_difference([values[s] for s in seeds], [baseline[s] for s in seeds])
        gap = mean_ci([teacher.mean - v for v in values.values()]) if teacher is not None else None
        rows.append(QatRow(bits, signals, mean_ci(list(values.values())), gap, versus))
    return QatTable(metric, rows, teacher)


def qat_rows(table: QatTable, *, digits: int = 3) -> Table:
    """One row per (weights, signals), then the teacher's row."""
    from kdlab.study.stats import format_mean_ci

    headers = ["weights", "distillation signals", "n", table.metric, "gap to teacher",
               f"vs {BASELINE_SIGNALS} (paired)", "p"]
    rows = []
    for row in table.rows:
        versus = row.versus_baseline
        rows.append([row.bits, row.signals, str(row.summary.n), format_mean_ci(row.summary, digits=digits),
                     format_mean_ci(row.gap, digits=digits) if row.gap is not None else "-",
                     *(format_difference(versus, digits) if versus is not None else ("-", "-"))])
    if table.teacher is not None:
        rows.append(["fp32", "teacher", str(table.teacher.n), format_mean_ci(table.teacher, digits=digits), "", "", ""])
    return Table(headers, rows, numeric=[False, False, True, True, True, True, True],
                 caption=f"{table.metric}: mean ± 95% CI over seeds; gap = teacher − student",
                 notes=[f"vs {BASELINE_SIGNALS}: paired same-seed difference ± 95% CI and its p-value, at the same "
                        f"precision (-: fewer than 2 shared seeds or no {BASELINE_SIGNALS} row)"])


def render_qat_table(table: QatTable, *, fmt: str = "text", digits: int = 3) -> str:
    return render(qat_rows(table, digits=digits), fmt=fmt)


def plot_qat_table(table: QatTable, out_dir: str | Path) -> list[Path]:
    """Bars of the metric per (weights, signals) with 95% CI whiskers and the teacher as a line (PNG + SVG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [f"{r.bits}\n{r.signals.replace('+', '+ ')}" for r in table.rows]
    means = [r.summary.mean for r in table.rows]
    errors = [0.0 if r.summary.half_width != r.summary.half_width else r.summary.half_width for r in table.rows]
    figure = Figure(figsize=(max(6.0, 1.1 * len(labels)), 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(labels)), means, yerr=errors, capsize=3, color="#4c72b0")
    if table.teacher is not None:
        axes.axhline(table.teacher.mean, color="#c44e52", linestyle="--", label="full-precision teacher")
        axes.legend(loc="lower right")
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, fontsize=7)
    axes.set_ylabel(table.metric)
    low = min(m - e for m, e in zip(means, errors))
    top = max([m + e for m, e in zip(means, errors)] + ([table.teacher.mean] if table.teacher else []))
    axes.set_ylim(max(0.0, low - 0.05), min(1.0, top + 0.03) if top <= 1 else top * 1.05)
    axes.set_title("QAT distillation: accuracy by weight precision and signals")
    figure.tight_layout()
    paths = []
    for suffix in ("png", "svg"):
        path = out / f"qat.{suffix}"
        figure.savefig(path, dpi=120)
        paths.append(path)
    return paths
