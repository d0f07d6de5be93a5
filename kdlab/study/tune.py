"""Hyperparameter search over a config's knobs with Optuna: ``kdlab tune CONFIG --trials N``.

Optuna is an optional extra (``pip install 'kdlab[tune]'``). A config's ``tune:``
section names the objective and the search space; the rest of the file is an
ordinary experiment config (one YAML document, no ``grid:``)::

    tune:
      metric: val/acc          # a final metric of the runs, on validation: never test/ (default val/acc)
      direction: maximize      # default: maximize for ...acc and agreement, minimize for nll/ece/brier/loss
      trials: 20               # default of --trials: the TOTAL number of finished trials of the study
      seed: 0                  # default of --seed: the TPE sampler's seed
      study: NAME              # default <name>-tune: the Optuna study and the experiment of its runs
      space:
        method.temperature: {low: 1, high: 8, log: true}
        method.alpha: {low: 0.1, high: 0.95}
        train.epochs: {low: 10, high: 30, step: 10}     # integer keys are sampled as integers
        train.lr: {choices: [0.003, 0.01]}               # (a bare list means the same)
        method.name: {choices: [kd, dkd]}                # entry names: each run keeps only its entry's keys
        method.terms: {choices: {kl: {kl: 1.0}, tvd: {tvd: 1.0}}}   # named values, sampled by name

Every key of the space is checked against the config schema before any trial (by
parsing the config with its bounds and choices): an unknown key, a wrong type or a
bad range is a ``ConfigError`` naming ``tune.space.KEY``.

A trial is one run per seed of the config (``seeds:``, or ``--seeds``) with the
trial's values set, executed by :class:`~kdlab.study.runner.Runner` like any run:
recorded in the results database under experiment ``<study>``, skipped when it has
already finished, resumed from its checkpoint when it was interrupted. The
objective is the mean of ``metric`` over the seeds' final metrics.

The Optuna study is stored in the results database itself
(``<workspace>/kdlab.db``, Optuna's tables beside kdlab's) under the study name.
Running the command again resumes it: ``--trials N`` is the total, so only the
missing trials run. A trial whose process died (still RUNNING, its pid gone) is
marked FAIL and its values are enqueued again, so its run resumes from its
checkpoint (or is reused when it had finished). The TPE sampler is reseeded before
each trial from ``--seed`` and the number of trials so far, so a study is
reproducible, and one stopped and resumed gives the trials of an uninterrupted one.
A study whose config, space, seeds, metric or direction changed is refused (name a
new one with ``tune.study``), unless it has no completed trial yet (then it is
recreated).

The best trial's full resolved config is written to
``<workspace>/tune/<study>/best.yaml``, named ``<study>-best``: ``kdlab run`` on it
trains it again (same config and seeds, so the same numbers) and reports its test
metrics, which tuning never looked at.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from kdlab.config import (ConfigError, ExperimentConfig, RunSpec, apply_overrides, content_hash, dotted_leaves,
                          load_yaml_documents, name_problem, parse_experiment, set_path, to_dict)
from kdlab.config.sections import takes_integers
from kdlab.errors import KdlabError

INSTALL_HINT = "install the tune extra: pip install 'kdlab[tune]'"
TUNE_KEYS = ("metric", "direction", "trials", "seed", "study", "space")
KNOB_KEYS = ("low", "high", "log", "step", "choices")
# Keys naming a registry entry: tuned through a grid over the choices, so every run keeps only its entry's keys.
ENTRY_KEYS = ("data.dataset", "student.model", "teacher.model", "method.name")
UNTUNABLE = ("name", "seeds", "grid", "tune", "variant")
MAXIMIZE_LEAVES = ("agreement",)
MINIMIZE_LEAVES = ("nll", "ece", "brier", "kl_ts", "loss", "error", "params", "train_seconds")

# Optuna user attributes of a trial.
ATTR_PID, ATTR_PID_START, ATTR_HOST = "kdlab_pid", "kdlab_pid_start", "kdlab_host"
ATTR_RUNS, ATTR_VALUES, ATTR_ERROR, ATTR_RETRY_OF = "kdlab_runs", "kdlab_values", "kdlab_error", "kdlab_retry_of"
ATTR_IDENTITY = "kdlab_identity"  # of the study: what its trials' values mean
STALE_WITHOUT_PID_SECONDS = 60.0  # a RUNNING trial that never recorded its process: stale after this long


def import_optuna():
    """Optuna, or a ``KdlabError`` with the install hint when the extra is missing."""
    try:
        import optuna
    except ImportError:
        raise KdlabError(f"kdlab tune needs Optuna: {INSTALL_HINT}") from None
    return optuna


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


def _resolve(raw: dict, values: dict[str, Any], entry_grid: dict[str, list]) -> list[RunSpec]:
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
                _resolve(raw, {key: value}, entry_grid)
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
    elif isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        errors.append(f"--trials: expected a whole number >= 0 (the total number of trials), got {trials!r}")
    seed = seed if seed is not None else section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        errors.append(f"tune.seed: expected an integer, got {seed!r}")
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


# --------------------------------------------------------------------------- the study


@dataclass
class TrialRow:
    """One trial as reported: its values, objective and runs."""

    number: int
    state: str  # COMPLETE | FAIL | RUNNING | WAITING | PRUNED
    params: dict[str, Any]  # Optuna's parameters (a named choice's name)
    value: float | None
    run_ids: list[str]
    error: str | None = None
    retry_of: int | None = None
    retried: bool = False  # a killed trial whose values were enqueued again


@dataclass
class TuneResult:
    study: str
    metric: str
    direction: str
    database: Path
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Path | None
    ran: list[int] = field(default_factory=list)  # trial numbers run by this call
    retried: list[int] = field(default_factory=list)  # killed trials found and enqueued again


def _identity(base: ExperimentConfig, settings: TuneSettings) -> dict:
    """What a study's values mean: changing any of it makes old and new trials incomparable."""
    config = to_dict(base)
    config.pop("grid", None)
    config.pop("name", None)
    for key in settings.space:  # the config's own value of a tuned key is never used
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return {"config": config, "space": settings.space_raw, "metric": settings.metric,
            "direction": settings.direction}




