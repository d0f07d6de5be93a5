"""Running an experiment: runs claimed in the store, teachers trained once, results recorded.

For each run of the expanded grid × seeds, in order: skip it if the store says
it is finished (or another live process holds it); build the data; get the
teacher (load its checkpoint, or train its recipe as a run of its own — once,
shared by every student, found again by its content hash); claim the run;
train through the one loop; save the model and final metrics; mark it finished
only then. A run whose loss goes NaN is marked failed and the study goes on.

Under torchrun every rank runs the same study, one run after another, each run
data-parallel over all ranks. Rank 0 alone touches the store and run folders; its
decisions (a run's status, its claim) are broadcast so that every rank takes the
same path through this file.
"""
from __future__ import annotations

import functools
import getpass
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from kdlab.config import ExperimentConfig, TeacherConfig
from kdlab.data import Splits, build_splits
from kdlab.data.lowlabel import low_label_splits
from kdlab.engine.build import build_method, build_student, check_class_counts, load_model_file, model_spec
from kdlab.engine import distributed
from kdlab.engine.checkpoint import read_pointer, save_model
from kdlab.engine.loop import fit
from kdlab.engine.run_files import clean_temporaries, remove_path, safe_path
from kdlab.engine.seed import intra_op_threads, seed_everything
from kdlab.engine.teacher import teacher_module
from kdlab.errors import KdlabError, WorkspaceError
from kdlab.models import parameter_count, tap_shapes
from kdlab.plan import TEACHER_EXPERIMENT, assistant_run_spec, build_plan, recipe_run_spec, teacher_inputs
from kdlab.runs import RunSpec, to_dict
from kdlab.store import Heartbeat, Store, append_jsonl, atomic_write_json, atomic_write_text
from kdlab.store.files import read_metric_rows
from kdlab.seq.hf_load import workspace_cache
from kdlab.study.llm_outputs import finish_llm_run, is_hf_student
from kdlab.study.tracking import Sinks, check_available, open_sinks

MODEL_FILE = "model.safetensors"
TEACHER_WAIT_SECONDS = 24 * 3600  # how long a run waits for its teacher held by another live process
TEACHER_POLL_SECONDS = 2.0  # how often it asks the store (the holder may be on another host)


def kept_model_file(epoch: int) -> str:
    """Where a run keeps its weights after ``epoch`` (train.keep_epochs), relative to its folder."""
    return f"epochs/model-epoch-{epoch:04d}.safetensors"


@dataclass
class StudySummary:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before
    held: list[str] = field(default_factory=list)  # claimed by another live process
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id, message)


def environment() -> dict:
    """Where a run happened: versions, machine and the kdlab source revision."""
    source = Path(__file__).resolve().parents[2]
    try:
        revision = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        revision, dirty = None, None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "host": socket.gethostname(), "user": getpass.getuser(), "git_revision": revision, "git_dirty": dirty,
            "argv": sys.argv}


def _trim_metrics_after_checkpoint(run_dir: Path, out: Callable[[str], None]) -> None:
    """Before resuming, drop metric lines of epochs after the last checkpoint: they are trained again.
    Lines that are not metric records are named and dropped too."""
    metrics = safe_path(run_dir, run_dir / "metrics.jsonl")
    if not metrics.is_file():
        return
    pointer = read_pointer(safe_path(run_dir, run_dir / "checkpoints"))
    last = pointer[0] if pointer is not None else 0
    rows, problems = read_metric_rows(metrics)
    for problem in problems:
        out(f"  {problem}")
    kept = [row for row in rows if row["epoch"] <= last]
    if len(kept) != len(rows) or problems:
        atomic_write_text(metrics, "".join(json.dumps(row) + "\n" for row in kept))


QUANT_EXPORT_FILE = "quantized.safetensors"


class RunTakenOver(KdlabError):
    """Another process claimed this run (its heartbeat went unseen): stop without touching its row."""


def _export_quantized(student, splits: Splits, run_dir: Path) -> dict[str, float]:
    """Write the quantized student's integer weights + scales and check, from the file, that they
    reproduce its outputs on the first 64 test inputs."""
    from kdlab.quant import export, export_max_error, read_export, save_export

    save_export(safe_path(run_dir, run_dir / QUANT_EXPORT_FILE), export(student))
    inputs = splits.test[0][:64].to(next(student.parameters()).device)
    error = export_max_error(student, inputs, exported=read_export(run_dir / QUANT_EXPORT_FILE))
    return {"quant/export_max_error": error}


