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

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from kdlab.config import ExperimentConfig
from kdlab.dotted import dotted_leaves
from kdlab.errors import KdlabError
from kdlab.runs import content_hash, to_dict
from kdlab.study.tune_space import TuneSettings, entry_grid_of, load_tune_config, resolve_point

INSTALL_HINT = "install the tune extra: pip install 'kdlab[tune]'"

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
    runner.preflight(resolve_point(raw, {}, entry_grid))  # data, checkpoints and taps, before the study is touched
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
        specs = resolve_point(raw, values, entry_grid)
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
    specs = resolve_point(raw, values, entry_grid)
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
