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
5. **Study plots** that apply: bars of the first metric per configuration (the loss
   ablation view; with ≥ 2 configurations), the capacity-gap heatmap and lines
   (≥ 2 teachers or students), the GKD λ × divergence grid (gkd runs), the
   deviation scatter of one distilled run (``kdlab analyze deviations``), robust
   accuracy against ε (``robust/curve/<ε>`` metrics) and the accuracy–robustness
   trade-off (``robust/worst/acc`` against ``test/acc``).

Figures are written as PNG and SVG into ``<report stem>_files/<experiment>/``; the HTML
embeds the PNGs, the Markdown links them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kdlab.config import dotted_leaves
from kdlab.errors import KdlabError
from kdlab.report.document import Block, Figure, Heading, Paragraph, Table, render_html, render_markdown
from kdlab.store import RunRecord, Store, atomic_write_text
from kdlab.study.capacity import _canonical, safe_name
from kdlab.study.compare import DEFAULT_METRICS, CompareRow, compare_table, _headers_and_cells, _footnote
from kdlab.study.stats import mean_ci

CURVE_KEYS = ("train/loss", "val/acc", "val/nll")  # beside every train/loss/<term>
MAX_DIFF_VALUE = 60  # characters of a config value shown in the diff table
SELECTION_RULES = {"last": "the last epoch", "best_val": "the epoch with the best validation accuracy"}
_CURVE = re.compile(r"^robust/curve/(.+)$")


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


def _method_name(record: RunRecord) -> str:
    method = record.config.get("method")
    return method.get("name", "") if isinstance(method, dict) else ""


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
        if _method_name(records[row.run_ids[0]]) == "scratch":
            return row.label
    return rows[0].label


# --------------------------------------------------------------------------- parts of one study


