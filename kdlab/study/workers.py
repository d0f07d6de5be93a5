"""Running the runs of a study in several worker processes (``kdlab run --workers N``).

Each worker is a fresh process (the multiprocessing "spawn" context) with its
own :class:`~kdlab.study.runner.Runner` and so its own store connection. Every
worker walks the whole spec list, from its own start offset, calling
``Runner.execute``; the store's atomic claims split the work (a run held by a
live process is skipped by the others), a shared teacher is trained by the
first worker that reaches it while the others wait for it, and a run that
fails during the study is not retried by another worker (``Store.claim``'s
``take_failed_before``).

Because a run claimed by one worker is "skipped" by the others, the outcome of
the study is read from the store at the end, not from what the workers return.
The parent process only preflights, starts the workers, relays their messages,
prints a progress line and stops them on Ctrl-C (SIGTERM, then SIGKILL): their
runs become 'interrupted' (or, if killed, are taken over from their dead pid)
and resume on the next ``kdlab run``.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

from kdlab.config import ExperimentConfig
from kdlab.errors import KdlabError, WorkspaceError
from kdlab.plan import build_plan
from kdlab.plugins import loaded as loaded_plugins
from kdlab.runs import RunSpec, to_dict
from kdlab.store import RunRecord, Store
from kdlab.study.runner import Runner, StudySummary

STOP_SECONDS = 10.0  # how long stopped workers get to mark their runs interrupted before SIGKILL
INTERRUPTED = 130  # a worker's exit code after SIGINT/SIGTERM


# ---------------------------------------------------------------------------- the worker process


def _interrupt(signum: int, frame: Any) -> None:
    # One-shot: a second signal must not break the store write that marks the run interrupted.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _parent_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one-shot, while the workers are being stopped
    raise KeyboardInterrupt


def _worker(workspace: str, specs: list[RunSpec], resume: bool, retry_failed: bool, since: float,
            threads: int, conn: Connection, imports: tuple[str, ...] = ()) -> None:
    """One worker: execute every spec (from this worker's offset on), reporting to the parent via ``conn``.

    ``imports`` are the parent's plugin imports (kdlab.plugins), repeated before any run is built (a spec is
    plain data: names and options, so it arrives before them)."""
    def send(*message: Any) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError):  # the parent is gone: the runs still go on and land in the store
            pass

    try:
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        import torch

        from kdlab.plugins import load_all

        load_all(list(imports))
        # The process's default: each run sets its own train.threads (Runner.execute); this count
        # (cpus / workers, never oversubscribed) serves runs with train.threads: null.
        torch.set_num_threads(threads)
        runner = Runner(workspace, resume=resume, retry_failed=retry_failed, progress=False,
                        out=lambda text: send("out", text))
        runner.since = since  # a run that fails in this study (in any worker) is not retried by this one
        for spec in specs:
            try:
                runner.execute(spec)
            except WorkspaceError as exc:  # a full or read-only disk: every later run would fail too
                send("fatal", spec.run_id, spec.label, str(exc))
                return
            except KdlabError as exc:  # recorded failed in the store (or its teacher failed); go on
                send("failed", spec.run_id, spec.label, str(exc))
    except KdlabError as exc:  # a plugin import that worked in the parent fails here: every run would fail
        send("fatal", "-", "imports", str(exc))
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)  # Runner.execute has marked the run interrupted; no traceback
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the parent


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


class _Display:
    """Worker messages and the progress line; on a terminal the line is rewritten in place."""

    def __init__(self, out: Callable[[str], None], enabled: bool):
        self.out = out
        self.enabled = enabled
        self.tty = enabled and out is print and sys.stdout.isatty()
        self.line: str | None = None

    def progress(self, line: str) -> None:
        if not self.enabled or line == self.line:
            return
        self.line = line
        if self.tty:
            sys.stdout.write(f"\r{line}\033[K")
            sys.stdout.flush()
        else:
            self.out(line)

    def message(self, text: str) -> None:
        if self.tty and self.line is not None:
            sys.stdout.write("\r\033[K")
        self.out(text)
        if self.tty and self.line is not None:
            sys.stdout.write(self.line)
            sys.stdout.flush()

    def close(self) -> None:
        if self.tty and self.line is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _records(store: Store, specs: list[RunSpec]) -> dict[str, RunRecord]:
    """The store's record of each spec's run (absent: never claimed)."""
    wanted = {spec.run_id for spec in specs}
    records: dict[str, RunRecord] = {}
    for experiment in dict.fromkeys(spec.config.name for spec in specs):
        for record in store.runs(experiment=experiment):
            if record.run_id in wanted:
                records[record.run_id] = record
    return records


def progress_line(records: dict[str, RunRecord], specs: list[RunSpec], *, since: float, workers: int) -> str:
    """``runs: D done, R running, F failed, P pending of T; ETA mm:ss`` from the store's records.

    The ETA is the mean wall time of the runs finished since ``since`` × pending / workers.
    """
    done = running = failed = 0
    durations = []
    for spec in specs:
        record = records.get(spec.run_id)
        status = record.status if record is not None else "pending"
        if status == "finished":
            done += 1
            if record.finished_at is not None and record.started_at is not None and record.finished_at >= since:
                durations.append(record.finished_at - record.started_at)
        elif status == "running":
            running += 1
        elif status == "failed":
            failed += 1
    total = len(specs)
    pending = total - done - running - failed
    if durations:
        eta = f"ETA {_format_eta(sum(durations) / len(durations) * pending / workers)}"
    else:
        eta = "ETA unknown"
    return f"runs: {done} done, {running} running, {failed} failed, {pending} pending of {total}; {eta}"


def summarize(records: dict[str, RunRecord], specs: list[RunSpec], *, since: float,
              reported: dict[str, str] | None = None) -> StudySummary:
    """The outcome of a study from the store: ran (finished since ``since``), skipped (finished before),
    held (by another live process), failed.

    ``reported`` holds the errors workers reported for runs the store cannot
    explain (a run whose teacher failed is never claimed).
    """
    reported = reported or {}
    summary = StudySummary()
    for spec in specs:
        run_id = spec.run_id
        record = records.get(run_id)
        status = record.status if record is not None else None
        if status == "finished":
            ran = record.finished_at is not None and record.finished_at >= since
            (summary.ran if ran else summary.skipped).append(run_id)
        elif status == "running":  # after the workers ended: another live process holds it
            summary.held.append(run_id)
        elif status == "failed":
            if record.started_at is not None and record.started_at >= since:
                summary.failed.append((run_id, record.error or reported.get(run_id) or "no error recorded"))
            else:
                summary.failed.append((run_id, f"failed earlier ({record.error}); --retry-failed runs it again"))
        elif run_id in reported:
            summary.failed.append((run_id, reported[run_id]))
        elif record is None:
            summary.failed.append((run_id, "not started: every worker ended before reaching it"))
        else:
            summary.failed.append((run_id, f"{status} ({record.error or 'its worker ended before finishing it'}); "
                                           "`kdlab run` resumes it"))
    return summary


def _stop(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """SIGTERM every live worker, wait for them, SIGKILL the ones that do not end."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def pending_specs(specs, records, *, retry_failed: bool) -> list:
    """The specs still to run: never recorded, unfinished, or failed when ``retry_failed``."""
    return [spec for spec in specs if spec.run_id not in records
            or records[spec.run_id].status not in ("finished", "failed")
            or (retry_failed and records[spec.run_id].status == "failed")]


