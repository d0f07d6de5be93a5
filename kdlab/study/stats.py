"""Confidence intervals over seeds.

Results are reported as ``mean ± half_width`` where the half width is the
Student-t interval ``t_{(1+c)/2, n-1} · s / √n`` with ``s`` the sample standard
deviation (ddof=1): the right interval for the handful of seeds a study runs.
With one seed there is no spread to estimate, so ``std`` and ``half_width``
are NaN and :func:`format_mean_ci` prints ``± n/a``. NaN values are kept (a
diverged seed makes the mean NaN rather than silently vanishing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from kdlab.errors import KdlabError


@dataclass(frozen=True)
class MeanCI:
    """Mean of ``n`` values, sample std (ddof=1) and the CI half width."""

    mean: float
    half_width: float
    n: int
    std: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired seeds, its CI, and a two-sided paired t-test."""

    mean: float
    half_width: float
    n: int
    std: float
    statistic: float
    p_value: float


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise KdlabError(f"confidence must be between 0 and 1 (exclusive), got {confidence}; use e.g. 0.95")
    return confidence


def _as_values(values: Iterable[float], *, name: str) -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{name}: need at least one value")
    return array


def mean_ci(values: Iterable[float], *, confidence: float = 0.95) -> MeanCI:
    """Mean and Student-t confidence interval of ``values`` (see module docstring)."""
    confidence = _check_confidence(confidence)
    array = _as_values(values, name="mean_ci")
    n = int(array.size)
    mean = float(array.mean())
    if n < 2:
        return MeanCI(mean=mean, half_width=math.nan, n=n, std=math.nan)
    std = float(array.std(ddof=1))
    from scipy import stats as scipy_stats  # deferred: ~0.9 s to import (issue 17 item 13)

    quantile = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1))
    return MeanCI(mean=mean, half_width=quantile * std / math.sqrt(n), n=n, std=std)


def format_mean_ci(value: MeanCI, *, digits: int = 4) -> str:
    """``"0.9123 ± 0.0041"``; ``"0.9123 ± n/a"`` when the half width is unknown (n=1)."""
    mean = f"{value.mean:.{digits}f}"
    if math.isnan(value.half_width) and value.n < 2:
        return f"{mean} ± n/a"
    return f"{mean} ± {value.half_width:.{digits}f}"


def paired_difference(
    a: Iterable[float], b: Iterable[float], *, confidence: float = 0.95
) -> PairedDifference:
    """Compare paired seeds: ``a[i]`` and ``b[i]`` must come from the same seed.

    The p-value is that of the two-sided paired t-test. When all differences
    are equal the t statistic is infinite: p is 1 if they are all zero and 0
    otherwise (scipy would return NaN). With one pair, std, CI and p are NaN.
    """
    first = _as_values(a, name="paired_difference a")
    second = _as_values(b, name="paired_difference b")
    if first.size != second.size:
        raise KdlabError(
            f"paired comparison needs the same seeds on both sides, got {first.size} and {second.size} values; "
            "run the same seeds for both configurations"
        )
    difference = first - second
    summary = mean_ci(difference, confidence=confidence)
    if summary.n < 2 or math.isnan(summary.mean) or math.isnan(summary.std):
        statistic = p_value = math.nan
    elif summary.std == 0.0:
        statistic = 0.0 if summary.mean == 0.0 else math.copysign(math.inf, summary.mean)
        p_value = 1.0 if summary.mean == 0.0 else 0.0
    else:
        from scipy import stats as scipy_stats

        result = scipy_stats.ttest_rel(first, second)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return PairedDifference(
        mean=summary.mean,
        half_width=summary.half_width,
        n=summary.n,
        std=summary.std,
        statistic=statistic,
        p_value=p_value,
    )
