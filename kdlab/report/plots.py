"""Figures as PNG files (the capacity-gap figures also as SVG). matplotlib is
imported inside each function and draws through the Agg canvas directly (no
pyplot, so no global backend state and no display is touched)."""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import torch

DODGE_DECADES = 0.012  # horizontal offset between students' points in capacity_lines (log10 units)
TITLE_CHARS_PER_INCH = 11  # characters of a 10-pt title that fit in one inch of figure width
MAX_POINTS_PER_PANEL = 20_000  # scatter points drawn per panel (a fixed random subset beyond it); fits use all


def _subset(x: torch.Tensor, y: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() <= limit:
        return x, y
    keep = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:limit]
    return x[keep], y[keep]


def deviation_scatter(points: Mapping[str, tuple[Sequence[float], Sequence[float]]], fits: Mapping[str, dict],
                      path: str | Path, *, title: str | None = None, eps: float | None = None,
                      max_points: int = MAX_POINTS_PER_PANEL) -> Path:
    """Write a PNG with one panel per split: φ_teacher (x) against φ_student (y).

    ``points[split] = (phi_teacher, phi_student)``; ``fits[split]`` is a
    :func:`kdlab.metrics.deviation.fit_slope` dict, drawn as the fitted line
    beside the y = x line. Panels share their axes. At most ``max_points``
    points are drawn per panel (a fixed random subset, said in the panel
    title). The file is written atomically; returns its path.
    """
    path = Path(path)
    figure = deviation_figure(points, fits, title=title, eps=eps, max_points=max_points)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return path


