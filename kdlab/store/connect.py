"""Opening the results database: the writer's schema and WAL set-up, the readers' read-only connection.

Kept apart from :class:`kdlab.store.database.Store`, which uses these, so each file stays short.
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdlab.errors import KdlabError
from kdlab.store import schema

BUSY_TIMEOUT_SECONDS = 30.0
DATABASE_NAME = "kdlab.db"


@contextmanager
def transaction(connection: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
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


def enable_wal(connection: sqlite3.Connection) -> str:
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


def create_schema(connection: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new database; refuse an existing one that lost a table (never recreate it empty)."""
    with transaction(connection):
        existing = schema.check_existing(connection, path, reading=False)
        row = connection.execute("SELECT version FROM schema_version").fetchone() if existing else None
        if row is not None and row[0] == 1:  # once, in this transaction: readers see schema 1 or 2, never half
            for statement in schema.MIGRATE_1_TO_2:
                connection.execute(statement)
            connection.execute("UPDATE schema_version SET version = ?", (schema.SCHEMA_VERSION,))
        for statement in schema.SCHEMA:
            connection.execute(statement)
        # Added after schema 1 shipped: a nullable column old readers ignore, so no version bump.
        columns = {info[1] for info in connection.execute("PRAGMA table_info(runs)")}
        if "heartbeat_at" not in columns:
            connection.execute("ALTER TABLE runs ADD COLUMN heartbeat_at REAL")
        if connection.execute("SELECT version FROM schema_version").fetchone() is None:
            connection.execute("INSERT INTO schema_version (version) VALUES (?)", (schema.SCHEMA_VERSION,))


def open_readonly(path: Path, workspace: Path, *, check: bool) -> sqlite3.Connection:
    """A read-only connection: ``mode=ro``, or ``immutable=1`` where SQLite cannot even create the
    WAL index (a read-only folder after the last writer closed, so no one can be writing)."""
    if not path.is_file():
        where = "no such folder" if not workspace.is_dir() else f"it has no {path.name}"
        raise KdlabError(f"no kdlab workspace at {workspace} ({where}); run `kdlab run CONFIG` to create "
                         "one, or pass --workspace DIR (or set $KDLAB_WORKSPACE) to the folder it wrote")
    if path.stat().st_size == 0:
        raise KdlabError(f"{path}: the results database is empty (0 bytes); {schema.RESTORE}")
    uri = path.as_uri()
    for mode in ("mode=ro", "immutable=1"):
        connection = None
        try:
            connection = sqlite3.connect(f"{uri}?{mode}", uri=True, timeout=BUSY_TIMEOUT_SECONDS,
                                         isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            schema.check_existing(connection, path, reading=True)
            if check:
                schema.quick_check(connection, path)
            return connection
        except sqlite3.OperationalError as error:
            if connection is not None:
                connection.close()
            if mode == "mode=ro" and ("unable to open" in str(error) or "readonly" in str(error)):
                continue
            raise KdlabError(f"{path}: cannot read the results database ({error}); check the "
                             "file's permissions, or pass --workspace DIR to another folder") from None
        except sqlite3.DatabaseError as error:
            if connection is not None:
                connection.close()
            if "not a database" in str(error):
                raise KdlabError(f"{path}: not a kdlab results database ({error}); pass "
                                 "--workspace DIR to the folder `kdlab run` wrote") from None
            raise schema.damaged(path, str(error)) from None
        except BaseException:
            if connection is not None:
                connection.close()
            raise
    raise RuntimeError("unreachable: the immutable=1 attempt returns or raises")
