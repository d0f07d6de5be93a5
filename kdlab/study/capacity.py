"""The capacity-gap report: student accuracy for every teacher × student pair of a study.

From the finished student runs of one experiment (role ``student``):

* **Cells.** Each run is placed by its method block, teacher and student, all
  read from its resolved config. A *block* is a method section (name and
  hyperparameters) together with the rest of the config that shapes training
  (``data``, ``train``, ...: everything but ``name``, ``seed``, ``teacher``,
  ``student`` and ``method``); blocks are labelled by the method name, with
  the keys that tell apart blocks of the same name appended
  (``kd temperature=2.0``). A *teacher* is the whole ``teacher`` section, a
  *student* the whole ``student`` section. A cell is the mean ± Student-t CI
  over seeds of ``metric``.
* **Scratch baseline.** Runs of method ``scratch`` give, per block context and
  student, the from-scratch baseline. Their teacher section does not shape
  training, so scratch runs are pooled over teachers: when several scratch runs
  share a seed (a grid that crosses teachers trains one per teacher), the
  baseline of that seed is their *mean* (the runs are the same training, so this
  is their common value when training is deterministic, and less noisy when it
  is not). Only scratch runs with the default scratch hyperparameters are the
  baseline (if none has them, the first variant seen is); other variants are
  listed in ``CapacityTable.notes``.
* **Gain over scratch.** :func:`~kdlab.study.stats.paired_difference` of
  (method − scratch) over the seeds both have, for the same student.
* **Teacher's own accuracy and size.** The teacher's recipe run (experiment
  ``teachers``) is found by the content hash of its recipe
  (:func:`kdlab.config.teacher_run_spec`), else by comparing its resolved
  model, data, recipe and seed. Its final ``metric`` is the teacher's accuracy
  and its final ``params`` the teacher's size. An early-stopped teacher
  (``teacher.epoch``) takes ``metric`` from that epoch's logged metrics when
  present, else it is unknown (``-``). With teacher assistants
  (``teacher.assistants``) the accuracy and size are the first teacher's (the
  large end of the chain); a trajectory teacher's are its recipe run's final
  ones. An ensemble (``teacher.members``) has no accuracy of its own and the
  summed size of its members. A checkpoint teacher has no run: both are unknown.

Descriptors name a model by its zoo name plus the options that vary among the
teachers (or students) of the study, e.g. ``cnn1d width=64``,
``cnn1d width=128 epoch=10``, ``cnn1d width=128 → TA cnn1d width=32``; when
no option varies the first size option present (``width``, ...) is shown.
Recipe keys that vary (``train.epochs=3``, ``seed=1``) are appended, and so
are the ``data`` keys that tell apart one teacher section trained on different
data; a descriptor still shared gets ``[2]``, ``[3]``... Teachers are keyed by
(teacher section, data); students by their section.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from kdlab.config import dotted_leaves
from kdlab.errors import KdlabError
from kdlab.store import RunRecord, Store
from kdlab.study.compare import FORMATS, MISSING, _render_markdown, _render_text
from kdlab.study.stats import (
    MeanCI,
    PairedDifference,
    _check_confidence,
    format_mean_ci,
    mean_ci,
    paired_difference,
)

SCRATCH = "scratch"
NO_TEACHER = "(no teacher)"
# Fields of a model section that are not model-factory options.
MODEL_FIELDS = ("model", "checkpoint", "train", "seed", "epoch", "trajectory", "assistants", "members")
# Teacher-section keys that pick or combine networks rather than shape the recipe run.
TEACHER_EXTRAS = ("epoch", "trajectory", "assistants", "members")
# Shown even when they do not vary, so a lone model still says how big it is (first present wins).
SIZE_OPTIONS = ("width", "widths", "width_multiplier", "widen_factor", "dim", "depth")
# Top-level keys that are not part of a block's training context.
NOT_CONTEXT = ("name", "seed", "teacher", "student", "method")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TeacherInfo:
    """One teacher of the study: its descriptor, own accuracy and size (None: unknown)."""

    key: str  # canonical JSON of the teacher section ("null": no teacher)
    name: str
    accuracy: float | None
    params: float | None
    run_id: str | None  # the teacher's recipe run, when found
    variant: bool = False  # not the plain recipe teacher: an epoch, assistants, a trajectory or members


@dataclass(frozen=True)
class StudentInfo:
    """One student architecture of the study and its parameter count (None: unknown)."""

    key: str  # canonical JSON of the student section
    name: str
    params: float | None


@dataclass(frozen=True)
class CapacityCell:
    """``metric`` of one (block, teacher, student) over seeds and its paired gain over scratch."""

    method: str
    teacher: str
    student: str
    summary: MeanCI
    gain: PairedDifference | None  # None: no scratch run shares a seed
    seeds: tuple[int | None, ...]
    run_ids: tuple[str, ...]


@dataclass(frozen=True)
class CapacityTable:
    """The capacity-gap report of one experiment.

    ``teachers`` are sorted by size (params, unknown last) then name, ``students``
    likewise. ``cells[(method, teacher, student)]`` and
    ``scratch[(method, student)]`` (the baseline that block is compared with)
    are keyed by descriptors. ``methods`` are the block labels, scratch excluded
    (a study of scratch runs only has the one block ``"scratch"`` with no cells).
    """

    experiment: str
    metric: str
    confidence: float
    methods: tuple[str, ...]
    teachers: tuple[TeacherInfo, ...]
    students: tuple[StudentInfo, ...]
    cells: dict[tuple[str, str, str], CapacityCell]
    scratch: dict[tuple[str, str], MeanCI]
    notes: tuple[str, ...] = ()

    def teacher(self, name: str) -> TeacherInfo:
        for info in self.teachers:
            if info.name == name:
                return info
        raise KeyError(name)

    def teachers_of(self, method: str) -> tuple[TeacherInfo, ...]:
        """The teachers with at least one cell in block ``method``, in table order."""
        used = {teacher for (m, teacher, _) in self.cells if m == method}
        return tuple(info for info in self.teachers if info.name in used)

    def students_of(self, method: str) -> tuple[StudentInfo, ...]:
        """The students with a cell in block ``method`` (with a scratch value, if it has no cell), in table order."""
        used = {student for (m, _, student) in self.cells if m == method}
        if not used:
            used = {student for (m, student) in self.scratch if m == method}
        return tuple(info for info in self.students if info.name in used)


# --------------------------------------------------------------------------- helpers


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_short(v) for v in value)
    if isinstance(value, dict):
        return _canonical(value)
    return str(value)




def _varying(dicts: Iterable[dict[str, Any]]) -> set[str]:
    """Keys whose canonical values differ (or that are missing somewhere) across ``dicts``."""
    dicts = list(dicts)
    keys = {key for d in dicts for key in d}
    return {key for key in keys if len({_canonical(d.get(key, "<absent>")) for d in dicts}) > 1}


def _options(section: dict) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in MODEL_FIELDS}


def _model_name(section: dict) -> str:
    model = section.get("model")
    checkpoint = section.get("checkpoint")
    if model is None:
        return f"checkpoint {Path(str(checkpoint)).name}" if checkpoint else "?"
    return f"{model} (checkpoint {Path(str(checkpoint)).name})" if checkpoint else str(model)


def _describe_models(sections: dict[str, dict]) -> dict[str, str]:
    """Descriptor per section key: model + shown options + varying recipe keys (no extras)."""
    by_model: dict[str, list[dict]] = {}
    for section in sections.values():
        by_model.setdefault(str(section.get("model")), []).append(_options(section))
    vary_options = {model: _varying(options) for model, options in by_model.items()}
    recipes = {key: dotted_leaves({k: section.get(k) for k in ("train", "seed", "checkpoint") if k in section})
               for key, section in sections.items()}
    vary_recipe = _varying(recipes.values())
    out = {}
    for key, section in sections.items():
        options = _options(section)
        shown = [k for k in options if k in vary_options[str(section.get("model"))]]
        if not shown:
            shown = [k for k in SIZE_OPTIONS if options.get(k) is not None][:1]
        parts = [_model_name(section)] + [f"{k}={_short(options[k])}" for k in shown]
        parts += [f"{k}={_short(v)}" for k, v in recipes[key].items() if k in vary_recipe and k != "checkpoint"]
        out[key] = " ".join(parts)
    return out


def _describe_assistant(assistant: Any) -> str:
    if isinstance(assistant, dict):
        options = _options(assistant)
        shown = [k for k in SIZE_OPTIONS if options.get(k) is not None][:1]
        return " ".join([_model_name(assistant)] + [f"{k}={_short(options[k])}" for k in shown])
    return str(assistant)


def _members(section: dict) -> list:
    members = section.get("members") or []
    return list(members) if isinstance(members, (list, tuple)) else [members]


def _describe_teachers(sections: dict[str, dict | None]) -> dict[str, str]:
    """Descriptor per teacher key (not yet made unique: see :func:`_with_data`)."""
    real = {key: section for key, section in sections.items()
            if isinstance(section, dict) and not (_members(section) and section.get("model") is None)}
    base = _describe_models(real)
    out = {}
    for key, section in sections.items():
        if not isinstance(section, dict):
            out[key] = NO_TEACHER
        elif key not in real:  # several teachers at once (teacher.members)
            out[key] = "ensemble of " + " + ".join(_describe_assistant(m) for m in _members(section))
        else:
            text = base[key]
            if section.get("epoch") is not None:
                text += f" epoch={section['epoch']}"
            if section.get("trajectory"):
                text += " trajectory"
            assistants = section.get("assistants")
            if assistants:
                items = assistants if isinstance(assistants, (list, tuple)) else [assistants]
                text += "".join(f" → TA {_describe_assistant(a)}" for a in items)
            out[key] = text
    return out


def _unique(names: dict[str, str]) -> dict[str, str]:
    """Suffix ``[2]``, ``[3]``... to descriptors shared by different keys (first-seen order keeps the bare name)."""
    seen: dict[str, int] = {}
    out = {}
    for key, name in names.items():
        seen[name] = seen.get(name, 0) + 1
        out[key] = name if seen[name] == 1 else f"{name} [{seen[name]}]"
    return out


def _seed_order(seed: int | None) -> tuple[bool, int]:
    return (seed is None, seed if seed is not None else 0)


def _per_seed(runs: Sequence[RunRecord], metric: str) -> dict[int | None, float]:
    """Mean of ``metric`` per seed over ``runs`` that have it."""
    values: dict[int | None, list[float]] = {}
    for run in runs:
        if metric in run.final:
            values.setdefault(run.seed, []).append(float(run.final[metric]))
    return {seed: sum(v) / len(v) for seed, v in sorted(values.items(), key=lambda item: _seed_order(item[0]))}


def _is_default_scratch(method_section: dict) -> bool:
    from kdlab.config import entry_parameters

    try:
        defaults = {key: default for key, (_, default) in entry_parameters("method", SCRATCH).items()}
    except KdlabError:
        return True
    return all(method_section.get(key, default) == default for key, default in defaults.items())


def _unknown_experiment(store: Store, experiment: str) -> KdlabError:
    names = store.experiments()
    close = difflib.get_close_matches(experiment, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return KdlabError(f"no experiment named {experiment!r} in {store.database_path}; {hint}"
                      "list experiments and runs with `kdlab runs`")


# --------------------------------------------------------------------------- teacher runs


class _TeacherFinder:
    """Finds the recipe run of a teacher section (for a given data section) in the store."""

    def __init__(self, store: Store):
        self.store = store
        self._teacher_runs: list[RunRecord] | None = None

    def _runs(self) -> list[RunRecord]:
        if self._teacher_runs is None:
            self._teacher_runs = self.store.runs(role="teacher", status="finished")
        return self._teacher_runs

    def find(self, teacher: dict, data: dict) -> RunRecord | None:
        if teacher.get("checkpoint") is not None or teacher.get("model") is None:
            return None
        recipe = {k: v for k, v in teacher.items() if k not in TEACHER_EXTRAS}
        by_hash = self._by_hash(recipe, data)
        if by_hash is not None:
            return by_hash
        return self._by_content(recipe, data)

    def _by_hash(self, recipe: dict, data: dict) -> RunRecord | None:
        from kdlab.config import parse_experiment, teacher_run_spec

        raw = {"name": "capacity", "data": copy.deepcopy(data), "teacher": copy.deepcopy(recipe),
               "method": {"name": SCRATCH}, "seeds": [0]}
        try:
            _, specs = parse_experiment(raw)
            spec = teacher_run_spec(specs[0].config)
        except (KdlabError, TypeError, ValueError):  # written by another kdlab version: compare content instead
            return None
        if spec is None:
            return None
        for run in self._runs():
            if run.run_id == spec.run_id:
                return run
        return None

    def _by_content(self, recipe: dict, data: dict) -> RunRecord | None:
        want_model = (recipe.get("model"), _canonical(_options(recipe)))
        matches = []
        for run in self._runs():
            student = run.config.get("student") or {}
            got_model = (student.get("model"), _canonical(_options(student)))
            if got_model != want_model or _canonical(run.config.get("data")) != _canonical(data):
                continue
            if recipe.get("train") is not None and _canonical(run.config.get("train")) != _canonical(recipe["train"]):
                continue
            if run.seed != recipe.get("seed", 0):
                continue
            matches.append(run)
        return matches[0] if len(matches) == 1 else None


def _teacher_info(store: Store, finder: _TeacherFinder, key: str, name: str, section: dict | None, data: dict,
                  metric: str) -> TeacherInfo:
    """Accuracy and size of a teacher section: its recipe run (the first teacher of an assistant
    chain); an ensemble has no accuracy of its own and the summed size of its members."""
    if not isinstance(section, dict):
        return TeacherInfo(key=key, name=name, accuracy=None, params=None, run_id=None)
    variant = any(section.get(extra) for extra in TEACHER_EXTRAS) or section.get("epoch") is not None
    members = _members(section)
    if members and section.get("model") is None:
        sizes = []
        for member in members:
            run = finder.find(member, data) if isinstance(member, dict) else None
            sizes.append(run.final.get("params") if run is not None else None)
        total = float(sum(sizes)) if sizes and all(s is not None for s in sizes) else None
        return TeacherInfo(key=key, name=name, accuracy=None, params=total, run_id=None, variant=True)
    run = finder.find(section, data)
    params = run.final.get("params") if run is not None else None
    return TeacherInfo(key=key, name=name, accuracy=_teacher_accuracy(store, run, section, metric),
                       params=None if params is None else float(params), run_id=run.run_id if run else None,
                       variant=variant)


def _teacher_accuracy(store: Store, run: RunRecord | None, teacher: dict, metric: str) -> float | None:
    if run is None:
        return None
    epoch = teacher.get("epoch")
    if epoch is None:
        value = run.final.get(metric)
        return None if value is None else float(value)
    try:
        logged = store.epoch_metrics(run.run_id).get(int(epoch), {})
    except (KdlabError, TypeError, ValueError):
        return None
    value = logged.get(metric)
    return None if value is None else float(value)


# --------------------------------------------------------------------------- the table


def capacity_table(store: Store, experiment: str, *, metric: str = "test/acc",
                   confidence: float = 0.95) -> CapacityTable:
    """The capacity-gap table of ``experiment`` (see the module docstring).

    Raises ``KdlabError`` for an unknown experiment, one without finished
    student runs, or one where no run has ``metric``.
    """
    confidence = _check_confidence(confidence)
    if experiment not in store.experiments():
        raise _unknown_experiment(store, experiment)
    runs = [run for run in store.runs(experiment=experiment, role="student", status="finished")]
    if not runs:
        raise KdlabError(f"experiment {experiment!r} has no finished student runs; run it with `kdlab run CONFIG`")
    if not any(metric in run.final for run in runs):
        keys = sorted({key for run in runs for key in run.final})
        raise KdlabError(f"no finished run of {experiment!r} has metric {metric!r}; metrics: {', '.join(keys)}")

    teacher_sections: dict[str, dict | None] = {}  # by teacher key: the teacher section and the data it trains on
    teacher_data: dict[str, dict] = {}
    student_sections: dict[str, dict] = {}
    placed = []  # (run, method section, context key, teacher key, student key)
    contexts: dict[str, dict] = {}
    for run in runs:
        config = run.config
        teacher = config.get("teacher")
        student = config.get("student") or {}
        method = config.get("method") or {}
        context = {k: v for k, v in config.items() if k not in NOT_CONTEXT}
        context_key = _canonical(context)
        contexts[context_key] = context
        student_key = _canonical(student)
        student_sections.setdefault(student_key, student)
        data = config.get("data") or {}
        teacher_key = _canonical([teacher, data]) if teacher is not None else _canonical(None)
        if method.get("name") != SCRATCH:
            teacher_sections.setdefault(teacher_key, teacher)
            teacher_data.setdefault(teacher_key, data)
        placed.append((run, method, context_key, teacher_key, student_key))

    notes: list[str] = []
    # Scratch baselines: per (context, student), pooled over teacher sections, mean per seed.
    scratch_variants: dict[str, dict] = {}
    for _, method, _, _, _ in placed:
        if method.get("name") == SCRATCH:
            scratch_variants.setdefault(_canonical(method), method)
    baseline_key = next((key for key, section in scratch_variants.items() if _is_default_scratch(section)),
                        next(iter(scratch_variants), None))
    def hparams(section: dict) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in section.items() if k != "name") or "no hyperparameters"

    for key, section in scratch_variants.items():
        if key != baseline_key:
            notes.append(f"scratch runs with {hparams(section)} are not the baseline "
                         f"(the baseline has {hparams(scratch_variants[baseline_key])})")
    scratch_runs: dict[tuple[str, str], list[RunRecord]] = {}
    for run, method, context_key, _, student_key in placed:
        if method.get("name") == SCRATCH and _canonical(method) == baseline_key:
            scratch_runs.setdefault((context_key, student_key), []).append(run)
    scratch_by_seed = {key: _per_seed(members, metric) for key, members in scratch_runs.items()}

    # Blocks: (method section, context) of non-scratch runs, labelled by method name + distinguishing keys.
    blocks: dict[tuple[str, str], list[tuple[RunRecord, str, str]]] = {}
    block_sections: dict[tuple[str, str], tuple[dict, dict]] = {}
    for run, method, context_key, teacher_key, student_key in placed:
        if method.get("name") == SCRATCH:
            continue
        block = (_canonical(method), context_key)
        blocks.setdefault(block, []).append((run, teacher_key, student_key))
        block_sections[block] = (method, contexts[context_key])
    if not blocks:  # scratch runs only: one block per context, holding just the scratch row
        for context_key, _ in scratch_runs:
            block_sections[(baseline_key, context_key)] = (scratch_variants[baseline_key], contexts[context_key])
    labels = _block_labels(block_sections)

    teacher_names = _with_data(_describe_teachers(teacher_sections), teacher_data)
    student_names = _unique(_describe_models(student_sections))

    finder = _TeacherFinder(store)
    teachers = [_teacher_info(store, finder, key, teacher_names[key], section, teacher_data.get(key, {}), metric)
                for key, section in teacher_sections.items()]
    teachers.sort(key=lambda t: (t.params is None, t.params or 0.0, t.name))

    students = []
    for key in student_sections:
        params = next((run.final["params"] for run, _, _, _, s in placed if s == key and "params" in run.final), None)
        students.append(StudentInfo(key=key, name=student_names[key], params=None if params is None else float(params)))
    students.sort(key=lambda s: (s.params is None, s.params or 0.0, s.name))

    cells: dict[tuple[str, str, str], CapacityCell] = {}
    scratch: dict[tuple[str, str], MeanCI] = {}
    for block, label in labels.items():
        context_key = block[1]
        for student in students:
            base = scratch_by_seed.get((context_key, student.key))
            if base:
                scratch[(label, student.name)] = mean_ci(list(base.values()), confidence=confidence)
        groups: dict[tuple[str, str], list[RunRecord]] = {}
        for run, teacher_key, student_key in blocks.get(block, []):
            groups.setdefault((teacher_key, student_key), []).append(run)
        for (teacher_key, student_key), members in groups.items():
            mine = _per_seed(members, metric)
            if not mine:
                continue
            base = scratch_by_seed.get((context_key, student_key), {})
            shared = [seed for seed in mine if seed in base]
            gain = (paired_difference([mine[s] for s in shared], [base[s] for s in shared], confidence=confidence)
                    if shared else None)
            members.sort(key=lambda run: (_seed_order(run.seed), run.run_id))
            cell = CapacityCell(method=label, teacher=teacher_names[teacher_key], student=student_names[student_key],
                                summary=mean_ci(list(mine.values()), confidence=confidence), gain=gain,
                                seeds=tuple(mine), run_ids=tuple(run.run_id for run in members))
            cells[(label, cell.teacher, cell.student)] = cell
    return CapacityTable(experiment=experiment, metric=metric, confidence=confidence,
                         methods=tuple(dict.fromkeys(labels.values())), teachers=tuple(teachers),
                         students=tuple(students), cells=cells, scratch=scratch, notes=tuple(notes))


def _with_data(names: dict[str, str], data: dict[str, dict]) -> dict[str, str]:
    """One teacher section trained on different data (a grid over ``data.*``) is several teachers:
    their descriptors gain the data keys that tell them apart."""
    by_name: dict[str, list[str]] = {}
    for key, name in names.items():
        by_name.setdefault(name, []).append(key)
    out = dict(names)
    for name, keys in by_name.items():
        if len(keys) > 1 and all(key in data for key in keys):
            leaves = {key: dotted_leaves(data[key], "data") for key in keys}
            varying = _varying(leaves.values())
            for key in keys:
                extra = [f"{k}={_short(v)}" for k, v in leaves[key].items() if k in varying]
                out[key] = " ".join([name, *extra])
    return _unique(out)


def _block_labels(block_sections: dict[tuple[str, str], tuple[dict, dict]]) -> dict[tuple[str, str], str]:
    by_name: dict[str, list[tuple[str, str]]] = {}
    for block, (method, _) in block_sections.items():
        by_name.setdefault(str(method.get("name")), []).append(block)
    labels = {}
    for name, members in by_name.items():
        leaves = {block: {**{k: v for k, v in dotted_leaves(block_sections[block][0]).items() if k != "name"},
                          **dotted_leaves(block_sections[block][1])} for block in members}
        varying = _varying(leaves.values()) if len(members) > 1 else set()
        for block in members:
            extra = [f"{k}={_short(v)}" for k, v in leaves[block].items() if k in varying]
            labels[block] = " ".join([name, *extra])
    unique = _unique({_canonical(block): label for block, label in labels.items()})
    return {block: unique[_canonical(block)] for block in labels}


# --------------------------------------------------------------------------- rendering


def _params(value: float | None) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{int(round(value)):,}"


def _gain(gain: PairedDifference | None, digits: int) -> str:
    if gain is None:
        return MISSING
    half = "n/a" if math.isnan(gain.half_width) else f"{gain.half_width:.{digits}f}"
    mean = f"{gain.mean:+.{digits}f}"
    return f"{'+' + mean[1:] if float(mean) == 0.0 else mean} ± {half}"  # no "-0.0000"


def render_capacity(table: CapacityTable, *, fmt: str = "text", digits: int = 4) -> str:
    """One block per method: rows = teachers (by size), first the teacher's own metric and
    params, then one column per student (by size) with ``mean ± ci (Δ gain ± ci)``; last a
    scratch row. Ends with a footnote explaining the numbers."""
    if fmt not in FORMATS:
        raise KdlabError(f"unknown table format {fmt!r}; formats are: {', '.join(FORMATS)}")
    percent = f"{table.confidence * 100:g}%"
    max_n = max((len(cell.seeds) for cell in table.cells.values()), default=0)
    max_n = max([max_n, *(s.n for s in table.scratch.values())])
    title = f"capacity gap of {table.experiment}: student {table.metric}, mean ± {percent} CI over seeds"
    out = [f"## {title}" if fmt == "markdown" else title, ""]
    for method in table.methods:
        teachers = table.teachers_of(method)
        students = table.students_of(method)
        headers = ["teacher", f"teacher {table.metric}", "teacher params"]
        headers += [f"{s.name} ({_params(s.params)} params)" for s in students]
        numeric = [False, True, True] + [True] * len(students)
        body = []
        for teacher in teachers:
            row = [teacher.name, MISSING if teacher.accuracy is None else f"{teacher.accuracy:.{digits}f}",
                   _params(teacher.params)]
            for student in students:
                cell = table.cells.get((method, teacher.name, student.name))
                if cell is None:
                    row.append(MISSING)
                    continue
                text = format_mean_ci(cell.summary, digits=digits)
                if cell.summary.n != max_n:
                    text += f" (n={cell.summary.n})"
                row.append(f"{text} (Δ {_gain(cell.gain, digits)})")
            body.append(row)
        scratch_row = ["scratch (no teacher)", MISSING, MISSING]
        for student in students:
            base = table.scratch.get((method, student.name))
            text = MISSING if base is None else format_mean_ci(base, digits=digits)
            scratch_row.append(text if base is None or base.n == max_n else f"{text} (n={base.n})")
        body.append(scratch_row)
        out.append(f"### method {method}" if fmt == "markdown" else f"method {method}")
        out.append("")
        lines = _render_text(headers, body, numeric) if fmt == "text" else _render_markdown(headers, body, numeric)
        out += lines + [""]
    out.append(f"cells: mean ± {percent} Student-t CI half-width over seeds; (n=k): k seeds; -: no run")
    out.append("Δ: mean same-seed difference (method − scratch) for the same student ± CI")
    out.append(f"teacher {table.metric} and params: the teacher's own recipe run (-: not found); "
               "scratch: per seed, the mean of that seed's scratch runs over the grid's teachers")
    out += [f"note: {note}" for note in table.notes]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- figures


def pick_method(table: CapacityTable, method: str | None = None) -> str:
    """``method`` if it is a block of ``table``; by default ``kd`` when present, else the first block."""
    if method is None:
        if not table.methods:
            raise KdlabError(f"experiment {table.experiment!r} has no method block to plot")
        return "kd" if "kd" in table.methods else table.methods[0]
    if method not in table.methods:
        raise KdlabError(f"--method {method!r} is not a method of experiment {table.experiment!r}; "
                         f"methods: {', '.join(table.methods)}")
    return method


def safe_name(name: str) -> str:
    """An experiment name usable as one folder name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return cleaned or "experiment"


