"""Which stored run trained a student's teacher: the one place the study views ask.

A run claimed under store schema 2 has its edges in ``run_inputs`` (:mod:`kdlab.plan`): its
teacher's recipe run is read from them (through an assistant chain to its base). Runs recorded
before, and teacher sections named by a view without a student run, are matched to their recipe
run by the content hash of the recipe (:func:`kdlab.plan.teacher_run_spec`, the id the runner
gave the teacher run), else, for stores written by another kdlab version, by comparing the
resolved model, data, recipe and seed.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Callable, Iterable

from kdlab.errors import KdlabError
from kdlab.store.database import RunRecord

# Fields of a model section that are not model-factory options.
MODEL_FIELDS = ("model", "checkpoint", "train", "seed", "epoch", "trajectory", "assistants", "members")
# Teacher-section keys that pick or combine networks rather than shape the recipe run.
TEACHER_EXTRAS = ("epoch", "trajectory", "assistants", "members")

Finder = Callable[[Any, Any], "RunRecord | None"]


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys): equal sections, equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def model_options(section: dict) -> dict[str, Any]:
    """The model-factory options of a model section (``width``, ``depth``, ...)."""
    return {k: v for k, v in section.items() if k not in MODEL_FIELDS}


def teacher_run_finder(store) -> Finder:
    """``find(teacher_section, data_section)`` → the finished recipe run of that teacher, or None.

    None for a checkpoint teacher, an ensemble without its own model, a section that is not a
    mapping, or when no (or more than one) stored run matches. The teacher runs are read once.
    """
    runs: list[RunRecord] | None = None

    def teacher_runs() -> list[RunRecord]:
        nonlocal runs
        if runs is None:
            runs = store.runs(role="teacher", status="finished")
        return runs

    def find(teacher: Any, data: Any) -> RunRecord | None:
        if not isinstance(teacher, dict) or teacher.get("checkpoint") is not None or teacher.get("model") is None:
            return None
        data = data if isinstance(data, dict) else {}
        recipe = {k: v for k, v in teacher.items() if k not in TEACHER_EXTRAS}
        run_id = _recipe_run_id(recipe, data)
        if run_id is not None:
            for run in teacher_runs():
                if run.run_id == run_id:
                    return run
        return _by_content(teacher_runs(), recipe, data)

    return find


def recipe_run_id(store, run_id: str, edges: list | None = None) -> str | None:
    """The recipe run behind run ``run_id``'s teacher, from the stored edges (an assistant chain is
    followed to its base); None for an ensemble, a file teacher, or a run recorded without edges.
    ``edges``: the run's own edges when the caller has read them already."""
    seen = set()
    while run_id not in seen:
        seen.add(run_id)
        edges = store.inputs(run_id) if edges is None else edges
        kinds = {kind for _, kind, _ in edges}
        if kinds <= {"teacher", "trajectory"} and edges and len({i for i, _, _ in edges}) == 1:
            return edges[0][0]
        if kinds != {"assistant"}:
            return None
        run_id, edges = edges[0][0], None
    return None


def teacher_metric_values(store, runs: Iterable[RunRecord], metric: str) -> list[float]:
    """``metric`` of each distinct teacher recipe run behind ``runs`` (each teacher counted once)."""
    find, seen, values = teacher_run_finder(store), set(), []
    for run in runs:
        edges = store.inputs(run.run_id)
        edge = recipe_run_id(store, run.run_id, edges)
        found = None
        if edge is not None:
            try:
                found = store.run(edge)
            except KdlabError:
                found = None
            found = found if found is not None and found.status == "finished" else None
        elif not edges:  # recorded before the run graph was stored
            found = find(run.config.get("teacher"), run.config.get("data", {}))
        if found is not None and found.run_id not in seen and metric in found.final:
            seen.add(found.run_id)
            values.append(found.final[metric])
    return values


def _recipe_run_id(recipe: dict, data: dict) -> str | None:
    from kdlab.runs import parse_experiment
    from kdlab.plan import teacher_run_spec

    raw = {"name": "teacher", "data": copy.deepcopy(data), "teacher": copy.deepcopy(recipe),
           "method": {"name": "scratch"}, "seeds": [0]}
    try:
        _, specs = parse_experiment(raw)
        spec = teacher_run_spec(specs[0].config)
    except (KdlabError, TypeError, ValueError):  # written by another kdlab version: compare content instead
        return None
    return None if spec is None else spec.run_id


def _by_content(runs: list[RunRecord], recipe: dict, data: dict) -> RunRecord | None:
    want_model = (recipe.get("model"), canonical(model_options(recipe)))
    matches = []
    for run in runs:
        student = run.config.get("student") or {}
        got_model = (student.get("model"), canonical(model_options(student)))
        if got_model != want_model or canonical(run.config.get("data")) != canonical(data):
            continue
        if recipe.get("train") is not None and canonical(run.config.get("train")) != canonical(recipe["train"]):
            continue
        if run.seed != recipe.get("seed", 0):
            continue
        matches.append(run)
    return matches[0] if len(matches) == 1 else None
