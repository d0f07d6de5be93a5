"""One writer of the store load test, run as a child process: claim, log and finish runs until time is up.

    python load_writer.py WORKSPACE WORKER START_AT SECONDS OUT.json

Waits until the wall clock reaches START_AT (so all writers start together),
then loops for SECONDS: claim a new run, log EPOCHS epochs of KEYS metrics
each (one transaction per epoch), finish it. Only what a call returned from is
counted as written, and OUT.json lists it, so the parent can demand that every
counted row is in the database and nothing else is.
"""
from __future__ import annotations

import json
import sys
import time

from kdlab.store import Store

EXPERIMENT = "load"
EPOCHS = 3
KEYS = 4


def value_of(worker: int, run: int, epoch: int, key: int) -> float:
    return worker * 1_000_000 + run * 100 + epoch * 10 + key + 0.25


def main(workspace: str, worker: int, start_at: float, seconds: float, out: str) -> None:
    store = Store(workspace)
    store.ensure_experiment(EXPERIMENT, {"test": "load"})
    time.sleep(max(0.0, start_at - time.time()))
    deadline = time.time() + seconds
    finished = []
    while time.time() < deadline:
        run = len(finished)
        run_id = f"w{worker}-r{run}"
        store.claim(run_id, experiment=EXPERIMENT, role="student", label=f"worker={worker}", seed=run,
                    group_key=f"w{worker}", config={"worker": worker, "run": run})
        for epoch in range(1, EPOCHS + 1):
            store.log_epoch(run_id, epoch, {f"k{key}": value_of(worker, run, epoch, key) for key in range(KEYS)})
        store.finish(run_id, {"test/acc": value_of(worker, run, 0, 0)})
        finished.append(run_id)
    store.close()
    with open(out, "w") as handle:
        json.dump({"worker": worker, "finished": finished}, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
