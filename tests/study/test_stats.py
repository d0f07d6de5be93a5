"""Student-t confidence intervals and paired comparisons."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kdlab.errors import KdlabError
from kdlab.study.stats import MeanCI, format_mean_ci, mean_ci, paired_difference


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_matches_scipy_t_interval(confidence):
    generator = np.random.default_rng(0)
    for n in (2, 3, 5, 10, 30):
        values = generator.normal(0.9, 0.05, size=n)
        result = mean_ci(values, confidence=confidence)
        low, high = scipy_stats.t.interval(confidence, n - 1, loc=values.mean(), scale=scipy_stats.sem(values))
        assert result.n == n
        assert result.mean == pytest.approx(values.mean(), rel=1e-12)
        assert result.std == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert result.low == pytest.approx(low, rel=1e-10)
        assert result.high == pytest.approx(high, rel=1e-10)


def test_hand_worked_n3():
    # mean 2, s = 1, t_{0.975, 2} = 4.302653, half = 4.302653 / sqrt(3) = 2.484138
    result = mean_ci([1, 2, 3])
    assert result.mean == 2.0 and result.std == pytest.approx(1.0) and result.n == 3
    assert result.half_width == pytest.approx(2.484138, abs=1e-6)
    assert format_mean_ci(result) == "2.0000 ± 2.4841"


def test_hand_worked_n2():
    # mean 2, s = sqrt(2), t_{0.975, 1} = 12.706205, half = 12.706205 * sqrt(2) / sqrt(2)
    result = mean_ci((1.0, 3.0))
    assert result.mean == 2.0 and result.std == pytest.approx(math.sqrt(2))
    assert result.half_width == pytest.approx(12.706205, abs=1e-6)


def test_single_value_has_no_interval():
    result = mean_ci([0.91234])
    assert result.n == 1 and result.mean == 0.91234
    assert math.isnan(result.half_width) and math.isnan(result.std)
    assert format_mean_ci(result) == "0.9123 ± n/a"
    assert format_mean_ci(result, digits=2) == "0.91 ± n/a"


def test_constant_values_have_zero_width():
    result = mean_ci(np.full(4, 0.5))
    assert result == MeanCI(mean=0.5, half_width=0.0, n=4, std=0.0)
    assert format_mean_ci(result, digits=3) == "0.500 ± 0.000"


def test_nan_propagates():
    result = mean_ci([0.9, math.nan, 0.8])
    assert math.isnan(result.mean)
    assert format_mean_ci(result) == "nan ± nan"


def test_coverage_is_nominal_with_few_seeds():
    """With n=4 a normal-quantile interval covers ~86%; the t interval covers 95%."""
    generator = np.random.default_rng(1)
    samples = generator.normal(0.0, 1.0, size=(3000, 4))
    covered = sum(abs(mean_ci(sample).mean) <= mean_ci(sample).half_width for sample in samples)
    assert 0.935 <= covered / len(samples) <= 0.965


def test_bad_input():
    with pytest.raises(KdlabError, match="confidence must be between 0 and 1"):
        mean_ci([1, 2], confidence=95)
    with pytest.raises(KdlabError, match="confidence"):
        mean_ci([1, 2], confidence=0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])


def test_paired_difference_hand_worked():
    # differences 1, 2, 3: mean 2, s = 1, t = 2 / (1 / sqrt 3) = sqrt 12; for 2 degrees of
    # freedom the two-sided p is 1 - t / sqrt(2 + t^2) = 1 - sqrt(12 / 14) = 0.074180
    result = paired_difference([1.5, 2.5, 3.5], [0.5, 0.5, 0.5])
    assert result.mean == pytest.approx(2.0) and result.n == 3
    assert result.half_width == pytest.approx(2.484138, abs=1e-6)
    assert result.statistic == pytest.approx(math.sqrt(12))
    assert result.p_value == pytest.approx(1 - math.sqrt(12 / 14), abs=1e-9)


def test_paired_difference_matches_scipy():
    generator = np.random.default_rng(2)
    a = generator.normal(0.90, 0.02, size=8)
    b = a - 0.01 + generator.normal(0, 0.01, size=8)
    result = paired_difference(a, b, confidence=0.9)
    reference = scipy_stats.ttest_rel(a, b)
    assert result.statistic == pytest.approx(reference.statistic)
    assert result.p_value == pytest.approx(reference.pvalue)
    assert result.half_width == pytest.approx(mean_ci(a - b, confidence=0.9).half_width)
    # Swapping the sides flips the sign, not the p-value.
    swapped = paired_difference(b, a, confidence=0.9)
    assert swapped.mean == pytest.approx(-result.mean) and swapped.p_value == pytest.approx(result.p_value)


def test_paired_difference_degenerate_cases():
    same = paired_difference([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same.mean == 0 and same.p_value == 1.0 and same.statistic == 0.0
    shifted = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert shifted.mean == 1.0 and shifted.p_value == 0.0 and shifted.statistic == math.inf
    single = paired_difference([0.9], [0.8])
    assert single.mean == pytest.approx(0.1) and math.isnan(single.p_value) and math.isnan(single.half_width)
    with pytest.raises(KdlabError, match="same seeds on both sides, got 3 and 2 values"):
        paired_difference([1, 2, 3], [1, 2])