def _differences(old: dict, new: dict) -> list[str]:
    a, b = dotted_leaves(old, keep_empty=True), dotted_leaves(new, keep_empty=True)
    return [f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
            for key in sorted(set(a) | set(b)) if a.get(key, "(unset)") != b.get(key, "(unset)")]


def storage_url(workspace: Path) -> str:
    from kdlab.store.database import DATABASE_NAME

    return f"sqlite:///{(Path(workspace).expanduser().absolute() / DATABASE_NAME).as_posix()}"


def open_study(optuna, workspace: Path, name: str, identity: dict, direction: str, out: Callable[[str], None]):
    """Create or load study ``name`` in the results database; refuse one whose meaning changed."""
    from kdlab.store.database import BUSY_TIMEOUT_SECONDS, DATABASE_NAME

    database = Path(workspace) / DATABASE_NAME
    storage = optuna.storages.RDBStorage(storage_url(workspace),
                                         engine_kwargs={"connect_args": {"timeout": BUSY_TIMEOUT_SECONDS}})
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        study = None
    if study is not None:
        stored = study.user_attrs.get(ATTR_IDENTITY)
        if stored != json.loads(json.dumps(identity)):
            complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if complete:
                changes = _differences(stored or {}, identity)
                shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
                raise KdlabError(f"study {name} in {database} has {len(complete)} completed "
                                 f"trials of another config ({shown}); restore it, or start a new study with "
                                 "tune.study: NEW_NAME (finished runs are reused)")
            out(f"study {name} had no completed trial; recreating it with the current config")
            optuna.delete_study(study_name=name, storage=storage)
            study = None
    if study is None:
        study = optuna.create_study(study_name=name, storage=storage, direction=direction)
        study.set_user_attr(ATTR_IDENTITY, identity)
    return study


def _trial_alive(trial) -> bool:
    """Whether a RUNNING trial's process still lives (one on another host is assumed to)."""
    from kdlab.store.database import _process_alive

    attrs = trial.user_attrs
    if ATTR_PID not in attrs:
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return time.time() - started < STALE_WITHOUT_PID_SECONDS
    if attrs.get(ATTR_HOST) != socket.gethostname():
        return True
    return _process_alive(attrs.get(ATTR_PID), attrs.get(ATTR_PID_START))


