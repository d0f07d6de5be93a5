"""Parsing one grid point: the top-level fields, then the sections that name a registry entry.

``data`` (``dataset:`` + factory options), ``student``/``teacher`` (``model:`` + factory options) and
``method`` (``name:`` + its ``Hparams``) take the entry's keyword arguments as their other keys. When a
grid switches the entry, a key is accepted if any entry the experiment can select takes it, and each run
keeps only the keys its own entry takes (so ``scratch`` runs of a temperature grid are shared).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from kdlab import registry
from kdlab.config.checks import check_experiment, raw_rules
from kdlab.config.entries import (check_options, entry_parameters, expand_sized_name, pretrained_teacher,
                                  split_sized_name)
from kdlab.config.schema import (DataConfig, ExperimentConfig, MethodConfig, QuantConfig, StudentConfig,
                                 TeacherConfig, TrainConfig)
from kdlab.config.validate import parse_dataclass
from kdlab.dotted import get_path
from kdlab.errors import KdlabError

# section -> (dataclass, key naming the entry, registry kind)
REGISTRY_SECTIONS = {
    "data": (DataConfig, "dataset", "dataset"),
    "student": (StudentConfig, "model", "model"),
    "teacher": (TeacherConfig, "model", "model"),
    "method": (MethodConfig, "name", "method"),
}
_TEACHER_ONLY = {f.name for f in dataclasses.fields(TeacherConfig)} - {f.name for f in dataclasses.fields(StudentConfig)}
_STUDENT_ONLY = {f.name for f in dataclasses.fields(StudentConfig)} - {f.name for f in dataclasses.fields(TeacherConfig)}


def _candidates(raw: dict, grid: dict, section: str, name_key: str, default: Any) -> set:
    """Every entry name section ``section`` can take in this experiment (base value + grid values)."""
    names = [get_path(raw, f"{section}.{name_key}", default)]
    grid_names = grid.get(f"{section}.{name_key}", [])
    names.extend(grid_names.values() if isinstance(grid_names, dict) else
                 grid_names if isinstance(grid_names, (list, tuple)) else [])
    out = set()
    for n in names:
        if isinstance(n, str):
            try:
                out.add(split_sized_name(n)[0])
            except KdlabError:
                pass  # reported where the name is parsed
    return out


def _student_keys(section_raw: dict, errors: list[str]) -> dict:
    """Drop the keys only a teacher takes, naming where they belong (the resolved student section holds
    them at their defaults, for run ids: those are accepted)."""
    out = {}
    for key, value in section_raw.items():
        if key not in _TEACHER_ONLY:
            out[key] = value
        elif key in StudentConfig.RUN_ID_KEYS and value == StudentConfig.RUN_ID_KEYS[key]:
            continue
        elif key == "train":
            errors.append("student.train: the student trains with the top-level train section; move it there")
        elif key == "method":
            errors.append("student.method: the student trains with the top-level method section; move it there")
        else:
            errors.append(f"student.{key}: only the teacher section takes {key}")
    return out


def _model_section(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    """A student or teacher section (its own fields + model options, checked against the model)."""
    if not isinstance(raw, dict):
        return parse_dataclass(cls, raw, path, errors)
    raw = expand_sized_name(raw, path, errors)
    if cls is StudentConfig:
        raw = _student_keys(raw, errors)
    else:
        for key in _STUDENT_ONLY & set(raw):
            if raw[key] is not None:
                errors.append(f"{path}.{key}: only the student section takes {key}")
        raw = {k: v for k, v in raw.items() if k not in _STUDENT_ONLY}
    raw = dict(raw)
    recipe_method = raw.pop("method", None) if cls is TeacherConfig else None
    obj = parse_dataclass(cls, raw, path, errors, extra_ok=True)
    if cls is TeacherConfig:
        obj.method = _recipe_method(recipe_method, f"{path}.method", errors)
    elif obj.quant is not None:
        parse_dataclass(QuantConfig, obj.quant, f"{path}.quant", errors)
    return obj


def _model_list(items: Any, path: str, errors: list[str]) -> list:
    """``teacher.assistants`` / ``teacher.members``: each item a teacher section of its own."""
    if not isinstance(items, list):
        errors.append(f"{path}: expected a list of model sections, got {items!r}")
        return []
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{where}: expected a mapping like {{model: cnn1d, width: 32}}, got {item!r}")
            continue
        obj = _model_section(TeacherConfig, item, where, errors)
        if obj.method is not None and (obj.checkpoint is not None or obj.model is None):
            errors.append(f"{where}.method: only a recipe teacher (model + train) is trained by a method")
        if obj.model is None and obj.checkpoint is None:
            errors.append(f"{where}: give a model (and its options) or a checkpoint")
        elif obj.model is not None:
            try:
                registry.get("model", obj.model, key=f"{where}.model")
                obj.options = check_options(where, "model", obj.model, obj.options, set(), errors)
            except KdlabError as exc:
                errors.append(str(exc))
        for nested in ("assistants", "members"):
            if getattr(obj, nested):
                errors.append(f"{where}.{nested}: nesting is not supported; declare one flat list")
        if obj.checkpoint is None and obj.train is None:
            obj.train = TrainConfig()
        out.append(obj)
    return out


def _recipe_method(raw: Any, path: str, errors: list[str]) -> Optional[MethodConfig]:
    """``teacher.method`` (or a member's): the method that trains a recipe teacher, checked like ``method``."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a method section like {{name: adversarial_training, epsilon: 0.1}}, "
                      f"got {raw!r}")
        return None
    obj = parse_dataclass(MethodConfig, raw, path, errors, extra_ok=True)
    if "name" not in raw:
        errors.append(f"{path}.name: name the method that trains the teacher, e.g. adversarial_training")
        return None
    try:
        method_cls = registry.get("method", obj.name, key=f"{path}.name")
    except KdlabError as exc:
        errors.append(str(exc))
        return None
    if getattr(method_cls, "needs_teacher", False):
        errors.append(f"{path}.name: method {obj.name!r} needs a teacher of its own; a recipe teacher trains "
                      "without one (e.g. scratch, adversarial_training, trades)")
        return None
    obj.options = check_options(path, "method", obj.name, obj.options, set(), errors)
    return obj


