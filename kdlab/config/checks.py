"""Rules that tie fields together (bounds of single fields are declared in ``schema.py``).

A package that owns a section's meaning registers its rules here (``@raw_rule``, ``@config_rule``), so the
config imports none of them: ``kdlab.methods.base`` (the method contract: teachers, unlabelled samples, the
teacher cache, each method's ``check_config``), ``kdlab.seq.hf_rules`` (language models), ``kdlab.robust.section``
(the robust section). They are registered when the registry loads its built-in modules.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from kdlab import registry
from kdlab.config.schema import ExperimentConfig, StudentConfig, TeacherConfig

_RAW_RULES: list[Callable[[dict, list[str]], dict]] = []
_RULES: list[Callable[[ExperimentConfig, list[str]], None]] = []


def raw_rule(fn: Callable[[dict, list[str]], dict]) -> Callable:
    """Register ``fn(raw, errors) -> raw``: rewrites one grid point's mapping before it is parsed (the input is
    not modified)."""
    _RAW_RULES.append(fn)
    return fn


def config_rule(fn: Callable[[ExperimentConfig, list[str]], None]) -> Callable:
    """Register ``fn(cfg, errors)``: a rule of one parsed grid point; each problem appended to ``errors``."""
    _RULES.append(fn)
    return fn


def raw_rules() -> list[Callable[[dict, list[str]], dict]]:
    registry.names("model")  # the built-in modules register their rules when loaded
    return list(_RAW_RULES)


def name_problem(value: Any, key: str) -> str | None:
    """Why ``value`` cannot be a name (of an experiment or a study), else None.

    Names become parts of run ids and folder names in the workspace; they are
    slugged there, but a name that looks like a path is refused outright, so
    nobody believes ``name: ../elsewhere`` writes elsewhere.
    """
    if not isinstance(value, str):
        return None  # the type check reports it
    if not value.strip():
        return f"{key}: give a non-empty name, e.g. {key}: my-study"
    if ("/" in value or "\\" in value or ".." in value or value.startswith(("~", "."))
            or not value.isprintable()):
        return (f"{key}: {value!r} looks like a path; names may not contain '/', '\\' or '..', start with '.' or "
                f"'~', or hold control characters; results always go under the workspace (--workspace DIR)")
    if len(value) > 64:
        return f"{key}: {len(value)} characters; names are at most 64 (they become file names), e.g. {key}: my-study"
    return None


def device_problem(name: str, precision: str, path: str) -> str | None:
    """Whether ``train.device`` exists on this machine, and whether fp16 has the CUDA it needs."""
    import torch  # the devices of this machine; torch is already loaded by the registry lookups

    match = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d{1,6}))?", name)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        return f"{path}.device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{path}.device: {name} requested but CUDA is not available; use device: auto or cpu"
        if index is not None and int(index) >= count:
            return f"{path}.device: {name} requested but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if kind == "mps" and not mps:
        return f"{path}.device: {name} requested but MPS is not available; use device: auto or cpu"
    on_cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    if precision == "fp16" and not on_cuda:
        return f"{path}.precision: fp16 needs a CUDA device but training runs on {name if kind != 'auto' else 'the CPU'}; use bf16 or fp32"
    return None


def _check_sections(cfg: ExperimentConfig, errors: list[str]) -> None:
    s, t = cfg.student, cfg.teacher
    if isinstance(s, StudentConfig):
        if s.init == "teacher" and t is None:
            errors.append("student.init: 'teacher' copies the teacher's weights; add a teacher section")
        if s.init == "teacher" and s.checkpoint is not None:
            errors.append("student.init: 'teacher' and student.checkpoint both set the starting weights; keep one")
    if not isinstance(t, TeacherConfig):
        return
    kept = tuple(t.train.keep_epochs) if t.train is not None else ()
    if t.epoch is not None:
        if t.checkpoint is not None or t.model is None:
            errors.append("teacher.epoch: only a recipe teacher (teacher.model + teacher.train) has epochs to pick")
        elif t.epoch not in kept:
            errors.append(f"teacher.epoch: epoch {t.epoch} is not kept by the teacher's recipe; add it to "
                          f"teacher.train.keep_epochs (now {list(kept)})")
    if t.trajectory and (t.model is None or t.checkpoint is not None or not kept):
        errors.append("teacher.trajectory: needs a recipe teacher with teacher.train.keep_epochs, e.g. [5, 10, 20]")
    if t.method is not None and (t.checkpoint is not None or t.model is None):
        errors.append("teacher.method: only a recipe teacher (teacher.model + teacher.train) is trained by a method")
    if t.members and (t.model is not None or t.checkpoint is not None or t.assistants):
        errors.append("teacher.members: a multi-teacher section holds only members (each a model section)")
    if t.assistants and (t.checkpoint is not None or t.model is None) and not t.members:
        errors.append("teacher.assistants: the chain starts from a recipe teacher (teacher.model + teacher.train)")
    if t.train is not None and t.train.keep_epochs:
        bad = [e for e in t.train.keep_epochs if not (isinstance(e, int) and 1 <= e <= t.train.epochs)]
        if bad:
            errors.append(f"teacher.train.keep_epochs: {bad} outside 1..{t.train.epochs} (teacher.train.epochs)")


def _check_data(cfg: ExperimentConfig, errors: list[str]) -> None:
    d = cfg.data
    if cfg.train.selection == "best_val" and d.val_fraction == 0.0:
        errors.append("train.selection: best_val needs a validation split; set data.val_fraction > 0")
    if d.drop_unlabelled is True and d.labels_per_class is None:
        errors.append("data.drop_unlabelled: only applies with data.labels_per_class; set both or neither")
    if d.augment != "none":
        from kdlab.data.base import gives_images  # deferred: kdlab.data imports this package

        if gives_images(d.dataset, d.options) is False:
            errors.append(f"data.augment: {d.augment} needs image inputs (C, H, W) but dataset {d.dataset!r} gives "
                          "vectors or tokens; set data.augment: none")


def check_experiment(cfg: ExperimentConfig, errors: list[str]) -> None:
    """Every cross-field rule of one grid point."""
    problem = name_problem(cfg.name, "name")
    if problem:
        errors.append(problem)
    _check_sections(cfg, errors)
    _check_data(cfg, errors)
    trains = [("train", cfg.train)]
    if isinstance(cfg.teacher, TeacherConfig) and cfg.teacher.train is not None:
        trains.append(("teacher.train", cfg.teacher.train))
    for path, t in trains:
        if isinstance(t.device, str):
            problem = device_problem(t.device, t.precision, path)
            if problem:
                errors.append(problem)
    if isinstance(cfg.seeds, list) and not cfg.seeds:
        errors.append("seeds: give at least one seed, e.g. seeds: [0, 1, 2]")
    registry.names("model")  # the built-in modules register their rules when loaded
    for rule in _RULES:
        rule(cfg, errors)
