"""Comparison tables: one row per configuration, mean ± CI over its seeds.

Finished runs are grouped by (experiment, configuration): the stored
``group_key`` (the hash of the run's resolved config without its seed), or, for
a row without one, that hash recomputed from the stored config. Labels are for
display only: a row is labelled with its first run's label minus that run's own
``seed=N`` token. A metric missing from some seeds of a row is summarised over
the seeds that have it and marked ``(n=k)``; missing from all, it is ``-``.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from kdlab.errors import KdlabError
from kdlab.report.table import FORMATS, Table, check_format, render
from kdlab.store.database import RunRecord
from kdlab.study.stats import MeanCI, PairedDifference, _check_confidence, format_mean_ci, mean_ci, paired_difference

__all__ = ["DEFAULT_METRICS", "FORMATS", "CompareRow", "CompareTable", "as_table", "compare_table",
           "config_key", "format_difference", "render_table", "strip_seed"]

DEFAULT_METRICS = ("test/acc", "test/nll", "test/ece", "test/agreement")
MISSING = "-"
NO_VALUE = "—"  # a statistic that one value cannot give (a CI, a p-value)
ONE_PAIR_NOTE = "(n=1), p —: one paired seed gives no CI and no t-test; run more seeds"
# Shown when the label is nothing but the seed (an experiment with one grid point).
BASE_LABEL = "(base)"


def _seed_token(token: str) -> bool:
    name, _, value = token.partition("=")
    return name == "seed" and value.lstrip("+-").isdigit()


def strip_seed(label: str, seed: int | None = None) -> str:
    """``"method.name=kd seed=1"`` → ``"method.name=kd"``; ``"seed=3"`` → ``"(base)"``.

    The label is display text (``RunSpec.label``: grid point, then ``seed=N``). With ``seed`` the exact
    token ``seed={seed}`` is removed; without, a trailing ``seed=<integer>`` token.
    """
    head, _, last = label.rstrip().rpartition(" ")
    if last == f"seed={seed}" if seed is not None else _seed_token(last):
        return head.strip() or BASE_LABEL
    return label.strip() or BASE_LABEL


def config_key(record: RunRecord) -> str:
    """The run's configuration without its seed: the stored ``group_key``, else recomputed from its config."""
    if record.group_key:
        return record.group_key
    from kdlab.runs import content_hash

    config = {k: v for k, v in record.config.items() if k != "seed"}
    return content_hash(config)[:16]


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
class CompareTable:
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
) -> CompareTable:
    """Group the finished runs of ``records`` by configuration and summarise ``metrics``."""
    confidence = _check_confidence(confidence)
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        if record.status == "finished":
            groups.setdefault((record.experiment, config_key(record)), []).append(record)
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
                label=strip_seed(members[0].label, members[0].seed),
                group_key=group_key,
                run_ids=tuple(run.run_id for run in members),
                summaries=summaries,
            )
        )
    # sorted() is stable: equal (experiment, label) keep their first-seen order.
    rows.sort(key=lambda row: (row.experiment, row.label))
    rows = _distinct_labels(rows)
    deltas = None
    if baseline is not None:
        deltas = _paired_deltas(rows, groups, metrics[0], baseline, confidence)
    return CompareTable(metrics=tuple(metrics), confidence=float(confidence), rows=tuple(rows), baseline=baseline,
                 deltas=deltas)


def _distinct_labels(rows: list[CompareRow]) -> list[CompareRow]:
    """Rows of one experiment that share a label (the same grid point run under two configurations, e.g.
    before and after a method's default changed) get their configuration's key appended, so no row and no
    --baseline is ambiguous."""
    counts = Counter((row.experiment, row.label) for row in rows)
    return [dataclasses.replace(row, label=f"{row.label} [config {row.group_key[:8]}]")
            if counts[(row.experiment, row.label)] > 1 else row for row in rows]


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


def format_difference(delta: PairedDifference, digits: int) -> tuple[str, str]:
    """``("+0.0300 ± 0.0248", "0.0412")``: a paired difference and its p-value as table cells.

    With one paired seed there is no spread, so no CI and no t-test: ``("+0.0300 (n=1)", "—")``
    rather than ``± nan`` and ``p nan`` (see :data:`ONE_PAIR_NOTE`).
    """
    mean = f"{delta.mean:+.{digits}f}"
    if float(mean) == 0.0:
        mean = "+" + mean[1:]  # no "-0.0000"
    if delta.n < 2 or math.isnan(delta.half_width):
        return f"{mean} (n={delta.n})", NO_VALUE
    p = NO_VALUE if math.isnan(delta.p_value) else f"{delta.p_value:.3g}"
    return f"{mean} ± {delta.half_width:.{digits}f}", p


def _cell(row: CompareRow, metric: str, digits: int) -> str:
    summary = row.summaries.get(metric)
    if summary is None:
        return MISSING
    text = format_mean_ci(summary, digits=digits)
    return text if summary.n == row.n else f"{text} (n={summary.n})"


def as_table(table: CompareTable, *, digits: int = 4) -> Table:
    """The comparison as a neutral :class:`~kdlab.report.table.Table` (one row per configuration)."""
    show_experiment = len({row.experiment for row in table.rows}) > 1
    headers = (["experiment"] if show_experiment else []) + ["config", "n", *table.metrics]
    numeric = ([False] if show_experiment else []) + [False, True] + [True] * len(table.metrics)
    body = [
        ([row.experiment] if show_experiment else [])
        + [row.label, str(row.n)]
        + [_cell(row, metric, digits) for metric in table.metrics]
        for row in table.rows
    ]
    one_pair = False
    if table.deltas is not None:
        headers += [f"Δ {table.metrics[0]} vs {table.baseline} (paired)", "p"]
        numeric += [True, True]
        for row, cells in zip(table.rows, body):
            delta = table.deltas.get(row.label)
            if delta is None:
                cells += ["(baseline)" if row.label == table.baseline else MISSING, ""]
            else:
                cells += list(format_difference(delta, digits))
                one_pair = one_pair or delta.n < 2
    return Table(headers, body, numeric=numeric, notes=[_footnote(table, one_pair)], empty="(no finished runs)")


def _footnote(table: CompareTable, one_pair: bool = False) -> str:
    percent = f"{table.confidence * 100:g}%"
    note = f"mean ± {percent} Student-t CI half-width over n seeds; (n=k): metric present in k seeds; -: absent"
    if table.deltas is not None:
        note += "; Δ: mean same-seed difference ± CI, p: two-sided paired t-test"
    if one_pair:
        note += f"; {ONE_PAIR_NOTE}"
    return note


def render_table(table: CompareTable, *, fmt: str = "text", digits: int = 4) -> str:
    """Render as an aligned monospace table (``"text"``) or a GitHub table (``"markdown"``).

    Ends with a one-line footnote explaining the ± numbers. An ``experiment``
    column appears only when rows come from more than one experiment.
    """
    return render(as_table(table, digits=digits), fmt=check_format(fmt))
