"""Running an experiment: runs claimed in the store, teachers trained once, results recorded.

For each run of the expanded grid × seeds, in order: skip it if the store says
it is finished (or another live process holds it); build the data; get the
teacher (load its checkpoint, or train its recipe as a run of its own — once,
shared by every student, found again by its content hash); claim the run;
train through the one loop; save the model and final metrics; mark it finished
only then. A run whose loss goes NaN is marked failed and the study goes on.
"""
from __future__ import annotations

import getpass
import json
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

from kdlab.config import ExperimentConfig, RunSpec, teacher_run_spec, to_dict
from kdlab.data import Splits, build_splits
from kdlab.engine.build import build_method, build_student, check_class_counts, load_model_file, model_spec
from kdlab.engine.checkpoint import save_model
from kdlab.engine.loop import fit
from kdlab.engine.seed import seed_everything
from kdlab.errors import KdlabError
from kdlab.models import parameter_count, tap_shapes
from kdlab.store import Store, atomic_write_json, atomic_write_text, append_jsonl

TEACHER_EXPERIMENT = "teachers"
MODEL_FILE = "model.safetensors"


@dataclass
class StudySummary:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
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


def _architecture_key(spec: RunSpec) -> str:
    cfg = spec.config
    return json.dumps([to_dict(cfg.data), to_dict(cfg.teacher), to_dict(cfg.student), to_dict(cfg.method)],
                      sort_keys=True, default=str)


