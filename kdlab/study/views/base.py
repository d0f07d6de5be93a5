"""What a study view is: which experiments it applies to, its table from the store, its figures.

A view is one file in ``kdlab/study/views/`` holding a :class:`View` subclass registered
under kind ``"view"`` with :func:`register_view`. ``kdlab compare --view NAME``,
``kdlab plot NAME EXPERIMENT`` and ``kdlab report`` find views only through the
registry, so adding a file (and importing it in ``views/__init__.py``) is all a new
view needs::

    @register_view
    class MyView(View):
        \"\"\"One line for `kdlab plot --help`.\"\"\"
        name = "my_view"                      # lower snake case; the CLI also accepts my-view
        def applies(self, runs): ...          # finished student runs of one experiment -> bool
        def build(self, selection, options): ...   # read the store; KdlabError when it cannot
        def tables(self, result): ...         # -> [kdlab.report.table.Table]
        def figures(self, result, out_dir): ...    # -> [ViewFigure(paths, caption)]

``build`` does the work once; ``tables`` and ``figures`` only present its result.
Views import their heavy modules (matplotlib, torch) inside these methods: the
registry imports every view to list their names.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.report.table import Table
from kdlab.store.database import RunRecord
from kdlab.study.compare import DEFAULT_METRICS


@dataclass(frozen=True)
class Options:
    """What the commands let a user choose; each view reads the fields it needs."""

    metric: str = "test/acc"  # the one metric of a study table (capacity, GKD grid, QAT)
    metrics: tuple[str, ...] = DEFAULT_METRICS  # the comparison's columns
    baseline: str | None = None  # the comparison's paired baseline (a row label)
    method: str | None = None  # the capacity-gap figure's method block
    evaluate: bool = True  # False: views that evaluate saved models refuse (kdlab report --no-eval)


@dataclass(frozen=True)
class Selection:
    """The runs a command was pointed at: the store, the experiments named, their (or the named) runs."""

    store: Any  # kdlab.store.Store
    runs: tuple[RunRecord, ...]
    experiments: tuple[str, ...] = ()

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "finished"]

    def experiment(self, view: str) -> str:
        """The one experiment a per-experiment view reads; else a one-line error."""
        if len(self.experiments) != 1 or any(r.experiment != self.experiments[0] for r in self.runs):
            raise KdlabError(f"the {cli_name(view)} view takes exactly one experiment name, got "
                             f"{len(self.experiments)}; e.g. kdlab compare my-study --view {cli_name(view)}")
        return self.experiments[0]


@dataclass(frozen=True)
class ViewFigure:
    """One figure of a view: its files (PNG first, SVG when written) and a caption for the report."""

    paths: tuple[Path, ...]
    caption: str

    @property
    def png(self) -> Path:
        return next(p for p in self.paths if p.suffix == ".png")

    @property
    def svg(self) -> Path | None:
        return next((p for p in self.paths if p.suffix == ".svg"), None)


class View:
    """Base class of the study views (see the module docstring); instances are stateless."""

    name: ClassVar[str] = ""
    evaluates: ClassVar[bool] = False  # evaluates saved models (slow; skipped by `kdlab report --no-eval`)

    def applies(self, runs: Sequence[RunRecord]) -> bool:
        """Whether ``kdlab report`` shows this view for an experiment with these finished student runs."""
        return bool(runs)

    def build(self, selection: Selection, options: Options) -> Any:
        """Read the store once; a ``KdlabError`` (one line) when the view does not fit the selection."""
        raise NotImplementedError

    def title(self, result: Any) -> str:
        """A line above the view's tables (empty: none)."""
        return ""

    def tables(self, result: Any) -> list[Table]:
        return []

    def figures(self, result: Any, out_dir: Path) -> list[ViewFigure]:
        return []


def register_view(cls: type[View]) -> type[View]:
    """Class decorator: register one instance of ``cls`` under kind ``"view"`` and ``cls.name``."""
    registry.register("view", cls.name)(cls())
    return cls


def cli_name(name: str) -> str:
    """The name the CLI shows: ``capacity_gap`` → ``capacity-gap``."""
    return name.replace("_", "-")


def get_view(name: str, *, key: str | None = None) -> View:
    """The registered view ``name`` (dashes or underscores); unknown: a one-line error listing the views."""
    return registry.get("view", name.replace("-", "_"), key=key)


def view_names() -> list[str]:
    """Every registered view, as the CLI spells it."""
    return [cli_name(n) for n in registry.names("view")]


def method_name(record: RunRecord) -> str:
    method = record.config.get("method")
    return str(method.get("name", "")) if isinstance(method, dict) else ""


def unknown_experiment(store: Any, name: str) -> KdlabError:
    """The one-line error for an experiment the store does not have, with close names."""
    known = store.experiments()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return KdlabError(f"unknown experiment {name!r} in {store.database_path}; {hint}"
                      f"experiments: {', '.join(known) or '(none)'} (see `kdlab runs`)")


def experiment_selection(store: Any, experiment: str) -> Selection:
    """The student runs of one named experiment (an unknown name is a one-line error)."""
    if experiment not in store.experiments():
        raise unknown_experiment(store, experiment)
    return Selection(store, tuple(store.runs(experiment=experiment, role="student")), (experiment,))


def token_selection(store: Any, tokens: Sequence[str]) -> Selection:
    """Run ids, run-id prefixes or experiment names (none: every student run of the workspace)."""
    if not tokens:
        return Selection(store, tuple(store.runs(role="student")))
    known = set(store.experiments())
    out: dict[str, RunRecord] = {}
    for token in tokens:
        found = store.find(token)
        if not found:
            raise KdlabError(f"{token!r} is neither a run id nor an experiment in {store.workspace}; "
                             "see `kdlab runs`")
        for record in found:
            out.setdefault(record.run_id, record)
    return Selection(store, tuple(out.values()), tuple(t for t in tokens if t in known))
