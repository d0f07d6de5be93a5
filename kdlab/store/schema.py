"""The results database's tables, and the checks that refuse a damaged one before anything reads it.

A database that lost tables (a dropped ``runs``), was truncated to zero bytes, or holds garbage in
a page is refused with one line naming the file and what to do, rather than being recreated empty
(which would silently re-run a finished study) or half-read (``kdlab runs`` on the intact pages
while ``kdlab show`` crashes on the damaged one).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from kdlab.errors import KdlabError

# 2: runs keep their grid point and method as columns; run_inputs holds the run graph's edges (kdlab.plan).
SCHEMA_VERSION = 2
STATUSES = ("pending", "running", "finished", "failed", "interrupted")
INPUT_KINDS = ("teacher", "assistant", "member", "trajectory")
TABLES_V1 = ("schema_version", "experiments", "runs", "epoch_metrics", "final_metrics")
TABLES = TABLES_V1 + ("run_inputs",)

SCHEMA = (
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
        run_dir TEXT NOT NULL,
        point_json TEXT,
        method TEXT)""",
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
    # One row per edge of the run graph: run_id reads input_run_id's weights (after epoch; NULL = final).
    f"""CREATE TABLE IF NOT EXISTS run_inputs (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
        input_run_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k) for k in INPUT_KINDS)})),
        epoch INTEGER)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS run_inputs_unique ON run_inputs(run_id, input_run_id, kind, IFNULL(epoch, -1))",
    "CREATE INDEX IF NOT EXISTS run_inputs_by_input ON run_inputs(input_run_id)",
)

# Schema 1 → 2, in one transaction: the new columns (method filled from the stored config) and the edge table.
# Edges of runs recorded before schema 2 are not reconstructed (their configs may come from older kdlab
# versions); views fall back to finding a teacher run by its content (kdlab.study.teacher_runs).
MIGRATE_1_TO_2 = (
    "ALTER TABLE runs ADD COLUMN point_json TEXT",
    "ALTER TABLE runs ADD COLUMN method TEXT",
    "UPDATE runs SET method = json_extract(config_json, '$.method.name') WHERE json_valid(config_json)",
)

# What to do with a damaged database, said once for every refusal below.
RESTORE = ("restore it from a backup (or salvage it with `sqlite3 kdlab.db .recover`), or move it away to start "
           "an empty workspace (every run would train again); `kdlab doctor` shows what is wrong")
# Words of sqlite3.DatabaseError messages that mean the file itself is damaged.
DAMAGE_WORDS = ("malformed", "not a database", "file is encrypted", "disk image")


def is_damage(error: BaseException) -> bool:
    """Whether a SQLite error means a damaged file (rather than a lock, a full disk or a bug)."""
    return isinstance(error, sqlite3.DatabaseError) and any(word in str(error) for word in DAMAGE_WORDS)


def damaged(path: Path, detail: str) -> KdlabError:
    return KdlabError(f"{path}: the results database is damaged ({detail}); {RESTORE}")


def refuse_empty_file(path: Path, runs_folder: Path) -> None:
    """Refuse a zero-byte database next to run folders: the file was truncated and its runs would re-run.

    A zero-byte file with no run folder is a workspace whose creation was interrupted (SQLite creates
    the file before writing the first page): it holds nothing to lose and is initialised as new.
    """
    try:
        if path.stat().st_size != 0:
            return
        folders = any(runs_folder.iterdir()) if runs_folder.is_dir() else False
    except FileNotFoundError:
        return
    if folders:
        raise KdlabError(f"{path}: the results database is empty (0 bytes) but {runs_folder} holds runs; {RESTORE}")


def tables(connection: sqlite3.Connection) -> set[str]:
    return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def check_existing(connection: sqlite3.Connection, path: Path, *, reading: bool) -> bool:
    """Whether the database already holds a kdlab schema (False: a new file); KdlabError if it is damaged.

    ``reading``: a reader also refuses a database without any kdlab table (there is nothing to read).
    """
    present = tables(connection) & set(TABLES)
    if not present:
        if reading:
            raise KdlabError(f"{path}: not a kdlab results database (it has no kdlab tables); pass --workspace DIR "
                             "to the folder `kdlab run` wrote")
        return False
    version = None
    if "schema_version" in present:
        row = connection.execute("SELECT version FROM schema_version").fetchone()
        version = None if row is None else row[0]
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise KdlabError(f"{path}: schema version {version} is newer than this kdlab's ({SCHEMA_VERSION}); "
                             "upgrade kdlab or pass --workspace DIR to another folder")
    expected = TABLES_V1 if version == 1 else TABLES  # a schema-1 file is migrated by the next writer
    missing = [name for name in expected if name not in present]
    if missing or not isinstance(version, int):
        what = f"table(s) {', '.join(missing)} missing" if missing else "no schema version"
        raise KdlabError(f"{path}: the results database is incomplete ({what}); {RESTORE}")
    return True


def quick_check(connection: sqlite3.Connection, path: Path) -> None:
    """``PRAGMA quick_check`` (every page and row, not index contents): a damaged file is a KdlabError.

    Measured on the shared 2-core machine: 13 ms for 1,000 runs (1.5 MB), 0.33 s for 20,000 runs with
    240,000 epoch rows (32 MB); every command pays it once when it opens the workspace.
    """
    try:
        rows = [str(row[0]) for row in connection.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as error:
        raise damaged(path, str(error)) from None
    # One problem per row, though a row may hold several lines ("*** in database main ***" and the first problem).
    report = [line for row in rows for line in row.splitlines() if line.strip() and not line.startswith("***")]
    if report != ["ok"]:
        more = f", and {len(report) - 1} more problem(s)" if len(report) > 1 else ""
        raise damaged(path, f"{report[0]}{more}")
