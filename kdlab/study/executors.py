"""Where the runs of a study execute: one protocol, two executors.

* ``LocalExecutor`` (the default): this process (``workers=1``) or N spawned worker
  processes on this machine (``kdlab run --workers N``, kdlab.study.workers).
* ``RayExecutor`` (``kdlab run --executor ray [--ray-address ADDR]``, the ``ray`` extra):
  N Ray tasks on an existing cluster, or on a local Ray instance it starts.

Both execute the plan (``kdlab.plan``) in dependency order: the teacher and
assistant runs before the students that read them (the Ray executor wave by wave,
``Plan.waves``), and let ``Runner.execute`` claim runs in the store, so a run executes
once wherever it lands, shared teachers are trained once, and run ids and results
are the same as with the local executor. The outcome is read back from the store
(``workers.summarize``). Ray workers therefore need the workspace at the same
path: one machine, or a shared filesystem that SQLite can lock.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from kdlab import plugins
from kdlab.config import ExperimentConfig
from kdlab.errors import KdlabError, WorkspaceError
from kdlab.plan import build_plan
from kdlab.runs import RunSpec, to_dict
from kdlab.study.runner import Runner, StudySummary

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs the specs of one study against a workspace and returns what happened to each."""

    def run(self, base: ExperimentConfig, specs: list[RunSpec], *, workspace: Path, resume: bool,
            retry_failed: bool, progress: bool, out: Callable[[str], None]) -> StudySummary: ...


@dataclass
class LocalExecutor:
    """This process (``workers == 1``) or ``workers`` spawned processes on this machine."""

    workers: int = 1

    def run(self, base, specs, *, workspace, resume, retry_failed, progress, out=print) -> StudySummary:
        if self.workers > 1:
            from kdlab.study.workers import run_parallel

            return run_parallel(base, specs, workspace=workspace, workers=self.workers, resume=resume,
                                retry_failed=retry_failed, progress=progress, out=out)
        runner = Runner(workspace, resume=resume, progress=progress, retry_failed=retry_failed, out=out)
        return runner.run(base, specs)


def import_ray():
    """``ray``, or a one-line error with the install hint (the core never needs it)."""
    try:
        import ray
    except ImportError:
        raise KdlabError("--executor ray needs Ray: pip install 'kdlab[ray]' (or pip install ray), "
                         "or use the default --executor local") from None
    return ray


