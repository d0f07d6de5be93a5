"""The deviation diagnostic of Nagarajan et al. (2023): φ, the teacher-class probabilities, the OLS slope and its
t-CI, the underconfidence buckets and the summary, against closed forms, hand examples and scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kdlab.errors import KdlabError
from kdlab.metrics.deviation import (
    deviation_summary,
    fit_slope,
    logit_confidence,
    teacher_class_probabilities,
    underconfidence_by_bucket,
)


def test_logit_confidence_closed_form_and_clamp():
    phi = logit_confidence(torch.tensor([0.5, 0.75, 0.25, 0.9], dtype=torch.float64))
    assert phi.tolist() == pytest.approx([0.0, math.log(3.0), -math.log(3.0), math.log(9.0)], abs=1e-12)
    eps = 1e-3
    capped = logit_confidence(torch.tensor([0.0, 1e-5, 1.0]), eps=eps)
    cap = math.log((1 - eps) / eps)
    assert capped.tolist() == pytest.approx([-cap, -cap, cap], rel=1e-5)
    assert torch.isfinite(logit_confidence(torch.tensor([0.0, 1.0]))).all()  # default eps 1e-6
    with pytest.raises(KdlabError, match="eps"):
        logit_confidence(torch.tensor([0.5]), eps=0.0)


def test_teacher_class_probabilities_use_the_teacher_argmax_not_the_student_argmax():
    teacher = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    student = torch.tensor([[3.0, 0.0, 0.0], [5.0, 0.0, 0.0]])  # row 0: student prefers class 0, teacher class 1
    p_teacher, p_student = teacher_class_probabilities(student, teacher)
    e = math.exp
    assert p_teacher.tolist() == pytest.approx([e(2) / (1 + e(2) + e(1)), e(5) / (e(5) + 2)], rel=1e-12)
    assert p_student.tolist() == pytest.approx([1 / (e(3) + 2), e(5) / (e(5) + 2)], rel=1e-12)
    assert p_teacher.dtype == torch.float64
    with pytest.raises(KdlabError, match="shape"):
        teacher_class_probabilities(student[:, :2], teacher)


def test_fit_slope_recovers_a_known_slope_and_matches_scipy_linregress():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 3.0, size=500)
    y = 1.7 * x + 0.2 + rng.normal(0.0, 0.1, size=500)
    fit = fit_slope(torch.from_numpy(x), torch.from_numpy(y))
    reference = stats.linregress(x, y)
    assert fit["low"] < 1.7 < fit["high"] and fit["half_width"] < 0.01
    assert fit["slope"] == pytest.approx(reference.slope, rel=1e-10)
    assert fit["intercept"] == pytest.approx(reference.intercept, rel=1e-8)
    assert fit["stderr"] == pytest.approx(reference.stderr, rel=1e-8)
    assert fit["r2"] == pytest.approx(reference.rvalue ** 2, rel=1e-10)
    assert fit["half_width"] == pytest.approx(stats.t.ppf(0.975, 498) * reference.stderr, rel=1e-10)
    assert fit["n"] == 500
    narrower = fit_slope(x, y, confidence=0.5)
    assert narrower["half_width"] < fit["half_width"]


def test_fit_slope_interval_covers_the_true_slope_at_its_nominal_rate_with_few_points():
    # With n = 5 the t quantile (3.18, 3 dof) matters: a normal quantile (1.96) would cover ~85%.
    rng = np.random.default_rng(1)
    hits, reps = 0, 1500
    for _ in range(reps):
        x = rng.normal(size=5)
        y = 0.8 * x - 1.0 + rng.normal(size=5)
        fit = fit_slope(x, y)
        hits += fit["low"] <= 0.8 <= fit["high"]
    assert 0.93 <= hits / reps <= 0.97


def test_fit_slope_degenerate_inputs():
    two = fit_slope([0.0, 1.0], [0.0, 2.0])
    assert two["slope"] == pytest.approx(2.0) and math.isnan(two["half_width"])  # no residual dof
    flat_x = fit_slope([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])
    assert math.isnan(flat_x["slope"]) and flat_x["n"] == 3
    flat_y = fit_slope([0.0, 1.0, 2.0], [3.0, 3.0, 3.0])
    assert flat_y["slope"] == 0.0 and flat_y["half_width"] == 0.0 and math.isnan(flat_y["r2"])
    with pytest.raises(KdlabError, match="paired"):
        fit_slope([0.0, 1.0, 2.0], [0.0, 1.0])
    with pytest.raises(KdlabError, match="confidence"):
        fit_slope([0.0, 1.0, 2.0], [0.0, 1.0, 2.0], confidence=95)


def test_underconfidence_buckets_on_a_hand_made_example():
    p_teacher = torch.tensor([0.35, 0.38, 0.40, 0.55, 0.95, 1.00])
    p_student = torch.tensor([0.20, 0.50, 0.40, 0.50, 0.99, 0.90])
    buckets = underconfidence_by_bucket(p_teacher, p_student, n_buckets=5)
    assert [b["low"] for b in buckets] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert [b["high"] for b in buckets] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert [b["n"] for b in buckets] == [0, 3, 1, 0, 2]  # 0.40 sits on an edge: the lower bucket (as ECE)
    fractions = [b["fraction_student_less_confident"] for b in buckets]
    assert math.isnan(fractions[0]) and math.isnan(fractions[3])
    # (0.2, 0.4]: 0.20 < 0.35 yes, 0.50 < 0.38 no, 0.40 < 0.40 no (a tie is not "less") → 1/3.
    assert fractions[1] == pytest.approx(1 / 3) and fractions[2] == 1.0 and fractions[4] == 0.5
    with pytest.raises(KdlabError, match="n_buckets"):
        underconfidence_by_bucket(p_teacher, p_student, n_buckets=0)


def test_summary_of_a_student_with_scaled_binary_margins_has_exactly_that_slope():
    # Two classes, logits (0, z): p(class 1) = sigmoid(z), so φ of the teacher's class is |z|. A student with logits
    # a·z gives φ = a·|z|: the fitted line is exactly slope a through the origin.
    z = torch.arange(-20, 21, dtype=torch.float64) / 5
    z = z[z != 0]
    teacher = torch.stack([torch.zeros_like(z), z], dim=1)
    hot = deviation_summary(1.5 * teacher, teacher)
    assert hot["fit"]["slope"] == pytest.approx(1.5, abs=1e-9)
    assert hot["fit"]["intercept"] == pytest.approx(0, abs=1e-8)
    assert hot["fit"]["r2"] == pytest.approx(1.0) and hot["verdict"] == "exaggerates"
    assert hot["fraction_student_less_confident"] == 0.0 and hot["agreement"] == 1.0 and hot["n"] == 40
    cold = deviation_summary(0.5 * teacher, teacher, n_buckets=4)
    assert cold["fit"]["slope"] == pytest.approx(0.5, abs=1e-9) and cold["verdict"] == "softens"
    assert cold["fraction_student_less_confident"] == 1.0
    # Teacher p = sigmoid(|z|) ≤ 0.75 ⇔ |z| ≤ ln 3 ≈ 1.099: |z| in {0.2, ..., 1.0}, each twice → 10 in (0.5, 0.75].
    assert [b["n"] for b in cold["buckets"]] == [0, 0, 10, 30]
    assert cold["clamped"] == {"teacher": {"low": 0, "high": 0}, "student": {"low": 0, "high": 0}}


def test_summary_counts_clamped_points():
    teacher = torch.tensor([[0.0, 40.0], [0.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, 1.0], [30.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    summary = deviation_summary(student, teacher)
    # Teacher row 0 is ~1 - 4e-18; student row 1 gives the teacher's class ~e^-30.
    assert summary["clamped"] == {"teacher": {"low": 0, "high": 1}, "student": {"low": 1, "high": 0}}
    assert summary["agreement"] == pytest.approx(2 / 3)