def _rows(study) -> list[TrialRow]:
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[ATTR_RETRY_OF] for t in trials if ATTR_RETRY_OF in t.user_attrs}
    return [TrialRow(number=t.number, state=t.state.name, params=dict(t.params), value=t.value,
                     run_ids=list(t.user_attrs.get(ATTR_RUNS, [])), error=t.user_attrs.get(ATTR_ERROR),
                     retry_of=t.user_attrs.get(ATTR_RETRY_OF), retried=t.number in retried)
            for t in trials]


def _counted(row: TrialRow) -> bool:
    """Finished trials count toward --trials; a killed trial retried under a new number does not."""
    return row.state in ("COMPLETE", "PRUNED") or (row.state == "FAIL" and not row.retried)


def retry_stale_trials(optuna, study, out: Callable[[str], None] = print) -> list[int]:
    """Mark RUNNING trials whose process died FAIL and enqueue their values again; return their numbers."""
    state = optuna.trial.TrialState
    stale = [t for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)) if not _trial_alive(t)]
    numbers = []
    for trial in stale:
        try:
            study.tell(trial.number, state=state.FAIL)
        except (RuntimeError, ValueError):
            continue  # another process finished or failed it meanwhile
        study.enqueue_trial(dict(trial.params), user_attrs={ATTR_RETRY_OF: trial.number})
        numbers.append(trial.number)
        out(f"trial {trial.number} was stopped before it finished; retrying its values (its runs resume)")
    return numbers


def _trial_seed(seed: int, index: int) -> int:
    return int(content_hash(["kdlab-tune", seed, index])[:8], 16)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={_format_value(value)}" for key, value in params.items())


def tune(config: str | Path | dict, *, workspace: str | Path, trials: int | None = None, seed: int | None = None,
         metric: str | None = None, direction: str | None = None, overrides: list[str] | None = None,
         seeds: list[int] | None = None, out: Callable[[str], None] = print, progress: bool = False) -> TuneResult:
    """Run (or resume) the study of ``config`` until it has ``trials`` finished trials; see the module docstring."""
    optuna = import_optuna()
    raw, base, settings = load_tune_config(config, overrides=overrides, seeds=seeds, trials=trials, seed=seed,
                                           metric=metric, direction=direction)
    from kdlab.store.database import _own_start_ticks
    from kdlab.study.runner import Runner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = dict(raw, name=settings.study)
    entry_grid = entry_grid_of(settings.space)
    runner = Runner(workspace, progress=progress, out=lambda line: None if line.lstrip().startswith("done ")
                    else out(line))  # "done" lines show test accuracy: tuning reports validation only
    runner.preflight(_resolve(raw, {}, entry_grid))  # data, checkpoints and taps, before the study is touched
    study = open_study(optuna, runner.workspace, settings.study, _identity(base, settings), settings.direction, out)
    result = TuneResult(study=settings.study, metric=settings.metric, direction=settings.direction,
                        database=runner.store.database_path, rows=[], best=None, best_config=None)
    result.retried = retry_stale_trials(optuna, study, out)
    state = optuna.trial.TrialState
    while True:
        rows = _rows(study)
        running = [t for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)) if _trial_alive(t)]
        if sum(_counted(r) for r in rows) + len(running) >= settings.trials:
            break
        study.sampler = optuna.samplers.TPESampler(seed=_trial_seed(settings.seed, len(rows)))
        trial = study.ask()
        trial.set_user_attr(ATTR_PID, os.getpid())
        trial.set_user_attr(ATTR_PID_START, _own_start_ticks())
        trial.set_user_attr(ATTR_HOST, socket.gethostname())
        try:
            _run_trial(optuna, study, trial, raw, settings, entry_grid, runner, out)
        except KeyboardInterrupt:  # the trial is retried next time; its interrupted run resumes
            try:
                study.tell(trial, state=state.FAIL)
            except (RuntimeError, ValueError):
                raise KeyboardInterrupt from None  # it had finished: nothing to retry
            study.enqueue_trial(dict(trial.params), user_attrs={ATTR_RETRY_OF: trial.number})
            raise
        result.ran.append(trial.number)
    result.rows = _rows(study)
    complete = [r for r in result.rows if r.state == "COMPLETE"]
    if complete:
        pick = max if settings.direction == "maximize" else min
        result.best = pick(complete, key=lambda r: (r.value, -r.number))
        result.best_config = write_best_config(raw, base, settings, result, runner.workspace)
    return result