def config_diff(rows: Sequence[CompareRow], records: dict[str, RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (one per configuration) of the resolved-config keys that differ between them."""

    leaves = [dotted_leaves(_config_without_seed(records[row.run_ids[0]])) for row in rows]
    keys = sorted({k for d in leaves for k in d
                   if len({_canonical(other.get(k, "<absent>")) for other in leaves}) > 1})
    body = [[row.label] + [_short(d[k]) if k in d else "(absent)" for k in keys] for row, d in zip(rows, leaves)]
    return ["config", *keys], body


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


def _robust_curves(rows: Sequence[CompareRow], records: dict[str, RunRecord]) -> dict:
    series = {}
    for row in rows:
        per_eps: dict[float, list[float]] = {}
        for run_id in row.run_ids:
            for key, value in records[run_id].final.items():
                match = _CURVE.match(key)
                if match:
                    try:
                        per_eps.setdefault(float(match.group(1)), []).append(value)
                    except ValueError:
                        continue
        if per_eps:
            xs = sorted(per_eps)
            summaries = [mean_ci(per_eps[x]) for x in xs]
            series[row.label] = (xs, [s.mean for s in summaries], [s.half_width for s in summaries])
    return series


def _tradeoff(rows: Sequence[CompareRow], records: dict[str, RunRecord], clean: str, robust: str) -> dict:
    points = {}
    for row in rows:
        pairs = [(records[r].final[clean], records[r].final[robust]) for r in row.run_ids
                 if clean in records[r].final and robust in records[r].final]
        if pairs:
            x, y = mean_ci([p[0] for p in pairs]), mean_ci([p[1] for p in pairs])
            points[row.label] = (x.mean, x.half_width, y.mean, y.half_width)
    return points


def _figure(paths, caption: str) -> Figure:
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    png = next(p for p in paths if p.suffix == ".png")
    svg = next((p for p in paths if p.suffix == ".svg"), None)
    return Figure(png=png, svg=svg, caption=caption)


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
    table = compare_table(finished, metrics=metrics, baseline=chosen) if chosen is not None else probe
    rows = table.rows

    # 1. configuration diff
    blocks.append(Heading("Configuration differences", 3))
    headers, body = config_diff(rows, records)
    if len(headers) > 1:
        blocks.append(Table(headers, body, note="only the resolved-config keys that differ between configurations "
                                                "(seeds aside)"))
    else:
        blocks.append(Paragraph("One configuration (runs differ only by seed)."))

    # 2. results
    blocks.append(Heading("Results", 3))
    selections = sorted({str(records[r].config.get("train", {}).get("selection", "last")) for r in records})
    rule = "; ".join(f"{SELECTION_RULES.get(s, s)} (train.selection: {s})" for s in selections)
    seeds = sorted({r.seed for r in finished if r.seed is not None})
    blocks.append(Paragraph(f"Selection rule: test metrics are taken at {rule}. Seeds: {seeds}. "
                            + (f"Baseline for the paired comparison: {chosen}." if chosen else
                               "One configuration: no paired comparison.")))
    headers, body, numeric = _headers_and_cells(table, 4)
    blocks.append(Table(headers, body, note=_footnote(table), numeric=numeric))

    # 3. learning curves
    panels = _curve_panels(store, rows)
    if panels:
        blocks.append(Heading("Learning curves", 3))
        paths = plots.learning_curves(panels, folder / "learning_curves", title=f"{experiment}: per-epoch metrics")
        blocks.append(_figure(paths, "Learning curves per loss term and validation metrics (mean over seeds, "
                                     "95% CI band)"))
    else:
        notes.append(f"{experiment}: no per-epoch metrics in the store")

    # 4. reliability
    if evaluate:
        curves, why = _reliability(store, rows, records)
        if curves:
            blocks.append(Heading("Reliability diagrams", 3))
            paths = plots.reliability_diagram(curves, folder / "reliability",
                                              title=f"{experiment}: test split, student vs teacher")
            blocks.append(_figure(paths, "Reliability diagram on the test split: students (seeds pooled) and "
                                         "their teachers; the saved models evaluated now"))
        elif why:
            notes.append(f"{experiment}: {why}")
    else:
        notes.append(f"{experiment}: reliability diagrams and the deviation scatter skipped (--no-eval)")

    # 5. study plots
    study: list[Block] = []
    metric = table.metrics[0]
    with_metric = [row for row in rows if row.summaries.get(metric) is not None]
    if len(with_metric) >= 2:
        paths = plots.comparison_bars([r.label for r in with_metric], [r.summaries[metric].mean for r in with_metric],
                                      [r.summaries[metric].half_width for r in with_metric],
                                      folder / "comparison_bars.png", metric=metric, baseline=chosen,
                                      title=f"{experiment}: {metric} per configuration")
        study.append(_figure([paths], f"{metric} per configuration (loss/method ablation), mean ± 95% CI; "
                                      f"baseline {chosen} in orange"))
    teachers = {_canonical(r.config.get("teacher")) for r in finished if r.config.get("teacher")}
    students = {_canonical(r.config.get("student")) for r in finished}
    if teachers and (len(teachers) > 1 or len(students) > 1):
        from kdlab.study.capacity import capacity_table, plot_capacity

        try:
            paths = plot_capacity(capacity_table(store, experiment, metric=metric), folder)
            study.append(_figure([p for p in paths if "heatmap" in p.name], "Capacity gap: student "
                                 f"{metric} per teacher × student, Δ = paired gain over scratch"))
            study.append(_figure([p for p in paths if "lines" in p.name], f"Student {metric} against teacher size"))
        except KdlabError as error:
            notes.append(f"{experiment}: capacity-gap plot skipped ({error})")
    if any(_method_name(r) == "gkd" for r in finished):
        from kdlab.study.gkd_grid import gkd_grid, plot_gkd_grid

        try:
            paths = plot_gkd_grid(gkd_grid(store, experiment, metric=metric), folder)
            study.append(_figure(paths, f"GKD grid: {metric} per divergence × student data fraction λ"))
        except KdlabError as error:
            notes.append(f"{experiment}: GKD grid skipped ({error})")
    distilled = [records[row.run_ids[0]] for row in rows if records[row.run_ids[0]].config.get("teacher")]
    if evaluate and distilled:
        from kdlab.study.deviations import analyze_deviations

        run = distilled[0]
        try:
            result = analyze_deviations(store, run.run_id, out_dir=folder / "deviations", splits=("test",))
            study.append(_figure([Path(result["plot"])], f"Deviation scatter of run {run.run_id} [{run.label}] "
                                 "on the test split: does the student exaggerate its teacher's confidence?"))
        except KdlabError as error:
            notes.append(f"{experiment}: deviation scatter skipped ({error})")
    series = _robust_curves(rows, records)
    if series:
        paths = plots.metric_curves(series, folder / "robustness_vs_eps", xlabel="ε (input units)",
                                    ylabel="robust accuracy (mean ± 95% CI)", title=f"{experiment}: robustness vs ε")
        study.append(_figure(paths, "Robust accuracy of the first attack against ε (robust.eps_curve)"))
    points = _tradeoff(rows, records, "test/acc", "robust/worst/acc")
    if points:
        paths = plots.tradeoff_scatter(points, folder / "accuracy_robustness", xlabel="clean test/acc",
                                       ylabel="robust/worst/acc", title=f"{experiment}: accuracy–robustness")
        study.append(_figure(paths, "Accuracy–robustness trade-off: clean test accuracy against worst-case robust "
                                    "accuracy"))
    if study:
        blocks += [Heading("Study plots", 3), *study]
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
            import difflib

            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise KdlabError(f"unknown experiment {name!r} in {store.database_path}; {hint}"
                             f"experiments: {', '.join(known) or '(none)'}")
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
