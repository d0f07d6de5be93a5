"""Tests of kdlab.metrics.classification: hand-worked examples and closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.metrics import accuracy, agreement, brier, classification_metrics, ece, kl_teacher_student, nll
from kdlab.metrics.classification import _ece_bin_index


def random_logits(n, c, *, seed, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, c, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=generator)
    return logits, labels


# ---------------------------------------------------------------------------
# ECE
# ---------------------------------------------------------------------------


def test_ece_hand_worked_with_a_boundary_confidence():
    # n_bins = 4: bins [0, .25], (.25, .5], (.5, .75], (.75, 1].
    # A: logits (0, 0)         -> conf 0.5 exactly, argmax 0 (first max), label 0: correct
    # B: logits (200, 0)       -> conf 1.0 exactly (e^-200 vanishes next to 1), label 0: correct
    # C: logits ln(.6), ln(.4) -> conf 0.6, argmax 0, label 1: wrong
    # D: logits ln(.28), ln(.72) -> conf 0.72, argmax 1, label 1: correct
    # A sits on the edge 0.5 and goes to the lower bin (.25, .5]:
    #   (.25, .5]: {A}    acc 1,   conf .5           -> |1 − .5|  · 1/4 = .125
    #   (.5, .75]: {C, D} acc 1/2, conf (.6+.72)/2 = .66 -> |.5 − .66| · 2/4 = .08
    #   (.75, 1]:  {B}    acc 1,   conf 1            -> 0
    #   ECE = .125 + .08 = .205
    # (Had A gone to the upper bin: {A, C, D} acc 2/3, conf .60667 -> .06·3/4 = .045.)
    logits = torch.tensor(
        [[0.0, 0.0], [200.0, 0.0], [math.log(0.6), math.log(0.4)], [math.log(0.28), math.log(0.72)]],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 0, 1, 1])
    assert logits.softmax(-1).max(-1).values[0].item() == 0.5
    assert logits.softmax(-1).max(-1).values[1].item() == 1.0
    assert ece(logits, labels, n_bins=4) == pytest.approx(0.205, abs=1e-12)
    # One bin: |mean acc − mean conf| = |3/4 − (.5 + 1 + .6 + .72)/4| = |.75 − .705| = .045
    assert ece(logits, labels, n_bins=1) == pytest.approx(0.045, abs=1e-12)


def test_ece_bin_convention_on_edges():
    # Right-closed bins: an edge value goes to the lower bin; 0 to the first, 1 to the last.
    confidence = torch.tensor([0.0, 0.25, 0.2500001, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64)
    assert _ece_bin_index(confidence, 4).tolist() == [0, 0, 1, 1, 2, 3, 3]
    # float32 edges are the rounded b/n: 0.2 (= 1/5 rounded) goes to bin 0 of 5.
    assert _ece_bin_index(torch.tensor([0.2, 0.4, 0.6000001], dtype=torch.float32), 5).tolist() == [0, 1, 3]


def reference_ece(logits, labels, n_bins):
    probs = torch.softmax(logits.double(), -1).numpy()
    labels = labels.numpy()
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = []
        for i in range(len(labels)):
            conf = probs[i].max()
            if (lo < conf <= hi) or (b == 0 and conf == 0.0):
                members.append(i)
        if members:
            acc = np.mean([probs[i].argmax() == labels[i] for i in members])
            conf = np.mean([probs[i].max() for i in members])
            total += len(members) / len(labels) * abs(acc - conf)
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_matches_loop_reference(n_bins):
    logits, labels = random_logits(200, 6, seed=n_bins)
    assert ece(logits, labels, n_bins=n_bins) == pytest.approx(reference_ece(logits, labels, n_bins), abs=1e-12)


def test_ece_is_zero_for_a_perfectly_calibrated_confident_model():
    logits = torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]])
    assert ece(logits, torch.tensor([0, 2])) == pytest.approx(0.0, abs=1e-12)
    assert ece(logits, torch.tensor([1, 1])) == pytest.approx(1.0, abs=1e-6)  # confident and always wrong


# ---------------------------------------------------------------------------
# NLL, Brier, accuracy, agreement, KL
# ---------------------------------------------------------------------------

# logits (ln 3, 0) -> p = (3/4, 1/4)
THREE_QUARTERS = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)


def test_nll_closed_forms():
    # label 0: −ln ¾ = ln(4/3); label 1: −ln ¼ = ln 4; mean = (ln(4/3) + ln 4)/2
    assert nll(THREE_QUARTERS, torch.tensor([0, 1])) == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-12)
    # Uniform logits: −ln(1/C) = ln C
    assert nll(torch.zeros(5, 7), torch.arange(5)) == pytest.approx(math.log(7), rel=1e-6)


def test_brier_closed_forms():
    # label 0: (¾ − 1)² + (¼ − 0)² = 1/16 + 1/16 = 1/8; label 1: (¾)² + (¼ − 1)² = 9/8; mean 5/8
    assert brier(THREE_QUARTERS, torch.tensor([0, 1])) == pytest.approx(5 / 8, rel=1e-12)
    # Identity Σ_c (p_c − y_c)² = 1 − 2·p_y + Σ_c p_c² on random data.
    logits, labels = random_logits(30, 5, seed=3)
    p = torch.softmax(logits, -1)
    want = (1 - 2 * p[torch.arange(30), labels] + p.square().sum(-1)).mean().item()
    assert brier(logits, labels) == pytest.approx(want, rel=1e-12)


def test_accuracy_topk_hand_worked():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.2],  # label 1: rank 1
            [0.9, 0.1, 0.8, 0.0],  # label 2: rank 2
            [0.0, 0.1, 0.2, 0.3],  # label 0: rank 4
        ]
    )
    labels = torch.tensor([1, 2, 0])
    assert accuracy(logits, labels) == pytest.approx(1 / 3)
    assert accuracy(logits, labels, topk=2) == pytest.approx(2 / 3)
    assert accuracy(logits, labels, topk=3) == pytest.approx(2 / 3)
    assert accuracy(logits, labels, topk=4) == 1.0


def test_agreement_hand_worked():
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0], [5.0, 4.0, 0.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 4.0], [0.0, 9.0, 0.0]])
    # argmax student (0, 1, 2, 0) vs teacher (0, 2, 2, 1): rows 0 and 2 agree -> 2/4
    assert agreement(student, teacher) == 0.5
    assert agreement(teacher, teacher) == 1.0


def test_kl_teacher_student_closed_form():
    # teacher (0, 0) -> (½, ½), student (0, ln 3) -> (¼, ¾): KL = ½·ln(4/3) (see the loss tests)
    student = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    teacher = torch.zeros(1, 2, dtype=torch.float64)
    assert kl_teacher_student(student, teacher) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert kl_teacher_student(teacher, teacher) == 0.0
    # Per-row loop in numpy on random logits.
    s, _ = random_logits(10, 4, seed=5)
    t, _ = random_logits(10, 4, seed=6)
    ps, pt = torch.softmax(s, -1).numpy(), torch.softmax(t, -1).numpy()
    want = np.mean([sum(pt[i, c] * math.log(pt[i, c] / ps[i, c]) for c in range(4)) for i in range(10)])
    assert kl_teacher_student(s, t) == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------------------
# Bundle, dtypes, registry, errors
# ---------------------------------------------------------------------------


def test_classification_metrics_bundle():
    logits, labels = random_logits(40, 5, seed=7)
    teacher, _ = random_logits(40, 5, seed=8)
    plain = classification_metrics(logits, labels)
    assert set(plain) == {"acc", "nll", "ece", "brier"}
    full = classification_metrics(logits, labels, teacher_logits=teacher)
    assert set(full) == {"acc", "nll", "ece", "brier", "agreement", "kl_ts"}
    assert all(type(value) is float for value in full.values())
    assert full["acc"] == accuracy(logits, labels)
    assert full["ece"] == ece(logits, labels, n_bins=15)
    assert full["kl_ts"] == kl_teacher_student(logits, teacher)
    assert full["agreement"] == agreement(logits, teacher)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_upcast(dtype):
    logits, labels = random_logits(50, 6, seed=9)
    low = logits.to(dtype)
    for metric in (nll, ece, brier, accuracy):
        got = metric(low, labels)
        assert type(got) is float and math.isfinite(got)
        assert got == pytest.approx(metric(low.float(), labels), rel=1e-6, abs=1e-7)


def test_metrics_are_registered():
    for name in ("accuracy", "nll", "ece", "brier", "agreement", "kl_teacher_student"):
        assert name in registry.names("metric")
    assert registry.get("metric", "ece") is ece


def test_metrics_ignore_autograd():
    logits, labels = random_logits(8, 3, seed=10)
    logits.requires_grad_(True)
    assert type(nll(logits, labels)) is float


def test_bad_inputs_raise_kdlab_error():
    logits, labels = random_logits(4, 3, seed=11)
    with pytest.raises(KdlabError, match="topk"):
        accuracy(logits, labels, topk=4)
    with pytest.raises(KdlabError, match="n_bins"):
        ece(logits, labels, n_bins=0)
    with pytest.raises(KdlabError, match="labels"):
        nll(logits, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(KdlabError, match="labels"):
        brier(logits, labels[:3])
    with pytest.raises(KdlabError, match=r"\(N, C\)"):
        nll(logits.unsqueeze(0), labels)
    with pytest.raises(KdlabError, match="at least one sample"):
        nll(logits[:0], labels[:0])
    with pytest.raises(KdlabError, match="shape"):
        agreement(logits, logits[:, :2])


def test_reliability_bins_hand_worked_and_consistent_with_ece():
    from kdlab.metrics.classification import reliability_bins

    # The four samples of test_ece_hand_worked_with_a_boundary_confidence, n_bins = 4:
    # [0, .25]: empty; (.25, .5]: {A} acc 1 conf .5; (.5, .75]: {C, D} acc .5 conf .66; (.75, 1]: {B} acc 1 conf 1.
    logits = torch.tensor(
        [[0.0, 0.0], [200.0, 0.0], [math.log(0.6), math.log(0.4)], [math.log(0.28), math.log(0.72)]],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 0, 1, 1])
    bins = reliability_bins(logits, labels, n_bins=4)
    assert bins["count"].tolist() == [0.0, 1.0, 2.0, 1.0]
    assert math.isnan(bins["accuracy"][0]) and math.isnan(bins["confidence"][0])
    assert bins["accuracy"][1:].tolist() == pytest.approx([1.0, 0.5, 1.0], abs=1e-12)
    assert bins["confidence"][1:].tolist() == pytest.approx([0.5, 0.66, 1.0], abs=1e-12)
    logits, labels = random_logits(300, 5, seed=3)
    bins = reliability_bins(logits, labels, n_bins=10)
    seen = bins["count"] > 0
    gap = (bins["count"][seen] * (bins["accuracy"][seen] - bins["confidence"][seen]).abs()).sum() / 300
    assert gap.item() == pytest.approx(ece(logits, labels, n_bins=10), abs=1e-12)
    with pytest.raises(KdlabError, match="n_bins"):
        reliability_bins(logits, labels, n_bins=0)
