"""Crash-safe file helpers: atomic writes and JSON lines."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab.errors import WorkspaceError

import kdlab
from kdlab.errors import KdlabError
from kdlab.store import files
from kdlab.store import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl

HERE = Path(__file__).resolve().parent


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "note.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(target.parent) == ["note.txt"]  # no temporary files left


def test_atomic_write_json_round_trips_non_finite(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"acc": 0.5, "nll": math.inf, "bad": math.nan, "list": [1, 2]})
    loaded = json.loads(target.read_text())
    assert loaded["acc"] == 0.5 and loaded["nll"] == math.inf and math.isnan(loaded["bad"])
    assert loaded["list"] == [1, 2]


def test_failed_replace_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"version": 1})

    def broken_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    # A full disk is the workspace's problem, not a bug: a one-line WorkspaceError naming the file.
    with pytest.raises(WorkspaceError, match=r"state\.json: cannot write \(No space left on device\)"):
        atomic_write_json(target, {"version": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_failed_fsync_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.txt"
    atomic_write_text(target, "old")

    def broken_fsync(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.txt"]


def test_killed_writer_never_leaves_a_partial_target(tmp_path):
    """SIGKILL a process rewriting a ~1 MB file in a loop: the target always parses whole."""
    target = tmp_path / "big.json"
    size = 150_000
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(kdlab.__file__).parents[1]), str(HERE)]))
    for attempt in range(3):
        process = subprocess.Popen(
            [sys.executable, str(HERE / "store_workers.py"), "rewrite", str(target), str(size)],
            env=environment, stdout=subprocess.PIPE,
        )
        assert process.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 10
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2 + 0.1 * attempt)  # kill at some point inside the write loop
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        data = json.loads(target.read_text())
        assert data["payload"] == [data["version"]] * size


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "log" / "metrics.jsonl"
    records = [{"epoch": 0, "acc": 0.1}, {"epoch": 1, "acc": math.inf}, [1, "two"]]
    for record in records:
        append_jsonl(path, record)
    assert read_jsonl(path) == records
    assert path.read_text().count("\n") == 3


def test_read_jsonl_skips_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 0})
    append_jsonl(path, {"epoch": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"epoch": 2, "ac')  # the crash happened mid-write
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]


def test_append_after_crash_drops_the_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 0})
    with open(path, "ab") as handle:
        handle.write(b'{"epoch": 1, "ac')
    append_jsonl(path, {"epoch": 1, "acc": 0.5})
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1, "acc": 0.5}]
    # Also when the only line is partial.
    lone = tmp_path / "lone.jsonl"
    lone.write_bytes(b'{"x"')
    append_jsonl(lone, {"x": 1})
    assert lone.read_bytes() == b'{"x": 1}\n'


def test_read_jsonl_keeps_complete_last_line_without_newline_and_skips_blanks(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_rejects_damage_in_the_middle(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(KdlabError, match=r"bad.jsonl: line 2 is not valid JSON"):
        read_jsonl(path)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(KdlabError, match="nothere.jsonl: file not found"):
        read_jsonl(tmp_path / "nothere.jsonl")


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    # mkstemp creates 0600 whatever the umask; a shared workspace needs what open() would have given.
    previous = os.umask(umask)
    try:
        assert files.current_umask() == umask
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        atomic_write_bytes(tmp_path / "model.safetensors", b"\x00")
        atomic_write_json(tmp_path / "final.json", {"test/acc": 0.5})
    finally:
        os.umask(previous)
    for name in ("config.yaml", "model.safetensors", "final.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
