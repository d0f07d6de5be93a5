"""`kdlab doctor`: a clean workspace exits 0; each kind of damage is found (exit 1); --fix does only what is safe."""
from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import sys
import time
from pathlib import Path

from kdlab.cli import main
from kdlab.store import Store

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import store_workers  # noqa: E402


def _workspace(tmp_path: Path) -> Path:
    """Two finished runs with their folders and final.json, as `kdlab run` leaves them."""
    workspace = tmp_path / "ws"
    with Store(workspace) as store:
        store.ensure_experiment(store_workers.EXPERIMENT, {})
        for run_id in ("a", "b"):
            store.claim(run_id, experiment=store_workers.EXPERIMENT, role="student", label=run_id, seed=0,
                        group_key="g", config={"seed": 0})
            (workspace / "runs" / run_id / "final.json").write_text(json.dumps({"test/acc": 0.5}))
            store.finish(run_id, {"test/acc": 0.5})
    return workspace


def _doctor(workspace: Path, capsys, *flags: str) -> tuple[int, list[str]]:
    code = main(["--workspace", str(workspace), "doctor", *flags])
    return code, capsys.readouterr().out.splitlines()


def _old(path: Path) -> Path:
    stamp = time.time() - 3600
    os.utime(path, (stamp, stamp))
    return path


def test_a_clean_workspace_is_ok(tmp_path, capsys):
    code, lines = _doctor(_workspace(tmp_path), capsys)
    assert code == 0 and lines[-1].endswith("ok (2 runs, database integrity ok, every run folder matches its row)")


def test_doctor_finds_every_kind_of_problem_and_fix_does_only_the_safe_part(tmp_path, capsys):
    workspace = _workspace(tmp_path)
    runs = workspace / "runs"
    child = multiprocessing.get_context("spawn").Process(target=store_workers.claim_and_exit,
                                                         args=(str(workspace), "dead"))
    child.start()
    child.join(60)
    (runs / "b" / "final.json").unlink()                                    # finished without final.json
    (runs / "stray").mkdir()                                                # a folder without a row
    stale = runs / "a" / ".final.json.x1y2z3.tmp"                           # a killed atomic write
    stale.write_text("{")
    _old(stale)
    checkpoint = runs / "a" / "checkpoints" / ".tmp-epoch-0003-999999999"   # a killed checkpoint write
    checkpoint.mkdir(parents=True)
    _old(checkpoint)
    fresh = runs / "a" / ".config.yaml.abcd.tmp"                            # young: maybe being written now
    fresh.write_text("x")
    connection = sqlite3.connect(workspace / "kdlab.db", isolation_level=None)
    connection.execute("INSERT INTO epoch_metrics VALUES ('a', 1, 'train/loss', 'oops')")
    connection.close()

    code, lines = _doctor(workspace, capsys)
    text = "\n".join(lines)
    assert code == 1
    assert f"run dead: stored as running but process {child.pid}" in text
    assert "run b: finished but" in text and "final.json is missing" in text
    assert "stray: a folder without a row" in text
    assert "epoch_metrics 'train/loss' holds 'oops'" in text
    for path in (stale, checkpoint, fresh):
        assert f"{path}: a temporary file left by a killed writer" in text
    assert lines[-1].startswith("7 problem(s)")

    code, lines = _doctor(workspace, capsys, "--fix")
    text = "\n".join(lines)
    assert code == 1  # what --fix must not touch remains
    assert "fixed: run dead: its process is gone; marked interrupted" in text
    assert f"fixed: {stale}: removed" in text and f"fixed: {checkpoint}: removed" in text
    assert not stale.exists() and not checkpoint.exists() and fresh.exists()
    assert Store(workspace).run("dead").status == "interrupted"
    assert (runs / "stray").is_dir() and "final.json is missing" in text  # reported, never "fixed"
    with sqlite3.connect(workspace / "kdlab.db") as connection:
        assert connection.execute("SELECT status FROM runs WHERE run_id = 'dead'").fetchone()[0] == "interrupted"


def test_doctor_names_a_damaged_row(tmp_path, capsys):
    workspace = _workspace(tmp_path)
    connection = sqlite3.connect(workspace / "kdlab.db", isolation_level=None)
    connection.execute("UPDATE runs SET config_json = '[1, 2' WHERE run_id = 'a'")
    connection.close()
    code, lines = _doctor(workspace, capsys)
    assert code == 1 and any(line.startswith("problem: run a: damaged row (config_json is not valid JSON")
                             for line in lines)
