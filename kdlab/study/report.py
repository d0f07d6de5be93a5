"""`kdlab report`: the studies of a workspace as one self-contained HTML page and a Markdown twin.

Per experiment (its finished student runs; reads the store and the run folders, trains nothing):

1. **Configuration diff**: the resolved-config keys whose values differ between its
   configurations (runs that differ only by seed are one configuration).
2. **Results**: mean ± 95% Student-t CI over seeds per configuration
   (:func:`kdlab.study.compare.compare_table`), the selection rule read from the
   configs (``train.selection``), and the paired, same-seed difference of the first
   metric against the **baseline**: ``--baseline LABEL``, else the first configuration
   whose method is ``scratch``, else the first configuration.
3. **Learning curves** per loss term (``train/loss/<term>``, their sum ``train/loss``)
   and ``val/acc``/``val/nll``, from the per-epoch metrics in the store: mean over seeds
   with the 95% CI as a band.
4. **Reliability diagrams**, student vs teacher: the saved models are evaluated on the
   test split (predictions are not stored); a configuration pools the predictions of
   its seeds. Skipped for sequence tasks and with ``evaluate=False``.
5. **Study views** that apply: every view registered under kind ``"view"``
   (:mod:`kdlab.study.views`) whose ``applies`` accepts the experiment's finished
   student runs adds its tables and figures: the capacity gap, the GKD grid, the QAT
   table, the deviation scatter of one distilled run, robustness against ε and the
   accuracy–robustness trade-off. The comparison view gives part 2 (its table and the
   bars of the first metric per configuration). A view that cannot be drawn is named
   in the notes with its reason.

Figures are written as PNG and SVG into ``<report stem>_files/<experiment>/``; the HTML
embeds the PNGs, the Markdown links them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kdlab import registry
from kdlab.dotted import dotted_leaves
from kdlab.errors import KdlabError
from kdlab.report.document import Block, Figure, Heading, Paragraph, Table, render_html, render_markdown
from kdlab.store import RunRecord, Store, atomic_write_text
from kdlab.study.capacity import safe_name
from kdlab.study.compare import DEFAULT_METRICS, CompareRow, compare_table
from kdlab.study.stats import mean_ci
from kdlab.study.teacher_runs import canonical
from kdlab.study.views.base import Options, Selection, ViewFigure, cli_name, get_view, method_name, unknown_experiment

CURVE_KEYS = ("train/loss", "val/acc", "val/nll")  # beside every train/loss/<term>
MAX_DIFF_VALUE = 60  # characters of a config value shown in the diff table
SELECTION_RULES = {"last": "the last epoch", "best_val": "the epoch with the best validation accuracy"}
WEIGHTED_NOTE = ("loss terms are logged as they enter the training loss, i.e. times the method's weight (KD's "
                 "ce term is (1 − α)·CE, scratch's the plain CE): a term's curves of different methods are not "
                 "on one scale")


@dataclass(frozen=True)
class ReportResult:
    html: Path
    markdown: Path
    figures: tuple[Path, ...]
    notes: tuple[str, ...]  # parts left out and why (also in the report)


def _short(value) -> str:
    import json

    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= MAX_DIFF_VALUE else text[: MAX_DIFF_VALUE - 1] + "…"


def _config_without_seed(record: RunRecord) -> dict:
    config = dict(record.config)
    config.pop("seed", None)
    return config


def _pick_baseline(rows: Sequence[CompareRow], records: dict[str, RunRecord], wanted: str | None) -> str | None:
    if wanted is not None:
        if wanted not in {row.label for row in rows}:
            labels = ", ".join(row.label for row in rows)
            raise KdlabError(f"--baseline {wanted!r} is not a configuration of experiment {rows[0].experiment!r}; "
                             f"its configurations: {labels}")
        return wanted
    if len(rows) < 2:
        return None
    for row in rows:
        if method_name(records[row.run_ids[0]]) == "scratch":
            return row.label
    return rows[0].label


# --------------------------------------------------------------------------- parts of one study


def config_diff(rows: Sequence[CompareRow], records: dict[str, RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (one per configuration) of the resolved-config keys that differ between them."""

    leaves = [dotted_leaves(_config_without_seed(records[row.run_ids[0]])) for row in rows]
    keys = sorted({k for d in leaves for k in d
                   if len({canonical(other.get(k, "<absent>")) for other in leaves}) > 1})
    body = [[row.label] + [_short(d[k]) if k in d else "(absent)" for k in keys] for row, d in zip(rows, leaves)]
    return ["config", *keys], body


