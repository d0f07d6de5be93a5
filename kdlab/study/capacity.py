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
  (:func:`kdlab.study.teacher_runs.teacher_run_finder`). Its final ``metric`` is the teacher's accuracy
  and its final ``params`` the teacher's size. An early-stopped teacher
  (``teacher.epoch``) takes ``metric`` from that epoch's logged metrics when
  present, else it is unknown (``-``). With teacher assistants
  (``teacher.assistants``) the accuracy and size are the first teacher's (the
  large end of the chain); a trajectory teacher's are its recipe run's final
  ones. An ensemble (``teacher.members``) has no accuracy of its own and the
  summed size of its members. A checkpoint teacher has no run: both are unknown.

Teachers and students are named by :mod:`kdlab.study.capacity_names`; the table is
shown and drawn by the ``capacity_gap`` view (:mod:`kdlab.study.views.capacity`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from kdlab.errors import KdlabError
from kdlab.store import RunRecord, Store
from kdlab.study.capacity_names import (
    block_labels,
    describe_models,
    describe_teachers,
    member_sections,
    short,
    unique_names,
    with_data,
)
from kdlab.study.stats import MeanCI, PairedDifference, _check_confidence, mean_ci, paired_difference
from kdlab.study.views.base import unknown_experiment
from kdlab.study.teacher_runs import TEACHER_EXTRAS, Finder, canonical, teacher_run_finder

SCRATCH = "scratch"
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


def _teacher_info(store: Store, find: Finder, key: str, name: str, section: dict | None, data: dict,
                  metric: str) -> TeacherInfo:
    """Accuracy and size of a teacher section: its recipe run (the first teacher of an assistant
    chain); an ensemble has no accuracy of its own and the summed size of its members."""
    if not isinstance(section, dict):
        return TeacherInfo(key=key, name=name, accuracy=None, params=None, run_id=None)
    variant = any(section.get(extra) for extra in TEACHER_EXTRAS) or section.get("epoch") is not None
    members = member_sections(section)
    if members and section.get("model") is None:
        sizes = []
        for member in members:
            run = find(member, data)
            sizes.append(run.final.get("params") if run is not None else None)
        total = float(sum(sizes)) if sizes and all(s is not None for s in sizes) else None
        return TeacherInfo(key=key, name=name, accuracy=None, params=total, run_id=None, variant=True)
    run = find(section, data)
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
        raise unknown_experiment(store, experiment)
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
        context_key = canonical(context)
        contexts[context_key] = context
        student_key = canonical(student)
        student_sections.setdefault(student_key, student)
        data = config.get("data") or {}
        teacher_key = canonical([teacher, data]) if teacher is not None else canonical(None)
        if method.get("name") != SCRATCH:
            teacher_sections.setdefault(teacher_key, teacher)
            teacher_data.setdefault(teacher_key, data)
        placed.append((run, method, context_key, teacher_key, student_key))

    notes: list[str] = []
    # Scratch baselines: per (context, student), pooled over teacher sections, mean per seed.
    scratch_variants: dict[str, dict] = {}
    for _, method, _, _, _ in placed:
        if method.get("name") == SCRATCH:
            scratch_variants.setdefault(canonical(method), method)
    baseline_key = next((key for key, section in scratch_variants.items() if _is_default_scratch(section)),
                        next(iter(scratch_variants), None))
    def hparams(section: dict) -> str:
        return " ".join(f"{k}={short(v)}" for k, v in section.items() if k != "name") or "no hyperparameters"

    for key, section in scratch_variants.items():
        if key != baseline_key:
            notes.append(f"scratch runs with {hparams(section)} are not the baseline "
                         f"(the baseline has {hparams(scratch_variants[baseline_key])})")
    scratch_runs: dict[tuple[str, str], list[RunRecord]] = {}
    for run, method, context_key, _, student_key in placed:
        if method.get("name") == SCRATCH and canonical(method) == baseline_key:
            scratch_runs.setdefault((context_key, student_key), []).append(run)
    scratch_by_seed = {key: _per_seed(members, metric) for key, members in scratch_runs.items()}

    # Blocks: (method section, context) of non-scratch runs, labelled by method name + distinguishing keys.
    blocks: dict[tuple[str, str], list[tuple[RunRecord, str, str]]] = {}
    block_sections: dict[tuple[str, str], tuple[dict, dict]] = {}
    for run, method, context_key, teacher_key, student_key in placed:
        if method.get("name") == SCRATCH:
            continue
        block = (canonical(method), context_key)
        blocks.setdefault(block, []).append((run, teacher_key, student_key))
        block_sections[block] = (method, contexts[context_key])
    if not blocks:  # scratch runs only: one block per context, holding just the scratch row
        for context_key, _ in scratch_runs:
            block_sections[(baseline_key, context_key)] = (scratch_variants[baseline_key], contexts[context_key])
    labels = block_labels(block_sections)

    teacher_names = with_data(describe_teachers(teacher_sections), teacher_data)
    student_names = unique_names(describe_models(student_sections))

    find = teacher_run_finder(store)
    teachers = [_teacher_info(store, find, key, teacher_names[key], section, teacher_data.get(key, {}), metric)
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


def safe_name(name: str) -> str:
    """An experiment name usable as one folder name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return cleaned or "experiment"