def plot_capacity(table: CapacityTable, out_dir: str | Path, *, method: str | None = None) -> list[Path]:
    """Write ``capacity_gap_heatmap.{png,svg}`` and ``capacity_gap_lines.{png,svg}`` to ``out_dir``."""
    from kdlab.report.plots import capacity_heatmap, capacity_lines

    method = pick_method(table, method)
    out_dir = Path(out_dir)
    teachers = table.teachers_of(method)
    students = table.students_of(method)
    if not teachers or not students:
        raise KdlabError(f"method {method!r} of experiment {table.experiment!r} has no teacher × student cell to plot")
    nan = math.nan

    def cell(teacher, student):
        return table.cells.get((method, teacher.name, student.name))

    means = [[cell(t, s).summary.mean if cell(t, s) else nan for s in students] for t in teachers]
    half = [[cell(t, s).summary.half_width if cell(t, s) else nan for s in students] for t in teachers]
    deltas = [[cell(t, s).gain.mean if cell(t, s) and cell(t, s).gain else nan for s in students] for t in teachers]
    baseline = [table.scratch[(method, s.name)].mean if (method, s.name) in table.scratch else nan for s in students]
    teacher_labels = [t.name if t.params is None else f"{t.name}\n({_params(t.params)} params)" for t in teachers]
    student_labels = [s.name if s.params is None else f"{s.name}\n({_params(s.params)} params)" for s in students]
    title = f"{table.experiment}: {method}, student {table.metric}"
    paths = list(capacity_heatmap(teacher_labels, student_labels, means, out_dir / "capacity_gap_heatmap",
                                  deltas=deltas, baseline=baseline, metric=table.metric, title=title))
    sized = [i for i, t in enumerate(teachers) if t.params is not None and t.params > 0]
    if not sized:
        raise KdlabError(f"no teacher of {table.experiment!r} has a known parameter count (a recipe run in the "
                         "store); the lines plot needs teacher sizes")
    series = {s.name: ([means[i][j] for i in sized], [half[i][j] for i in sized]) for j, s in enumerate(students)}
    paths += capacity_lines([teachers[i].params for i in sized], series, out_dir / "capacity_gap_lines",
                            baselines={s.name: baseline[j] for j, s in enumerate(students)},
                            teacher_labels=[teachers[i].name for i in sized],
                            joined=[not teachers[i].variant for i in sized],
                            metric=table.metric, confidence=table.confidence, title=title)
    return paths