class Runner:
    """Executes runs against one workspace (its store, run folders and caches)."""

    def __init__(self, workspace: str | Path, *, resume: bool = True, progress: bool = False,
                 retry_failed: bool = False, out: Callable[[str], None] = print):
        self.workspace = Path(workspace)
        self.store = Store(self.workspace)
        self.cache_dir = self.workspace / "cache"
        self.resume = resume
        self.retry_failed = retry_failed  # failed runs are retried only when asked: never in a loop
        self.progress = progress
        self.out = out

    # ------------------------------------------------------------------ helpers

    def splits(self, cfg: ExperimentConfig) -> Splits:
        d = cfg.data
        return build_splits(d.dataset, d.options, root=d.root, cache_dir=self.cache_dir,
                            val_fraction=d.val_fraction, split_seed=d.split_seed)

    def _status(self, run_id: str) -> str | None:
        try:
            return self.store.run(run_id).status
        except KdlabError:
            return None

    def teacher(self, cfg: ExperimentConfig, splits: Splits):
        """The trained teacher network of ``cfg`` (None without one), training its recipe if needed."""
        t = cfg.teacher
        if t is None:
            return None
        if t.checkpoint is not None:
            return load_model_file(t.checkpoint, splits, model=t.model, options=t.options)[0]
        spec = teacher_run_spec(cfg)
        self.execute(spec, role="teacher", experiment=TEACHER_EXPERIMENT)
        deadline = time.monotonic() + 24 * 3600
        while (status := self._status(spec.run_id)) == "running" and time.monotonic() < deadline:
            time.sleep(2.0)  # another process is training this teacher; wait for it
        record = self.store.run(spec.run_id)
        if record.status != "finished":
            raise KdlabError(f"teacher run {spec.run_id} is {record.status}: {record.error or 'no error recorded'}; "
                             f"see `kdlab show {spec.run_id}`")
        return load_model_file(Path(record.run_dir) / MODEL_FILE, splits, key=f"teacher run {spec.run_id}")[0]

    # ------------------------------------------------------------------ one run

    def execute(self, spec: RunSpec, *, role: str = "student", experiment: str | None = None) -> str:
        """Run ``spec`` unless finished or held by a live process; return what happened."""
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
        self.store.ensure_experiment(experiment, {} if role == "teacher" else to_dict(cfg))
        previous = self.store.claim(run_id, experiment=experiment, role=role, label=spec.label, seed=spec.seed,
                                    group_key=spec.group_key, config=spec.resolved())
        if previous in ("finished", "running"):
            return "skipped"
        run_dir = self.store.run_dir(run_id)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(spec.resolved(), sort_keys=False))
            atomic_write_json(run_dir / "env.json", environment())
            if not self.resume and (run_dir / "checkpoints").exists():
                import shutil

                shutil.rmtree(run_dir / "checkpoints")
            seed_everything(spec.seed)
            student = build_student(cfg.student, splits)
            method = build_method(cfg.method, student=student, teacher=teacher, input_shape=tuple(splits.input_shape))
            check_class_counts(student, teacher, splits)
            verb = "resuming" if previous in ("failed", "interrupted") else "running"
            self.out(f"{verb} {role} {run_id}  [{spec.label}]")

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                self.store.log_epoch(run_id, epoch, metrics)
                append_jsonl(run_dir / "metrics.jsonl", {"epoch": epoch, **metrics})

            started = time.perf_counter()
            result = fit(student=student, method=method, teacher=teacher, splits=splits, train=cfg.train,
                         seed=spec.seed, run_dir=run_dir, resume=self.resume, augment=cfg.data.augment,
                         on_epoch=on_epoch, progress=self.progress, label=run_id)
            final = dict(result.final)
            final["params"] = float(parameter_count(student))
            final["train_seconds"] = time.perf_counter() - started
            save_model(run_dir / MODEL_FILE, student, model_spec(cfg.student.model, cfg.student.options, splits))
            atomic_write_json(run_dir / "final.json", final)
            self.store.finish(run_id, final)
        except KeyboardInterrupt:
            self.store.interrupt(run_id)
            raise
        except BaseException as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.store.fail(run_id, message if isinstance(exc, KdlabError) else f"{type(exc).__name__}: {message}")
            raise
        acc = final.get("test/acc")
        self.out(f"  done {run_id}: test acc {acc:.4f}" if acc is not None else f"  done {run_id}")
        return "ran"

    # ------------------------------------------------------------------ a study

    def run(self, base: ExperimentConfig, specs: list[RunSpec]) -> StudySummary:
        """Run every spec; data and teacher checkpoints are checked before any run starts."""
        self.store.ensure_experiment(base.name, to_dict(base))
        checked: set[str] = set()
        for spec in specs:  # preflight: bad data, checkpoints, taps and shapes fail before any run is claimed
            key = _architecture_key(spec)
            if key not in checked:
                checked.add(key)
                self._assemble_untrained(spec)
        summary = StudySummary()
        for spec in specs:
            try:
                outcome = self.execute(spec)
            except KdlabError as exc:
                summary.failed.append((spec.run_id, str(exc)))
                self.out(f"  FAILED {spec.run_id} [{spec.label}]: {exc}")
                continue
            if outcome == "skipped_failed":
                record = self.store.run(spec.run_id)
                summary.failed.append((spec.run_id, f"failed earlier ({record.error}); --retry-failed runs it again"))
            else:
                (summary.ran if outcome == "ran" else summary.skipped).append(spec.run_id)
        return summary

    def _assemble_untrained(self, spec: RunSpec):
        """Data, teacher (its checkpoint, or its untrained architecture), student and method of ``spec``.

        Building them checks everything that can be wrong before training:
        data files, checkpoints, class counts, tap names and adapter shapes.
        """
        from kdlab.engine.build import build_model

        cfg = spec.config
        splits = self.splits(cfg)
        t = cfg.teacher
        teacher = None
        if t is not None:
            if t.checkpoint is not None:
                teacher = load_model_file(t.checkpoint, splits, model=t.model, options=t.options)[0]
            else:
                teacher = build_model(t.model, t.options, splits)  # architecture only: nothing is trained
        student = build_student(cfg.student, splits)
        check_class_counts(student, teacher, splits)
        method = build_method(cfg.method, student=student, teacher=teacher, input_shape=tuple(splits.input_shape))
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