def curve_titles(rows: Sequence[CompareRow], records: dict[str, RunRecord], keys: Sequence[str]) -> dict[str, str]:
    """Panel titles: a ``train/loss/<term>`` shared by configurations whose method sections differ says it
    is weighted (a KD arm's ce is (1 − α)·CE, a scratch arm's the plain CE: see :data:`WEIGHTED_NOTE`)."""
    methods = {canonical(records[row.run_ids[0]].config.get("method")) for row in rows}
    return {key: f"{key} (× each method's weight)" if key.startswith("train/loss/") and len(methods) > 1 else key
            for key in keys}


def _curve_panels(store: Store, rows: Sequence[CompareRow]) -> dict:
    """{key: {config: (epochs, means, half_widths)}} of the logged per-epoch metrics."""
    per_config: dict[str, dict[str, dict[int, list[float]]]] = {}
    keys: set[str] = set()
    for row in rows:
        values: dict[str, dict[int, list[float]]] = {}
        for run_id in row.run_ids:
            for epoch, metrics in store.epoch_metrics(run_id).items():
                for key, value in metrics.items():
                    if key.startswith("train/loss/") or key in CURVE_KEYS:
                        values.setdefault(key, {}).setdefault(epoch, []).append(value)
                        keys.add(key)
        per_config[row.label] = values
    ordered = sorted(k for k in keys if k.startswith("train/loss/")) + [k for k in CURVE_KEYS if k in keys]
    panels: dict = {}
    for key in ordered:
        for config, values in per_config.items():
            if key not in values:
                continue
            epochs = sorted(values[key])
            summaries = [mean_ci(values[key][e]) for e in epochs]
            panels.setdefault(key, {})[config] = (epochs, [s.mean for s in summaries],
                                                  [s.half_width for s in summaries])
    return panels


def _reliability(store: Store, rows: Sequence[CompareRow], records: dict[str, RunRecord]) -> tuple[dict, str]:
    """{name: (confidence, accuracy, count)} for each configuration (seeds pooled) and each teacher."""
    import torch

    from kdlab.data import build_splits
    from kdlab.engine.build import load_model_file
    from kdlab.engine.loop import predict
    from kdlab.metrics.classification import reliability_bins
    from kdlab.study.deviations import MODEL_FILE, _teacher_file, run_config

    curves: dict = {}
    splits_cache: dict[str, object] = {}
    teachers_done: dict[str, str] = {}
    teacher_logits: dict[str, list] = {}
    test_labels = None
    for row in rows:
        logits, labels = [], []
        for run_id in row.run_ids:
            record = records[run_id]
            cfg = run_config(record)
            d = cfg.data
            key = repr((d.dataset, sorted(d.options.items()), d.root, d.val_fraction, d.split_seed))
            if key not in splits_cache:
                splits_cache[key] = build_splits(d.dataset, d.options, root=d.root, cache_dir=store.cache_folder,
                                                 val_fraction=d.val_fraction, split_seed=d.split_seed)
            splits = splits_cache[key]
            if splits.sequence:
                return {}, "sequence task: reliability diagrams are drawn for classification only"
            model_file = Path(record.run_dir) / MODEL_FILE
            if not model_file.is_file():
                continue
            model, _ = load_model_file(model_file, splits, key=f"run {record.run_id}")
            inputs, test_labels = splits.test
            logits.append(predict(model, inputs, device=torch.device("cpu")))
            labels.append(test_labels)
            if cfg.teacher is not None:
                try:
                    path, kwargs, description = _teacher_file(store, record, cfg)
                except KdlabError:
                    continue
                if str(path) not in teachers_done and path.is_file():
                    teacher, _ = load_model_file(path, splits, **kwargs)
                    name = f"teacher ({description})"
                    teachers_done[str(path)] = name
                    teacher_logits[name] = [predict(teacher, inputs, device=torch.device("cpu")), test_labels]
        if logits:
            bins = reliability_bins(torch.cat(logits), torch.cat(labels), n_bins=10)
            curves[f"{row.label} (student)"] = (bins["confidence"], bins["accuracy"], bins["count"])
    for name, (logits, labels) in teacher_logits.items():
        bins = reliability_bins(logits, labels, n_bins=10)
        curves[name] = (bins["confidence"], bins["accuracy"], bins["count"])
    return curves, ""


