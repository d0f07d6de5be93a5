"""The results store: schema, claims, metrics, reads and multi-process safety."""
from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab.errors import KdlabError
from kdlab.store import STATUSES, RunRecord, Store
from kdlab.store import database

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # spawn children inherit sys.path and import the workers by name
import store_workers  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")


def new_run(store: Store, run_id: str, *, experiment: str = "exp", seed: int = 0, label: str | None = None,
            group_key: str = "g", role: str = "student") -> str | None:
    store.ensure_experiment(experiment, {"name": experiment})
    return store.claim(
        run_id, experiment=experiment, role=role, label=label or f"point seed={seed}", seed=seed,
        group_key=group_key, config={"seed": seed, "nested": {"lr": 0.1}},
    )


def raw(store: Store) -> sqlite3.Connection:
    """A second, independent connection for poking at the database like another process."""
    connection = sqlite3.connect(store.database_path, timeout=30, isolation_level=None)
    connection.row_factory = sqlite3.Row
    return connection


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "ws") as opened:
        yield opened


# --- opening ------------------------------------------------------------------------


def test_layout_and_connection_settings(tmp_path):
    workspace = tmp_path / "new" / "ws"
    store = Store(str(workspace))
    assert (workspace / "kdlab.db").is_file()
    assert (workspace / "runs").is_dir() and (workspace / "cache").is_dir()
    connection = store._db
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] >= 30_000
    assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert connection.execute("SELECT version FROM schema_version").fetchall()[0][0] == database.SCHEMA_VERSION
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.experiments()


def test_reopen_keeps_data(tmp_path):
    with Store(tmp_path) as store:
        new_run(store, "r1")
        store.finish("r1", {"test/acc": 0.75})
    with Store(tmp_path) as store:
        assert store.run("r1").final == {"test/acc": 0.75}
        assert len(store._db.execute("SELECT * FROM schema_version").fetchall()) == 1


def test_unwritable_workspace_chmod(tmp_path):
    workspace = tmp_path / "locked"
    workspace.mkdir()
    workspace.chmod(0o500)
    try:
        if os.access(workspace, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(KdlabError, match=r"workspace .*locked is not writable: .*; pass --workspace DIR"):
            Store(workspace)
    finally:
        workspace.chmod(0o700)


def test_unwritable_workspace_under_a_file(tmp_path):
    # Works as root too: a folder cannot be created inside a regular file.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(KdlabError, match=r"workspace .*file[/\\]ws is not writable: .*pass --workspace DIR \(or set workspace:\)"):
        Store(blocker / "ws")


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path).close()
    connection = sqlite3.connect(tmp_path / "kdlab.db", isolation_level=None)
    connection.execute("UPDATE schema_version SET version = 99")
    connection.close()
    with pytest.raises(KdlabError, match="schema version 99 is newer"):
        Store(tmp_path)


