"""Executors for grid runs: the local one is the existing in-process/worker path; Ray tasks claim runs
through the store exactly like local workers do."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kdlab.config import parse_experiment
from kdlab.errors import KdlabError
from kdlab.store import Store
from kdlab.study import executors
from kdlab.study.executors import LocalExecutor, RayExecutor, make_executor

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "name": "sweep",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 120, "num_test": 30},
    "teacher": {"model": "mlp", "width": 16, "train": {"epochs": 1, "batch_size": 40, "device": "cpu"}},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "kd", "temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 1, "batch_size": 40, "device": "cpu"},
    "seeds": [0, 1],
    "grid": {"method.name": ["scratch", "kd"]},
}


def test_make_executor_picks_the_local_default_and_checks_flags():
    assert make_executor("local", workers=3) == LocalExecutor(workers=3)
    with pytest.raises(KdlabError, match="--ray-address needs --executor ray"):
        make_executor("local", ray_address="10.0.0.1:6379")
    with pytest.raises(KdlabError, match="choose one of local, ray"):
        make_executor("dask")


def test_an_unreachable_ray_address_is_a_clear_error_at_once():
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(KdlabError, match=f"--ray-address 127.0.0.1:{port}: nothing answers there"):
        executors.check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5
    with pytest.raises(KdlabError, match="expected HOST:PORT"):
        executors.check_reachable("headnode")


def test_ray_executor_without_ray_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(KdlabError, match=r"pip install 'kdlab\[ray\]'"):
        make_executor("ray")


def _final(workspace: Path) -> dict[str, dict]:
    """Each run's final metrics, without the wall-clock ones."""
    return {r.run_id: {k: v for k, v in r.final.items() if k != "train_seconds"}
            for r in Store(workspace).runs()}


@pytest.mark.integration
def test_ray_tasks_run_every_run_once_with_the_ids_and_results_of_the_local_executor(tmp_path):
    ray = pytest.importorskip("ray")
    base, specs = parse_experiment(TINY)
    local = LocalExecutor().run(base, specs, workspace=tmp_path / "local", resume=True, retry_failed=False,
                                progress=False, out=lambda text: None)
    assert sorted(local.ran) == sorted(s.run_id for s in specs)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        started = time.monotonic()
        lines: list[str] = []
        summary = RayExecutor(poll_seconds=0.2).run(base, specs, workspace=tmp_path / "ray", resume=True,
                                                    retry_failed=False, progress=True, out=lines.append)
        elapsed = time.monotonic() - started
        assert ray.is_initialized()  # a connection the caller made is left to the caller
    finally:
        ray.shutdown()
    assert sorted(summary.ran) == sorted(local.ran) and summary.failed == []
    assert sum(line.startswith("running teacher") for line in lines) == 1  # the shared teacher, trained once
    for run_id in summary.ran:
        assert sum(line.startswith(f"running student {run_id}") for line in lines) == 1
        metrics = (tmp_path / "ray" / "runs" / run_id / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(m)["epoch"] for m in metrics] == [1]  # executed exactly once
    ray_final, local_final = _final(tmp_path / "ray"), _final(tmp_path / "local")
    assert ray_final.keys() == local_final.keys()  # the same run ids, teacher included
    for run_id, metrics in local_final.items():
        assert ray_final[run_id] == pytest.approx(metrics, abs=1e-6), run_id
    records = Store(tmp_path / "ray").runs()
    teacher_done = max(r.finished_at for r in records if r.role == "teacher")
    readers = [r for r in records if r.role == "student" and r.config["method"]["name"] == "kd"]
    assert readers and all(r.started_at >= teacher_done for r in readers)  # the plan's upstream run came first
    hosts = {r.pid for r in Store(tmp_path / "ray").runs(role="student")}
    assert os.getpid() not in hosts  # the runs ran in Ray's worker processes, not in the driver
    assert elapsed < 120
