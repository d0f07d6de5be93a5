"""Crash safety: a SIGKILLed run resumes to the same result; an abandoned claim is taken over."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kdlab.store import Heartbeat, Store

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from reliability_helpers import TINY, child_env, kdlab_command, run_kdlab, write_config  # noqa: E402

# Everything in final metrics is a function of the weights except the wall time.
TIMING_KEYS = {"train_seconds"}


def _wait_for_checkpoint(workspace: Path, proc: subprocess.Popen, epoch: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for pointer in workspace.glob("runs/*/checkpoints/latest.json"):
            try:
                reached = json.loads(pointer.read_text())["epoch"]
            except (OSError, ValueError):
                continue  # never happens with atomic writes, but a test must not depend on it
            if reached >= epoch:
                return reached
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no checkpoint of epoch {epoch} appeared: {proc.communicate()}")


@pytest.mark.integration
def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path):
    config = write_config(tmp_path, TINY)
    env = child_env()
    straight = run_kdlab(tmp_path / "straight", "run", str(config), "--quiet", env=env)
    assert straight.returncode == 0, straight.stderr
    (reference,) = Store(tmp_path / "straight").runs(experiment="crash")

    workspace = tmp_path / "killed"
    proc = subprocess.Popen(kdlab_command(workspace, "run", str(config), "--quiet"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reached = _wait_for_checkpoint(workspace, proc, epoch=2)
    time.sleep(0.02)  # into the next epoch: an epoch here is ~20 optimiser steps of a few ms each
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    store = Store(workspace)
    (killed,) = store.runs(experiment="crash")
    assert killed.run_id == reference.run_id  # same config, same content-hash id
    # Read as 'interrupted' at once (issue 17 item 11); the row still says 'running' until a writer marks it.
    assert killed.status == "interrupted" and store.mark_dead_runs_interrupted() == [killed.run_id]
    assert store.run(killed.run_id).status == "interrupted"
    assert 2 <= reached < TINY["train"]["epochs"]

    resumed = run_kdlab(workspace, "run", str(config), "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming student {killed.run_id}" in resumed.stdout

    runs = Store(workspace).runs()
    assert [(r.run_id, r.status) for r in runs] == [(reference.run_id, "finished")]  # exactly one finished run
    final = runs[0].final
    assert set(final) == set(reference.final)
    for key in set(final) - TIMING_KEYS:
        both_nan = math.isnan(final[key]) and math.isnan(reference.final[key])
        assert both_nan or final[key] == reference.final[key], key  # bit for bit, not approximately
    straight_epochs = Store(tmp_path / "straight").epoch_metrics(reference.run_id)
    assert Store(workspace).epoch_metrics(reference.run_id) == straight_epochs


def _hold_claim_elsewhere(workspace: Path, run_id: str, timeout: float) -> subprocess.Popen:
    """A child that claims ``run_id`` as if from another machine, beats its heart, and waits to be killed."""
    script = (
        "import sys, time\n"
        "from kdlab.store import Heartbeat, Store\n"
        f"s = Store(sys.argv[1], heartbeat_timeout={timeout})\n"
        "s.host = 'node-b'  # another machine sharing the workspace: its pid cannot be checked from here\n"
        "s.ensure_experiment('sweep', {})\n"
        f"print(s.claim({run_id!r}, experiment='sweep', role='student', label='x', seed=0, group_key='g', "
        "config={}), flush=True)\n"
        "class Beat(Heartbeat):\n"
        "    def _beat(self):\n"
        "        store = Store(self.workspace, heartbeat_timeout=self.timeout); store.host = 'node-b'\n"
        "        while not self._stop.wait(self.interval):\n"
        f"            store.heartbeat({run_id!r})\n"
        f"Beat(sys.argv[1], {run_id!r}, heartbeat_timeout={timeout}).start()\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(workspace)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    assert proc.stdout.readline().strip() == "None"  # a new run, claimed
    return proc


@pytest.mark.integration  # a child process and a few seconds of waiting
def test_a_killed_workers_claim_from_another_host_is_reclaimed_after_the_timeout(tmp_path):
    timeout = 1.0
    workspace = tmp_path / "ws"
    proc = _hold_claim_elsewhere(workspace, "r1", timeout)
    store = Store(workspace, heartbeat_timeout=timeout)
    try:
        time.sleep(1.5 * timeout)  # longer than the timeout, but the heartbeat keeps the claim alive
        assert store.claim("r1", experiment="sweep", role="student", label="x", seed=0, group_key="g",
                           config={}) == "running"
        assert store.mark_dead_runs_interrupted() == []
    finally:
        proc.kill()
        proc.wait()
    killed_at = time.time()
    while store.claim("r1", experiment="sweep", role="student", label="x", seed=0, group_key="g",
                      config={}) == "running":
        assert time.time() - killed_at < 10 * timeout, "the dead claim was never released"
        time.sleep(0.05)
    waited = time.time() - killed_at
    record = store.run("r1")
    assert record.status == "running" and record.host == store.host and record.pid == os.getpid()
    assert waited >= 0.5 * timeout  # not before its heartbeat went stale (the last beat was ≤ timeout/5 before)


def test_kdlab_runs_shows_a_silent_other_host_run_as_interrupted(tmp_path, capsys):
    from kdlab.cli import main

    workspace = tmp_path / "ws"
    store = Store(workspace, heartbeat_timeout=1.0)
    store.host = "node-b"
    store.ensure_experiment("sweep", {})
    store.claim("r1", experiment="sweep", role="student", label="x", seed=0, group_key="g", config={})
    with store._write() as db:  # its last heartbeat was 10 minutes ago
        db.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = 'r1'", (time.time() - 600,))
    assert main(["--workspace", str(workspace), "runs"]) == 0
    assert "r1 " in capsys.readouterr().out and Store(workspace).run("r1").status == "interrupted"
    assert "no heartbeat for 600 s" in Store(workspace).run("r1").error


def test_heartbeat_refreshes_only_the_holders_claim(tmp_path):
    store = Store(tmp_path / "ws", heartbeat_timeout=0.5)
    store.ensure_experiment("e", {})
    store.claim("r1", experiment="e", role="student", label="x", seed=0, group_key="g", config={})
    first = store.run("r1").heartbeat_at
    with Heartbeat(tmp_path / "ws", "r1", heartbeat_timeout=0.5):
        time.sleep(0.35)  # three or so beats of 0.1 s
    assert store.run("r1").heartbeat_at > first
    store.finish("r1", {"test/acc": 1.0})
    assert store.heartbeat("r1") is False  # a finished run has nothing to keep alive


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf"])
def test_a_bad_heartbeat_timeout_is_a_one_line_error(tmp_path, monkeypatch, capsys, value):
    from kdlab.cli import main

    monkeypatch.setenv("KDLAB_HEARTBEAT_TIMEOUT", value)
    assert main(["--workspace", str(tmp_path / "ws"), "runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlab: error: $KDLAB_HEARTBEAT_TIMEOUT") and len(err.splitlines()) == 1


@pytest.mark.integration
def test_a_sigkilled_sweep_worker_is_replaced_and_its_run_finished(tmp_path):
    cfg = dict(TINY, name="sweep", seeds=[0, 1])
    config = write_config(tmp_path, cfg)
    workspace = tmp_path / "ws"
    proc = subprocess.Popen(kdlab_command(workspace, "run", str(config), "--workers", "2"), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        if (workspace / "kdlab.db").exists():
            for pointer in workspace.glob("runs/*/checkpoints/latest.json"):
                record = Store(workspace).run(pointer.parents[1].name)
                if record.status == "running" and record.pid != proc.pid:
                    victim = record
        time.sleep(0.02)
    assert victim is not None, proc.communicate()
    os.kill(victim.pid, signal.SIGKILL)  # one worker, mid-run; the parent and the other worker live on
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"(pid {victim.pid}) was killed by SIGKILL; started pid" in out
    assert f"resuming student {victim.run_id}" in out
    store = Store(workspace)
    runs = store.runs(experiment="sweep")
    assert len(runs) == 2 and {r.status for r in runs} == {"finished"}
    for record in runs:
        assert sorted(store.epoch_metrics(record.run_id)) == list(range(1, TINY["train"]["epochs"] + 1))


def test_a_database_from_before_heartbeats_is_upgraded_in_place(tmp_path):
    import sqlite3

    store = Store(tmp_path / "ws", heartbeat_timeout=0.1)
    store.host = "node-b"
    store.ensure_experiment("e", {})
    store.claim("old", experiment="e", role="student", label="x", seed=0, group_key="g", config={})
    store.close()
    connection = sqlite3.connect(tmp_path / "ws" / "kdlab.db")
    connection.execute("ALTER TABLE runs DROP COLUMN heartbeat_at")  # the schema a kdlab without heartbeats wrote
    connection.commit()
    connection.close()
    time.sleep(0.2)
    store = Store(tmp_path / "ws", heartbeat_timeout=0.1)
    record = store.run("old")
    assert record.status == "running" and record.heartbeat_at is None
    # An old holder never beats: its liveness is unknown, so it is never taken over by time.
    assert store.mark_dead_runs_interrupted() == []
    assert store.claim("old", experiment="e", role="student", label="x", seed=0, group_key="g",
                       config={}) == "running"


def test_a_run_taken_over_stops_after_its_epoch_and_leaves_the_row_to_the_new_owner(tmp_path, monkeypatch):
    # The heartbeat thread found the row no longer ours (another host claimed it): the trainer stops at the
    # next epoch boundary and writes neither metrics nor a failure over the new owner's row.
    from kdlab.config import parse_experiment
    from kdlab.study import runner as runner_module

    class LostHeartbeat:
        def __init__(self, *args, **kwargs):
            self.lost, self.timeout = threading.Event(), 300.0
            self.lost.set()

        def start(self):
            return self

        def stop(self):
            pass

    monkeypatch.setattr(runner_module, "Heartbeat", LostHeartbeat)
    base, specs = parse_experiment(dict(TINY, train=dict(TINY["train"], epochs=2)))
    run = runner_module.Runner(tmp_path / "ws", progress=False, out=lambda text: None)
    with pytest.raises(runner_module.RunTakenOver, match="taken over"):
        run.execute(specs[0])
    record = run.store.run(specs[0].run_id)
    assert record.status == "running" and record.error is None  # untouched: the new owner's to write
    assert run.store.epoch_metrics(specs[0].run_id) == {}
