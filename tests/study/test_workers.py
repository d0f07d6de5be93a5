"""`kdlab run --workers N`: runs split between worker processes through the store's claims."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdlab.config import parse_experiment
from kdlab.store import Store
from kdlab.study.workers import run_parallel

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "name": "sweep",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 200, "num_test": 60},
    "teacher": {"model": "mlp", "width": 32, "train": {"epochs": 3, "batch_size": 50, "device": "cpu"}},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "kd", "temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 2, "batch_size": 50, "device": "cpu", "checkpoint_every": 1},
    "seeds": [0, 1, 2],
    "grid": {"method.name": ["scratch", "kd"]},
}


def _sweep(workspace: Path, cfg: dict, **options):
    base, specs = parse_experiment(cfg)
    lines: list[str] = []
    summary = run_parallel(base, specs, workspace=workspace, workers=options.pop("workers", 2), out=lines.append,
                           poll_seconds=0.2, **options)
    return specs, summary, lines


def _epochs_in_file(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_run_every_run_exactly_once_and_a_rerun_skips_them(tmp_path):
    specs, summary, lines = _sweep(tmp_path / "ws", TINY)
    ids = [spec.run_id for spec in specs]
    assert len(set(ids)) == 6
    assert sorted(summary.ran) == sorted(ids) and summary.failed == [] and summary.skipped == []
    store = Store(tmp_path / "ws")
    for run_id in ids:
        record = store.run(run_id)
        assert record.status == "finished"
        assert _epochs_in_file(Path(record.run_dir)) == [1, 2]  # a run executed twice would append twice
        assert sorted(store.epoch_metrics(run_id)) == [1, 2]
        assert sum(line.startswith(f"running student {run_id}") for line in lines) == 1
    (teacher,) = store.runs(role="teacher")  # one teacher run, shared by all six students
    assert teacher.status == "finished" and _epochs_in_file(Path(teacher.run_dir)) == [1, 2, 3]
    assert sum(line.startswith("running teacher") for line in lines) == 1
    # The one shared teacher is trained by the parent, on every thread, before the workers start.
    assert teacher.pid == os.getpid()
    assert "runs: 6 done, 0 running, 0 failed, 0 pending of 6; ETA 00:00" in lines

    finished_at = {run_id: store.run(run_id).finished_at for run_id in ids + [teacher.run_id]}
    specs, again, lines = _sweep(tmp_path / "ws", TINY)
    assert again.ran == [] and again.failed == [] and sorted(again.skipped) == sorted(ids)
    assert not any(line.startswith("running") for line in lines)
    assert {run_id: store.run(run_id).finished_at for run_id in finished_at} == finished_at


def test_a_failed_run_is_reported_and_retried_only_when_asked(tmp_path):
    cfg = dict(TINY, seeds=[0, 1], grid={"train.lr": [0.01, 1.0e30]})
    specs, summary, lines = _sweep(tmp_path / "ws", cfg)
    bad = [spec.run_id for spec in specs if spec.config.train.lr == 1.0e30]
    good = [spec.run_id for spec in specs if spec.run_id not in bad]
    assert sorted(summary.ran) == sorted(good)
    assert sorted(run_id for run_id, _ in summary.failed) == sorted(bad)
    assert all("non-finite" in message for _, message in summary.failed)
    store = Store(tmp_path / "ws")
    started = {}
    for run_id in bad:
        record = store.run(run_id)
        assert record.status == "failed" and "non-finite" in record.error
        assert sum(line.startswith(f"running student {run_id}") for line in lines) == 1  # never twice
        assert any(line.startswith(f"  FAILED {run_id}") for line in lines)
        started[run_id] = record.started_at

    specs, again, lines = _sweep(tmp_path / "ws", cfg)  # without retry_failed: reported, not run
    assert again.ran == [] and sorted(again.skipped) == sorted(good)
    assert sorted(run_id for run_id, _ in again.failed) == sorted(bad)
    assert all(message.startswith("failed earlier (loss term") and "--retry-failed" in message
               for _, message in again.failed)
    assert not any(line.startswith("running") or line.startswith("resuming") for line in lines)
    assert {run_id: store.run(run_id).started_at for run_id in bad} == started

    specs, retried, lines = _sweep(tmp_path / "ws", cfg, retry_failed=True)
    assert sorted(run_id for run_id, _ in retried.failed) == sorted(bad)
    assert all("non-finite" in message and "earlier" not in message for _, message in retried.failed)
    for run_id in bad:
        # Retried once in this invocation, though both workers reach it after it failed again.
        assert sum(line.startswith(f"resuming student {run_id}") for line in lines) == 1
        assert store.run(run_id).started_at > started[run_id]


def test_a_crashed_worker_is_reported_and_its_run_counted_failed(tmp_path):
    cfg = dict(TINY, teacher=None, method={"name": "scratch"}, seeds=[0, 1], grid={})
    base, specs = parse_experiment(cfg)
    # A folder where the run's metrics.jsonl should be: writing it raises IsADirectoryError (not a KdlabError).
    broken = specs[1].run_id
    (tmp_path / "ws" / "runs" / broken / "metrics.jsonl").mkdir(parents=True)
    specs, summary, lines = _sweep(tmp_path / "ws", cfg)
    assert summary.ran == [specs[0].run_id]
    ((run_id, message),) = summary.failed
    assert run_id == broken and message.startswith("IsADirectoryError")
    assert any("exited with code 1" in line and "other workers go on" in line for line in lines)
    store = Store(tmp_path / "ws")
    assert store.run(broken).status == "failed" and store.run(specs[0].run_id).status == "finished"


# ---------------------------------------------------------------------------- the command, killed


def _start(tmp_path: Path, cfg: dict) -> tuple[list[str], dict, subprocess.Popen]:
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "kdlab.cli", "--workspace", str(tmp_path / "ws"), "run", str(config),
           "--workers", "2", "--quiet"]
    # A shell that started the suite in the background hands SIGINT down ignored, and Python then
    # installs no Ctrl-C handler: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return cmd, env, proc


def _wait_for(tmp_path: Path, proc: subprocess.Popen, ready, role: str | None = None) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "ws" / "kdlab.db").exists():
            statuses = [r.status for r in Store(tmp_path / "ws").runs(experiment="sweep", role=role)]
            if ready(statuses):
                return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the sweep never reached the state to interrupt: {proc.communicate()}")


LONG = dict(TINY, seeds=[0, 1], train={"epochs": 60, "batch_size": 20, "device": "cpu", "checkpoint_every": 1})


def _finish_and_check(tmp_path: Path, cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    store = Store(tmp_path / "ws")
    runs = store.runs(experiment="sweep")
    assert len(runs) == 4 and {r.status for r in runs} == {"finished"}
    for record in runs:
        assert sorted(store.epoch_metrics(record.run_id)) == list(range(1, 61))
        assert record.final["selected_epoch"] == 60
    assert len(store.runs(role="teacher")) == 1
    return done.stdout


@pytest.mark.integration
def test_a_killed_sweep_resumes(tmp_path):
    """SIGKILL the whole process group (parent and workers) mid-sweep; the next run resumes and finishes."""
    cmd, env, proc = _start(tmp_path, LONG)
    _wait_for(tmp_path, proc, lambda s: "finished" in s and "running" in s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    # Rows still stored 'running', read 'interrupted' since their processes are dead (issue 17 item 11).
    held = [r for r in Store(tmp_path / "ws").runs(experiment="sweep") if r.status == "interrupted"]
    assert held  # their processes are dead; the next run takes them over
    out = _finish_and_check(tmp_path, cmd, env)
    for record in held:
        assert f"resuming student {record.run_id}" in out


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_workers_and_their_runs_resume(tmp_path, signum):
    """SIGINT (or SIGTERM) to the parent alone: it stops its workers, exits 130, and the runs resume next time."""
    cmd, env, proc = _start(tmp_path, LONG)
    # A student, not the shared teacher: the teacher's 3 short epochs can end between this poll and the
    # signal, and a parent stopped before its workers start leaves nothing to mark interrupted.
    _wait_for(tmp_path, proc, lambda s: "running" in s, role="student")
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    runs = Store(tmp_path / "ws").runs()
    stopped = [r for r in runs if r.status == "interrupted"]
    assert stopped and not any(r.status == "running" for r in runs)  # the workers marked them on SIGTERM
    for record in runs:
        with pytest.raises(ProcessLookupError):
            os.kill(record.pid, 0)  # no worker outlived the parent
    out = _finish_and_check(tmp_path, cmd, env)
    for record in stopped:
        if record.experiment == "sweep":
            assert f"resuming student {record.run_id}" in out


def test_a_worker_waiting_for_a_teacher_takes_it_over_when_its_holder_dies(tmp_path):
    """The holder of the teacher run dies mid-wait (e.g. an OOM-killed worker): the waiter trains it itself."""
    import threading

    from kdlab.plan import teacher_run_spec
    from kdlab.study.runner import TEACHER_EXPERIMENT, Runner

    base, specs = parse_experiment(TINY)
    teacher = teacher_run_spec(specs[0].config)
    holder = (f"import sys, time; from kdlab.store import Store; s = Store(sys.argv[1]); "
              f"s.ensure_experiment({TEACHER_EXPERIMENT!r}, {{}}); "
              f"print(s.claim({teacher.run_id!r}, experiment={TEACHER_EXPERIMENT!r}, role='teacher', label='x', "
              f"seed=0, group_key='g', config={{}}), flush=True); time.sleep(3)")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "ws")], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "None"  # claimed; alive for 3 s, then gone without finishing
    lines: list[str] = []
    got = []

    def wait_for_teacher() -> None:  # a Store belongs to the thread that opened it
        runner = Runner(tmp_path / "ws", out=lines.append)
        got.append(runner.teacher(specs[0].config, runner.splits(base)))

    waiter = threading.Thread(target=wait_for_teacher, daemon=True)
    waiter.start()
    waiter.join(60)
    proc.wait()
    assert got and got[0] is not None, "still waiting for a teacher whose process is dead"
    assert lines[0] == f"resuming teacher {teacher.run_id}  [seed=0]"
    assert Store(tmp_path / "ws").run(teacher.run_id).status == "finished"