def deviation_figure(points: Mapping[str, tuple[Sequence[float], Sequence[float]]], fits: Mapping[str, dict], *,
                     title: str | None = None, eps: float | None = None, max_points: int = MAX_POINTS_PER_PANEL):
    """The figure of :func:`deviation_scatter`, not yet written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = list(points)
    if not splits:
        raise ValueError("deviation_scatter: no splits to plot")
    figure = Figure(figsize=(5.0 * len(splits), 5.0), dpi=100, constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(splits), squeeze=False, sharex=True, sharey=True)[0]
    finite = [torch.as_tensor(v, dtype=torch.float64) for split in splits for v in points[split]]
    values = torch.cat([v[torch.isfinite(v)] for v in finite]) if finite else torch.zeros(1)
    lo = float(values.min()) if values.numel() else -1.0
    hi = float(values.max()) if values.numel() else 1.0
    pad = 0.05 * max(hi - lo, 1.0)
    lo, hi = lo - pad, hi + pad
    for ax, split in zip(axes, splits):
        x = torch.as_tensor(points[split][0], dtype=torch.float64).reshape(-1)
        y = torch.as_tensor(points[split][1], dtype=torch.float64).reshape(-1)
        shown_x, shown_y = _subset(x, y, max_points)
        ax.scatter(shown_x.numpy(), shown_y.numpy(), s=4, alpha=0.3, linewidths=0, color="tab:blue",
                   rasterized=True, label="samples")
        ax.plot([lo, hi], [lo, hi], linestyle="--", color="black", linewidth=1.0, label="y = x")
        fit = fits.get(split, {})
        slope, intercept = fit.get("slope", math.nan), fit.get("intercept", math.nan)
        if math.isfinite(slope) and math.isfinite(intercept):
            hw = fit.get("half_width", math.nan)
            shown_hw = f" ± {hw:.3f}" if math.isfinite(hw) else ""
            ax.plot([lo, hi], [intercept + slope * lo, intercept + slope * hi], color="tab:red", linewidth=1.5,
                    label=f"OLS slope {slope:.3f}{shown_hw}")
        subset_note = f", {shown_x.numel()} of {x.numel()} shown" if shown_x.numel() < x.numel() else ""
        ax.set_title(f"{split} (n = {x.numel()}{subset_note})")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.set_xlabel("φ(teacher p of teacher's class)")
        ax.legend(loc="upper left", fontsize=8, markerscale=3)
    axes[0].set_ylabel("φ(student p of teacher's class)")
    caption = "φ(p) = log(p / (1 − p))" + (f", p clamped to [{eps:g}, 1 − {eps:g}]" if eps is not None else "")
    # A run id, its label and the teacher's description outrun one 5-inch panel: wrap to the figure's width.
    width = max(20, int(figure.get_figwidth() * TITLE_CHARS_PER_INCH))
    shown = "\n".join(textwrap.wrap(title, width, break_long_words=True)) if title else ""
    figure.suptitle(f"{shown}\n{caption}" if shown else caption, fontsize=10)
    return figure


def comparison_bars(labels: Sequence[str], means: Sequence[float], half_widths: Sequence[float], path: str | Path,
                    *, metric: str, title: str | None = None, baseline: str | None = None) -> Path:
    """Write a horizontal bar chart of one metric per configuration with its CI as error bars.

    ``half_widths`` are the CI half widths (NaN: no bar); the ``baseline`` row,
    if given, is drawn in another colour with a vertical reference line at its mean.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not labels:
        raise ValueError("comparison_bars: nothing to plot")
    figure = Figure(figsize=(7.0, 0.45 * len(labels) + 1.4), dpi=100, constrained_layout=True)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    positions = list(range(len(labels)))[::-1]  # first row on top
    errors = [0.0 if not math.isfinite(h) else h for h in half_widths]
    colours = ["tab:orange" if label == baseline else "tab:blue" for label in labels]
    ax.barh(positions, means, xerr=errors, color=colours, alpha=0.8, capsize=3)
    ax.set_yticks(positions, labels)
    if baseline in labels:
        ax.axvline(means[list(labels).index(baseline)], color="tab:orange", linestyle="--", linewidth=1.0)
    finite = [m - e for m, e in zip(means, errors) if math.isfinite(m)]
    if finite:
        top = max(m + e for m, e in zip(means, errors) if math.isfinite(m))
        span = max(top - min(finite), 1e-6)
        ax.set_xlim(min(finite) - 0.15 * span, top + 0.15 * span)
    ax.set_xlabel(f"{metric} (mean ± 95% CI over seeds)")
    if title:
        ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _save_png_and_svg(figure, path: str | Path) -> tuple[Path, Path]:
    """Write ``figure`` as ``<path>.png`` and ``<path>.svg`` (any suffix of ``path`` is replaced), each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in ("png", "svg"):
        target = path.with_suffix(f".{fmt}")
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            figure.savefig(partial, format=fmt)
            os.replace(partial, target)
        finally:
            if partial.exists():
                partial.unlink()
        written.append(target)
    return written[0], written[1]


def capacity_heatmap(teachers: Sequence[str], students: Sequence[str], means: Sequence[Sequence[float]],
                     path: str | Path, *, deltas: Sequence[Sequence[float]] | None = None,
                     baseline: Sequence[float] | None = None, metric: str = "test/acc",
                     title: str | None = None, row_label: str = "teacher (by size)",
                     column_label: str = "student") -> tuple[Path, Path]:
    """Write a teachers (rows) × students (columns) heatmap of the students' mean ``metric``.

    ``means[i][j]`` is student ``j`` distilled from teacher ``i`` (NaN: no such
    run, drawn blank); ``deltas[i][j]``, if given, its gain over scratch, written
    under the mean in each cell. ``baseline[j]``, if given, adds a last row with
    each student's scratch value. Colours follow the value (one scale for all
    cells). Writes ``path`` with suffixes ``.png`` and ``.svg``, atomically;
    returns both paths.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [list(map(float, row)) for row in means]
    if not teachers or not students or len(rows) != len(teachers) or any(len(r) != len(students) for r in rows):
        raise ValueError("capacity_heatmap: means must be a non-empty len(teachers) × len(students) matrix")
    row_labels = list(teachers)
    delta_rows = [list(map(float, row)) for row in deltas] if deltas is not None else None
    if baseline is not None:
        rows.append([float(v) for v in baseline])
        row_labels.append("scratch (no teacher)")
        if delta_rows is not None:
            delta_rows.append([math.nan] * len(students))
    matrix = np.ma.masked_invalid(np.array(rows, dtype=float))
    figure = Figure(figsize=(max(4.5, 1.9 * len(students) + 3.0), max(3.0, 0.75 * len(row_labels) + 1.8)), dpi=100,
                    constrained_layout=True)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    finite = matrix.compressed()
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.01, hi + 0.01
    image = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    figure.colorbar(image, ax=ax, label=f"student {metric} (mean over seeds)")
    for i in range(len(row_labels)):
        for j in range(len(students)):
            value = rows[i][j]
            if not math.isfinite(value):
                ax.text(j, i, "-", ha="center", va="center", fontsize=9, color="black")
                continue
            text = f"{value:.3f}"
            if delta_rows is not None and math.isfinite(delta_rows[i][j]):
                delta = f"{delta_rows[i][j]:+.3f}"
                text += f"\nΔ {'+' + delta[1:] if float(delta) == 0.0 else delta}"  # no "-0.000"
            elif baseline is not None and i == len(row_labels) - 1:
                text += "\n(scratch)"
            shade = (value - lo) / (hi - lo)
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if shade > 0.55 else "white")
    if baseline is not None:
        ax.axhline(len(row_labels) - 1.5, color="black", linewidth=1.5)
    ax.set_xticks(range(len(students)), list(students), fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    caption = "cell: mean over seeds" + ("; Δ: paired gain over scratch" if delta_rows is not None else "")
    ax.set_title(f"{title}\n{caption}" if title else caption, fontsize=10)
    return _save_png_and_svg(figure, path)


def capacity_lines(teacher_params: Sequence[float], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                   path: str | Path, *, baselines: Mapping[str, float] | None = None,
                   teacher_labels: Sequence[str] | None = None, teacher_metric: Sequence[float] | None = None,
                   joined: Sequence[bool] | None = None, metric: str = "test/acc", confidence: float = 0.95,
                   title: str | None = None) -> tuple[Path, Path]:
    """Write a plot of student ``metric`` against teacher size, one line per student.

    x is ``teacher_params`` (log scale; one entry per teacher, > 0);
    ``series[student] = (means, half_widths)`` aligned with it (NaN mean: no
    point; NaN half width: no error bar); the students' points at one teacher
    are set slightly apart (``DODGE_DECADES``) so their error bars stay
    readable. ``baselines[student]`` draws a dashed
    horizontal line in the student's colour at its scratch value;
    ``teacher_metric`` draws the teachers' own values as a grey dotted line;
    ``teacher_labels`` name the teachers under the x ticks. Teachers with
    ``joined[i]`` False (e.g. an early-stopped teacher, an assistant chain, of
    the same size as a plain one) are drawn as hollow diamonds, not joined by
    the student's line. Writes ``path``
    with suffixes ``.png`` and ``.svg``, atomically; returns both paths.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    xs = [float(x) for x in teacher_params]
    if not xs or not series or any(not (math.isfinite(x) and x > 0) for x in xs):
        raise ValueError("capacity_lines: need at least one teacher with a positive parameter count and one series")
    figure = Figure(figsize=(7.5, 5.0), dpi=100, constrained_layout=True)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    colours = [f"C{i % 10}" for i in range(len(series))]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    joined = [True] * len(xs) if joined is None else [bool(j) for j in joined]
    any_apart = False
    for k, (colour, (student, (means, half_widths))) in enumerate(zip(colours, series.items())):
        dodge = 10.0 ** ((k - (len(series) - 1) / 2.0) * DODGE_DECADES)  # students side by side at each teacher
        for on_line in (True, False):
            points = [(xs[i] * dodge, float(means[i]), float(half_widths[i])) for i in order
                      if joined[i] == on_line and math.isfinite(float(means[i]))]
            if not points:
                continue
            any_apart = any_apart or not on_line
            style = dict(marker="o", linewidth=1.5, label=student) if on_line else \
                dict(marker="D", linestyle="none", markerfacecolor="none")
            ax.errorbar([p[0] for p in points], [p[1] for p in points],
                        yerr=[p[2] if math.isfinite(p[2]) else 0.0 for p in points], color=colour, capsize=3, **style)
        base = (baselines or {}).get(student)
        if base is not None and math.isfinite(base):
            ax.axhline(base, color=colour, linestyle="--", linewidth=1.0, alpha=0.8, label=f"{student}: scratch")
    if teacher_metric is not None:
        points = [(xs[i], float(teacher_metric[i])) for i in order if math.isfinite(float(teacher_metric[i]))]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], color="grey", linestyle=":", marker="s",
                    markersize=4, linewidth=1.0, label="teacher itself")
    if any_apart:
        ax.plot([], [], marker="D", linestyle="none", markerfacecolor="none", color="black",
                label="teacher variant (not joined)")
    ax.set_xscale("log")
    ticks = sorted(set(xs))
    if teacher_labels is not None:
        names: dict[float, list[str]] = {}
        for x, label in zip(xs, teacher_labels):
            names.setdefault(x, []).append(str(label))
        labels = [" / ".join(names[x]) + f"\n({int(round(x)):,})" for x in ticks]
    else:
        labels = [f"{int(round(x)):,}" for x in ticks]
    ax.set_xticks(ticks, labels, fontsize=7, rotation=20, ha="right")
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2.0, ticks[0] * 2.0)
    else:
        ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.set_xlabel("teacher size (parameters, log scale)")
    ax.set_ylabel(f"student {metric} (mean ± {confidence * 100:g}% CI over seeds)")
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return _save_png_and_svg(figure, path)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, constrained_layout=True)
    FigureCanvasAgg(figure)
    return figure


def learning_curves(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]],
                    path: str | Path, *, title: str | None = None, columns: int = 3,
                    titles: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """Write one panel per logged key (a loss term, val/acc, ...): value against epoch, one line per config.

    ``panels[key][config] = (epochs, means, half_widths)``: the mean over seeds
    at each epoch and its CI half width (NaN: no band), drawn as a shaded band.
    ``titles[key]`` replaces a panel's title (default: the key). Writes ``path``
    with suffixes ``.png`` and ``.svg``; returns both paths.
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    keys = list(panels)
    if not keys:
        raise ValueError("learning_curves: nothing to plot")
    columns = max(1, min(columns, len(keys)))
    rows = math.ceil(len(keys) / columns)
    figure = _new_figure(4.2 * columns, 3.0 * rows + 0.4)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    configs = list(dict.fromkeys(c for key in keys for c in panels[key]))
    colours = {c: f"C{i % 10}" for i, c in enumerate(configs)}
    for ax, key in zip(axes, keys):
        for config, (epochs, means, half) in panels[key].items():
            x, m, h = (np.asarray(v, dtype=float) for v in (epochs, means, half))
            ax.plot(x, m, marker="o", markersize=3, linewidth=1.3, color=colours[config], label=config)
            band = np.isfinite(h)
            if band.any():
                ax.fill_between(x[band], (m - h)[band], (m + h)[band], color=colours[config], alpha=0.15,
                                linewidth=0)
        ax.set_title((titles or {}).get(key, key), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, linewidth=0.3, alpha=0.5)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=7)
    caption = "mean over seeds, band: 95% CI"
    figure.suptitle(f"{title}\n{caption}" if title else caption, fontsize=10)
    return _save_png_and_svg(figure, path)