def test_garbage_database_file(tmp_path):
    (tmp_path / "kdlab.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KdlabError, match="kdlab.db: not a kdlab results database"):
        Store(tmp_path)


def test_store_refuses_pickling_and_use_after_fork(store):
    with pytest.raises(TypeError, match="open a new Store"):
        pickle.dumps(store)
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    pid = os.fork()
    if pid == 0:  # child: must refuse rather than corrupt the parent's connection
        code = 1
        try:
            store.experiments()
        except RuntimeError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert store.experiments() == []  # the parent's connection still works


# --- experiments and claims --------------------------------------------------------------


def test_ensure_experiment(store):
    assert store.ensure_experiment("b", {"x": 1}) is True
    assert store.ensure_experiment("a", {"x": 1}) is True
    assert store.ensure_experiment("b", {"x": 2}) is False
    assert store.experiments() == ["b", "a"]  # oldest first
    row = raw(store).execute("SELECT config_json FROM experiments WHERE name = 'b'").fetchone()
    assert row[0] == '{"x": 2}'


def test_claim_new_then_skip_while_running_then_finished(store):
    assert new_run(store, "r1", seed=3) is None
    record = store.run("r1")
    assert record.status == "running" and record.pid == os.getpid() and record.host == store.host
    assert record.run_dir == store.workspace / "runs" / "r1" and record.run_dir.is_dir()
    assert record.config == {"seed": 3, "nested": {"lr": 0.1}} and record.seed == 3
    assert new_run(store, "r1", seed=3) == "running"  # this very process holds it
    store.finish("r1", {"test/acc": 0.9})
    assert new_run(store, "r1", seed=3) == "finished"
    assert store.run("r1").status == "finished"


def test_claim_needs_experiment_and_a_safe_id(store):
    with pytest.raises(ValueError, match="ensure_experiment"):
        store.claim("r1", experiment="nope", role="student", label="x", seed=0, group_key="g", config={})
    store.ensure_experiment("exp", {})
    for bad in ("", "../escape", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="invalid run id"):
            store.claim(bad, experiment="exp", role="student", label="x", seed=0, group_key="g", config={})


def test_failed_and_interrupted_runs_are_reclaimable(store):
    new_run(store, "r1")
    store.log_epoch("r1", 0, {"loss": 1.0})
    assert store.fail("r1", "CUDA out of memory") is True
    assert store.run("r1").status == "failed" and store.run("r1").error == "CUDA out of memory"
    assert new_run(store, "r1") == "failed"
    record = store.run("r1")
    assert record.status == "running" and record.error is None and record.finished_at is None
    assert store.epoch_metrics("r1") == {0: {"loss": 1.0}}  # kept for resuming
    assert store.interrupt("r1") is True
    assert new_run(store, "r1") == "interrupted"


def test_failed_runs_are_taken_only_if_they_failed_before_the_given_time(store):
    def claim(before: float) -> str | None:
        return store.claim("r1", experiment="exp", role="student", label="x", seed=0, group_key="g", config={},
                           take_failed_before=before)

    new_run(store, "r1")
    store.fail("r1", "boom")
    started = store.run("r1").started_at
    assert claim(-math.inf) == "failed_kept" and claim(started) == "failed_kept"  # a study's own failure
    record = store.run("r1")
    assert record.status == "failed" and record.error == "boom" and record.started_at == started  # untouched
    assert claim(started + 1.0) == "failed"  # failed before this study began: retried
    assert store.run("r1").status == "running"


def test_fail_and_interrupt_never_undo_finished(store):
    new_run(store, "r1")
    store.finish("r1", {"test/acc": 0.5})
    assert store.fail("r1", "late error in cleanup") is False
    assert store.interrupt("r1") is False
    record = store.run("r1")
    assert record.status == "finished" and record.error is None and record.final == {"test/acc": 0.5}


def test_claim_of_dead_process_is_reclaimed(tmp_path):
    workspace = str(tmp_path)
    child = SPAWN.Process(target=store_workers.claim_and_exit, args=(workspace, "dead-run"))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    with Store(workspace) as store:
        before = store.run("dead-run")
        # Stored as 'running', read as 'interrupted': readers apply the liveness check (issue 17 item 11).
        assert before.status == "interrupted" and before.pid == child.pid
        assert raw(store).execute("SELECT status FROM runs WHERE run_id = 'dead-run'").fetchone()[0] == "running"
        previous = store.claim("dead-run", experiment=store_workers.EXPERIMENT, role="student",
                               label="dead seed=0", seed=0, group_key="dead", config={})
        assert previous == "interrupted"  # never "running", which would tell the caller to skip it
        after = store.run("dead-run")
        assert after.status == "running" and after.pid == os.getpid()


def test_mark_dead_runs_interrupted(tmp_path):
    workspace = str(tmp_path)
    child = SPAWN.Process(target=store_workers.claim_and_exit, args=(workspace, "dead-run"))
    child.start()
    child.join(60)
    with Store(workspace) as store:
        new_run(store, "alive-run", experiment=store_workers.EXPERIMENT)  # held by this live process
        new_run(store, "other-host", experiment=store_workers.EXPERIMENT)
        raw(store).execute("UPDATE runs SET host = 'elsewhere', pid = ? WHERE run_id = 'other-host'", (child.pid,))
        assert store.mark_dead_runs_interrupted() == ["dead-run"]
        statuses = {record.run_id: record.status for record in store.runs()}
        assert statuses == {"dead-run": "interrupted", "alive-run": "running", "other-host": "running"}
        assert str(child.pid) in store.run("dead-run").error
        assert store.mark_dead_runs_interrupted() == []
        # A run held on another host cannot be checked, so it is never taken over.
        assert new_run(store, "other-host", experiment=store_workers.EXPERIMENT) == "running"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_reused_pid_counts_as_dead(store):
    new_run(store, "r1")
    # Our pid is alive, but with another start time it belongs to another process.
    raw(store).execute("UPDATE runs SET pid_start = pid_start + 12345 WHERE run_id = 'r1'")
    assert new_run(store, "r1") == "interrupted"
    assert store.run("r1").status == "running"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_zombie_counts_as_dead():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stat = database._process_start_ticks(process.pid)
            if stat is not None and stat[0] == "Z":
                break
            time.sleep(0.01)
        assert database._process_start_ticks(process.pid)[0] == "Z"
        os.kill(process.pid, 0)  # kill() alone would call the zombie alive
        assert database._process_alive(process.pid, None) is False
    finally:
        process.wait()
    assert database._process_alive(os.getpid(), database._own_start_ticks()) is True
    assert database._process_alive(None, None) is False


# --- metrics ------------------------------------------------------------------------------


def test_epoch_metrics_upsert_and_non_finite_round_trip(store):
    new_run(store, "r1")
    store.log_epoch("r1", 1, {"loss": 2.0, "acc": 0.1})
    store.log_epoch("r1", 0, {"loss": math.inf, "acc": -math.inf, "odd": math.nan})
    store.log_epoch("r1", 1, {"loss": 1.5})  # re-logged epoch overwrites that key only
    metrics = store.epoch_metrics("r1")
    assert list(metrics) == [0, 1]
    assert metrics[1] == {"loss": 1.5, "acc": 0.1}
    assert metrics[0]["loss"] == math.inf and metrics[0]["acc"] == -math.inf and math.isnan(metrics[0]["odd"])
    store.finish("r1", {"test/nll": math.nan, "test/acc": 1, "test/big": math.inf})
    final = store.run("r1").final
    assert math.isnan(final["test/nll"]) and final["test/acc"] == 1.0 and final["test/big"] == math.inf
    with pytest.raises(TypeError, match="'loss' has value 'high'"):
        store.log_epoch("r1", 2, {"loss": "high"})


def test_metrics_of_unknown_run(store):
    new_run(store, "abc-1")
    with pytest.raises(KdlabError, match="unknown run id 'abc-2'.*did you mean abc-1"):
        store.log_epoch("abc-2", 0, {"loss": 1.0})
    with pytest.raises(KdlabError, match="unknown run id"):
        store.finish("zzz", {})
    with pytest.raises(KdlabError, match="unknown run id"):
        store.epoch_metrics("zzz")


def test_finish_is_atomic(store):
    new_run(store, "r1")
    # Make the status update fail inside finish's transaction, after the metrics were inserted.
    connection = raw(store)
    connection.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE OF status ON runs WHEN NEW.status = 'finished' "
        "BEGIN SELECT RAISE(ABORT, 'simulated crash'); END"
    )
    with pytest.raises(sqlite3.DatabaseError, match="simulated crash"):
        store.finish("r1", {"test/acc": 0.9, "test/nll": 0.3})
    assert store.run("r1").status == "running"
    assert store.run("r1").final == {}
    assert connection.execute("SELECT COUNT(*) FROM final_metrics").fetchone()[0] == 0
    connection.execute("DROP TRIGGER refuse")
    store.finish("r1", {"test/acc": 0.9, "test/nll": 0.3})  # the store still works afterwards
    assert store.run("r1").final == {"test/acc": 0.9, "test/nll": 0.3}