def parse_point(raw: dict, grid: dict, errors: list[str]) -> ExperimentConfig:
    """One grid point's raw mapping → ``ExperimentConfig``, every problem appended to ``errors``."""
    for rule in raw_rules():  # e.g. student.init: teacher takes the teacher's model (kdlab.seq.hf_rules)
        raw = rule(raw, errors)
    top_raw = {k: v for k, v in raw.items() if k not in REGISTRY_SECTIONS}
    cfg: ExperimentConfig = parse_dataclass(ExperimentConfig, top_raw, "", errors)
    for section, (cls, name_key, kind) in REGISTRY_SECTIONS.items():
        section_raw = raw.get(section)
        if section == "teacher" and section_raw is None:
            cfg.teacher = None
            continue
        if section == "student" and section_raw is not None and not isinstance(section_raw, dict):
            errors.append(f"student: expected a mapping, got {section_raw!r}")
            continue
        if cls in (StudentConfig, TeacherConfig):
            obj = _model_section(cls, section_raw, section, errors)
        else:
            obj = parse_dataclass(cls, section_raw, section, errors, extra_ok=True)
        if section == "teacher":
            obj.assistants = _model_list(obj.assistants, "teacher.assistants", errors)
            obj.members = _model_list(obj.members, "teacher.members", errors)
        if section == "student" and obj.model is None:
            obj.model = "cnn1d"
        setattr(cfg, section, obj)
        name = getattr(obj, name_key)
        if name is None:  # a teacher given only as a kdlab checkpoint (or as members): options come from the file
            if obj.options:
                errors.append(f"{section}: options {sorted(obj.options)} need {section}.model to be set")
            if section == "teacher" and obj.checkpoint is None and not obj.members:
                errors.append("teacher: give teacher.model (a training recipe), teacher.checkpoint (a file) "
                              "or teacher.members (several teachers)")
            continue
        try:
            registry.get(kind, name, key=f"{section}.{name_key}")
        except KdlabError as exc:
            errors.append(str(exc))
            continue
        others: set[str] = set()
        for cand in _candidates(raw, grid, section, name_key, getattr(cls(), name_key)) - {name}:
            try:
                others.update(entry_parameters(kind, cand))
            except KdlabError:
                pass  # reported when that grid point is parsed
        own = tuple(f.name for f in dataclasses.fields(cls) if f.name != "options")
        obj.options = check_options(section, kind, name, obj.options, others, errors, own_keys=own)
    if cfg.teacher is not None and cfg.teacher.checkpoint is None and cfg.teacher.model is not None \
            and cfg.teacher.train is None and not pretrained_teacher(cfg.teacher):
        cfg.teacher.train = TrainConfig()
    check_experiment(cfg, errors)
    return cfg
