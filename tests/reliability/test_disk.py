"""A full disk or an unwritable workspace: a one-line error (exit 2), never a corrupt or lost checkpoint.

We run as root, where chmod does not stop writes, so the failures are injected:
the OS call that would fail raises the OSError it would raise (ENOSPC, EROFS,
EACCES), or SQLite is capped with ``PRAGMA max_page_count`` (a real "database
or disk is full").
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

from kdlab.cli import main
from kdlab.engine import checkpoint
from kdlab.engine.checkpoint import load_latest_checkpoint, read_model_file, save_checkpoint
from kdlab.errors import WorkspaceError
from kdlab.store import Store, append_jsonl, files

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from reliability_helpers import TINY, write_config  # noqa: E402


class _FillingFile:
    """A file object that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            self.handle.write(data[: self.room])  # a partial write really lands on disk first
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def _disk_fills_up(monkeypatch, room: int = 100) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: _FillingFile(real_fdopen(fd, mode), room))


def test_enospc_during_a_checkpoint_keeps_the_previous_one_intact(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    first = {"w": torch.arange(1000, dtype=torch.float32)}
    save_checkpoint(root, 1, first, {"step": 10})
    _disk_fills_up(monkeypatch)
    with pytest.raises(WorkspaceError, match="No space left on device") as caught:
        save_checkpoint(root, 2, {"w": torch.zeros(1000)}, {"step": 20})
    monkeypatch.undo()
    assert "\n" not in str(caught.value) and str(root) in str(caught.value)
    tensors, state = load_latest_checkpoint(root)
    assert state == {"epoch": 1, "step": 10} and torch.equal(tensors["w"], first["w"])
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "latest.json"]  # no half-written leftovers


def test_enospc_on_the_pointer_keeps_pointing_at_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, {"w": torch.ones(3)}, {})
    real_replace = os.replace

    def full_at_the_pointer(source, destination):
        if str(destination).endswith("latest.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", full_at_the_pointer)
    with pytest.raises(WorkspaceError):
        save_checkpoint(root, 2, {"w": torch.zeros(3)}, {})
    monkeypatch.undo()
    tensors, state = load_latest_checkpoint(root)
    assert state["epoch"] == 1 and torch.equal(tensors["w"], torch.ones(3))


def test_model_file_write_is_atomic_under_enospc(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    net = torch.nn.Linear(3, 2)
    checkpoint.save_model(path, net, {"model": "linear"})
    before = path.read_bytes()
    _disk_fills_up(monkeypatch, room=10)
    with pytest.raises(WorkspaceError, match="model.safetensors: cannot write"):
        checkpoint.save_model(path, torch.nn.Linear(3, 2), {"model": "linear"})
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.safetensors"]
    tensors, spec = read_model_file(path)
    assert spec == {"model": "linear"} and torch.equal(tensors["weight"], net.weight.detach())


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_run_folder_is_a_workspace_error(tmp_path, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(WorkspaceError, match=os.strerror(code)):
        files.atomic_write_text(tmp_path / "x.txt", "x")
    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(WorkspaceError, match=os.strerror(code)):
        append_jsonl(tmp_path / "metrics.jsonl", {"epoch": 1})


def test_a_bug_is_not_disguised_as_a_disk_error(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # IsADirectoryError: not a full disk, keeps its type and traceback
    with pytest.raises(IsADirectoryError):
        append_jsonl(tmp_path / "metrics.jsonl", {"epoch": 1})


def test_read_only_workspace_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from kdlab.store import database

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(database.tempfile, "TemporaryFile", refuse)
    # A writer: `runs` now opens read-only and reads a read-only workspace (issue 17 item 10).
    assert main(["--workspace", str(tmp_path / "ws"), "run", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable: Read-only file system" in err[0] and "--workspace" in err[0]


def test_a_full_database_is_a_workspace_error_and_keeps_what_it_had(tmp_path):
    store = Store(tmp_path / "ws")
    store.ensure_experiment("e", {})
    store.claim("r1", experiment="e", role="student", label="x", seed=0, group_key="g", config={})
    store.log_epoch("r1", 1, {"loss": 1.0})
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is now full
    with pytest.raises(WorkspaceError, match="kdlab.db: cannot write \\(database or disk is full\\)"):
        store.log_epoch("r1", 2, {f"key{i}": float(i) for i in range(5000)})
    assert not store._db.in_transaction
    store.close()
    assert Store(tmp_path / "ws").epoch_metrics("r1") == {1: {"loss": 1.0}}
    connection = sqlite3.connect(tmp_path / "ws" / "kdlab.db")
    assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    connection.close()


@pytest.mark.integration  # two short CLI studies in-process (~2 s)
def test_disk_full_mid_run_stops_the_study_with_exit_2_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    cfg = dict(TINY, train=dict(TINY["train"], epochs=4), seeds=[0, 1])
    config = write_config(tmp_path, cfg)
    real_save = checkpoint.save_checkpoint
    calls = []

    def disk_fills_after_two_checkpoints(root, epoch, *args, **kwargs):
        calls.append(epoch)
        if len(calls) == 3:
            _disk_fills_up(monkeypatch)  # from here on every file write of the run hits a full disk
        return real_save(root, epoch, *args, **kwargs)

    from kdlab.engine import loop

    monkeypatch.setattr(loop, "save_checkpoint", disk_fills_after_two_checkpoints)
    workspace = tmp_path / "ws"
    assert main(["--workspace", str(workspace), "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    runs = Store(workspace).runs(experiment="crash")
    # The study stopped (the second seed never started); the run is interrupted, not failed: the disk's fault.
    assert [r.status for r in runs] == ["interrupted"]
    assert "No space left on device" in runs[0].error
    checkpoints = Path(runs[0].run_dir) / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["epoch"] == 2  # the last good checkpoint
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-0001", "epoch-0002", "latest.json"]

    monkeypatch.undo()  # space freed: a plain `kdlab run` resumes it
    assert main(["--workspace", str(workspace), "run", str(config), "--quiet"]) == 0
    assert f"resuming student {runs[0].run_id}" in capsys.readouterr().out
    runs = Store(workspace).runs(experiment="crash")
    assert [r.status for r in runs] == ["finished", "finished"]
    assert sorted(Store(workspace).epoch_metrics(runs[0].run_id)) == [1, 2, 3, 4]


def test_enospc_writing_the_dataset_cache_is_a_workspace_error(tmp_path, monkeypatch):
    import numpy as np

    from kdlab.data import mnist1d

    real_savez = np.savez

    def savez_on_a_full_disk(handle, **arrays):
        handle.write(b"PK")  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mnist1d.np, "savez", savez_on_a_full_disk)
    with pytest.raises(WorkspaceError, match="cannot write the mnist1d cache \\(No space left on device\\)"):
        mnist1d._write_cache(tmp_path / "cache" / "x.npz", {"a": np.zeros(3)})
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file left to be read as a cache
    monkeypatch.setattr(mnist1d.np, "savez", real_savez)