def reliability_diagram(curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                        path: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Write a reliability diagram: accuracy against mean confidence per bin, one line per model.

    ``curves[name] = (confidence, accuracy, count)`` per bin (bins with count 0
    are skipped; marker area grows with the count), e.g. from
    :func:`kdlab.metrics.classification.reliability_bins`; the diagonal is
    perfect calibration. Writes ``.png`` and ``.svg``; returns both paths.
    """
    import numpy as np

    if not curves:
        raise ValueError("reliability_diagram: nothing to plot")
    figure = _new_figure(5.5, 5.0)
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1.0, label="perfect calibration")
    for i, (name, (confidence, accuracy, count)) in enumerate(curves.items()):
        conf, acc, n = (np.asarray(v, dtype=float) for v in (confidence, accuracy, count))
        keep = n > 0
        sizes = 12 + 120 * n[keep] / max(n[keep].max(), 1.0) if keep.any() else []
        colour = f"C{i % 10}"
        ax.plot(conf[keep], acc[keep], color=colour, linewidth=1.2, label=name)
        ax.scatter(conf[keep], acc[keep], s=sizes, color=colour, alpha=0.7, linewidths=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal", adjustable="box")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.set_xlabel("mean top-1 confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.legend(fontsize=7, loc="lower right")
    caption = "equal-width confidence bins; marker area ∝ samples in bin"
    ax.set_title(f"{title}\n{caption}" if title else caption, fontsize=9)
    return _save_png_and_svg(figure, path)


def metric_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]], path: str | Path,
                  *, xlabel: str, ylabel: str, title: str | None = None) -> tuple[Path, Path]:
    """Write lines of a metric against a swept value (robust accuracy against ε), one per config.

    ``series[config] = (xs, means, half_widths)`` (NaN half width: no error
    bar). Writes ``.png`` and ``.svg``; returns both paths.
    """
    if not series:
        raise ValueError("metric_curves: nothing to plot")
    figure = _new_figure(6.5, 4.5)
    ax = figure.subplots()
    for i, (config, (xs, means, half)) in enumerate(series.items()):
        ax.errorbar([float(x) for x in xs], [float(m) for m in means],
                    yerr=[float(h) if math.isfinite(float(h)) else 0.0 for h in half], marker="o", capsize=3,
                    linewidth=1.3, color=f"C{i % 10}", label=config)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return _save_png_and_svg(figure, path)


def tradeoff_scatter(points: Mapping[str, tuple[float, float, float, float]], path: str | Path, *, xlabel: str,
                     ylabel: str, title: str | None = None) -> tuple[Path, Path]:
    """Write a scatter of two metrics per config with CI error bars on both (accuracy–robustness trade-off).

    ``points[config] = (x_mean, x_half_width, y_mean, y_half_width)``.
    Writes ``.png`` and ``.svg``; returns both paths.
    """
    if not points:
        raise ValueError("tradeoff_scatter: nothing to plot")
    figure = _new_figure(6.5, 4.8)
    ax = figure.subplots()
    for i, (config, (x, xh, y, yh)) in enumerate(points.items()):
        ax.errorbar([x], [y], xerr=[xh if math.isfinite(xh) else 0.0], yerr=[yh if math.isfinite(yh) else 0.0],
                    marker="o", capsize=3, linestyle="none", color=f"C{i % 10}", label=config)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    caption = "mean ± 95% CI over seeds; up and right is better"
    ax.set_title(f"{title}\n{caption}" if title else caption, fontsize=9)
    return _save_png_and_svg(figure, path)
