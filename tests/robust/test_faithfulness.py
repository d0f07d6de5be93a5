"""Faithfulness metrics (kdlab.robust.faithfulness): agreement, adversarial disagreement, relative calibration."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.robust.faithfulness import (
    adversarial_disagreement_rate,
    agreement,
    certified_agreement_rate,
    certified_relative_calibration,
    confidence_gap,
    confidence_gap_bound,
    maximise_confidence_gap,
    relative_calibration,
)

SHAPE, CLASSES = (1, 10), 3


def zoo(name, seed, **options):
    torch.manual_seed(seed)
    model = registry.get("model", name)(input_shape=SHAPE, num_classes=CLASSES, mean=(0.5,), std=(0.3,), **options)
    for m in model.modules():  # non-trivial eval statistics for the BatchNorm models
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.double()


def pair():
    return zoo("mlp", 0, width=16), zoo("cnn1d", 1, width=4, depth=2, kernel_size=3)


def inputs(n=12, seed=2):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_agreement_on_hand_made_logits():
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0], [5.0, 4.0, 0.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [0.0, 4.0, 1.0]])
    assert agreement(student, teacher) == pytest.approx(0.5)  # rows 0 and 2 agree
    assert agreement(teacher, teacher) == 1.0
    with pytest.raises(KdlabError, match="same shape"):
        agreement(student, teacher[:, :2])


def test_confidence_gap_variants_by_hand():
    # student p = softmax(0, ln 3) = (1/4, 3/4); teacher p = (3/4, 1/4). Class 0: |1/4 − 3/4| = 1/2; vector: 1/2.
    import math
    s = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert confidence_gap(s, t, torch.tensor([0])).item() == pytest.approx(0.5)
    assert confidence_gap(s, t).item() == pytest.approx(0.5)
    # A point box gives the gap itself.
    assert confidence_gap_bound((s, s), (t, t), torch.tensor([1])).item() == pytest.approx(0.5)


def test_disagreement_rate_is_zero_for_identical_models():
    teacher = zoo("cnn1d", 3, width=4, depth=2, kernel_size=3)
    student = copy.deepcopy(teacher)
    x = inputs()
    with torch.no_grad():
        labels = teacher.eval()(x).argmax(-1)  # every point eligible
    result = adversarial_disagreement_rate(student, teacher, x, labels, eps=0.3, steps=5,
                                           generator=torch.Generator().manual_seed(0))
    assert result.eligible == len(x) and result.rate == 0.0 and not result.disagrees.any()


def perturbed_copy(model, scale, seed):
    """A student close to its teacher: the same weights plus relative noise."""
    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return student


def test_disagreement_is_found_between_different_models_and_only_counts_eligible_points():
    teacher = zoo("mlp", 5, width=16).eval()
    student = perturbed_copy(teacher, 0.5, seed=6).eval()
    x = inputs(16)
    with torch.no_grad():
        labels = teacher(x).argmax(-1)
        labels[::4] = (labels[::4] + 1) % CLASSES  # the teacher is wrong there: never eligible
        both = (student(x).argmax(-1) == labels) & (teacher(x).argmax(-1) == labels)
    result = adversarial_disagreement_rate(student, teacher, x, labels, eps=0.5, steps=10,
                                           generator=torch.Generator().manual_seed(0))
    assert result.eligible == int(both.sum()) > 0
    assert not result.disagrees[~both].any()
    assert result.rate == pytest.approx(result.disagrees.sum().item() / result.eligible) and result.rate > 0
    # At the same radius certification is at most the complement: a certified point can never be attacked.
    for eps in (0.5, 0.05, 0.005):
        certified = certified_agreement_rate(student, teacher, x, labels, eps=eps)
        attacked = adversarial_disagreement_rate(student, teacher, x, labels, eps=eps, steps=10)
        assert certified <= 1 - attacked.rate + 1e-12
    assert certified > 0  # and at the smallest radius it certifies something


@pytest.mark.parametrize("confidence", ["teacher_class", "vector"])
def test_certified_upper_bound_is_at_least_the_empirical_delta_on_every_sample(confidence):
    student, teacher = pair()
    x = inputs()
    with torch.no_grad():
        clean = confidence_gap(student.eval()(x), teacher.eval()(x),
                               teacher(x).argmax(-1) if confidence == "teacher_class" else None)
    for eps in (0.0, 0.02, 0.1):
        empirical = relative_calibration(student, teacher, x, eps=eps, steps=10, restarts=2, delta=0.05,
                                         confidence=confidence, generator=torch.Generator().manual_seed(1))
        certified = certified_relative_calibration(student, teacher, x, eps=eps, delta=0.05, confidence=confidence)
        assert (certified.per_sample >= empirical.per_sample - 1e-12).all()
        assert (empirical.per_sample >= clean - 1e-12).all()  # the clean point is inside the ball
        assert certified.certified_rate <= 1 - empirical.violation_rate + 1e-12
        assert empirical.mean == pytest.approx(empirical.per_sample.mean().item())
        if eps == 0.0:  # the ball is the point: both are the clean gap
            torch.testing.assert_close(empirical.per_sample, clean)
            torch.testing.assert_close(certified.per_sample, clean)


def test_relative_calibration_is_zero_for_a_student_equal_to_its_teacher():
    teacher = zoo("mlp", 4, width=16)
    student = copy.deepcopy(teacher)
    x = inputs()
    for confidence in ("teacher_class", "vector"):
        result = relative_calibration(student, teacher, x, eps=0.2, steps=5, confidence=confidence,
                                      generator=torch.Generator().manual_seed(2))
        assert result.mean == 0.0 and result.violation_rate == 0.0
    # IBP bounds the two copies separately, so only the zero-radius certificate is exactly 0.
    assert certified_relative_calibration(student, teacher, x, eps=0.0).mean == 0.0
    assert certified_relative_calibration(student, teacher, x, eps=0.05).mean > 0.0


def test_the_ascent_stays_in_the_ball_and_beats_random_points():
    student, teacher = pair()
    x = inputs()
    eps = 0.1
    classes = teacher.eval()(x).argmax(-1).detach()
    gaps, found = maximise_confidence_gap(student, teacher, x, eps=eps, steps=10, classes=classes,
                                          generator=torch.Generator().manual_seed(3))
    assert (found - x).abs().max() <= eps + 1e-12 and found.min() >= 0 and found.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(gaps, confidence_gap(student(found), teacher(found), classes))
        noise = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(4),
                                           dtype=x.dtype) - 1)).clamp(0, 1)
        random_gaps = confidence_gap(student(noise), teacher(noise), classes)
    assert gaps.mean() > random_gaps.mean()


def test_modes_are_restored_and_no_parameter_gradient_is_left():
    student, teacher = pair()
    student.train()
    teacher.eval()
    x = inputs(6)
    labels = torch.zeros(6, dtype=torch.long)
    relative_calibration(student, teacher, x, eps=0.1, steps=2)
    certified_relative_calibration(student, teacher, x, eps=0.1)
    adversarial_disagreement_rate(student, teacher, x, labels, eps=0.1, steps=2)
    assert student.training and not teacher.training
    assert all(p.grad is None for p in [*student.parameters(), *teacher.parameters()])


def test_bad_arguments_are_refused():
    student, teacher = pair()
    with pytest.raises(KdlabError, match="confidence"):
        relative_calibration(student, teacher, inputs(2), eps=0.1, confidence="max")
    with pytest.raises(KdlabError, match="eps"):
        certified_relative_calibration(student, teacher, inputs(2), eps=-1.0)
