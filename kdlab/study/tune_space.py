"""``kdlab tune``'s config: the ``tune:`` section (metric, direction, trials, seed, study) and its search
space, each entry checked against the schema's declarations before any trial runs (see ``kdlab.study.tune``)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union

from annotated_types import Ge, Le

from kdlab.config import (ConfigError, ExperimentConfig, apply_overrides, entry_parameters, load_yaml_documents,
                          name_problem, split_sized_name)
from kdlab.config.sections import REGISTRY_SECTIONS
from kdlab.config.validate import Says, coerce, hints
from kdlab.dotted import get_path, set_path
from kdlab.errors import KdlabError
from kdlab.runs import RunSpec, parse_experiment

TUNE_KEYS = ("metric", "direction", "trials", "seed", "study", "space")
# tune.trials and tune.seed (also the flags --trials and --seed, kdlab.cli_flags): a total of trials (a study
# already past it runs none) and the TPE sampler's seed (numpy seeds are below 2^32).
Trials = Annotated[int, Ge(0), Le(1 << 20), Says("a whole number >= 0 (the total number of trials)")]
SamplerSeed = Annotated[int, Ge(0), Le((1 << 32) - 1)]
KNOB_KEYS = ("low", "high", "log", "step", "choices")
# Keys naming a registry entry: tuned through a grid over the choices, so every run keeps only its entry's keys.
ENTRY_KEYS = ("data.dataset", "student.model", "teacher.model", "method.name")
UNTUNABLE = ("name", "seeds", "grid", "tune", "variant")
MAXIMIZE_LEAVES = ("agreement",)
MINIMIZE_LEAVES = ("nll", "ece", "brier", "kl_ts", "loss", "error", "params", "train_seconds")


# --------------------------------------------------------------------------- the space


@dataclass
class Knob:
    """One key of the search space: a float or integer range, or categorical choices."""

    key: str
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list = field(default_factory=list)  # the values written into the config
    names: list[str] | None = None  # named choices (a mapping): Optuna samples the name

    def suggest(self, trial) -> Any:
        """Sample (or, for an enqueued trial, take) this knob's Optuna parameter."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, self.names if self.names is not None else self.choices)

    def value(self, param: Any) -> Any:
        """The config value of an Optuna parameter (a named choice's value; else the parameter itself)."""
        if self.names is not None:
            return copy.deepcopy(self.choices[self.names.index(param)])
        return param

    def samples(self) -> list:
        """The values checked against the schema before any trial: both bounds, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tune_problem(key: str, problem: str) -> str:
    """A config problem met while trying ``key``'s values, named as ``tune.space.KEY``."""
    if problem.startswith(f"{key}:"):
        return f"tune.space.{problem}"
    if problem.startswith("grid.") and problem[5:].startswith(f"{key}:"):
        return f"tune.space.{problem[5:]}"
    return f"tune.space.{key}: {problem}"