# --- reads ---------------------------------------------------------------------------------


def test_runs_filters_and_order(store):
    new_run(store, "b-2", experiment="b", seed=2)
    new_run(store, "a-1", experiment="a", seed=1)
    new_run(store, "b-1", experiment="b", seed=1)
    new_run(store, "t-1", experiment="a", role="teacher")
    store.finish("b-1", {"test/acc": 0.5})
    store.fail("b-2", "boom")
    assert [r.run_id for r in store.runs()] == ["a-1", "t-1", "b-2", "b-1"]
    assert [r.run_id for r in store.runs(experiment="b")] == ["b-2", "b-1"]
    assert [r.run_id for r in store.runs(status="finished")] == ["b-1"]
    assert [r.run_id for r in store.runs(role="teacher")] == ["t-1"]
    assert [r.run_id for r in store.runs(experiment="b", status="running")] == []
    finals = {r.run_id: r.final for r in store.runs()}
    assert finals == {"a-1": {}, "t-1": {}, "b-2": {}, "b-1": {"test/acc": 0.5}}
    assert all(isinstance(r, RunRecord) for r in store.runs())
    with pytest.raises(KdlabError, match="unknown run status 'done'; statuses are: " + ", ".join(STATUSES)):
        store.runs(status="done")


def test_find(store):
    new_run(store, "kd-7f3a", experiment="sweep")
    new_run(store, "kd-7f3b", experiment="sweep")
    new_run(store, "ce-0001", experiment="base")
    store.ensure_experiment("empty", {})
    assert [r.run_id for r in store.find("kd-7f3a")] == ["kd-7f3a"]
    assert [r.run_id for r in store.find("ce")] == ["ce-0001"]
    assert [r.run_id for r in store.find("sweep")] == ["kd-7f3a", "kd-7f3b"]
    assert store.find("empty") == []
    with pytest.raises(KdlabError, match=r"prefix 'kd-7f3' matches 2 runs \(kd-7f3a, kd-7f3b\)"):
        store.find("kd-7f3")
    with pytest.raises(KdlabError, match="named 'swep'.*did you mean sweep"):
        store.find("swep")
    with pytest.raises(KdlabError, match="empty run id"):
        store.find("")


