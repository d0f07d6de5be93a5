"""Worker functions for the multi-process store tests.

They live in a plain module (not the test module) so that 'spawn' children can
import them by name whatever pytest import mode is in use; the tests put this
folder on sys.path, which spawn passes on to its children.
"""
from __future__ import annotations

import os
import sys
import time

from kdlab.store import Store, atomic_write_json, database

EXPERIMENT = "concurrency"


def value_of(worker: int, run: int, epoch: int, key: int) -> float:
    """The metric value each writer stores, so the reader can check every cell."""
    return worker * 1_000_000 + run * 1_000 + epoch * 10 + key + 0.5


def write_runs(workspace: str, worker: int, runs: int, epochs: int, keys: int, barrier) -> None:
    """Claim, log and finish ``runs`` runs of this worker, all workers starting together."""
    barrier.wait(timeout=60)  # create the workspace and write at the same time as the others
    store = Store(workspace)
    store.ensure_experiment(EXPERIMENT, {"workers": "many"})
    for run in range(runs):
        run_id = f"w{worker}-r{run}"
        previous = store.claim(
            run_id, experiment=EXPERIMENT, role="student", label=f"worker={worker} seed={run}",
            seed=run, group_key=f"g{worker}", config={"worker": worker, "run": run},
        )
        if previous is not None:
            raise RuntimeError(f"{run_id}: expected a new run, claim returned {previous!r}")
        for epoch in range(epochs):
            store.log_epoch(run_id, epoch, {f"k{key}": value_of(worker, run, epoch, key) for key in range(keys)})
        store.finish(run_id, {"test/acc": value_of(worker, run, 0, 0)})
    store.close()


def claim_and_hold(workspace: str, run_ids: list[str], barrier, results, release) -> None:
    """Claim each of ``run_ids`` together with the other workers, report, stay alive until released.

    The claim's read-modify-write window is widened with a sleep (claim reads
    this process's start time between checking the row and writing it), so
    that without a proper write lock the contenders would reliably interleave.
    """
    original = database._own_start_ticks

    def slow_start_ticks():
        time.sleep(0.03)
        return original()

    database._own_start_ticks = slow_start_ticks
    store = Store(workspace)
    store.ensure_experiment(EXPERIMENT, {})
    for run_id in run_ids:
        barrier.wait(timeout=60)  # maximise the overlap of the competing claims
        try:
            outcome = store.claim(
                run_id, experiment=EXPERIMENT, role="student", label="same seed=0", seed=0,
                group_key="same", config={},
            )
        except Exception as error:  # report instead of leaving the test waiting
            outcome = f"error: {error!r}"
        results.put((run_id, os.getpid(), outcome))
    release.wait(timeout=60)  # the winners' pids must stay alive while the others claim
    store.close()


def claim_and_exit(workspace: str, run_id: str) -> None:
    """Claim ``run_id`` and exit without finishing it (a crashed trainer)."""
    store = Store(workspace)
    store.ensure_experiment(EXPERIMENT, {})
    store.claim(run_id, experiment=EXPERIMENT, role="student", label="dead seed=0", seed=0, group_key="dead", config={})
    store.close()


def rewrite_forever(path: str, size: int) -> None:
    """Rewrite ``path`` atomically with ever-new large JSON until killed."""
    version = 0
    print("ready", flush=True)
    while True:
        version += 1
        atomic_write_json(path, {"version": version, "payload": [version] * size})


if __name__ == "__main__":
    # python store_workers.py rewrite PATH SIZE
    if sys.argv[1] == "rewrite":
        rewrite_forever(sys.argv[2], int(sys.argv[3]))
