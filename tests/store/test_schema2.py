"""Schema 2: runs keep their method and grid point; run_inputs holds the run graph's edges; schema 1 migrates once."""
from __future__ import annotations

import json
import sqlite3

import pytest

from kdlab.errors import KdlabError
from kdlab.store import Store
from kdlab.store import schema

V1_RUNS = """CREATE TABLE runs (run_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, role TEXT NOT NULL,
    label TEXT NOT NULL, seed INTEGER, group_key TEXT NOT NULL, config_json TEXT NOT NULL, status TEXT NOT NULL,
    pid INTEGER, pid_start INTEGER, host TEXT, started_at REAL, finished_at REAL, error TEXT, run_dir TEXT NOT NULL,
    heartbeat_at REAL)"""


def _schema1_workspace(tmp_path):
    """A workspace as schema 1 wrote it: one finished kd run."""
    tmp_path.mkdir(exist_ok=True)
    db = sqlite3.connect(tmp_path / "kdlab.db")
    db.executescript(f"""
        CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
        CREATE TABLE experiments (name TEXT PRIMARY KEY, created_at REAL NOT NULL, config_json TEXT NOT NULL);
        INSERT INTO experiments VALUES ('exp', 0, '{{}}');
        {V1_RUNS};
        CREATE TABLE epoch_metrics (run_id TEXT, epoch INTEGER, key TEXT, value REAL, PRIMARY KEY (run_id, epoch, key));
        CREATE TABLE final_metrics (run_id TEXT, key TEXT, value REAL, PRIMARY KEY (run_id, key));
    """)
    config = json.dumps({"method": {"name": "kd", "temperature": 4.0}, "seed": 0})
    db.execute("INSERT INTO runs VALUES ('exp-a', 'exp', 'student', 'seed=0', 0, 'g', ?, 'finished', NULL, NULL, "
               "NULL, 1.0, 2.0, NULL, 'runs/exp-a', NULL)", (config,))
    db.execute("INSERT INTO final_metrics VALUES ('exp-a', 'test/acc', 0.5)")
    db.commit()
    db.close()
    (tmp_path / "runs" / "exp-a").mkdir(parents=True)
    return tmp_path


def test_claim_records_method_point_and_edges(tmp_path):
    store = Store(tmp_path)
    store.ensure_experiment("teachers", {})
    store.ensure_experiment("exp", {})
    store.claim("teachers-t", experiment="teachers", role="teacher", label="t", seed=0, group_key="t", config={},
                method="scratch")
    inputs = [("teachers-t", "trajectory", 2), ("teachers-t", "trajectory", None), ("teachers-t", "trajectory", 2)]
    store.claim("exp-s", experiment="exp", role="student", label="s", seed=0, group_key="s", config={}, method="kd",
                point={"method.name": "kd"}, inputs=inputs)
    record = store.run("exp-s")
    assert record.method == "kd" and record.point == {"method.name": "kd"}
    assert store.inputs("exp-s") == [("teachers-t", "trajectory", 2), ("teachers-t", "trajectory", None)]
    assert store.inputs("teachers-t") == []
    # A re-claim (a resumed run) replaces its edges rather than adding to them.
    store.interrupt("exp-s")
    store.claim("exp-s", experiment="exp", role="student", label="s", seed=0, group_key="s", config={}, method="kd",
                inputs=[("teachers-t", "teacher", None)])
    assert store.inputs("exp-s") == [("teachers-t", "teacher", None)]


def test_schema1_reads_read_only_and_migrates_once_on_write(tmp_path):
    ws = _schema1_workspace(tmp_path / "ws")
    reader = Store(ws, readonly=True)
    (record,) = reader.runs()
    assert record.method is None and record.point is None and reader.inputs("exp-a") == []
    reader.close()

    Store(ws).close()  # a writer migrates
    db = sqlite3.connect(ws / "kdlab.db")
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(schema.SCHEMA_VERSION,)]
    assert db.execute("SELECT method, point_json FROM runs").fetchall() == [("kd", None)]
    assert "run_inputs" in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    store = Store(ws)  # a second open finds schema 2: nothing to do
    (record,) = store.runs()
    assert record.status == "finished" and record.final == {"test/acc": 0.5} and record.method == "kd"


def test_schema2_without_the_edge_table_is_refused(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "kdlab.db")
    db.execute("DROP TABLE run_inputs")
    db.commit()
    db.close()
    with pytest.raises(KdlabError, match="run_inputs missing"):
        Store(tmp_path)
