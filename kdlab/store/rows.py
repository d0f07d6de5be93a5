"""Rows of the results database as Python values, and the checks that keep a damaged row from crashing a reader.

A hand-edited or damaged row (a ``config_json`` that is not JSON, a text-valued metric, a field of the
wrong type, a ``run_dir`` pointing elsewhere) raises :class:`DamagedRow`; readers that list runs name
it once on stderr and leave it out, a reader asked for that run by name says why it cannot be read.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from kdlab.store.schema import STATUSES


@dataclass(frozen=True)
class RunRecord:
    """One run as stored: identity, resolved config, status and final metrics.

    ``status`` is as read: a 'running' row whose process is gone reads 'interrupted' (with the
    reason in ``error``) whether or not a writer has marked it yet.
    """

    run_id: str
    experiment: str
    role: str
    label: str
    seed: int | None
    group_key: str
    config: dict[str, Any]
    status: str
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    run_dir: Path | None = None
    final: dict[str, float] = field(default_factory=dict)
    pid: int | None = None
    host: str | None = None
    heartbeat_at: float | None = None
    method: str | None = None  # the method's name (schema 2; filled from the config for migrated rows)
    point: dict[str, Any] | None = None  # the grid point the run came from (schema 2; None before)

    def wall_seconds(self, now: float) -> float | None:
        """Start to end; to ``now`` while running; to the last heartbeat when its process died; None if unknown."""
        end = self.finished_at
        if end is None:
            end = now if self.status == "running" else self.heartbeat_at
        if self.started_at is None or end is None or end < self.started_at:
            return None
        return end - self.started_at


class DamagedRow(Exception):
    """A row a reader cannot use (not JSON, a text metric, a wrong type); the message says which part."""


_WARNED: set[tuple[str, str]] = set()


def warn_skipped(database: Path, what: str) -> None:
    """Name a skipped row once per process on stderr (readers skip a damaged row rather than die)."""
    if (str(database), what) in _WARNED:
        return
    _WARNED.add((str(database), what))
    print(f"kdlab: warning: {database}: {what}; skipped (`kdlab doctor` lists damaged rows)", file=sys.stderr)


def metric_rows(metrics: Mapping[str, Any], *, where: str) -> list[tuple[str, float | None]]:
    """(key, value) pairs ready for SQLite; NaN becomes NULL (which SQLite cannot tell from a missing value,
    but a metric row always exists, so NULL means NaN)."""
    rows = []
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{where}: metric names must be non-empty strings, got {key!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{where}: metric {key!r} has value {value!r}, which is not a number") from None
        rows.append((key, None if math.isnan(number) else number))
    return rows


def metric_value(value: Any) -> float:
    """A stored metric as a float (NULL is NaN); DamagedRow for text or bytes (a hand-edited row)."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise DamagedRow(f"value {value!r} is not a number")


def check_run_id(run_id: str) -> None:
    # The id names a folder under runs/, so it must not be able to escape it.
    if (
        not isinstance(run_id, str)
        or not run_id
        or len(run_id) > 200
        or run_id.startswith(".")
        or any(character in run_id for character in "/\\\0:")
        or not run_id.isprintable()
    ):
        raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '-', '_', '.', '=' (no leading '.')")


def decode_run(row: Mapping[str, Any], final: dict[str, float], *, runs_folder: Path,
               abandoned: Callable[[Mapping[str, Any]], str | None]) -> RunRecord:
    """A ``runs`` row as a RunRecord; ``abandoned(fields)`` says why a 'running' row's process is gone, or None.

    DamagedRow if a field is unusable.
    """
    fields = {key: row[key] for key in row.keys()}
    fields.setdefault("heartbeat_at", None)  # a database from before heartbeats, opened read-only
    fields.setdefault("method", None)  # schema 1, opened read-only (a writer migrates it)
    fields.setdefault("point_json", None)
    for key in ("run_id", "experiment", "role", "label", "group_key", "status", "run_dir"):
        if not isinstance(fields[key], str):
            raise DamagedRow(f"{key} is {fields[key]!r}, not text")
    for key, kinds in (("seed", int), ("pid", int), ("pid_start", int), ("host", str), ("error", str),
                       ("started_at", (int, float)), ("finished_at", (int, float)),
                       ("heartbeat_at", (int, float))):
        value = fields[key]
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)
                                  or (isinstance(value, float) and not math.isfinite(value))):
            raise DamagedRow(f"{key} is {value!r}")
    try:
        check_run_id(fields["run_id"])
    except ValueError:
        raise DamagedRow(f"run_id {fields['run_id']!r} is not a valid run id") from None
    if fields["status"] not in STATUSES:
        raise DamagedRow(f"status {fields['status']!r} is not one of {', '.join(STATUSES)}")
    if fields["run_dir"] != f"runs/{fields['run_id']}":  # claim writes exactly this; never a path elsewhere
        raise DamagedRow(f"run_dir {fields['run_dir']!r} is not runs/{fields['run_id']}")
    try:
        config = json.loads(fields["config_json"])
    except (TypeError, ValueError, RecursionError) as error:
        raise DamagedRow(f"config_json is not valid JSON ({str(error)[:80]})") from None
    if not isinstance(config, dict):
        raise DamagedRow(f"config_json holds a {type(config).__name__}, not a mapping")
    point = None
    if fields["point_json"] is not None:
        try:
            point = json.loads(fields["point_json"])
        except (TypeError, ValueError, RecursionError):
            raise DamagedRow("point_json is not valid JSON") from None
        if not isinstance(point, dict):
            raise DamagedRow(f"point_json holds a {type(point).__name__}, not a mapping")
    if fields["method"] is not None and not isinstance(fields["method"], str):
        raise DamagedRow(f"method is {fields['method']!r}, not text")
    status, error = fields["status"], fields["error"]
    if status == "running":  # a dead holder reads 'interrupted' at once, not after the next `kdlab runs`
        why = abandoned(fields)
        if why is not None:
            status, error = "interrupted", error or why
    return RunRecord(
        run_id=fields["run_id"],
        experiment=fields["experiment"],
        role=fields["role"],
        label=fields["label"],
        seed=fields["seed"],
        group_key=fields["group_key"],
        config=config,
        status=status,
        error=error,
        started_at=fields["started_at"],
        finished_at=fields["finished_at"],
        run_dir=runs_folder / fields["run_id"],
        final=final,
        pid=fields["pid"],
        host=fields["host"],
        heartbeat_at=fields["heartbeat_at"],
        method=fields["method"],
        point=point,
    )