# --- several processes ------------------------------------------------------------------------


def test_concurrent_writers_lose_nothing(tmp_path):
    workspace = str(tmp_path / "shared")  # created concurrently by the workers themselves
    workers, runs, epochs, keys = 4, 25, 5, 4
    barrier = SPAWN.Barrier(workers)
    processes = [
        SPAWN.Process(target=store_workers.write_runs, args=(workspace, worker, runs, epochs, keys, barrier))
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0] * workers
    with Store(workspace) as store:
        records = store.runs()
        assert len(records) == workers * runs
        assert {record.status for record in records} == {"finished"}
        for worker in range(workers):
            for run in range(runs):
                run_id = f"w{worker}-r{run}"
                expected = {
                    epoch: {f"k{key}": store_workers.value_of(worker, run, epoch, key) for key in range(keys)}
                    for epoch in range(epochs)
                }
                assert store.epoch_metrics(run_id) == expected
                assert store.run(run_id).final == {"test/acc": store_workers.value_of(worker, run, 0, 0)}
        count = store._db.execute("SELECT COUNT(*) FROM epoch_metrics").fetchone()[0]
        assert count == workers * runs * epochs * keys


def test_concurrent_claims_of_one_run_have_one_winner(tmp_path):
    workspace = str(tmp_path)
    Store(workspace).close()
    contenders, rounds = 5, 6
    run_ids = [f"contested-{index}" for index in range(rounds)]
    barrier = SPAWN.Barrier(contenders)
    results = SPAWN.Queue()
    release = SPAWN.Event()
    processes = [
        SPAWN.Process(target=store_workers.claim_and_hold, args=(workspace, run_ids, barrier, results, release))
        for _ in range(contenders)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=60) for _ in range(contenders * rounds)]
    finally:
        release.set()
        for process in processes:
            process.join(60)
    assert [process.exitcode for process in processes] == [0] * contenders
    with Store(workspace) as store:
        for run_id in run_ids:
            mine = [(pid, outcome) for claimed, pid, outcome in outcomes if claimed == run_id]
            winners = [pid for pid, outcome in mine if outcome is None]
            assert len(winners) == 1, (run_id, mine)
            assert [outcome for _, outcome in mine if outcome is not None] == ["running"] * (contenders - 1)
            assert store.run(run_id).pid == winners[0]
