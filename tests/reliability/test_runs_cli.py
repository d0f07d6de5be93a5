"""`kdlab runs` shows each run's status from the store; `kdlab show` gives a failed run's message."""
from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

from kdlab.cli import main
from kdlab.store import Store

HERE = Path(__file__).resolve().parents[1] / "store"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # spawn children import the worker functions by name
import store_workers  # noqa: E402


def _claim(store: Store, run_id: str) -> None:
    store.claim(run_id, experiment=store_workers.EXPERIMENT, role="student", label=f"label-{run_id}", seed=0,
                group_key="g", config={})


def _status_column(out: str) -> dict[str, str]:
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["RUN", "STATUS"]  # the header `kdlab runs` prints first (issue 17 item 16)
    return {line.split()[0]: line.split()[1] for line in lines[1:] if line.strip()}


def test_runs_lists_every_status_and_show_gives_the_failure(tmp_path, capsys):
    workspace = tmp_path / "ws"
    store = Store(workspace)
    store.ensure_experiment(store_workers.EXPERIMENT, {})
    for run_id in ("done", "broken", "stopped", "live"):
        _claim(store, run_id)
    store.finish("done", {"test/acc": 0.75})
    store.fail("broken", "loss term 'kd' became non-finite in epoch 3; lower train.lr")
    store.interrupt("stopped")  # Ctrl-C
    # A process SIGKILLed while holding its run never marks it: the dead pid shows it interrupted.
    child = multiprocessing.get_context("spawn").Process(target=store_workers.claim_and_exit,
                                                         args=(str(workspace), "killed"))
    child.start()
    child.join()

    assert main(["--workspace", str(workspace), "runs"]) == 0
    statuses = _status_column(capsys.readouterr().out)
    assert statuses == {"done": "finished", "broken": "failed", "stopped": "interrupted", "live": "running",
                        "killed": "interrupted"}
    assert "ended without finishing" in Store(workspace).run("killed").error

    assert main(["--workspace", str(workspace), "show", "broken"]) == 0
    out = capsys.readouterr().out
    assert "status failed" in out
    assert "error: loss term 'kd' became non-finite in epoch 3; lower train.lr" in out
    assert main(["--workspace", str(workspace), "show", "done"]) == 0
    out = capsys.readouterr().out
    assert "status finished" in out and "error:" not in out and "test/acc: 0.75" in out
    assert os.getpid() == Store(workspace).run("live").pid  # this process still holds it: never marked
