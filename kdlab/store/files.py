"""Crash-safe file writes for run folders.

``atomic_write_*`` write a temporary file in the target's folder, flush and
fsync it, then ``os.replace`` it over the target: a reader (or a process that
was killed mid-write) sees either the old file or the new one, never half of
one. The temporary file lives in the same folder because ``os.replace`` is only
atomic within one filesystem.

``append_jsonl`` / ``read_jsonl`` keep one JSON record per line. A crash can
leave the last line cut short; ``read_jsonl`` skips such a line and the next
``append_jsonl`` trims it away before writing, so it never ends up glued to a
new record in the middle of the file.

Files get the mode a plain ``open()`` would give them (0666 less the user's umask): ``mkstemp``
creates its temporary file 0600, which would make every config, metrics file, model and report
private to its owner in a shared workspace.

A write that fails because the disk is full or the folder is read-only (or
not ours) raises :class:`~kdlab.errors.WorkspaceError`, one line naming the
file; the target keeps its previous content and no temporary file is left.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kdlab.errors import KdlabError, WorkspaceError

# errno values that mean "this workspace cannot take the write", not "kdlab has a bug".
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def workspace_error(path: str | Path, error: OSError) -> WorkspaceError | None:
    """The one-line error for a write to ``path`` that failed with a full or unwritable disk, else None."""
    if error.errno not in DISK_ERRNOS:
        return None
    reason = error.strerror or os.strerror(error.errno)
    return WorkspaceError(f"{path}: cannot write ({reason}); free disk space or make the folder writable, or pass "
                          "--workspace DIR to another folder; finished runs and the last checkpoint are kept")


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux /proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # os.umask can only be read by setting it; set it straight back (a race only with another thread doing the same).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def _fsync_folder(folder: Path) -> None:
    """Persist the folder entry of a renamed file (POSIX); best effort elsewhere."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open folders; the rename itself is still atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating the parent folders."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise workspace_error(path, error) or error from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if hasattr(os, "fchmod"):  # mkstemp made it 0600; give it the user's umask (no fchmod on Windows)
                os.fchmod(handle.fileno(), default_file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        # Also on KeyboardInterrupt: leave no temporary file behind.
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and workspace_error(path, error) is not None:
            raise workspace_error(path, error) from None
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    NaN and infinities are written as Python's ``NaN``/``Infinity`` tokens, which
    ``json.load`` reads back (they are not strict JSON).
    """
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _trim_partial_last_line(handle: Any) -> None:
    """Cut a trailing line that has no newline (a write cut short by a crash)."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return
    # Walk back in blocks to the last newline; keep everything up to it.
    end = size
    block = 65536
    while end > 0:
        start = max(0, end - block)
        handle.seek(start)
        chunk = handle.read(end - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            handle.truncate(start + newline + 1)
            return
        end = start
    handle.truncate(0)


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append ``obj`` as one JSON line to ``path`` and flush it to the OS.

    The line is written with a single ``write`` call; a partial last line left
    by an earlier crash is removed first.
    """
    path = Path(path)
    line = (json.dumps(obj) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as handle:
            _trim_partial_last_line(handle)
            handle.write(line)
            handle.flush()
    except OSError as error:
        # A partial line left by a failed write is trimmed by the next append (see the module docstring).
        raise workspace_error(path, error) or error from None


def _jsonl_lines(data: bytes) -> list[tuple[int, Any, bool]]:
    """(line number, record or ``_NOT_JSON``, complete) of each non-blank line of a JSON-lines file.

    ``complete``: the line ends in a newline; the last line without one may be a write cut short.
    """
    lines = data.split(b"\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = _NOT_JSON
        out.append((number, record, number < len(lines)))
    return out


_NOT_JSON = object()


def read_jsonl(path: str | Path) -> list[Any]:
    """Records of a JSON-lines file, skipping blank lines and a truncated last line.

    A complete line (one that ends in a newline) that is not valid JSON is real
    damage, not an interrupted write, and raises ``KdlabError``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KdlabError(f"{path}: file not found; check the run folder path (see `kdlab runs`)") from None
    except OSError as error:
        raise KdlabError(f"{path}: cannot read ({error.strerror}); check the file's permissions") from None
    records = []
    for number, record, complete in _jsonl_lines(data):
        if record is _NOT_JSON:
            if complete:
                raise KdlabError(f"{path}: line {number} is not valid JSON; delete or repair that line")
            continue  # a record whose write was cut short by a crash
        records.append(record)
    return records


def read_metric_rows(path: Path) -> tuple[list[dict], list[str]]:
    """(rows, problems) of a run's ``metrics.jsonl``: each line that is not a JSON object with an integer
    ``epoch`` is skipped and named (a cut-short last line from a crash is skipped silently)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise WorkspaceError(f"{path}: cannot read ({exc.strerror}); check the file's permissions") from None
    rows, problems = [], []
    for number, row, complete in _jsonl_lines(data):
        if row is _NOT_JSON and not complete:
            continue
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            problems.append(f"{path}: line {number} is not a metrics record (a JSON object with an integer epoch); "
                            "skipped")
            continue
        rows.append(row)
    return rows, problems