def _knob(key: str, spec: Any, errors: list[str]) -> Knob | None:
    """The shape of one space entry (ranges, choices), before it meets the schema."""
    where = f"tune.space.{key}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        errors.append(f"{where}: expected {{low: L, high: H}} (optionally log: true, step: S) or "
                      f"{{choices: [...]}}, got {spec!r}")
        return None
    for name in spec:
        if name not in KNOB_KEYS:
            close = difflib.get_close_matches(str(name), KNOB_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{where}.{name}: unknown key{hint}; allowed keys: {', '.join(KNOB_KEYS)}")
    if "choices" in spec:
        if any(k in spec for k in ("low", "high", "log", "step")):
            errors.append(f"{where}: give either choices or low/high, not both")
            return None
        choices = spec["choices"]
        if isinstance(choices, dict) and choices:
            names = [str(name) for name in choices]
            return Knob(key, "categorical", choices=list(choices.values()), names=names)
        if not isinstance(choices, list) or not choices:
            errors.append(f"{where}.choices: expected a non-empty list of values (or a mapping name: value), "
                          f"got {choices!r}")
            return None
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            errors.append(f"{where}.choices: {bad[0]!r} is not a number, string, boolean or null; give "
                          "such values a name: choices: {name: value, ...}")
            return None
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            errors.append(f"{where}.choices: {choices!r} repeats a value; list each once")
            return None
        return Knob(key, "categorical", choices=list(choices))
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        errors.append(f"{where}: missing {' and '.join(missing)}; give a range {{low: L, high: H}} "
                      "or {choices: [...]}")
        return None
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    before = len(errors)
    for name, value in (("low", low), ("high", high)):
        if not _is_number(value) or not math.isfinite(value):
            errors.append(f"{where}.{name}: expected a finite number, got {value!r}")
    if not isinstance(log, bool):
        errors.append(f"{where}.log: expected true or false, got {log!r}")
    if step is not None and (not _is_number(step) or not step > 0):
        errors.append(f"{where}.step: expected a number > 0, got {step!r}")
    if len(errors) > before:
        return None
    if low > high:
        errors.append(f"{where}: low {low} is above high {high}; swap them")
        return None
    if log and low <= 0:
        errors.append(f"{where}: log: true needs low > 0, got low {low}")
        return None
    if log and step is not None:
        errors.append(f"{where}: give log: true or step, not both (Optuna samples a log range continuously)")
        return None
    return Knob(key, "float", low=low, high=high, log=log, step=step)


def resolve_point(raw: dict, values: dict[str, Any], entry_grid: dict[str, list]) -> list[RunSpec]:
    """The runs (one per seed) of ``raw`` with ``values`` set.

    Entry-name keys (``method.name``...) in ``entry_grid`` are resolved as a grid
    over all their choices — so a key only some entries take (``method.temperature``
    for ``kd``, not ``scratch``) is accepted and each run keeps only its entry's keys,
    as in a ``grid:`` — and only the runs of the entries named in ``values`` are kept
    (all of them for an entry key ``values`` leaves out).
    """
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        if key not in entry_grid:
            set_path(raw, key, copy.deepcopy(value))
    if entry_grid:
        raw["grid"] = {key: list(choices) for key, choices in entry_grid.items()}
    _, specs = parse_experiment(raw)
    return [s for s in specs if all(s.point.get(key) == values[key] for key in entry_grid if key in values)]


def space_knobs(space: Any, errors: list[str]) -> dict[str, Knob]:
    """The well-formed knobs of ``tune.space`` (ranges and choices), before their keys meet the config schema;
    the problems of the others are appended to ``errors``."""
    knobs: dict[str, Knob] = {}
    if not isinstance(space, dict) or not space:
        errors.append("tune.space: give at least one key to tune, e.g. "
                      "tune: {space: {method.temperature: {low: 1, high: 8}}}")
        return knobs
    for key, spec in space.items():
        key = str(key)
        if key.split(".")[0] in UNTUNABLE:
            errors.append(f"tune.space.{key}: {key.split('.')[0]} cannot be tuned; "
                          "tune.space takes config keys such as method.temperature or train.lr")
            continue
        knob = _knob(key, spec, errors)
        if knob is None:
            continue
        if key in ENTRY_KEYS and knob.kind != "categorical":
            errors.append(f"tune.space.{key}: names a registry entry; give {{choices: [...]}}")
            continue
        knobs[key] = knob
    return knobs


def entry_grid_of(knobs: dict[str, Knob]) -> dict[str, list]:
    """The tuned keys that name a registry entry, with their choices."""
    return {key: list(knob.choices) for key, knob in knobs.items() if key in ENTRY_KEYS}


def check_space(raw: dict, knobs: dict[str, Knob]) -> None:
    """Try every knob's bounds (or choices) in config ``raw``: an unknown key, a wrong type or a value the
    config refuses is a ``ConfigError`` naming ``tune.space.KEY``; integer keys become integer ranges."""
    errors: list[str] = []
    entry_grid = entry_grid_of(knobs)
    for key, knob in knobs.items():
        if knob.kind == "float" and takes_integers(raw, key, entry_grid):  # declared in the schema
            if not all(isinstance(v, int) for v in (knob.low, knob.high, knob.step or 1)):
                step = f", step {knob.step}" if knob.step is not None else ""
                errors.append(f"tune.space.{key}: an integer key; give integer bounds, got low {knob.low}, "
                              f"high {knob.high}{step}")
                continue
            knob.kind = "int"
        elif knob.kind == "float":
            knob.low, knob.high = float(knob.low), float(knob.high)
            knob.step = None if knob.step is None else float(knob.step)
        for value in knob.samples():
            try:
                resolve_point(raw, {key: value}, entry_grid)
            except ConfigError as exc:
                problems = exc.problems
            except KdlabError as exc:
                problems = [str(exc)]
            else:
                continue
            for problem in problems:
                line = _tune_problem(key, problem.split(" (grid point ")[0])
                if "unknown key" not in line and repr(value) not in line and str(value) not in line:
                    line += f" (at {value!r})"
                if line not in errors:
                    errors.append(line)
    if errors:
        raise ConfigError(errors)


# --------------------------------------------------------------------------- settings


@dataclass
class TuneSettings:
    """The ``tune:`` section after command-line flags, checked."""

    metric: str
    direction: str
    trials: int
    seed: int
    study: str
    space: dict[str, Knob]
    space_raw: dict


def _default_direction(metric: str) -> str | None:
    leaf = metric.rsplit("/", 1)[-1]
    if leaf.endswith("acc") or leaf in MAXIMIZE_LEAVES:
        return "maximize"
    if leaf in MINIMIZE_LEAVES or leaf.endswith(("loss", "nll", "error")):
        return "minimize"
    return None


def load_tune_config(config: str | Path | dict, *, overrides: list[str] | None = None, seeds: list[int] | None = None,
                     trials: int | None = None, seed: int | None = None, metric: str | None = None,
                     direction: str | None = None) -> tuple[dict, ExperimentConfig, TuneSettings]:
    """Read a config with a ``tune:`` section; return the config without it, its parsed base and the settings.

    Keyword arguments (the command-line flags) take precedence over the section.
    """
    if isinstance(config, dict):
        raw = copy.deepcopy(config)
    else:
        documents = load_yaml_documents(config)
        if len(documents) > 1:
            raise KdlabError(f"config file {config} holds {len(documents)} YAML documents; kdlab tune tunes one "
                             "experiment: keep one document")
        raw = documents[0]
    raw = apply_overrides(raw, overrides or [])
    if seeds is not None:
        raw["seeds"] = list(seeds)
    section = raw.pop("tune", None)
    if not isinstance(section, dict):
        raise KdlabError("config has no tune: section (a mapping); add one, e.g. "
                         "tune: {metric: val/acc, space: {method.temperature: {low: 1, high: 8}}}")
    errors: list[str] = []
    for key in section:
        if key not in TUNE_KEYS:
            close = difflib.get_close_matches(str(key), TUNE_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"tune.{key}: unknown key{hint}; allowed keys: {', '.join(TUNE_KEYS)}")
    if raw.get("grid"):
        keys = ", ".join(raw["grid"])
        errors.append(f"grid: a trial is one run per seed, so kdlab tune takes no grid ({keys}); remove grid: "
                      "and tune such keys with tune.space.KEY: {choices: [...]}")
    knobs = space_knobs(section.get("space"), errors)
    raw.pop("grid", None)
    entry_grid = entry_grid_of(knobs)
    base, _ = parse_experiment(dict(raw, grid=entry_grid) if entry_grid else raw)
    base.grid = {}

    metric = metric or section.get("metric", "val/acc")
    if not isinstance(metric, str) or not metric:
        errors.append(f"tune.metric: expected a metric name such as val/acc, got {metric!r}")
    elif metric.startswith("test/"):
        errors.append(f"tune.metric: {metric} is measured on the test split; tuning on it would select on test. "
                      f"Tune on validation (e.g. val/{metric[5:]}) and read test from `kdlab run` on best.yaml")
    elif metric.startswith("val/") and base.data.val_fraction == 0:
        errors.append(f"tune.metric: {metric} needs a validation split; set data.val_fraction > 0 (e.g. 0.1)")
    direction = direction or section.get("direction") or (_default_direction(metric) if isinstance(metric, str)
                                                          else None)
    if direction not in ("maximize", "minimize"):
        shown = "" if direction is None else f"{direction!r} is not allowed; "
        errors.append(f"tune.direction: {shown}give maximize or minimize (for metric {metric})")
    trials = trials if trials is not None else section.get("trials")
    if trials is None:
        errors.append("--trials: give the total number of trials, e.g. --trials 20 (or tune.trials in the config)")
    else:
        coerce(trials, Trials, "tune.trials", errors)
    seed = seed if seed is not None else section.get("seed", 0)
    coerce(seed, SamplerSeed, "tune.seed", errors)
    study = section.get("study") or f"{base.name}-tune"
    if not isinstance(study, str) or study.strip() != study or not study:
        errors.append(f"tune.study: expected a name, got {study!r}")
    elif name_problem(study, "tune.study"):
        errors.append(name_problem(study, "tune.study"))
    try:
        check_space(raw, knobs)
    except ConfigError as exc:
        errors.extend(exc.problems)
    if errors:
        raise ConfigError(errors)
    settings = TuneSettings(metric=metric, direction=direction, trials=trials, seed=seed, study=study, space=knobs,
                            space_raw=copy.deepcopy(section.get("space")))
    return raw, base, settings


# --------------------------------------------------------------------------- the declared type of a key


def key_annotation(raw: dict, key: str, entry_grid: dict | None = None) -> Any:
    """The declared type (bounds included) of dotted ``key`` in experiment ``raw``, or None if unknown:
    a schema field, or an option of the entry its section names (any of ``entry_grid``'s choices)."""
    parts = key.split(".")
    cls: Any = ExperimentConfig
    for i, part in enumerate(parts):
        tp = hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if tp is None and parts[0] in REGISTRY_SECTIONS and i == 1:
            section_cls, name_key, kind = REGISTRY_SECTIONS[parts[0]]
            names = [get_path(raw, f"{parts[0]}.{name_key}", getattr(section_cls(), name_key))]
            names += list((entry_grid or {}).get(f"{parts[0]}.{name_key}", []))
            for name in names:
                try:
                    params = entry_parameters(kind, split_sized_name(name)[0])
                except (KdlabError, TypeError):
                    continue
                if part in params and i == len(parts) - 1:
                    return params[part][0]
            return None
        if tp is None:
            return None
        cls = _unwrap(tp)
    return tp


def _unwrap(tp: Any) -> Any:
    """``Optional[Annotated[X, ...]]`` → ``X``."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp):
            non_null = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(non_null) != 1:
                return tp
            tp = non_null[0]
        else:
            return tp


def takes_integers(raw: dict, key: str, entry_grid: dict | None = None) -> bool:
    """Whether the schema declares ``key`` an integer (``tune.space`` samples it as one)."""
    return _unwrap(key_annotation(raw, key, entry_grid)) is int
