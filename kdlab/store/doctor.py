"""`kdlab doctor`: check a workspace's database and run folders against each other, and say what is wrong.

Checks, in order: the database file (zero bytes, ``PRAGMA integrity_check``, missing tables), every
``runs`` row (damaged fields, text-valued metrics), every run folder against its row (a row without a
folder, a folder without a row, ``final.json`` against the status), 'running' rows whose process is
gone, and temporary files left by a killed writer. ``--fix`` does only what cannot lose a result:
it marks dead 'running' rows 'interrupted' (what the next ``kdlab run`` would do) and removes
temporary files that no live process can be writing. Anything else is reported with what to do.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdlab.errors import KdlabError
from kdlab.store import schema
from kdlab.store.database import DATABASE_NAME, Store
from kdlab.store.liveness import _process_alive
from kdlab.store.rows import DamagedRow, decode_run

# Names of the temporary files and folders kdlab's writers use (all start with a dot):
# atomic writes (mkstemp) ``.NAME.XXXX.tmp``, checkpoints ``.tmp-epoch-NNNN-PID``, plots ``.tmp-NAME-PID`` and
# ``.NAME.PID.partial``, the teacher cache ``.NAME.tmp-PID``.
TEMP_NAME = re.compile(r"^\.(tmp-.+|.+\.tmp(-\d+)?|.+\.\d+\.partial)$")
PID_IN_NAME = re.compile(r"(?:-(\d+)|\.(\d+)\.partial)$")
TEMP_MIN_AGE_SECONDS = 600.0  # never remove a temporary file younger than this (a writer on another host)
SHOWN = 20  # findings of one kind printed in full; the rest are counted


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    runs: int = 0

    def add(self, text: str) -> None:
        self.problems.append(text)

    def lines(self, workspace: Path, *, fixing: bool) -> list[str]:
        """What `kdlab doctor` prints: what it fixed, each problem, and a summary line."""
        out = [f"fixed: {line}" for line in self.fixed] + [f"problem: {line}" for line in self.problems]
        if self.problems:
            hint = "" if fixing else "; `kdlab doctor --fix` fixes what it safely can"
            return out + [f"{len(self.problems)} problem(s) in {workspace} ({self.runs} runs){hint}"]
        return out + [f"{workspace}: ok ({self.runs} runs, database integrity ok, every run folder matches its row)"]


def _connect(path: Path) -> sqlite3.Connection:
    """A read-only connection that does not refuse a damaged file (the doctor's job is to look at it)."""
    uri = path.as_uri()
    try:
        connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
        connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        connection = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
    connection.row_factory = sqlite3.Row
    return connection


def _database(workspace: Path, findings: Findings) -> bool:
    """Check the file itself; True when its rows can be trusted enough to check them one by one."""
    path = workspace / DATABASE_NAME
    if path.stat().st_size == 0:
        findings.add(f"{path}: empty (0 bytes); {schema.RESTORE}")
        return False
    try:
        connection = _connect(path)
        try:
            rows = [str(row[0]) for row in connection.execute("PRAGMA integrity_check").fetchall()]
            report = [line for row in rows for line in row.splitlines() if line.strip() and not line.startswith("***")]
            if report == ["ok"]:
                schema.check_existing(connection, path, reading=True)
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        findings.add(f"{path}: unreadable ({error}); {schema.RESTORE}")
        return False
    except KdlabError as error:
        findings.add(str(error))
        return False
    if report != ["ok"]:
        for line in report[:SHOWN]:
            findings.add(f"{path}: integrity_check: {line}")
        if len(report) > SHOWN:
            findings.add(f"{path}: integrity_check: and {len(report) - SHOWN} more")
        findings.add(f"{path}: damaged; {schema.RESTORE}")
        return False
    return True


def _temp_files(folder: Path) -> list[Path]:
    found = []
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            if TEMP_NAME.match(name):
                found.append(Path(root) / name)
        folders[:] = [name for name in folders if not TEMP_NAME.match(name)]  # report a temp folder, not its files
    return sorted(found)


def _removable(path: Path, *, held: bool, now: float) -> bool:
    """Whether no live process can be writing ``path``: its run is not held, it is old, its pid (if named) is gone."""
    if held:
        return False
    try:
        if now - path.lstat().st_mtime < TEMP_MIN_AGE_SECONDS:
            return False
    except FileNotFoundError:
        return False
    match = PID_IN_NAME.search(path.name)
    pid = next((int(g) for g in match.groups() if g), None) if match else None
    return pid is None or not _process_alive(pid, None)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_workspace(workspace: Path, *, fix: bool = False) -> Findings:
    """Every finding about ``workspace`` (see the module docstring); KdlabError when there is no workspace."""
    findings = Findings()
    if not (workspace / DATABASE_NAME).is_file():
        Store(workspace, readonly=True)  # raises the one-line "no kdlab workspace" error
    if not _database(workspace, findings):
        return findings
    store = Store(workspace, readonly=not fix, check=False)  # integrity_check above covers quick_check
    now = time.time()
    if fix:
        for run_id in store.mark_dead_runs_interrupted():
            findings.fixed.append(f"run {run_id}: its process is gone; marked interrupted (`kdlab run` resumes it)")
    db = store._db
    rows = db.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
    findings.runs = len(rows)
    held: set[str] = set()
    known: set[str] = set()
    for row in rows:
        run_id = str(row["run_id"])
        known.add(run_id)
        try:
            record = decode_run(row, {}, runs_folder=store.runs_folder,
                                abandoned=lambda fields: store._abandoned_reason(fields, now))
        except DamagedRow as problem:
            findings.add(f"run {run_id}: damaged row ({problem}); readers skip it; restore the database from a "
                         "backup, or delete the row and the run's folder to train it again")
            continue
        if row["status"] == "running":
            if record.status == "running":
                held.add(run_id)
            else:
                findings.add(f"run {run_id}: stored as running but {record.error}; `kdlab doctor --fix` marks it "
                             "interrupted (any `kdlab run` of it resumes it)")
        folder = store.runs_folder / run_id
        if not folder.is_dir():
            findings.add(f"run {run_id} ({record.status}): its folder {folder} is missing; restore it, or "
                         "`kdlab run --no-resume` trains it again")
            continue
        final = folder / "final.json"
        if record.status == "finished" and not final.is_file():
            findings.add(f"run {run_id}: finished but {final} is missing (its metrics are in the database)")
        elif record.status != "finished" and final.is_file():
            findings.add(f"run {run_id}: {final} exists but the run is {record.status} (killed after writing it?); "
                         "the next `kdlab run` resumes and finishes it")
        if final.is_file():
            try:
                if not isinstance(json.loads(final.read_text()), dict):
                    raise ValueError("not a mapping")
            except (OSError, ValueError, UnicodeDecodeError) as error:
                findings.add(f"run {run_id}: {final} is unreadable ({str(error)[:60]}); the database holds its "
                             "final metrics (`kdlab show`)")
    for table in ("final_metrics", "epoch_metrics"):
        bad = db.execute(f"SELECT run_id, key, value FROM {table} "
                         "WHERE typeof(value) NOT IN ('real', 'integer', 'null')").fetchall()
        for row in bad[:SHOWN]:
            findings.add(f"run {row['run_id']}: {table} {row['key']!r} holds {row['value']!r}, not a number; "
                         "readers skip it (delete the row or restore the database)")
        if len(bad) > SHOWN:
            findings.add(f"{table}: and {len(bad) - SHOWN} more values that are not numbers")
    if store.runs_folder.is_dir():
        for entry in sorted(store.runs_folder.iterdir()):
            if entry.name not in known and not TEMP_NAME.match(entry.name):
                findings.add(f"{entry}: a folder without a row in {store.database_path} (copied from another "
                             "workspace, or its row was lost); move it away, or restore the database")
    for folder in (store.runs_folder, store.cache_folder):
        if not folder.is_dir():
            continue
        for path in _temp_files(folder):
            relative = path.relative_to(store.runs_folder) if folder == store.runs_folder else None
            run_held = relative is not None and relative.parts[0] in held
            if fix and _removable(path, held=run_held, now=now):
                _remove(path)
                findings.fixed.append(f"{path}: removed (a temporary file left by a killed writer)")
            else:
                why = "its run is running" if run_held else "`kdlab doctor --fix` removes it once no process can own it"
                findings.add(f"{path}: a temporary file left by a killed writer ({why})")
    store.close()
    return findings