def _architecture_key(spec: RunSpec) -> str:
    cfg = spec.config
    return json.dumps([to_dict(cfg.data), to_dict(cfg.teacher), to_dict(cfg.student), to_dict(cfg.method)],
                      sort_keys=True, default=str)


class Runner:
    """Executes runs against one workspace (its store, run folders and caches)."""

    def __init__(self, workspace: str | Path, *, resume: bool = True, progress: bool = False,
                 retry_failed: bool = False, out: Callable[[str], None] = print, train_teachers: bool = True):
        self.workspace = Path(workspace)
        # False (``kdlab eval``): teacher runs are only loaded, never trained; a missing one is an error.
        self.train_teachers = train_teachers
        self.store = Store(self.workspace)
        self.cache_dir = self.workspace / "cache"
        self.resume = resume
        self.retry_failed = retry_failed  # failed runs are retried only when asked: never in a loop
        self.since = time.time()  # runs that fail after this are not retried by this runner (see Store.claim)
        self.progress = progress
        self.out = out
        # Under torchrun: rank 0 reads and writes the store and the run folders; the others follow
        # its broadcast decisions and train their share of each run (see ``distributed``).
        self.dist = distributed.current()
        self.main = self.dist is None or self.dist.is_main
        if not self.main:
            self.out = lambda text: None
            self.progress = False

    # ------------------------------------------------------------------ helpers

    def splits(self, cfg: ExperimentConfig) -> Splits:
        """The run's data; with ``data.labels_per_class`` the train split keeps that many labels per class."""
        d = cfg.data
        splits = build_splits(d.dataset, d.options, root=d.root, cache_dir=self.cache_dir,
                              val_fraction=d.val_fraction, split_seed=d.split_seed)
        return low_label_splits(splits, d.labels_per_class, d.split_seed, drop_unlabelled=d.drop_unlabelled)

    def _status(self, run_id: str) -> str | None:
        status = None
        if self.main:
            try:
                status = self.store.run(run_id).status
            except KdlabError:
                status = None
        return distributed.broadcast(status, self.dist)

    def teacher(self, cfg: ExperimentConfig, splits: Splits):
        """The trained teacher network of ``cfg`` (None without one), training what it needs first."""
        if cfg.teacher is None:
            return None
        # Under torchrun every rank holds its own replica of the teacher. The teacher-output cache is
        # built inside fit on every rank: its writes are race-safe (a second builder drops its copy).
        def load_run(section: TeacherConfig, role: str, epoch: int | None):
            spec = (assistant_run_spec(section, cfg.data, cfg.method) if role == "assistant"
                    else recipe_run_spec(section, cfg.data))
            return self._load_run_model(spec, role, epoch, splits=splits)

        return teacher_module(cfg.teacher, splits, load_run=load_run)

    def _load_run_model(self, spec: RunSpec, role: str, epoch: int | None, *, splits: Splits):
        """Train ``spec`` as a run of experiment "teachers" unless done, then load its final (or kept) weights."""
        if self.train_teachers:
            self._train_or_wait(spec, role)
        if self._status(spec.run_id) is None:
            raise KdlabError(f"{role} run {spec.run_id} is not in {self.store.database_path}; train it with "
                             "`kdlab run` first")
        record = self.store.run(spec.run_id)
        if record.status != "finished":
            raise KdlabError(f"{role} run {spec.run_id} is {record.status}: {record.error or 'no error recorded'}; "
                             f"see `kdlab show {spec.run_id}`")
        path = Path(record.run_dir) / (MODEL_FILE if epoch is None else kept_model_file(epoch))
        if epoch is not None and not path.is_file():
            raise KdlabError(f"teacher.epoch: {role} run {spec.run_id} kept no weights for epoch {epoch} ({path}); "
                             "add the epoch to teacher.train.keep_epochs")
        return load_model_file(path, splits, key=f"{role} run {spec.run_id}")[0]

    def train_upstream(self, spec: RunSpec, role: str) -> None:
        """Train a teacher or assistant run of the plan ahead of its students. Its failure is recorded in
        the store and reported by each student that reads it, so it is not raised here."""
        try:
            self._train_or_wait(spec, role)
        except WorkspaceError:
            raise
        except KdlabError:
            if self.dist is not None:
                raise  # under torchrun every rank must leave together

    def _train_or_wait(self, spec: RunSpec, role: str) -> None:
        """Train the run unless finished; while another live process holds it, wait for it.

        The holder may be on another host, so the store is asked again every few seconds; asking is
        ``execute`` itself, whose claim takes the run over as soon as its holder is dead."""
        deadline = time.monotonic() + TEACHER_WAIT_SECONDS
        while (self.execute(spec, role=role, experiment=TEACHER_EXPERIMENT) == "held"
               and time.monotonic() < deadline):
            time.sleep(TEACHER_POLL_SECONDS)

    # ------------------------------------------------------------------ one run

    def execute(self, spec: RunSpec, *, role: str = "student", experiment: str | None = None) -> str:
        """Run ``spec`` unless finished or held by a live process; return what happened: "ran",
        "skipped" (finished before), "held" (by another live process) or "skipped_failed".

        The run computes on ``train.threads`` intra-op threads whatever executes it (this process,
        a worker, a Ray task), so its numbers do not depend on how it was scheduled."""
        with intra_op_threads(spec.config.train.threads), workspace_cache(self.cache_dir):
            return self._execute(spec, role=role, experiment=experiment)

    def _execute(self, spec: RunSpec, *, role: str, experiment: str | None) -> str:
        cfg = spec.config
        run_id = spec.run_id
        experiment = experiment or cfg.name
        status = self._status(run_id)
        if status == "finished":
            return "skipped"
        if status == "failed" and not self.retry_failed:
            return "skipped_failed"
        splits = self.splits(cfg)
        teacher = self.teacher(cfg, splits)
        previous = None
        if self.main:
            self.store.ensure_experiment(experiment, {} if role == "teacher" else to_dict(cfg))
            inputs = [(edge.run_id, edge.kind, edge.epoch) for edge, _, _ in teacher_inputs(cfg.teacher, cfg)]
            previous = self.store.claim(run_id, experiment=experiment, role=role, label=spec.label, seed=spec.seed,
                                        group_key=spec.group_key, config=spec.resolved(),
                                        take_failed_before=self.since if self.retry_failed else -math.inf,
                                        method=cfg.method.name, point=spec.point, inputs=inputs)
        previous = distributed.broadcast(previous, self.dist)
        if previous in ("finished", "running"):
            return "skipped" if previous == "finished" else "held"
        if previous == "failed_kept":  # failed meanwhile (another process of this study): not retried now
            return "skipped_failed"
        run_dir = self.store.run_dir(run_id)
        file = functools.partial(safe_path, run_dir)  # every write under the folder: no link followed
        sinks = Sinks([])  # replaced by the configured ones once the run folder exists
        outcome = "failed"  # what the sinks are closed with
        # Keeps the claim alive for other hosts sharing the workspace (see kdlab.store.database).
        # Rank 0 alone under torchrun (the other ranks never write to the store).
        beat = (Heartbeat(self.workspace, run_id, heartbeat_timeout=self.store.heartbeat_timeout).start()
                if self.main else None)
        try:
            safe_path(self.store.workspace, run_dir)
            if self.main:
                run_dir.mkdir(parents=True, exist_ok=True)
                clean_temporaries(run_dir)  # what a killed owner left; this process now owns the run
                atomic_write_text(file(run_dir / "config.yaml"), yaml.safe_dump(spec.resolved(), sort_keys=False))
                atomic_write_json(file(run_dir / "env.json"), environment())
                checkpoints = run_dir / "checkpoints"
                if not self.resume and (checkpoints.exists() or checkpoints.is_symlink()):
                    remove_path(run_dir, checkpoints)  # a link is removed itself, never its target
                    remove_path(run_dir, run_dir / "metrics.jsonl")  # the run starts over
                if self.resume:
                    _trim_metrics_after_checkpoint(run_dir, self.out)
            distributed.barrier(self.dist)  # the other ranks read the checkpoints only after rank 0 settled them
            seed_everything(spec.seed)
            student = build_student(cfg.student, splits, teacher=teacher)
            method = build_method(cfg.method, student=student, teacher=teacher, input_shape=tuple(splits.input_shape),
                              train_size=len(splits.train[0]), sequence=splits.sequence)
            check_class_counts(student, teacher, splits)
            verb = "resuming" if previous in ("failed", "interrupted") else "running"
            self.out(f"{verb} {role} {run_id}  [{spec.label}]")

            quant = getattr(student, "quant_options", None)  # the config's, or a loaded quantized file's
            spec_of_model = model_spec(cfg.student.model, cfg.student.options, splits, quant=quant)

            last_epoch = [0]  # the latest epoch recorded (the final metrics' step in the sinks)
            if self.main:  # under torchrun, rank 0 alone records
                sinks = open_sinks(cfg.tracking, run_dir=run_dir, workspace=self.workspace, run_id=run_id,
                                   experiment=experiment, label=spec.label, config=spec.resolved(), out=self.out)

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                if beat is not None and beat.lost.is_set():  # another process owns the run now: write nothing
                    raise RunTakenOver(f"run {run_id} was taken over by another process (no heartbeat seen for "
                                       f"{beat.timeout:g} s); this process stops and leaves it to the new owner")
                last_epoch[0] = epoch
                self.store.log_epoch(run_id, epoch, metrics)
                append_jsonl(file(run_dir / "metrics.jsonl"), {"epoch": epoch, **metrics})
                sinks.log_epoch(epoch, metrics)  # after the store: a sink sees only recorded metrics
                if epoch in cfg.train.keep_epochs:  # saved before this epoch's checkpoint, so never lost on resume
                    save_model(file(run_dir / kept_model_file(epoch)), student, spec_of_model)

            started = time.perf_counter()
            result = fit(student=student, method=method, teacher=teacher, splits=splits, train=cfg.train,
                         seed=spec.seed, run_dir=run_dir, resume=self.resume, augment=cfg.data.augment,
                         on_epoch=on_epoch, progress=self.progress, label=run_id,
                         teacher_cache_dir=self.cache_dir / "teacher_outputs")
            if not self.main:  # rank 0 saves, evaluates and records the run
                return "ran"
            final = dict(result.final)
            final["params"] = float(parameter_count(student))
            final["train_seconds"] = time.perf_counter() - started
            save_model(file(run_dir / MODEL_FILE), student, spec_of_model)
            if quant is not None:
                final.update(_export_quantized(student, splits, run_dir))
            if is_hf_student(student):  # issue 18: gen/ metrics, samples.jsonl and the hf/ folder
                from kdlab.engine.optim import resolve_device

                final.update(finish_llm_run(student, teacher, splits, run_dir, seed=spec.seed,
                                            device=resolve_device(cfg.train.device)))
            if cfg.robust is not None:  # on the test split, after training; the settings are kept with the numbers
                from kdlab.engine.optim import resolve_device
                from kdlab.study.robust_eval import REPORT_FILE, robust_report

                report = robust_report(student, teacher, splits, cfg.robust, device=resolve_device(cfg.train.device))
                atomic_write_json(file(run_dir / REPORT_FILE), report)
                final.update(report["metrics"])
                for line in report["warnings"]:
                    self.out(f"  robust warning {run_id}: {line}")
            not_a_number = sorted(key for key, value in final.items() if math.isnan(value))
            if not_a_number:  # never a silent NaN in a results table: the run fails and says which
                raise KdlabError(f"final metric(s) {', '.join(not_a_number[:5])} are NaN (the model's outputs are "
                                 "not finite on that split); lower train.lr or set train.grad_clip, and check the data")
            atomic_write_json(file(run_dir / "final.json"), final)
            self.store.finish(run_id, final)
            sinks.log_final(final, step=last_epoch[0] or max(self.store.epoch_metrics(run_id), default=0))
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = "interrupted"
            if self.main:
                self.store.interrupt(run_id)
            raise
        except WorkspaceError as exc:  # the disk, not the run: the next `kdlab run` resumes it without --retry-failed
            outcome = "interrupted"
            if self.main:
                self.store.interrupt(run_id, str(exc))
            raise
        except BaseException as exc:
            outcome = "failed"
            if not self.main or isinstance(exc, RunTakenOver):  # the row is not this process's to write
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.store.fail(run_id, message if isinstance(exc, KdlabError) else f"{type(exc).__name__}: {message}")
            raise
        finally:
            sinks.close(outcome)  # once, whatever happened (a store error above must not leave a sink open)
            if beat is not None:
                beat.stop()
        acc = final.get("test/acc")
        self.out(f"  done {run_id}: test acc {acc:.4f}" if acc is not None else f"  done {run_id}")
        return "ran"

    # ------------------------------------------------------------------ a study

    def run(self, base: ExperimentConfig, specs: list[RunSpec]) -> StudySummary:
        """Run every spec; data and teacher checkpoints are checked before any run starts."""
        if self.main:
            self.store.ensure_experiment(base.name, to_dict(base))
        self.preflight(specs)
        # The run graph in dependency order: teachers and assistants first, each once, then the students.
        for node in build_plan(base, specs).upstream():
            self.train_upstream(node.spec, node.role)
        summary = StudySummary()
        for spec in specs:
            try:
                outcome = self.execute(spec)
            except WorkspaceError:
                raise  # a full or read-only disk fails every later run too: stop the study here
            except KdlabError as exc:
                if self.dist is not None:
                    # Under torchrun the other ranks may be waiting in a collective this rank left: end the
                    # study on every rank (torchrun stops the others when one exits with an error).
                    raise
                summary.failed.append((spec.run_id, str(exc)))
                self.out(f"  FAILED {spec.run_id} [{spec.label}]: {exc}")
                continue
            if outcome == "skipped_failed":
                record = self.store.run(spec.run_id)
                summary.failed.append((spec.run_id, f"failed earlier ({record.error}); --retry-failed runs it again"))
            else:
                {"ran": summary.ran, "held": summary.held}.get(outcome, summary.skipped).append(spec.run_id)
        return summary

    def preflight(self, specs: list[RunSpec]) -> None:
        """Build each distinct data/teacher/student/method untrained: bad data, checkpoints, taps and
        shapes raise ``KdlabError`` here, before any run is claimed."""
        checked: set[str] = set()
        for spec in specs:
            check_available(spec.config.tracking)
            key = _architecture_key(spec)
            if key not in checked:
                checked.add(key)
                with workspace_cache(self.cache_dir):
                    self._assemble_untrained(spec)

    def _assemble_untrained(self, spec: RunSpec):
        """Data, teacher (its checkpoint, or its untrained architecture), student and method of ``spec``.

        Building them checks everything that can be wrong before training:
        data files, checkpoints, class counts, tap names and adapter shapes.
        """
        cfg = spec.config
        splits = self.splits(cfg)
        teacher = (teacher_module(cfg.teacher, splits)
                   if cfg.teacher is not None else None)
        student = build_student(cfg.student, splits, teacher=teacher)
        check_class_counts(student, teacher, splits)
        method = build_method(cfg.method, student=student, teacher=teacher, input_shape=tuple(splits.input_shape),
                              train_size=len(splits.train[0]), sequence=splits.sequence)
        return splits, teacher, student, method

    def dry_run(self, specs: list[RunSpec]) -> list[str]:
        """Describe each distinct teacher/student/method: parameter counts and tap shapes; trains nothing."""
        from kdlab import registry

        lines, seen = [], set()
        for spec in specs:
            cfg = spec.config
            key = _architecture_key(spec)
            if key in seen:
                continue
            seen.add(key)
            with workspace_cache(self.cache_dir):
                splits, teacher, student, method = self._assemble_untrained(spec)
            example = splits.train[0][:2]
            lines.append(f"[{spec.label}] data {splits.name}: train {len(splits.train[0])}, val {len(splits.val[0])}, "
                         f"test {len(splits.test[0])}, input {tuple(splits.input_shape)}, {splits.num_classes} classes")
            for role, net, names in (("teacher", teacher, method.teacher_taps), ("student", student,
                                                                                  method.student_taps)):
                if net is None:
                    continue
                arch = (cfg.teacher.model or "checkpoint") if role == "teacher" else cfg.student.model
                stages = list(getattr(net, "feature_stages", ()))
                shapes = tap_shapes(net, list(dict.fromkeys(list(names) + stages)), example)
                shown = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
                lines.append(f"  {role} {arch}: {parameter_count(net):,} parameters; taps: {shown}")
            lines.append(f"  method {cfg.method.name}: {registry.summary('method', cfg.method.name).rstrip('.')}; "
                         f"{parameter_count(method):,} own parameters")
        return lines
