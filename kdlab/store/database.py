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
:class:`Heartbeat`). A run is *abandoned* — reclaimable by the next ``claim``
and shown as 'interrupted' by :meth:`Store.mark_dead_runs_interrupted` (which
``kdlab runs`` calls) — when, on this host, its pid is gone (SIGKILL, OOM
kill, power loss), or, on another host (a shared workspace), its heartbeat is
older than ``heartbeat_timeout`` seconds (``$KDLAB_HEARTBEAT_TIMEOUT``, default
300). On the same host the pid check decides alone: a live but slow process is
never robbed of its run.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import socket
import sqlite3
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from kdlab.errors import KdlabError, WorkspaceError

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "finished", "failed", "interrupted")
BUSY_TIMEOUT_SECONDS = 30.0
DATABASE_NAME = "kdlab.db"
HEARTBEAT_TIMEOUT_SECONDS = 300.0  # a run of another host with no heartbeat for this long is abandoned
HEARTBEAT_ENV = "KDLAB_HEARTBEAT_TIMEOUT"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS experiments (
        name TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        config_json TEXT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL REFERENCES experiments(name),
        role TEXT NOT NULL,
        label TEXT NOT NULL,
        seed INTEGER,
        group_key TEXT NOT NULL,
        config_json TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
        pid INTEGER,
        pid_start INTEGER,
        host TEXT,
        started_at REAL,
        finished_at REAL,
        error TEXT,
        run_dir TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs(experiment)",
    "CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status)",
    """CREATE TABLE IF NOT EXISTS epoch_metrics (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
        epoch INTEGER NOT NULL,
        key TEXT NOT NULL,
        value REAL,
        PRIMARY KEY (run_id, epoch, key)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS final_metrics (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value REAL,
        PRIMARY KEY (run_id, key)) WITHOUT ROWID""",
)


@dataclass(frozen=True)
class RunRecord:
    """One run as stored: identity, resolved config, status and final metrics."""

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


# --- process liveness -------------------------------------------------------