def _figure(figure: ViewFigure) -> Figure:
    return Figure(png=figure.png, svg=figure.svg, caption=figure.caption)


def _view_blocks(name: str, selection: Selection, options: Options, folder: Path) -> list[Block]:
    """Heading, tables and figures of one view (a ``KdlabError`` when it cannot be built or drawn)."""
    view = get_view(name)
    result = view.build(selection, options)
    blocks: list[Block] = [Heading(registry.summary("view", name).split(":")[0], 4)]
    title = view.title(result)
    if title:
        blocks.append(Paragraph(title))
    blocks += view.tables(result)
    blocks += [_figure(f) for f in view.figures(result, folder)]
    return blocks


def study_blocks(store: Store, experiment: str, folder: Path, *, baseline: str | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, evaluate: bool = True) -> tuple[list[Block], list[str]]:
    """The report blocks of one experiment and the notes on what was left out; figures go to ``folder``."""
    from kdlab.report import plots

    blocks: list[Block] = [Heading(f"Study: {experiment}", 2)]
    notes: list[str] = []
    records_all = store.runs(experiment=experiment, role="student")
    finished = [r for r in records_all if r.status == "finished"]
    counts = {}
    for record in records_all:
        counts[record.status] = counts.get(record.status, 0) + 1
    blocks.append(Paragraph("Runs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
                            + (" (only finished runs are reported)" if len(finished) < len(records_all) else "")))
    if not finished:
        blocks.append(Paragraph("No finished student run yet: run the study with `kdlab run` first."))
        return blocks, [f"{experiment}: no finished runs"]
    records = {r.run_id: r for r in finished}
    probe = compare_table(finished, metrics=metrics)
    chosen = _pick_baseline(probe.rows, records, baseline)
    selection = Selection(store, tuple(finished), (experiment,))
    options = Options(metric=tuple(metrics)[0], metrics=tuple(metrics), baseline=chosen, evaluate=evaluate)
    comparison = get_view("comparison")
    table = comparison.build(selection, options)
    rows = table.rows

    # 1. configuration diff
    blocks.append(Heading("Configuration differences", 3))
    headers, body = config_diff(rows, records)
    if len(headers) > 1:
        blocks.append(Table(headers, body, notes=["only the resolved-config keys that differ between "
                                                  "configurations (seeds aside)"]))
    else:
        blocks.append(Paragraph("One configuration (runs differ only by seed)."))

    # 2. results: the comparison view
    blocks.append(Heading("Results", 3))
    selections = sorted({str(records[r].config.get("train", {}).get("selection", "last")) for r in records})
    rule = "; ".join(f"{SELECTION_RULES.get(s, s)} (train.selection: {s})" for s in selections)
    seeds = sorted({r.seed for r in finished if r.seed is not None})
    blocks.append(Paragraph(f"Selection rule: test metrics are taken at {rule}. Seeds: {seeds}. "
                            + (f"Baseline for the paired comparison: {chosen}." if chosen else
                               "One configuration: no paired comparison.")))
    blocks += comparison.tables(table)
    blocks += [_figure(f) for f in comparison.figures(table, folder)]

    # 3. learning curves
    panels = _curve_panels(store, rows)
    if panels:
        blocks.append(Heading("Learning curves", 3))
        titles = curve_titles(rows, records, list(panels))
        paths = plots.learning_curves(panels, folder / "learning_curves", title=f"{experiment}: per-epoch metrics",
                                      titles=titles)
        weighted = any(titles[k] != k for k in panels)
        blocks.append(Figure(png=paths[0], svg=paths[1], caption="Learning curves per loss term and validation "
                             "metrics (mean over seeds, 95% CI band)" + (f"; {WEIGHTED_NOTE}" if weighted else "")))
    else:
        notes.append(f"{experiment}: no per-epoch metrics in the store")

    # 4. reliability
    if evaluate:
        curves, why = _reliability(store, rows, records)
        if curves:
            blocks.append(Heading("Reliability diagrams", 3))
            paths = plots.reliability_diagram(curves, folder / "reliability",
                                              title=f"{experiment}: test split, student vs teacher")
            blocks.append(Figure(png=paths[0], svg=paths[1], caption="Reliability diagram on the test split: "
                                 "students (seeds pooled) and their teachers; the saved models evaluated now"))
        elif why:
            notes.append(f"{experiment}: {why}")
    else:
        notes.append(f"{experiment}: reliability diagrams and the views that evaluate saved models skipped "
                     "(--no-eval)")

    # 5. every other registered view that applies
    study: list[Block] = []
    for name in registry.names("view"):
        view = get_view(name)
        if name == "comparison" or not view.applies(finished) or (view.evaluates and not evaluate):
            continue
        try:
            study += _view_blocks(name, selection, options, folder)
        except KdlabError as error:
            notes.append(f"{experiment}: {cli_name(name)} view skipped ({error})")
    if study:
        blocks += [Heading("Study views", 3), *study]
    return blocks, notes


