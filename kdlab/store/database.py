"""The results store: one SQLite database plus one folder per run.

Workspace layout::

    <workspace>/kdlab.db          experiments, runs, epoch and final metrics
    <workspace>/runs/<run_id>/    a run's files (checkpoints, logs, ...)
    <workspace>/cache/            dataset caches and other re-creatable files

Concurrency: several processes (e.g. one per seed) may write the same
workspace at once. Each process opens its *own* ``Store``; a ``Store`` holds one
SQLite connection that must not cross a process boundary (SQLite forbids using
a connection after ``fork``; a ``Store`` used in a forked child raises) nor be
shared between threads. The database runs in WAL mode (readers never block the
writer) with a 30 s busy timeout, and every write is one ``BEGIN IMMEDIATE``
transaction, so read-modify-write steps such as :meth:`Store.claim` are atomic
across processes. Do not put the workspace on a network filesystem: SQLite's
locking is unreliable there.

Values: metrics are stored as SQLite REAL. ``±inf`` round-trip as REAL; NaN,
which SQLite cannot store, is written as NULL and read back as ``nan`` (a
metric row always exists, so NULL unambiguously means NaN). Timestamps are Unix
seconds (``time.time()``). Configs are stored as JSON text.

Liveness of a 'running' run: the claiming process records its pid, the pid's
start time and its host, and refreshes ``heartbeat_at`` while it trains (see
:class:`Heartbeat`). A run is *abandoned* — reclaimable by the next ``claim``,
read as 'interrupted' by every reader, and written so by
:meth:`Store.mark_dead_runs_interrupted` — when, on this host, its pid is gone
(SIGKILL, OOM kill, power loss), or, on another host (a shared workspace), its
heartbeat is older than ``heartbeat_timeout`` seconds
(``$KDLAB_HEARTBEAT_TIMEOUT``, default 300). On the same host the pid check
decides alone: a live but slow process is never robbed of its run
(:func:`kdlab.store.liveness.abandoned_reason`).

Damage: a store opened for reading (``readonly=True``: ``kdlab runs``, ``show``,
``compare``, ``report``) writes nothing and needs no write access. Any open runs
``PRAGMA quick_check``; a damaged file, a zero-length file next to runs or an
existing database missing a table is refused with one line
(:mod:`kdlab.store.schema`), and a damaged row is named and skipped by readers
that list runs (:mod:`kdlab.store.rows`).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import socket
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from kdlab.errors import KdlabError, WorkspaceError
from kdlab.store import connect, schema
from kdlab.store.liveness import (  # noqa: F401  (re-exported: tests and tune.py use them from here)
    HEARTBEAT_ENV,
    HEARTBEAT_TIMEOUT_SECONDS,
    Heartbeat,
    _own_start_ticks,
    _process_alive,
    _process_start_ticks,
    abandoned_reason,
    resolve_heartbeat_timeout as _heartbeat_timeout,
)
from kdlab.store.rows import (
    DamagedRow,
    RunRecord,
    check_run_id as _check_run_id,
    decode_run,
    metric_rows as _metric_rows,
    metric_value as _metric_value,
    warn_skipped as _warn_skipped,
)
from kdlab.store.connect import BUSY_TIMEOUT_SECONDS, DATABASE_NAME  # noqa: F401  (tune.py imports them here)
from kdlab.store.schema import SCHEMA_VERSION, STATUSES  # noqa: F401


# --- the store ------------------------------------------------------------------


class Store:
    """Experiments, runs and metrics of one workspace; see the module docstring."""

    def __init__(self, workspace: str | Path, *, heartbeat_timeout: float | None = None, readonly: bool = False,
                 check: bool = True):
        """Open (a writer: create) the workspace's database.

        ``readonly``: for commands that only read (``runs``, ``show``, ``compare``, ``report``): nothing
        is created or written, a read-only workspace can be read, and a missing one is a KdlabError.
        ``check``: run ``PRAGMA quick_check`` so a damaged file is refused before anything reads it
        (see :func:`kdlab.store.schema.quick_check` for its cost).
        """
        self.workspace = Path(workspace).expanduser().absolute()
        self.heartbeat_timeout = _heartbeat_timeout(heartbeat_timeout)
        self.runs_folder = self.workspace / "runs"
        self.cache_folder = self.workspace / "cache"
        self.database_path = self.workspace / DATABASE_NAME
        self.host = socket.gethostname()
        self.readonly = readonly
        self._pid = os.getpid()
        self._connection: sqlite3.Connection | None = None
        if readonly:
            self._connection = connect.open_readonly(self.database_path, self.workspace, check=check)
        else:
            self._connection = self._open(check)

    # -- opening --

    def _unwritable(self, reason: str) -> KdlabError:
        return KdlabError(
            f"workspace {self.workspace} is not writable: {reason}; "
            "pass --workspace DIR (or set workspace:) to a writable folder"
        )

    def _open(self, check: bool) -> sqlite3.Connection:
        try:
            for folder in (self.workspace, self.runs_folder, self.cache_folder):
                folder.mkdir(parents=True, exist_ok=True)
            # mkdir succeeds on existing read-only folders; creating a file is the real test.
            with tempfile.TemporaryFile(dir=self.workspace):
                pass
        except OSError as error:
            raise self._unwritable(error.strerror or str(error)) from None
        schema.refuse_empty_file(self.database_path, self.runs_folder)
        try:
            connection = sqlite3.connect(
                self.database_path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None
            )
        except sqlite3.Error as error:
            raise self._unwritable(str(error)) from None
        try:
            connection.row_factory = sqlite3.Row
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            self.journal_mode = connect.enable_wal(connection)
            connection.execute("PRAGMA foreign_keys = ON")
            # In WAL mode NORMAL loses no committed transaction when a process
            # crashes (only possibly the last ones on power loss) and is much faster.
            connection.execute("PRAGMA synchronous = NORMAL")
            connect.create_schema(connection, self.database_path)
            if check:
                schema.quick_check(connection, self.database_path)
        except sqlite3.OperationalError as error:
            connection.close()
            message = str(error)
            if "readonly" in message or "unable to open" in message or "disk I/O" in message:
                raise self._unwritable(message) from None
            raise KdlabError(
                f"{self.database_path}: cannot open the results database ({message}); "
                "close other kdlab processes or pass --workspace DIR to another folder"
            ) from None
        except sqlite3.DatabaseError as error:
            connection.close()
            if "not a database" not in str(error):  # garbage in a page rather than in the header
                raise schema.damaged(self.database_path, str(error)) from None
            raise KdlabError(
                f"{self.database_path}: not a kdlab results database ({error}); "
                "move the file away or pass --workspace DIR to another folder"
            ) from None
        except BaseException:
            connection.close()
            raise
        return connection

    # -- connection and transactions --

    _transaction = staticmethod(connect.transaction)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("this Store is closed; open a new Store(workspace)")
        if os.getpid() != self._pid:
            raise RuntimeError(
                "a Store cannot be used after fork; open a new Store(workspace) in each process"
            )
        return self._connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise RuntimeError(f"this Store of {self.workspace} was opened read-only; open Store(workspace) to write")
        try:
            with self._transaction(self._db, "IMMEDIATE") as db:
                yield db
        except sqlite3.DatabaseError as error:
            if schema.is_damage(error):  # a page went bad after the open-time check (or check=False)
                raise schema.damaged(self.database_path, str(error)) from None
            if not isinstance(error, sqlite3.OperationalError):
                raise
            # SQLite reports a full disk (or a workspace made read-only after opening) only when a write
            # fails; the transaction was rolled back, so the database is as it was before this write.
            message = str(error)
            if "full" in message or "readonly" in message or "disk I/O" in message:
                raise WorkspaceError(
                    f"{self.database_path}: cannot write ({message}); free disk space or make the folder "
                    "writable, or pass --workspace DIR to another folder; stored runs are kept"
                ) from None
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # A deferred transaction gives one consistent snapshot across queries.
        try:
            with self._transaction(self._db, "DEFERRED") as db:
                yield db
        except sqlite3.DatabaseError as error:
            if schema.is_damage(error):
                raise schema.damaged(self.database_path, str(error)) from None
            raise

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._connection is not None and os.getpid() == self._pid:
            self._connection.close()
        self._connection = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __getstate__(self) -> None:
        raise TypeError("a Store cannot be pickled; open a new Store(workspace) in each process")

    def __repr__(self) -> str:
        return f"Store({str(self.workspace)!r})"

    # -- writes --

    def ensure_experiment(self, name: str, config: Mapping[str, Any]) -> bool:
        """Record experiment ``name`` with its config as given; True if it was new.

        An existing experiment keeps its ``created_at`` and gets the new config
        (the latest definition wins; runs keep their own resolved configs).
        """
        config_json = json.dumps(config)
        with self._write() as db:
            exists = db.execute("SELECT 1 FROM experiments WHERE name = ?", (name,)).fetchone() is not None
            if exists:
                db.execute("UPDATE experiments SET config_json = ? WHERE name = ?", (config_json, name))
            else:
                db.execute(
                    "INSERT INTO experiments (name, created_at, config_json) VALUES (?, ?, ?)",
                    (name, time.time(), config_json),
                )
        return not exists

    def run_dir(self, run_id: str) -> Path:
        """The folder of run ``run_id`` (``<workspace>/runs/<run_id>``)."""
        _check_run_id(run_id)
        return self.runs_folder / run_id

    def claim(
        self,
        run_id: str,
        *,
        experiment: str,
        role: str,
        label: str,
        seed: int | None,
        group_key: str,
        config: Mapping[str, Any],
        take_failed_before: float = math.inf,
        method: str | None = None,
        point: Mapping[str, Any] | None = None,
        inputs: Sequence[tuple[str, str, int | None]] = (),
    ) -> str | None:
        """Atomically take run ``run_id`` for this process.

        Returns ``"finished"`` (done; skip it) or ``"running"`` (another live
        process has it, or a process on another host, whose liveness cannot be
        checked; skip it) without changing anything. A 'failed' run is taken
        only if its last attempt started before ``take_failed_before`` (default:
        always; ``-math.inf``: never); otherwise ``"failed_kept"`` is returned
        and nothing changes (skip it), so a run that failed during a study is
        not retried by another process of the same study. Otherwise the run is new,
        failed, interrupted, pending or held by a dead process: it becomes
        'running' with this pid/host, its folder is created, and the previous
        status is returned: ``None`` for a new run, and ``"interrupted"`` for a
        run whose process died (so ``"running"`` always means "skip it").
        Epoch metrics of an earlier attempt are kept (a resumed run overwrites
        them epoch by epoch). ``inputs`` are the run's edges of the run graph,
        ``(input_run_id, kind, epoch)`` (see :mod:`kdlab.plan`), stored with the claim.
        """
        run_dir = self.run_dir(run_id)
        config_json = json.dumps(config)
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM experiments WHERE name = ?", (experiment,)).fetchone() is None:
                raise ValueError(f"experiment {experiment!r} is not in the store; call ensure_experiment first")
            row = db.execute(
                "SELECT status, pid, pid_start, host, started_at, heartbeat_at FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is not None:
                if row["status"] == "finished":
                    return "finished"
                if row["status"] == "failed" and not (row["started_at"] or -math.inf) < take_failed_before:
                    return "failed_kept"
                if row["status"] == "running" and not self._abandoned(row, now):
                    return "running"
            values = dict(
                run_id=run_id, experiment=experiment, role=role, label=label, seed=seed,
                group_key=group_key, config_json=config_json, status="running", pid=os.getpid(),
                pid_start=_own_start_ticks(), host=self.host, started_at=now, finished_at=None,
                heartbeat_at=now, error=None, run_dir=run_dir.relative_to(self.workspace).as_posix(),
                method=method, point_json=None if point is None else json.dumps(point, default=str),
            )
            columns = ", ".join(values)
            placeholders = ", ".join(f":{name}" for name in values)
            updates = ", ".join(f"{name} = excluded.{name}" for name in values if name != "run_id")
            db.execute(
                f"INSERT INTO runs ({columns}) VALUES ({placeholders}) "
                f"ON CONFLICT(run_id) DO UPDATE SET {updates}",
                values,
            )
            # Keeps "final metrics exist iff finished" even for hand-edited databases.
            db.execute("DELETE FROM final_metrics WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM run_inputs WHERE run_id = ?", (run_id,))
            db.executemany("INSERT INTO run_inputs (run_id, input_run_id, kind, epoch) VALUES (?, ?, ?, ?)",
                           [(run_id, input_id, kind, epoch) for input_id, kind, epoch in dict.fromkeys(inputs)])
        run_dir.mkdir(parents=True, exist_ok=True)
        if row is None:
            return None
        # A 'running' row that reached this point belongs to a dead process.
        return "interrupted" if row["status"] == "running" else str(row["status"])

    def _abandoned_reason(self, row: Mapping[str, Any], now: float) -> str | None:
        """Why a 'running' row's process is gone, or None (the one rule of readers and writers)."""
        return abandoned_reason(row, host=self.host, now=now, timeout=self.heartbeat_timeout)

    def _abandoned(self, row: Mapping[str, Any], now: float) -> bool:
        return self._abandoned_reason(row, now) is not None

    def heartbeat(self, run_id: str) -> bool:
        """Mark run ``run_id`` alive now; False if this process no longer holds it (it was taken over)."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND status = 'running' AND pid = ? AND host = ?",
                (time.time(), run_id, os.getpid(), self.host),
            )
            return cursor.rowcount == 1

    def _require_run(self, db: sqlite3.Connection, run_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise self._unknown_run(db, run_id)
        return row

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Upsert ``metrics`` of ``epoch`` (a re-logged epoch overwrites its values)."""
        rows = _metric_rows(metrics, where=f"run {run_id} epoch {epoch}")
        epoch = int(epoch)
        with self._write() as db:
            self._require_run(db, run_id)
            db.executemany(
                "INSERT INTO epoch_metrics (run_id, epoch, key, value) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(run_id, epoch, key) DO UPDATE SET value = excluded.value",
                [(run_id, epoch, key, value) for key, value in rows],
            )

    def finish(self, run_id: str, final_metrics: Mapping[str, Any]) -> None:
        """Store the final metrics and mark the run 'finished' in one transaction."""
        rows = _metric_rows(final_metrics, where=f"run {run_id} final metrics")
        with self._write() as db:
            self._require_run(db, run_id)
            db.execute("DELETE FROM final_metrics WHERE run_id = ?", (run_id,))
            db.executemany(
                "INSERT INTO final_metrics (run_id, key, value) VALUES (?, ?, ?)",
                [(run_id, key, value) for key, value in rows],
            )
            db.execute(
                "UPDATE runs SET status = 'finished', finished_at = ?, error = NULL WHERE run_id = ?",
                (time.time(), run_id),
            )

    def add_final(self, run_id: str, metrics: Mapping[str, Any]) -> None:
        """Add (or overwrite) final metrics of a *finished* run, e.g. ``eval/...`` from ``kdlab eval``.

        The run's other final metrics and its status are kept; an unfinished run is refused.
        """
        rows = _metric_rows(metrics, where=f"run {run_id} final metrics")
        with self._write() as db:
            row = self._require_run(db, run_id)
            if row["status"] != "finished":
                raise KdlabError(f"run {run_id} is {row['status']}, not finished; finish it with `kdlab run` first")
            db.executemany(
                "INSERT INTO final_metrics (run_id, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT(run_id, key) DO UPDATE SET value = excluded.value",
                [(run_id, key, value) for key, value in rows],
            )

    def _end(self, run_id: str, status: str, error: str | None) -> bool:
        with self._write() as db:
            self._require_run(db, run_id)
            # A finished run stays finished: its metrics are complete, and a
            # late failure (e.g. during cleanup) must not hide them.
            cursor = db.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ? "
                "WHERE run_id = ? AND status != 'finished'",
                (status, error, time.time(), run_id),
            )
            return cursor.rowcount == 1

    def fail(self, run_id: str, message: str) -> bool:
        """Mark the run 'failed' with ``message``; False if it had already finished."""
        return self._end(run_id, "failed", str(message))

    def interrupt(self, run_id: str, message: str | None = None) -> bool:
        """Mark the run 'interrupted' (Ctrl-C, a full disk: not the run's fault; the next run resumes it).

        False if it had already finished.
        """
        return self._end(run_id, "interrupted", message)

    def mark_dead_runs_interrupted(self) -> list[str]:
        """Turn abandoned 'running' runs into 'interrupted' and return their ids.

        Abandoned: on this host, the process is gone; on another host, no
        heartbeat for ``heartbeat_timeout`` seconds (see the module docstring).
        """
        changed = []
        with self._write() as db:
            rows = db.execute(
                "SELECT run_id, pid, pid_start, host, heartbeat_at FROM runs WHERE status = 'running'"
            ).fetchall()
            now = time.time()
            for row in rows:
                why = self._abandoned_reason(row, now)
                if why is None:
                    continue
                db.execute(
                    "UPDATE runs SET status = 'interrupted', finished_at = ?, error = ? WHERE run_id = ?",
                    (now, why, row["run_id"]),
                )
                changed.append(str(row["run_id"]))
        return changed

    # -- reads --

    def _record(self, row: sqlite3.Row, final: dict[str, float], now: float | None = None) -> RunRecord:
        """The row as a RunRecord, its liveness applied; DamagedRow if a field is unusable."""
        now = time.time() if now is None else now
        return decode_run(row, final, runs_folder=self.runs_folder,
                          abandoned=lambda fields: self._abandoned_reason(fields, now))

    def _metrics(self, pairs: Any, *, run_id: str, where: str) -> dict[str, float]:
        """``{key: value}`` of (key, value) rows; a non-numeric value (hand-edited) is named once and skipped."""
        out: dict[str, float] = {}
        for key, value in pairs:
            try:
                out[str(key)] = _metric_value(value)
            except DamagedRow as problem:
                _warn_skipped(self.database_path, f"run {run_id}: {where} metric {key!r}: {problem}")
        return out

    def damaged_run_error(self, run_id: str, problem: DamagedRow) -> KdlabError:
        return KdlabError(f"{self.database_path}: run {run_id} has a damaged row ({problem}); restore the database "
                          "from a backup, or delete that row and the run's folder to train it again "
                          "(`kdlab doctor` lists damaged rows)")

    def _unknown_run(self, db: sqlite3.Connection, run_id: str) -> KdlabError:
        known = [str(row[0]) for row in db.execute("SELECT run_id FROM runs ORDER BY run_id")]
        close = [known_id for known_id in known if known_id.startswith(str(run_id)[:4])][:3]
        close += [c for c in difflib.get_close_matches(str(run_id), known, n=3, cutoff=0.5) if c not in close]
        hint = f"did you mean {', '.join(close[:5])}? " if close else ""
        return KdlabError(f"unknown run id {run_id!r} in {self.database_path}; {hint}list runs with `kdlab runs`")

    def _decoded_run(self, run_id: str) -> RunRecord:
        """The run ``run_id``; DamagedRow if its row cannot be read, KdlabError if there is none."""
        with self._read() as db:
            row = self._require_run(db, run_id)
            pairs = db.execute("SELECT key, value FROM final_metrics WHERE run_id = ?", (run_id,)).fetchall()
        return self._record(row, self._metrics(pairs, run_id=run_id, where="final"))

    def _skip_damaged(self, run_id: Any, problem: DamagedRow) -> None:
        _warn_skipped(self.database_path, f"run {run_id!r} has a damaged row ({problem})")

    def run(self, run_id: str) -> RunRecord:
        """The run ``run_id``; an unknown id raises ``KdlabError`` naming close ids, a damaged row one saying why."""
        try:
            return self._decoded_run(run_id)
        except DamagedRow as problem:  # asked for by name: say why it cannot be read
            raise self.damaged_run_error(run_id, problem) from None

    def runs(
        self, *, experiment: str | None = None, status: str | None = None, role: str | None = None
    ) -> list[RunRecord]:
        """Runs matching all given filters, by experiment then claim order.

        ``status`` filters on the status as read (a dead holder's 'running' row is 'interrupted').
        A damaged row is named once on stderr and left out.
        """
        if status is not None and status not in STATUSES:
            raise KdlabError(f"unknown run status {status!r}; statuses are: {', '.join(STATUSES)}")
        conditions, parameters = [], []
        for column, value in (("experiment", experiment), ("role", role)):
            if value is not None:
                conditions.append(f"runs.{column} = ?")
                parameters.append(value)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._read() as db:
            rows = db.execute(f"SELECT * FROM runs {where} ORDER BY runs.experiment, runs.rowid", parameters).fetchall()
            pairs: dict[Any, list[tuple[Any, Any]]] = {}
            for run_id, key, value in db.execute(
                f"SELECT final_metrics.run_id, key, value FROM final_metrics "
                f"JOIN runs ON runs.run_id = final_metrics.run_id {where}",
                parameters,
            ):
                pairs.setdefault(run_id, []).append((key, value))
        records, now = [], time.time()
        for row in rows:
            try:
                final = self._metrics(pairs.get(row["run_id"], ()), run_id=row["run_id"], where="final")
                record = self._record(row, final, now)
            except DamagedRow as problem:
                self._skip_damaged(row["run_id"], problem)
                continue
            if status is None or record.status == status:
                records.append(record)
        return records

    def epoch_metrics(self, run_id: str) -> dict[int, dict[str, float]]:
        """``{epoch: {key: value}}`` of run ``run_id``, epochs ascending."""
        result: dict[int, dict[str, float]] = {}
        with self._read() as db:
            self._require_run(db, run_id)
            rows = db.execute(
                "SELECT epoch, key, value FROM epoch_metrics WHERE run_id = ? ORDER BY epoch, key", (run_id,)
            ).fetchall()
        for epoch, key, value in rows:
            if not isinstance(epoch, int):
                _warn_skipped(self.database_path, f"run {run_id}: epoch {epoch!r} is not a whole number")
                continue
            result.setdefault(epoch, {}).update(self._metrics([(key, value)], run_id=run_id, where=f"epoch {epoch}"))
        return result

    def inputs(self, run_id: str) -> list[tuple[str, str, int | None]]:
        """The run graph's edges out of ``run_id``: ``(input_run_id, kind, epoch)`` in the order recorded
        (empty for runs recorded before schema 2, and for a schema-1 file opened read-only)."""
        with self._read() as db:
            if "run_inputs" not in {row[0] for row in db.execute("SELECT name FROM sqlite_master")}:
                return []
            rows = db.execute("SELECT input_run_id, kind, epoch FROM run_inputs WHERE run_id = ? ORDER BY rowid",
                              (run_id,)).fetchall()
        return [(str(i), str(k), e if isinstance(e, int) else None) for i, k, e in rows]

    def experiments(self) -> list[str]:
        """Experiment names, oldest first."""
        with self._read() as db:
            return [str(row[0]) for row in db.execute("SELECT name FROM experiments ORDER BY created_at, name")]

    def find(self, token: str, *, skip_damaged: bool = True) -> list[RunRecord]:
        """Resolve a CLI argument: an exact run id, an experiment name, or a unique run-id prefix.

        An experiment name gives all its runs (possibly none). An ambiguous
        prefix or an unknown token raises ``KdlabError``. A damaged row is named on stderr and left
        out, or with ``skip_damaged=False`` a run id naming one raises the error saying why.
        """
        token = str(token)
        if not token:
            raise KdlabError("empty run id or experiment name; pass a run id, a run-id prefix or an experiment name")
        with self._read() as db:
            exact = db.execute("SELECT 1 FROM runs WHERE run_id = ?", (token,)).fetchone()
            is_experiment = db.execute("SELECT 1 FROM experiments WHERE name = ?", (token,)).fetchone()
            matches = [
                row[0]
                for row in db.execute(
                    "SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? ORDER BY run_id", (len(token), token)
                )
            ]
            experiment_names = [str(row[0]) for row in db.execute("SELECT name FROM experiments")]
            run_ids = [str(row[0]) for row in db.execute("SELECT run_id FROM runs")]
        if is_experiment and not exact:
            return self.runs(experiment=token)
        if exact or len(matches) == 1:
            run_id = token if exact else matches[0]
            try:
                return [self._decoded_run(run_id)]
            except DamagedRow as problem:  # named on stderr and left out, as by every reader that lists runs
                if not skip_damaged:
                    raise self.damaged_run_error(run_id, problem) from None
                self._skip_damaged(run_id, problem)
                return []
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise KdlabError(
                f"run-id prefix {token!r} matches {len(matches)} runs ({shown}); type more characters of the id"
            )
        close = difflib.get_close_matches(token, experiment_names + run_ids, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KdlabError(
            f"no run id, run-id prefix or experiment named {token!r} in {self.database_path}; "
            f"{hint}list them with `kdlab runs`"
        )
