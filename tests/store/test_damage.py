"""Damaged stores (issue 17 items 7, 10, 11, 16): one line and exit 2, or the damaged row named and skipped.

A small finished study is trained once per module through the CLI and copied for each test, then damaged
the way the issue reproduced it: a bad ``config_json`` row, a text-valued metric, garbage inside a database
page, a zero-length database, a dropped ``runs`` table, a read-only workspace.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.store import Store, rows

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import store_workers  # noqa: E402

STUDY = {
    "name": "study",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 8], "num_train": 60, "num_test": 30},
    "student": {"model": "mlp", "width": 4},
    "method": {"name": "scratch"},
    "train": {"epochs": 2, "batch_size": 20, "device": "cpu"},
    "seeds": [0, 1],
}
READERS = (["runs"], ["compare"], ["report", "--no-eval"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    config = folder / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    assert main(["--workspace", str(folder / "ws"), "run", str(config), "--quiet"]) == 0
    return folder


@pytest.fixture
def study(trained, tmp_path, monkeypatch):
    """(workspace, config, run ids) of a copy of the trained study; the cwd is tmp_path (report writes there)."""
    shutil.copytree(trained / "ws", tmp_path / "ws")
    shutil.copy(trained / "study.yaml", tmp_path / "study.yaml")
    monkeypatch.chdir(tmp_path)
    with Store(tmp_path / "ws") as store:
        ids = [record.run_id for record in store.runs(experiment="study")]
    assert len(ids) == 2
    return tmp_path / "ws", tmp_path / "study.yaml", ids


def _kdlab(workspace: Path, *args: str) -> int:
    return main(["--workspace", str(workspace), *args])


def _sql(workspace: Path, statement: str, *parameters) -> None:
    connection = sqlite3.connect(workspace / "kdlab.db", isolation_level=None)
    connection.execute(statement, parameters)
    connection.close()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error: ") and "Traceback" not in err, err
    return lines[0]


# --- item 7: a damaged row is named once and skipped; the rest of the workspace keeps working -------------


@pytest.mark.parametrize("damage", ["config", "metric"])
def test_a_damaged_row_is_named_once_and_skipped_by_every_command(study, capsys, damage):
    workspace, config, (bad, good) = study
    if damage == "config":
        _sql(workspace, "UPDATE runs SET config_json = '{not json' WHERE run_id = ?", bad)
    else:
        _sql(workspace, "UPDATE final_metrics SET value = 'oops' WHERE run_id = ? AND key = 'test/acc'", bad)
        _sql(workspace, "UPDATE epoch_metrics SET value = 'oops' WHERE run_id = ? AND epoch = 1", bad)
    for args in (*READERS, ["show", good], ["run", str(config), "--quiet"]):
        rows._WARNED.clear()  # named once per process; each command here stands for one process
        assert _kdlab(workspace, *args) == 0, args
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        if args[0] == "runs":
            assert (bad in out) == (damage == "metric") and good in out  # a bad metric hides only itself
        if damage == "config" and args[0] in ("runs", "compare", "run"):
            assert err.count(bad) == 1 and "damaged row" in err and "kdlab doctor" in err
    if damage == "config":
        assert _kdlab(workspace, "show", bad) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert bad in line and "config_json is not valid JSON" in line and "kdlab.db" in line
    else:
        assert _kdlab(workspace, "show", bad) == 0
        out, err = capsys.readouterr()
        assert "test/acc" not in out and "'oops' is not a number" in err


@pytest.mark.parametrize("run_id, run_dir", [(None, "/etc"), ("../../outside", "runs/../../outside")])
def test_a_row_whose_run_dir_points_outside_its_folder_is_refused(study, capsys, run_id, run_dir):
    workspace, _, (bad, good) = study
    _sql(workspace, "PRAGMA foreign_keys = OFF")
    _sql(workspace, "UPDATE runs SET run_id = coalesce(?, run_id), run_dir = ? WHERE run_id = ?", run_id, run_dir, bad)
    rows._WARNED.clear()
    assert _kdlab(workspace, "runs") == 0
    out, err = capsys.readouterr()
    assert bad not in out and good in out and "outside" not in out
    assert ("run_dir '/etc'" if run_id is None else "not a valid run id") in err


def _garble_a_page(workspace: Path) -> None:
    """Overwrite the middle of the database with garbage, leaving the header page intact."""
    path = workspace / "kdlab.db"
    page = 4096
    size = path.stat().st_size
    assert size >= 6 * page, size
    with open(path, "r+b") as handle:
        for number in range(2, size // page - 1):
            handle.seek(number * page + 64)
            handle.write(b"\xde\xad\xbe\xef" * 200)


def test_garbage_in_a_database_page_is_one_line_for_every_command(study, capsys):
    workspace, config, (bad, good) = study
    with Store(workspace) as store:  # more rows, so the database spans enough pages to garble
        for epoch in range(2, 400):
            store.log_epoch(good, epoch, {f"k{i}": float(i) for i in range(6)})
    _garble_a_page(workspace)
    for args in (*READERS, ["show", good], ["run", str(config), "--quiet"], ["run", "--dry-run"]):
        assert _kdlab(workspace, *args) == 2, args
        line = _one_error_line(capsys.readouterr().err)
        assert "kdlab.db: the results database is damaged" in line and "kdlab doctor" in line, line
    assert _kdlab(workspace, "doctor") == 1
    assert "integrity_check" in capsys.readouterr().out


def test_a_zero_length_database_next_to_runs_is_refused_not_recreated(study, capsys):
    workspace, config, ids = study
    (workspace / "kdlab.db").write_bytes(b"")
    for args in (["runs"], ["run", str(config), "--quiet"]):
        assert _kdlab(workspace, *args) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "results database is empty (0 bytes)" in line and "restore it from a backup" in line
    assert (workspace / "kdlab.db").stat().st_size == 0  # left as found: nothing re-ran
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == sorted(ids)


def test_a_zero_length_database_of_an_interrupted_creation_is_initialised(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "kdlab.db").write_bytes(b"")  # SQLite creates the file before its first page
    with Store(workspace) as store:
        assert store.runs() == []


def test_a_dropped_runs_table_is_refused_not_recreated(study, capsys):
    workspace, config, _ = study
    _sql(workspace, "PRAGMA foreign_keys = OFF")
    _sql(workspace, "DROP TABLE runs")
    for args in (["run", str(config), "--quiet"], ["runs"], ["show", "x"]):
        assert _kdlab(workspace, *args) == 2, args
        line = _one_error_line(capsys.readouterr().err)
        assert "incomplete (table(s) runs missing)" in line and "kdlab.db" in line
    connection = sqlite3.connect(workspace / "kdlab.db")
    assert "runs" not in {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}


# --- item 10: read-only workspaces are readable; readers never create one ---------------------------------


@pytest.mark.parametrize("command", [["runs"], ["show", "x"], ["compare"], ["report", "--no-eval"], ["doctor"]])
def test_readers_never_create_a_workspace(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDLAB_WORKSPACE", raising=False)
    assert main(command) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no kdlab workspace at" in line and "kdlab-workspace" in line
    assert list(tmp_path.iterdir()) == []


def _read_only_runner(workspace: Path):
    """A function running ``kdlab ARGS`` on ``workspace`` mounted read-only (root: a read-only bind mount in a
    private mount namespace, since chmod stops nothing for root; others: chmod), or None if neither works."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    kdlab = [sys.executable, "-m", "kdlab.cli", "--workspace", str(workspace)]
    if os.geteuid() != 0:
        for root, folders, files in os.walk(workspace):
            for name in files:
                os.chmod(Path(root) / name, 0o444)
            for name in folders:
                os.chmod(Path(root) / name, 0o555)
        os.chmod(workspace, 0o555)
        return lambda *args: subprocess.run([*kdlab, *args], env=env, capture_output=True, text=True, timeout=300)
    if shutil.which("unshare") is None:
        return None
    mount = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(workspace)]
    probe = subprocess.run([*mount, "touch", str(workspace / "probe")], capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        return None
    return lambda *args: subprocess.run([*mount, *kdlab, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_read_only_workspace_can_be_read(trained, tmp_path):
    shutil.copytree(trained / "ws", tmp_path / "ws")
    workspace = tmp_path / "ws"
    with Store(workspace) as store:
        run_id = store.runs(experiment="study")[0].run_id
    before = sorted(str(p) for p in workspace.rglob("*"))
    kdlab = _read_only_runner(workspace)
    if kdlab is None:
        pytest.skip("cannot make a read-only folder here (root without mount namespaces)")
    try:
        report = ["report", "--no-eval", "--out", str(tmp_path / "r.html")]
        for args in (["runs"], ["show", run_id], ["compare"], report):
            result = kdlab(*args)
            assert result.returncode == 0, (args, result.stderr)
            assert run_id in result.stdout or args[0] in ("report", "compare"), result.stdout
        assert (tmp_path / "r.html").is_file()
        # A writer still says, in one line, that the workspace is not writable.
        result = kdlab("run", "--dry-run")
        assert result.returncode == 2 and "is not writable" in result.stderr, result.stderr
    finally:
        for root, folders, _ in os.walk(workspace):
            os.chmod(root, 0o755)
    assert sorted(str(p) for p in workspace.rglob("*")) == before  # nothing created (no -wal, -shm, probe)


# --- item 11: a dead holder reads 'interrupted' in every reader, at once -------------------------------------


def test_show_says_interrupted_for_a_dead_process_without_runs_first(tmp_path, capsys):
    workspace = tmp_path / "ws"
    child = multiprocessing.get_context("spawn").Process(target=store_workers.claim_and_exit,
                                                         args=(str(workspace), "killed"))
    child.start()
    child.join(60)
    assert _kdlab(workspace, "show", "killed") == 0
    out = capsys.readouterr().out
    assert "status interrupted" in out and f"process {child.pid}" in out and "ended without finishing" in out
    assert Store(workspace).runs(status="interrupted")[0].run_id == "killed"
    assert Store(workspace).runs(status="running") == []


# --- item 16: runs has a header and wall times -------------------------------------------------------------


def test_runs_prints_a_header_and_durations(study, capsys):
    workspace, _, ids = study
    _sql(workspace, "UPDATE runs SET started_at = finished_at - 125 WHERE run_id = ?", ids[0])
    assert _kdlab(workspace, "runs") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "EXPERIMENT", "TIME", "TEST/ACC", "LABEL"]
    row = next(line for line in lines if line.startswith(ids[0]))
    assert row.split()[:4] == [ids[0], "finished", "study", "2m05s"]
    assert _kdlab(workspace, "runs", "stdy") == 2
    assert "did you mean study?" in _one_error_line(capsys.readouterr().err)


def test_list_without_a_match_is_one_line_with_close_names(capsys):
    assert main(["list", "models", "zzz"]) == 2
    assert "no model matches 'zzz'" in _one_error_line(capsys.readouterr().err)
    assert main(["list", "models", "resnet2"]) == 2
    assert "did you mean" in _one_error_line(capsys.readouterr().err)
    assert main(["list", "modles"]) == 2
    assert "did you mean models" in _one_error_line(capsys.readouterr().err)


# --- a fixed-seed fuzz of damaged rows: every reader ends in exit 0 or one line, never a traceback ------------

VALUES = [None, "", "x", b"\x00\xff", 1e308, -1, 2 ** 63 - 1, 0.5, "{", "[]", "null", "{}", '{"method": 3}',
          '{"data": null, "student": [], "method": {"name": 7}}', "nan", float("inf"), "runs/../x", "running"]
CELLS = [("runs", column) for column in ("experiment", "role", "label", "seed", "group_key", "config_json", "status",
                                         "pid", "pid_start", "host", "started_at", "finished_at", "error", "run_dir",
                                         "heartbeat_at")]
CELLS += [("final_metrics", "value"), ("final_metrics", "key"), ("epoch_metrics", "value"),
          ("epoch_metrics", "epoch"), ("epoch_metrics", "key"), ("experiments", "config_json"),
          ("experiments", "created_at")]


@pytest.mark.parametrize("case", range(48))
def test_damaged_cells_never_give_a_traceback(study, capsys, case):
    import random

    workspace, _, (bad, good) = study
    generator = random.Random(case)
    damage = [(generator.choice(CELLS), generator.choice(VALUES)) for _ in range(1 + case % 3)]
    connection = sqlite3.connect(workspace / "kdlab.db", isolation_level=None)
    connection.execute("PRAGMA foreign_keys = OFF")
    connection.execute("PRAGMA ignore_check_constraints = ON")
    for (table, column), value in damage:
        where = "" if table == "experiments" else " WHERE run_id = ?"
        try:
            connection.execute(f"UPDATE {table} SET {column} = ?{where}", (value,) + (() if not where else (bad,)))
        except sqlite3.IntegrityError:
            pass  # NOT NULL / primary key: SQLite itself keeps these
    connection.close()
    for args in (*READERS, ["show", bad], ["show", good]):
        rows._WARNED.clear()
        code = _kdlab(workspace, *args)
        out, err = capsys.readouterr()
        assert "Traceback" not in err and code in (0, 2), (damage, args, err)
        if code == 2:
            _one_error_line(err.split("\n")[-2] if err.count("\n") > 1 and "warning" in err else err)


@pytest.mark.parametrize("config", ["{}", '{"method": 3, "data": []}', '{"student": {"model": null}}'])
def test_a_mapping_config_of_the_wrong_shape_never_gives_a_traceback(study, capsys, config):
    workspace, _, (bad, _good) = study
    _sql(workspace, "UPDATE runs SET config_json = ? WHERE run_id = ?", config, bad)
    for args in (*READERS, ["report"], ["show", bad]):
        code = _kdlab(workspace, *args)
        err = capsys.readouterr().err
        assert "Traceback" not in err and code in (0, 2), (args, err)