def write_report(store: Store, experiments: Sequence[str], out: str | Path, *, baseline: str | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, evaluate: bool = True,
                 title: str | None = None) -> ReportResult:
    """Write ``out`` (HTML), its Markdown twin (``.md``) and the figures folder; see the module docstring.

    ``experiments`` empty: every experiment with student runs. An unknown name raises ``KdlabError``.
    """
    out = Path(out).expanduser()
    if out.suffix.lower() not in (".html", ".htm"):
        raise KdlabError(f"--out {out}: the report is an HTML file; give a name ending in .html")
    known = store.experiments()
    if not experiments:
        with_students = {r.experiment for r in store.runs(role="student")}
        experiments = [name for name in known if name in with_students]
        if not experiments:
            raise KdlabError(f"no experiment with student runs in {store.database_path}; run one with `kdlab run`")
    for name in experiments:
        if name not in known:
            raise unknown_experiment(store, name)
    folder = out.with_name(out.stem + "_files")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KdlabError(f"--out {out}: cannot create {folder} ({error.strerror or error}); "
                         "pass a path in a writable folder") from None
    title = title or f"kdlab report: {', '.join(experiments)}"
    blocks: list[Block] = [Heading(title, 1), Paragraph(f"Workspace: {store.workspace}. Numbers are mean ± 95% "
                                                        "Student-t CI over seeds; Δ: paired same-seed difference.")]
    notes: list[str] = []
    for name in experiments:
        study, study_notes = study_blocks(store, name, folder / safe_name(name), baseline=baseline, metrics=metrics,
                                          evaluate=evaluate)
        blocks += study
        notes += study_notes
    if notes:
        blocks += [Heading("Notes", 2), Table(["left out"], [[n] for n in notes])]
    atomic_write_text(out, render_html(blocks, title=title))
    markdown = out.with_suffix(".md")
    atomic_write_text(markdown, render_markdown(blocks, base=markdown.parent))
    figures = tuple(sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".svg")))
    return ReportResult(html=out, markdown=markdown, figures=figures, notes=tuple(notes))