def _process_start_ticks(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc, or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return None
    # The command name is in parentheses and may itself contain ") ".
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _process_alive(pid: int | None, pid_start: int | None) -> bool:
    """Whether ``pid`` on this host is still the process that claimed the run.

    ``pid_start`` (Linux: the process start time in ticks, recorded at claim)
    detects a pid reused by an unrelated process; zombies count as dead.
    """
    if not pid or pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill() would terminate the process there; assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    stat = _process_start_ticks(pid)
    if stat is None:
        return True  # no /proc (macOS, or it vanished): trust kill()
    state, start = stat
    if state in ("Z", "X"):
        return False
    return pid_start is None or start == pid_start


def _own_start_ticks() -> int | None:
    stat = _process_start_ticks(os.getpid())
    return None if stat is None else stat[1]


# --- value conversion ---------------------------------------------------------


def _metric_rows(metrics: Mapping[str, Any], *, where: str) -> list[tuple[str, float | None]]:
    """(key, value) pairs ready for SQLite; NaN becomes NULL (see module docstring)."""
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


def _metric_value(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _check_run_id(run_id: str) -> None:
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


def _heartbeat_timeout(value: float | None) -> float:
    """The given timeout, else ``$KDLAB_HEARTBEAT_TIMEOUT``, else the default; a bad value is a KdlabError."""
    source = "heartbeat_timeout"
    if value is None:
        text = os.environ.get(HEARTBEAT_ENV)
        if not text:
            return HEARTBEAT_TIMEOUT_SECONDS
        source = f"${HEARTBEAT_ENV}"
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise KdlabError(f"{source}: expected a positive number of seconds, got {value!r}; e.g. {HEARTBEAT_ENV}=300")
    return float(value)


# --- the store ------------------------------------------------------------------


class Store:
    """Experiments, runs and metrics of one workspace; see the module docstring."""

    def __init__(self, workspace: str | Path, *, heartbeat_timeout: float | None = None):
        self.workspace = Path(workspace).expanduser().absolute()
        self.heartbeat_timeout = _heartbeat_timeout(heartbeat_timeout)
        self.runs_folder = self.workspace / "runs"
        self.cache_folder = self.workspace / "cache"
        self.database_path = self.workspace / DATABASE_NAME
        self.host = socket.gethostname()
        self._pid = os.getpid()
        self._connection: sqlite3.Connection | None = None
        self._connection = self._open()

    # -- opening --

    def _unwritable(self, reason: str) -> KdlabError:
        return KdlabError(
            f"workspace {self.workspace} is not writable: {reason}; "
            "pass --workspace DIR (or set workspace:) to a writable folder"
        )

    def _open(self) -> sqlite3.Connection:
        try:
            for folder in (self.workspace, self.runs_folder, self.cache_folder):
                folder.mkdir(parents=True, exist_ok=True)
            # mkdir succeeds on existing read-only folders; creating a file is the real test.
            with tempfile.TemporaryFile(dir=self.workspace):
                pass
        except OSError as error:
            raise self._unwritable(error.strerror or str(error)) from None
        try:
            connection = sqlite3.connect(
                self.database_path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None
            )
        except sqlite3.Error as error:
            raise self._unwritable(str(error)) from None
        try:
            connection.row_factory = sqlite3.Row
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            self.journal_mode = self._enable_wal(connection)
            connection.execute("PRAGMA foreign_keys = ON")
            # In WAL mode NORMAL loses no committed transaction when a process
            # crashes (only possibly the last ones on power loss) and is much faster.
            connection.execute("PRAGMA synchronous = NORMAL")
            self._create_schema(connection)
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
            raise KdlabError(
                f"{self.database_path}: not a kdlab results database ({error}); "
                "move the file away or pass --workspace DIR to another folder"
            ) from None
        except BaseException:
            connection.close()
            raise
        return connection

    @staticmethod
    def _enable_wal(connection: sqlite3.Connection) -> str:
        # Switching to WAL needs an exclusive lock and SQLite does not always
        # call the busy handler for it, so retry while other processes open.
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        while True:
            try:
                return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) and "busy" not in str(error):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        with self._transaction(connection):
            for statement in _SCHEMA:
                connection.execute(statement)
            # Added after schema 1 shipped: a nullable column old readers ignore, so no version bump.
            columns = {info[1] for info in connection.execute("PRAGMA table_info(runs)")}
            if "heartbeat_at" not in columns:
                connection.execute("ALTER TABLE runs ADD COLUMN heartbeat_at REAL")
            row = connection.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                connection.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise KdlabError(
                    f"{self.database_path}: schema version {row[0]} is newer than this kdlab's "
                    f"({SCHEMA_VERSION}); upgrade kdlab or pass --workspace DIR to another folder"
                )

    # -- connection and transactions --

    @property
    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("this Store is closed; open a new Store(workspace)")
        if os.getpid() != self._pid:
            raise RuntimeError(
                "a Store cannot be used after fork; open a new Store(workspace) in each process"
            )
        return self._connection

    @staticmethod
    @contextmanager
    def _transaction(connection: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE takes the write lock up front so a
        read-modify-write cannot interleave with another process's write."""
        connection.execute(f"BEGIN {mode}")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            # Some errors roll back by themselves; never leave a transaction open.
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._transaction(self._db, "IMMEDIATE") as db:
                yield db
        except sqlite3.OperationalError as error:
            # SQLite reports a full disk (or a workspace made read-only after opening) only when a write
            # fails; the transaction was rolled back, so the database is as it was before this write.
            message = str(error)
            if "full" in message or "readonly" in message or "disk I/O" in message:
                raise WorkspaceError(
                    f"{self.database_path}: cannot write ({message}); free disk space or make the folder "
                    "writable, or pass --workspace DIR to another folder; stored runs are kept"
                ) from None
            raise

    def _read(self) -> Any:
        # A deferred transaction gives one consistent snapshot across queries.
        return self._transaction(self._db, "DEFERRED")

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
        them epoch by epoch).
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
        run_dir.mkdir(parents=True, exist_ok=True)
        if row is None:
            return None
        # A 'running' row that reached this point belongs to a dead process.
        return "interrupted" if row["status"] == "running" else str(row["status"])

    def _abandoned(self, row: Mapping[str, Any], now: float) -> bool:
        """Whether a 'running' row's process is gone (see the module docstring)."""
        if row["host"] == self.host:
            return not _process_alive(row["pid"], row["pid_start"])
        beat = row["heartbeat_at"]
        # No heartbeat at all: written by a kdlab without heartbeats; its liveness is unknown, keep it.
        return beat is not None and now - beat > self.heartbeat_timeout

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
                if not self._abandoned(row, now):
                    continue
                if row["host"] == self.host:
                    why = f"process {row['pid']} on {self.host} ended without finishing the run"
                else:
                    why = (f"process {row['pid']} on {row['host']} sent no heartbeat for "
                           f"{now - row['heartbeat_at']:.0f} s (timeout {self.heartbeat_timeout:g} s)")
                db.execute(
                    "UPDATE runs SET status = 'interrupted', finished_at = ?, error = ? WHERE run_id = ?",
                    (now, why, row["run_id"]),
                )
                changed.append(str(row["run_id"]))
        return changed

    # -- reads --

    def _record(self, row: sqlite3.Row, final: dict[str, float]) -> RunRecord:
        return RunRecord(
            run_id=row["run_id"],
            experiment=row["experiment"],
            role=row["role"],
            label=row["label"],
            seed=row["seed"],
            group_key=row["group_key"],
            config=json.loads(row["config_json"]),
            status=row["status"],
            error=row["error"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            run_dir=self.workspace / row["run_dir"],
            final=final,
            pid=row["pid"],
            host=row["host"],
            heartbeat_at=row["heartbeat_at"],
        )

    def _unknown_run(self, db: sqlite3.Connection, run_id: str) -> KdlabError:
        known = [row[0] for row in db.execute("SELECT run_id FROM runs ORDER BY run_id")]
        close = [known_id for known_id in known if known_id.startswith(str(run_id)[:4])][:3]
        close += [c for c in difflib.get_close_matches(str(run_id), known, n=3, cutoff=0.5) if c not in close]
        hint = f"did you mean {', '.join(close[:5])}? " if close else ""
        return KdlabError(f"unknown run id {run_id!r} in {self.database_path}; {hint}list runs with `kdlab runs`")

    def run(self, run_id: str) -> RunRecord:
        """The run ``run_id``; an unknown id raises ``KdlabError`` naming close ids."""
        with self._read() as db:
            row = self._require_run(db, run_id)
            final = {
                key: _metric_value(value)
                for key, value in db.execute("SELECT key, value FROM final_metrics WHERE run_id = ?", (run_id,))
            }
        return self._record(row, final)

    def runs(
        self, *, experiment: str | None = None, status: str | None = None, role: str | None = None
    ) -> list[RunRecord]:
        """Runs matching all given filters, by experiment then claim order."""
        if status is not None and status not in STATUSES:
            raise KdlabError(f"unknown run status {status!r}; statuses are: {', '.join(STATUSES)}")
        conditions, parameters = [], []
        for column, value in (("experiment", experiment), ("status", status), ("role", role)):
            if value is not None:
                conditions.append(f"runs.{column} = ?")
                parameters.append(value)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._read() as db:
            rows = db.execute(f"SELECT * FROM runs {where} ORDER BY runs.experiment, runs.rowid", parameters).fetchall()
            finals: dict[str, dict[str, float]] = {}
            for run_id, key, value in db.execute(
                f"SELECT final_metrics.run_id, key, value FROM final_metrics "
                f"JOIN runs ON runs.run_id = final_metrics.run_id {where}",
                parameters,
            ):
                finals.setdefault(run_id, {})[key] = _metric_value(value)
        return [self._record(row, finals.get(row["run_id"], {})) for row in rows]

    def epoch_metrics(self, run_id: str) -> dict[int, dict[str, float]]:
        """``{epoch: {key: value}}`` of run ``run_id``, epochs ascending."""
        result: dict[int, dict[str, float]] = {}
        with self._read() as db:
            self._require_run(db, run_id)
            for epoch, key, value in db.execute(
                "SELECT epoch, key, value FROM epoch_metrics WHERE run_id = ? ORDER BY epoch, key", (run_id,)
            ):
                result.setdefault(int(epoch), {})[key] = _metric_value(value)
        return result

    def experiments(self) -> list[str]:
        """Experiment names, oldest first."""
        with self._read() as db:
            return [row[0] for row in db.execute("SELECT name FROM experiments ORDER BY created_at, name")]

    def find(self, token: str) -> list[RunRecord]:
        """Resolve a CLI argument: an exact run id, an experiment name, or a unique run-id prefix.

        An experiment name gives all its runs (possibly none). An ambiguous
        prefix or an unknown token raises ``KdlabError``.
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
            experiment_names = [row[0] for row in db.execute("SELECT name FROM experiments")]
            run_ids = [row[0] for row in db.execute("SELECT run_id FROM runs")]
        if exact:
            return [self.run(token)]
        if is_experiment:
            return self.runs(experiment=token)
        if len(matches) == 1:
            return [self.run(matches[0])]
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


class Heartbeat:
    """While open, refresh run ``run_id``'s heartbeat from a background thread.

    The thread opens its own ``Store`` (a connection belongs to the thread that
    opened it) and writes every ``heartbeat_timeout / 5`` seconds, so another
    host sees the run alive with four beats to spare. A failed beat (a locked or
    full disk) is retried at the next interval: it must never stop training.
    """

    def __init__(self, workspace: str | Path, run_id: str, *, heartbeat_timeout: float | None = None):
        self.workspace = workspace
        self.run_id = run_id
        self.timeout = _heartbeat_timeout(heartbeat_timeout)
        self.interval = min(60.0, max(0.05, self.timeout / 5))
        self._stop = threading.Event()
        self.lost = threading.Event()  # set when a beat finds the run no longer ours (taken over or ended)
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        store = None
        try:
            while not self._stop.wait(self.interval):
                try:
                    if store is None:
                        store = Store(self.workspace, heartbeat_timeout=self.timeout)
                    if not store.heartbeat(self.run_id):
                        self.lost.set()  # the trainer checks this after each epoch and stops writing
                        return
                except (sqlite3.Error, KdlabError, OSError):
                    pass  # retried at the next beat
        finally:
            if store is not None:
                store.close()

    def start(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._beat, name=f"kdlab-heartbeat-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