def _train_shared_teacher(runner: Runner, base: ExperimentConfig, todo: list[RunSpec]) -> None:
    """The teacher and assistant runs that every pending run reads: trained here first, before any worker starts.

    Otherwise one worker would train them while the others wait (a run's thread count is its own
    ``train.threads`` wherever it runs, so the numbers are the same either way). Runs read by only some
    students are trained in parallel by the workers. A run that fails here is recorded failed in this
    study, so the workers report their runs without training it again.
    """
    for node in build_plan(base, todo).shared_upstream():
        runner.train_upstream(node.spec, node.role)


def run_parallel(base: ExperimentConfig, specs: list[RunSpec], *, workspace: str | Path, workers: int,
                 resume: bool = True, retry_failed: bool = False, out: Callable[[str], None] = print,
                 poll_seconds: float = 2.0, progress: bool = True) -> StudySummary:
    """Run ``specs`` in ``workers`` processes; the summary is read from the store at the end.

    Bad input fails in the preflight, before any worker starts or any run is
    claimed. ``progress=False`` prints the workers' messages but no progress
    line. Ctrl-C stops the workers and re-raises ``KeyboardInterrupt``.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise KdlabError(f"--workers: expected a whole number ≥ 1, got {workers!r}")
    runner = Runner(workspace, resume=resume, retry_failed=retry_failed, out=out, progress=progress)
    store = runner.store
    try:
        store.ensure_experiment(base.name, to_dict(base))
        runner.preflight(specs)
        since = time.time()
        display = _Display(out, progress)
        before = _records(store, specs)
        todo = pending_specs(specs, before, retry_failed=retry_failed)
        if not todo:  # nothing to run: start no process
            display.progress(progress_line(before, specs, since=since, workers=workers))
            display.close()
            return summarize(before, specs, since=since)
        _train_shared_teacher(runner, base, todo)
        workers = max(1, min(workers, len(todo)))
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        processes, readers, numbers = [], [], {}
        # SIGTERM to the parent (kill, a scheduler's stop) stops the workers like Ctrl-C does,
        # instead of leaving them orphaned and still training.
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGTERM, _parent_terminated)

        def start(index: int) -> tuple[int, Any, Connection]:
            offset = index * len(todo) // workers  # start apart, so the workers do not queue on one run
            order = todo[offset:] + todo[:offset]
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_worker, name=f"kdlab-worker-{index + 1}",
                                      args=(str(runner.workspace), order, resume, retry_failed, since,
                                            threads, writer, tuple(loaded_plugins())))
            process.start()
            writer.close()
            processes.append(process)
            readers.append(reader)
            return index + 1, process, reader

        try:
            for index in range(workers):
                number, process, _ = start(index)
                numbers[process.sentinel] = (number, process)
            reported = _supervise(processes, readers, numbers, store, specs, display, since=since,
                                  workers=workers, poll_seconds=poll_seconds, restart=start)
        except BaseException:  # Ctrl-C (or a bug here): no worker outlives the parent
            display.close()
            _stop(processes)
            raise
        finally:
            for reader in readers:
                reader.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        display.close()
        store.mark_dead_runs_interrupted()  # a killed worker's run: 'interrupted', resumed by the next run
        return summarize(_records(store, specs), specs, since=since, reported=reported)
    finally:
        store.close()


def _supervise(processes, readers, numbers, store: Store, specs: list[RunSpec], display: _Display, *,
               since: float, workers: int, poll_seconds: float, restart: Callable | None = None) -> dict[str, str]:
    """Relay worker messages and print progress until every worker has ended; return reported failures.

    A worker killed by a signal (SIGKILL, the OOM killer) is replaced by a new
    one, at most ``workers`` times in all: the new worker reclaims the dead
    one's run (its pid is gone, see ``Store.claim``) and resumes it from its
    last checkpoint. A worker that exits with an error code is not replaced.
    """
    reported: dict[str, str] = {}
    live = dict(numbers)
    open_readers = list(readers)
    restarts_left = workers if restart is not None else 0
    fatal: list[str] = []
    next_poll = 0.0
    while live or open_readers:
        timeout = max(0.0, next_poll - time.monotonic())
        changed = False
        for ready in wait(open_readers + list(live), timeout=timeout):
            if ready in live:  # a process sentinel: that worker has ended
                number, process = live.pop(ready)
                process.join()
                if process.exitcode and process.exitcode < 0 and restarts_left > 0:
                    restarts_left -= 1
                    new_number, new_process, reader = restart(number - 1)
                    live[new_process.sentinel] = (new_number, new_process)
                    open_readers.append(reader)
                    display.message(f"worker {number} (pid {process.pid}) {_exit_reason(process.exitcode)}; "
                                    f"started pid {new_process.pid} in its place, which resumes its run")
                elif process.exitcode:
                    display.message(f"worker {number} (pid {process.pid}) {_exit_reason(process.exitcode)}; "
                                    "its run is recorded as failed or interrupted; the other workers go on")
                changed = True
                continue
            try:
                message = ready.recv()
            except (EOFError, OSError):
                open_readers.remove(ready)
                continue
            if message[0] == "out":
                display.message(message[1])
            elif message[0] == "fatal":
                _, run_id, label, text = message
                reported[run_id] = text
                fatal.append(text)
                display.message(f"  FAILED {run_id} [{label}]: {text}")
            elif message[0] == "failed":
                _, run_id, label, text = message
                reported[run_id] = text
                display.message(f"  FAILED {run_id} [{label}]: {text}")
            changed = True  # a run started, finished or failed: show the counts now
        if changed or time.monotonic() >= next_poll:
            display.progress(progress_line(_records(store, specs), specs, since=since, workers=workers))
            next_poll = time.monotonic() + poll_seconds
    if fatal:  # the other workers ran into the same disk, or finished: the study cannot go on
        raise WorkspaceError(fatal[0])
    return reported