def _run_trial(optuna, study, trial, raw: dict, settings: TuneSettings, entry_grid: dict, runner, out) -> None:
    state = optuna.trial.TrialState
    params = {key: knob.suggest(trial) for key, knob in settings.space.items()}
    values = {key: settings.space[key].value(param) for key, param in params.items()}
    label = format_params(params)

    def fail(message: str) -> None:
        trial.set_user_attr(ATTR_ERROR, message)
        study.tell(trial, state=state.FAIL)
        out(f"trial {trial.number} failed  {label}: {message}")

    try:
        specs = _resolve(raw, values, entry_grid)
    except KdlabError as exc:
        return fail(str(exc).splitlines()[0])
    trial.set_user_attr(ATTR_RUNS, [spec.run_id for spec in specs])
    scores, reused = [], 0
    for spec in specs:
        spec.point = {key: _format_value(param) for key, param in params.items()}
        try:
            outcome = runner.execute(spec)
            while outcome == "skipped" and runner.store.run(spec.run_id).status == "running":
                time.sleep(2.0)  # another live process trains this run (another trial with these values)
                outcome = runner.execute(spec)
        except KdlabError as exc:
            return fail(f"run {spec.run_id}: {str(exc).splitlines()[0]}")
        record = runner.store.run(spec.run_id)
        if record.status != "finished":
            return fail(f"run {spec.run_id} {record.status}: {record.error or 'no error recorded'}")
        reused += outcome == "skipped"
        if settings.metric not in record.final:
            available = ", ".join(k for k in sorted(record.final) if not k.startswith("test/"))
            trial.set_user_attr(ATTR_ERROR, f"no metric {settings.metric}")
            study.tell(trial, state=state.FAIL)
            raise KdlabError(f"tune.metric: run {spec.run_id} has no final metric {settings.metric!r}; "
                             f"choose one of {available}")
        scores.append(record.final[settings.metric])
    value = sum(scores) / len(scores)
    trial.set_user_attr(ATTR_VALUES, scores)
    if not math.isfinite(value):
        return fail(f"{settings.metric} is {value}")
    study.tell(trial, value)
    note = f"  (reused {reused} finished run{'s' if reused != 1 else ''})" if reused else ""
    out(f"trial {trial.number}  {label}  {settings.metric} {value:.4f}{note}")


def best_config(raw: dict, settings: TuneSettings, params: dict[str, Any]) -> dict:
    """The full resolved config of a trial's values, as a one-experiment YAML mapping named ``<study>-best``."""
    entry_grid = entry_grid_of(settings.space)
    values = {key: settings.space[key].value(param) for key, param in params.items()}
    specs = _resolve(raw, values, entry_grid)
    cfg = to_dict(specs[0].config)
    cfg.pop("grid", None)
    cfg["name"] = f"{settings.study}-best"
    return cfg


def write_best_config(raw: dict, base: ExperimentConfig, settings: TuneSettings, result: TuneResult,
                      workspace: Path) -> Path:
    from kdlab.store import atomic_write_text
    from kdlab.study.capacity import safe_name

    best = result.best
    cfg = best_config(raw, settings, best.params)
    path = Path(workspace) / "tune" / safe_name(settings.study) / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best trial {best.number} of study {settings.study} ({result.database}):\n"
              f"#   {settings.metric} = {best.value:.6g} ({settings.direction}; mean over seeds {base.seeds})\n"
              f"#   {format_params(best.params)}\n"
              f"# `kdlab run {path}` trains it as experiment {cfg['name']} and reports its test metrics,\n"
              "# which the search never saw (add --seeds for more seeds).\n")
    atomic_write_text(path, header + yaml.safe_dump(cfg, sort_keys=False))
    return path


def render_trials(result: TuneResult) -> str:
    """The study's trials as a text table, best marked with ``*``."""
    keys = list(dict.fromkeys(k for r in result.rows for k in r.params))
    header = ["", "trial", "state", result.metric, *keys, "run"]
    lines = []
    for r in result.rows:
        state = r.state if not r.retried else "KILLED"
        run = (r.run_ids[0] + (f" (+{len(r.run_ids) - 1})" if len(r.run_ids) > 1 else "")) if r.run_ids else "-"
        value = f"{r.value:.4f}" if r.value is not None else "-"
        lines.append(["*" if result.best is not None and r.number == result.best.number else "", str(r.number),
                      state, value, *(_format_value(r.params[k]) if k in r.params else "-" for k in keys), run])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *lines])
