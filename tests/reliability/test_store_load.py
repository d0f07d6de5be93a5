"""Store integrity under load: 8 processes writing runs and metrics at once lose no row; the file stays valid.

The issue asks for a minute of load; the default here is 20 s to keep the
integration tier short on a 2-core CI machine. Set KDLAB_LOAD_SECONDS=60 for
the full minute (docs/reliability.md records both).
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab.store import Store

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import load_writer  # noqa: E402
from reliability_helpers import child_env  # noqa: E402

WRITERS = 8
SECONDS = float(os.environ.get("KDLAB_LOAD_SECONDS", "20"))


@pytest.mark.integration
def test_eight_writers_lose_no_row_and_leave_a_valid_database(tmp_path):
    workspace = tmp_path / "ws"
    Store(workspace).close()  # created once up front; the writers race on everything else
    start_at = time.time() + 2.0  # every child imported and connected before the clock starts
    children = [
        subprocess.Popen([sys.executable, str(HERE / "load_writer.py"), str(workspace), str(worker), str(start_at),
                          str(SECONDS), str(tmp_path / f"w{worker}.json")], env=child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for worker in range(WRITERS)
    ]
    for child in children:
        out, err = child.communicate(timeout=SECONDS + 120)
        assert child.returncode == 0, err

    written = {}
    for worker in range(WRITERS):
        for run, run_id in enumerate(json.loads((tmp_path / f"w{worker}.json").read_text())["finished"]):
            written[run_id] = (worker, run)
    assert min(sum(1 for w, _ in written.values() if w == worker) for worker in range(WRITERS)) >= 1

    connection = sqlite3.connect(workspace / "kdlab.db")
    assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    connection.close()

    store = Store(workspace)
    runs = store.runs(experiment=load_writer.EXPERIMENT)
    assert sorted(r.run_id for r in runs) == sorted(written)  # no run lost, none invented
    for record in runs:
        worker, run = written[record.run_id]
        assert record.status == "finished"
        assert record.final == {"test/acc": load_writer.value_of(worker, run, 0, 0)}
        assert store.epoch_metrics(record.run_id) == {
            epoch: {f"k{key}": load_writer.value_of(worker, run, epoch, key) for key in range(load_writer.KEYS)}
            for epoch in range(1, load_writer.EPOCHS + 1)
        }
    print(f"{len(runs)} runs, {len(runs) * load_writer.EPOCHS * load_writer.KEYS} epoch rows "
          f"from {WRITERS} writers in {SECONDS:g} s")
