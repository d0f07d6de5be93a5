"""Comparison tables: one row per configuration, mean ± CI over its seeds.

Finished runs are grouped by (experiment, group_key): runs that differ only by
seed share a group_key. A row is labelled with the run label minus its
trailing ``seed=N``. A metric missing from some seeds of a row is summarised
over the seeds that have it and marked ``(n=k)``; missing from all, it is ``-``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from kdlab.errors import KdlabError
from kdlab.store.database import RunRecord
from kdlab.study.stats import MeanCI, _check_confidence, format_mean_ci, mean_ci, paired_difference

DEFAULT_METRICS = ("test/acc", "test/nll", "test/ece", "test/agreement")
FORMATS = ("text", "markdown")
MISSING = "-"
# Shown when the label is nothing but the seed (an experiment with one grid point).
BASE_LABEL = "(base)"

_SEED_SUFFIX = re.compile(r"(?:^|\s+)seed=[-+]?\d+\s*$")


def strip_seed(label: str) -> str:
    """``"method.name=kd seed=1"`` → ``"method.name=kd"``; ``"seed=3"`` → ``"(base)"``."""
    stripped = _SEED_SUFFIX.sub("", label).strip()
    return stripped or BASE_LABEL


@dataclass(frozen=True)
class CompareRow:
    """One configuration: its seeds' runs and a summary per metric (None: absent)."""

    experiment: str
    label: str
    group_key: str
    run_ids: tuple[str, ...]
    summaries: dict[str, MeanCI | None]

    @property
    def n(self) -> int:
        return len(self.run_ids)


@dataclass(frozen=True)
class Table:
    """Rows sorted by experiment then label; ``metrics`` are the summarised keys.

    With a ``baseline`` row label, ``deltas`` maps each other row's label to the
    paired (same-seed) difference of the first metric against the baseline.
    """

    metrics: tuple[str, ...]
    confidence: float
    rows: tuple[CompareRow, ...]
    baseline: str | None = None
    deltas: dict | None = None


def compare_table(
    records: Iterable[RunRecord],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    confidence: float = 0.95,
    baseline: str | None = None,
) -> Table:
    """Group the finished runs of ``records`` by configuration and summarise ``metrics``."""
    confidence = _check_confidence(confidence)
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        if record.status == "finished":
            groups.setdefault((record.experiment, record.group_key), []).append(record)
    rows = []
    for (experiment, group_key), members in groups.items():
        # Seed order makes the row's label and run order independent of input order.
        members.sort(key=lambda run: (run.seed is None, run.seed if run.seed is not None else 0, run.run_id))
        summaries: dict[str, MeanCI | None] = {}
        for metric in metrics:
            values = [run.final[metric] for run in members if metric in run.final]
            summaries[metric] = mean_ci(values, confidence=confidence) if values else None
        rows.append(
            CompareRow(
                experiment=experiment,
                label=strip_seed(members[0].label),
                group_key=group_key,
                run_ids=tuple(run.run_id for run in members),
                summaries=summaries,
            )
        )
    # sorted() is stable: equal (experiment, label) keep their first-seen order.
    rows.sort(key=lambda row: (row.experiment, row.label))
    deltas = None
    if baseline is not None:
        deltas = _paired_deltas(rows, groups, metrics[0], baseline, confidence)
    return Table(metrics=tuple(metrics), confidence=float(confidence), rows=tuple(rows), baseline=baseline,
                 deltas=deltas)


