"""Figures as PNG files. matplotlib is imported inside each function and draws
through the Agg canvas directly (no pyplot, so no global backend state and no
display is touched)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
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
    figure.suptitle(f"{title}\n{caption}" if title else caption, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return path


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