def _ray_worker(workspace: str, items: list[tuple[RunSpec, str, str]], resume: bool, retry_failed: bool,
                since: float, threads: int, imports: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """One Ray task: execute every (spec, role, experiment) of one wave of the plan (claims in the store split
    the work; a run another task holds is that task's); return its messages. A teacher or assistant run that
    fails is recorded in the store and reported by each student that reads it, as in ``Runner.run``. The
    driver's plugin imports (kdlab.plugins) are repeated before any run is built."""
    import torch

    from kdlab.plugins import load_all

    try:
        load_all(list(imports))
    except KdlabError as exc:  # e.g. a plugin file not at the same path on this node
        return [("fatal", "-", "imports", str(exc))]

    torch.set_num_threads(threads)  # the task's default; each run sets its own train.threads (Runner.execute)
    messages: list[tuple[str, ...]] = []
    runner = Runner(workspace, resume=resume, retry_failed=retry_failed, progress=False,
                    out=lambda text: messages.append(("out", text)))
    runner.since = since  # a run that fails during this study is not retried by another task
    try:
        for spec, role, experiment in items:
            try:
                runner.execute(spec, role=role, experiment=experiment)
            except WorkspaceError as exc:  # a full or read-only disk: every later run would fail too
                messages.append(("fatal", spec.run_id, spec.label, str(exc)))
                break
            except KdlabError as exc:  # recorded failed in the store (or its teacher failed); go on
                if role == "student":
                    messages.append(("failed", spec.run_id, spec.label, str(exc)))
    finally:
        runner.store.close()
    return messages


def check_reachable(address: str, *, seconds: float = 5.0) -> None:
    """A clear error unless ``address`` (``host:port`` or ``ray://host:port``) accepts a TCP connection."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise KdlabError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as exc:
        raise KdlabError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start the "
                         "cluster with `ray start --head` or give the head node's address") from None


def _source_root() -> str:
    """The folder holding this kdlab package, so a Ray worker started here imports the same code."""
    return str(Path(__file__).resolve().parents[2])


@dataclass
class RayExecutor:
    """``workers`` Ray tasks (default: one per run, at most the cluster's CPUs / ``cpus_per_worker``)."""

    address: str | None = None  # None: a running cluster from $RAY_ADDRESS, else a local instance
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    poll_seconds: float = 2.0

    def _connect(self, ray) -> bool:
        """Connect (or reuse a connection); True when this call started it (and so shuts it down)."""
        if ray.is_initialized():
            return False
        if self.address not in (None, "auto", "local"):
            check_reachable(self.address)  # Ray itself retries an unreachable address for minutes
        # The plugin modules' folders too (kdlab.plugins): a module found on this process's sys.path is found there.
        paths = [_source_root(), *plugins.search_paths(), os.environ.get("PYTHONPATH")]
        env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        try:
            ray.init(address=self.address, runtime_env={"env_vars": env}, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KdlabError(f"--ray-address: cannot connect to Ray at {where}: {detail[:200]}; start the cluster "
                             "(ray start --head) or give its address, e.g. --ray-address 10.0.0.1:6379") from None
        return True

    def run(self, base, specs, *, workspace, resume, retry_failed, progress, out=print) -> StudySummary:
        from kdlab.study.workers import _Display, _records, pending_specs, progress_line, summarize

        ray = import_ray()
        runner = Runner(workspace, resume=resume, retry_failed=retry_failed, out=out)
        store = runner.store
        runner.store.ensure_experiment(base.name, to_dict(base))
        runner.preflight(specs)  # bad input fails here, before Ray starts or any run is claimed
        since = time.time()
        display = _Display(out, progress)
        before = _records(store, specs)
        todo = pending_specs(specs, before, retry_failed=retry_failed)
        if not todo:
            return summarize(before, specs, since=since)
        started = self._connect(ray)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            workers = self.workers or max(1, int(cpus // max(self.cpus_per_worker, 1e-9)))
            workers = max(1, min(workers, len(todo)))
            threads = max(1, int(self.cpus_per_worker))
            task = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_retries=0)(_ray_worker)
            reported: dict[str, str] = {}
            fatal: list[str] = []

            def run_wave(items: list) -> None:
                """Tasks over one wave of the plan, each from its own offset (so they do not queue on one run);
                returns when every task has ended."""
                count = max(1, min(workers, len(items)))
                pending = [task.remote(str(runner.workspace), items[offset:] + items[:offset], resume, retry_failed,
                                       since, threads, tuple(plugins.loaded()))
                           for offset in (index * len(items) // count for index in range(count))]
                try:
                    while pending:
                        ready, pending = ray.wait(pending, num_returns=1, timeout=self.poll_seconds)
                        for ref in ready:
                            try:
                                messages = ray.get(ref)
                            except ray.exceptions.RayError as exc:  # the task died (node lost, killed): store decides
                                display.message(f"a Ray worker ended abnormally ({type(exc).__name__}); its run is "
                                                "recorded as failed or left to resume")
                                continue
                            for message in messages:
                                if message[0] == "out":
                                    display.message(message[1])
                                else:
                                    _, run_id, label, text = message
                                    reported[run_id] = text
                                    if message[0] == "fatal":
                                        fatal.append(text)
                                    display.message(f"  FAILED {run_id} [{label}]: {text}")
                        display.progress(progress_line(_records(store, specs), specs, since=since, workers=workers))
                except BaseException:  # Ctrl-C: no task outlives the study; their runs resume on the next run
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    raise

            try:
                # The plan in dependency order, wave by wave: a wave's runs read only runs of earlier waves
                # (teachers and assistants before their students), so no task waits on another's teacher.
                for wave in build_plan(base, todo).waves():
                    run_wave([(node.spec, node.role, node.experiment) for node in wave])
                    if fatal:
                        break
            finally:
                display.close()
        finally:
            if started:
                ray.shutdown()
        store.mark_dead_runs_interrupted()  # a cancelled task's run on this host: 'interrupted', resumable
        if fatal:  # as with local workers: the disk, not a run, so the study stops (exit 2)
            raise WorkspaceError(fatal[0])
        return summarize(_records(store, specs), specs, since=since, reported=reported)


def make_executor(name: str, *, workers: int = 1, ray_address: str | None = None,
                  ray_workers: int | None = None) -> Any:
    """The executor named by ``kdlab run --executor``."""
    if name == "local":
        if ray_address is not None:
            raise KdlabError("--ray-address needs --executor ray")
        return LocalExecutor(workers=workers)
    if name == "ray":
        import_ray()
        return RayExecutor(address=ray_address, workers=ray_workers)
    raise KdlabError(f"--executor {name!r}: choose one of {', '.join(EXECUTORS)}")