def _paired_deltas(rows, groups, metric: str, baseline: str, confidence: float) -> dict:
    """Row label -> PairedDifference of ``metric`` (row − baseline) over the seeds both have."""
    base_rows = [row for row in rows if row.label == baseline]
    if not base_rows:
        labels = ", ".join(sorted({row.label for row in rows}))
        raise KdlabError(f"--baseline {baseline!r} is not a row of this table; rows: {labels}")
    base = base_rows[0]
    base_by_seed = {run.seed: run.final.get(metric) for run in groups[(base.experiment, base.group_key)]}
    out = {}
    for row in rows:
        if row is base:
            continue
        mine = {run.seed: run.final.get(metric) for run in groups[(row.experiment, row.group_key)]}
        seeds = sorted(seed for seed in mine if seed in base_by_seed
                       and mine[seed] is not None and base_by_seed[seed] is not None)
        if seeds:
            out[row.label] = paired_difference([mine[s] for s in seeds], [base_by_seed[s] for s in seeds],
                                               confidence=confidence)
    return out


def _cell(row: CompareRow, metric: str, digits: int) -> str:
    summary = row.summaries.get(metric)
    if summary is None:
        return MISSING
    text = format_mean_ci(summary, digits=digits)
    return text if summary.n == row.n else f"{text} (n={summary.n})"


def _headers_and_cells(table: Table, digits: int) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, body cells and per-column right-alignment flags."""
    show_experiment = len({row.experiment for row in table.rows}) > 1
    headers = (["experiment"] if show_experiment else []) + ["config", "n", *table.metrics]
    numeric = ([False] if show_experiment else []) + [False, True] + [True] * len(table.metrics)
    body = [
        ([row.experiment] if show_experiment else [])
        + [row.label, str(row.n)]
        + [_cell(row, metric, digits) for metric in table.metrics]
        for row in table.rows
    ]
    if table.deltas is not None:
        headers += [f"Δ {table.metrics[0]} vs {table.baseline} (paired)", "p"]
        numeric += [True, True]
        for row, cells in zip(table.rows, body):
            delta = table.deltas.get(row.label)
            if delta is None:
                cells += ["(baseline)" if row.label == table.baseline else MISSING, ""]
            else:
                cells += [f"{delta.mean:+.{digits}f} ± {delta.half_width:.{digits}f}", f"{delta.p_value:.3g}"]
    return headers, body, numeric


def _footnote(table: Table) -> str:
    percent = f"{table.confidence * 100:g}%"
    note = f"mean ± {percent} Student-t CI half-width over n seeds; (n=k): metric present in k seeds; -: absent"
    if table.deltas is not None:
        note += "; Δ: mean same-seed difference ± CI, p: two-sided paired t-test"
    return note


def _render_text(headers: list[str], body: list[list[str]], numeric: list[bool]) -> list[str]:
    widths = [max(len(line[column]) for line in [headers, *body]) for column in range(len(headers))]

    def format_line(cells: list[str]) -> str:
        parts = [
            cell.rjust(width) if right else cell.ljust(width) for cell, width, right in zip(cells, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    return [format_line(headers), "  ".join("-" * width for width in widths), *map(format_line, body)]


def _render_markdown(headers: list[str], body: list[list[str]], numeric: list[bool]) -> list[str]:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    def format_line(cells: list[str]) -> str:
        return "| " + " | ".join(escape(cell) for cell in cells) + " |"

    rule = "|" + "|".join("---:" if right else "---" for right in numeric) + "|"
    return [format_line(headers), rule, *map(format_line, body)]


def render_table(table: Table, *, fmt: str = "text", digits: int = 4) -> str:
    """Render as an aligned monospace table (``"text"``) or a GitHub table (``"markdown"``).

    Ends with a one-line footnote explaining the ± numbers. An ``experiment``
    column appears only when rows come from more than one experiment.
    """
    if fmt not in FORMATS:
        raise KdlabError(f"unknown table format {fmt!r}; formats are: {', '.join(FORMATS)}")
    headers, body, numeric = _headers_and_cells(table, digits)
    if fmt == "text":
        lines = _render_text(headers, body, numeric)
    else:
        lines = _render_markdown(headers, body, numeric)
    if not table.rows:
        lines.append("(no finished runs)")
    lines += ["", _footnote(table)]
    return "\n".join(lines) + "\n"
