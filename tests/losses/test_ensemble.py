"""kdlab.losses.ensemble: each combination rule on hand-worked batches, against float64 references.

Hand-worked teachers (T = 1 unless stated):
    A: logits (ln 3, 0) -> p_A = (3/4, 1/4)       B: logits (0, 0) -> p_B = (1/2, 1/2)
The references at the end use plain Python ``math`` on probabilities formed
directly (no log-space arithmetic), a different route than the implementation.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.losses import combine_teacher_probs, kl, multi_teacher_kl, teacher_weights

LN3 = math.log(3.0)
RULES = ("fixed", "mean_probs", "mean_logits", "entropy", "confidence")


def pair(rows: int = 1, dtype=torch.float32):
    """Teachers A and B above, ``rows`` identical samples each."""
    a = torch.tensor([[LN3, 0.0]] * rows, dtype=dtype)
    b = torch.zeros(rows, 2, dtype=dtype)
    return [a, b]


def options(rule, num_teachers, n):
    """Keyword arguments every rule accepts for a batch of n samples."""
    out = {"rule": rule, "labels": torch.arange(n) % 2}
    if rule == "fixed":
        out["weights"] = [float(k + 1) for k in range(num_teachers)]
    return out


# ---------------------------------------------------------------------------
# Each rule, hand-worked
# ---------------------------------------------------------------------------


def test_fixed_weights_are_normalised_and_mix_probabilities():
    # weights (3, 1) -> (3/4, 1/4); p̄ = 3/4·(3/4, 1/4) + 1/4·(1/2, 1/2) = (9/16 + 2/16, 3/16 + 2/16) = (11/16, 5/16)
    probs = combine_teacher_probs(pair(), rule="fixed", weights=[3.0, 1.0])
    assert probs.tolist()[0] == pytest.approx([11 / 16, 5 / 16], abs=1e-7)
    assert teacher_weights(pair(), rule="fixed", weights=[3.0, 1.0]).tolist() == [pytest.approx([0.75, 0.25])]
    # A zero weight drops that teacher exactly: p̄ = p_A
    assert combine_teacher_probs(pair(), rule="fixed", weights=[1, 0]).tolist()[0] == pytest.approx([0.75, 0.25])


def test_mean_probs_averages_probabilities():
    # p̄ = ((3/4 + 1/2)/2, (1/4 + 1/2)/2) = (5/8, 3/8)
    probs = combine_teacher_probs(pair(), rule="mean_probs")
    assert probs.tolist()[0] == pytest.approx([0.625, 0.375], abs=1e-7)
    assert teacher_weights(pair(), rule="mean_probs").tolist() == [[0.5, 0.5]]


def test_mean_logits_averages_logits_first():
    # mean logits (ln3/2, 0) -> softmax = (√3, 1)/(√3 + 1) = (0.63397460, 0.36602540) ≠ mean_probs' (0.625, 0.375)
    probs = combine_teacher_probs(pair(), rule="mean_logits")
    assert probs.tolist()[0] == pytest.approx([0.63397460, 0.36602540], abs=1e-7)
    # Three classes: A (ln 2, 0, 0) -> (1/2, 1/4, 1/4), B (0, ln 2, 0) -> (1/4, 1/2, 1/4).
    # mean_logits: (ln2/2, ln2/2, 0) -> (√2, √2, 1)/(2√2 + 1) = (0.36939806, 0.36939806, 0.26120387)
    # mean_probs:  (3/8, 3/8, 1/4)
    ln2 = math.log(2.0)
    three = [torch.tensor([[ln2, 0.0, 0.0]]), torch.tensor([[0.0, ln2, 0.0]])]
    expected = [0.36939806, 0.36939806, 0.26120387]
    assert combine_teacher_probs(three, rule="mean_logits").tolist()[0] == pytest.approx(expected, abs=1e-7)
    assert combine_teacher_probs(three, rule="mean_probs").tolist()[0] == pytest.approx([0.375, 0.375, 0.25])


def test_entropy_weights_by_softmax_of_negative_entropy():
    # H_A = −(3/4 ln 3/4 + 1/4 ln 1/4) = ln 4 − (3/4) ln 3 = 0.56233514;  H_B = ln 2 = 0.69314718
    # w_A = e^{−H_A}/(e^{−H_A} + e^{−H_B}) = (3^{3/4}/4)/(3^{3/4}/4 + 1/2) = 0.56987676/1.06987676 = 0.53265645
    # p̄ = w_A·(3/4, 1/4) + (1 − w_A)·(1/2, 1/2) = (1/2 + w_A/4, 1/2 − w_A/4) = (0.63316411, 0.36683589)
    w = teacher_weights(pair(), rule="entropy")
    assert w.tolist()[0] == pytest.approx([0.53265645, 0.46734355], abs=1e-7)
    probs = combine_teacher_probs(pair(), rule="entropy")
    assert probs.tolist()[0] == pytest.approx([0.63316411, 0.36683589], abs=1e-7)
    # τ_w = 1/2 doubles the exponent: w_A = 1/(1 + e^{2(H_A − H_B)}) = 1/(1 + e^{−0.26162407}) = 0.56503548
    sharp = teacher_weights(pair(), rule="entropy", weight_temperature=0.5)
    assert sharp[0, 0].item() == pytest.approx(0.56503548, abs=1e-7)


def test_entropy_is_taken_at_the_distillation_temperature():
    # Logits doubled and T = 2 give the same tempered distributions, so the same weights as at T = 1.
    doubled = [2 * z for z in pair()]
    assert teacher_weights(doubled, rule="entropy", temperature=2.0).tolist()[0] == pytest.approx(
        [0.53265645, 0.46734355], abs=1e-6)


def test_confidence_is_ca_mkd_weighting_by_the_teachers_cross_entropy():
    # Sample 0, label 0: CE_A = −ln 3/4 = ln(4/3), CE_B = ln 2. softmax(CE) ∝ (4/3, 2) = (0.4, 0.6);
    #   w = (1 − softmax)/(K − 1) = (0.6, 0.4);  p̄ = 0.6·(3/4, 1/4) + 0.4·(1/2, 1/2) = (0.65, 0.35)
    # Sample 1, label 1: CE_A = ln 4, CE_B = ln 2. softmax(CE) ∝ (4, 2) = (2/3, 1/3); w = (1/3, 2/3);
    #   p̄ = 1/3·(3/4, 1/4) + 2/3·(1/2, 1/2) = (1/4 + 1/3, 1/12 + 1/3) = (7/12, 5/12)
    labels = torch.tensor([0, 1])
    w = teacher_weights(pair(2), rule="confidence", labels=labels)
    assert w.tolist()[0] == pytest.approx([0.6, 0.4], abs=1e-7)
    assert w.tolist()[1] == pytest.approx([1 / 3, 2 / 3], abs=1e-7)
    probs = combine_teacher_probs(pair(2), rule="confidence", labels=labels)
    assert probs.tolist()[0] == pytest.approx([0.65, 0.35], abs=1e-7)
    assert probs.tolist()[1] == pytest.approx([7 / 12, 5 / 12], abs=1e-7)


def test_confidence_with_three_teachers_uses_one_minus_softmax_over_k_minus_one():
    # Label 1. Teacher 0: (0, 0) -> p[y] = 1/2, CE = ln 2; teachers 1, 2: (ln 3, 0) -> p[y] = 1/4, CE = ln 4.
    # softmax(CE) ∝ (2, 4, 4) = (0.2, 0.4, 0.4); w = (1 − softmax)/2 = (0.4, 0.3, 0.3)
    # (softmax(−CE) would give (1/2, 1/4, 1/4): the rules differ when K > 2.)
    # p̄ = 0.4·(1/2, 1/2) + 0.6·(3/4, 1/4) = (0.65, 0.35)
    members = [torch.zeros(1, 2), torch.tensor([[LN3, 0.0]]), torch.tensor([[LN3, 0.0]])]
    w = teacher_weights(members, rule="confidence", labels=torch.tensor([1]))
    assert w.tolist()[0] == pytest.approx([0.4, 0.3, 0.3], abs=1e-7)
    probs = combine_teacher_probs(members, rule="confidence", labels=torch.tensor([1]))
    assert probs.tolist()[0] == pytest.approx([0.65, 0.35], abs=1e-7)


def test_multi_teacher_kl_hand_worked_with_temperature():
    # At T = 2 the doubled logits give p_A = (3/4, 1/4), p_B = (1/2, 1/2); mean_probs p̄ = (5/8, 3/8).
    # Student (0, 0) -> q = (1/2, 1/2). KL = 5/8·ln(5/4) + 3/8·ln(3/4) = 0.13946524 − 0.10788130 = 0.03158394
    # T² · KL = 4 · 0.03158394 = 0.12633577
    doubled = [2 * z for z in pair()]
    value = multi_teacher_kl(torch.zeros(1, 2), doubled, rule="mean_probs", temperature=2.0)
    assert value.item() == pytest.approx(0.12633577, abs=1e-6)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


def test_entropy_weight_grows_with_confidence():
    # Teacher A's logit gap grows (its entropy falls) while B stays uniform: A's weight rises monotonically,
    # from exactly 1/2 at gap 0 (equal entropies) towards e^{0}/(e^0 + e^{−ln 2}) = 2/3 as H_A → 0.
    gaps = torch.linspace(0.0, 12.0, 25)
    members = [torch.stack([gaps, torch.zeros_like(gaps)], dim=1), torch.zeros(25, 2)]
    w_a = teacher_weights(members, rule="entropy")[:, 0]
    assert w_a[0].item() == pytest.approx(0.5, abs=1e-7)
    assert bool((w_a[1:] > w_a[:-1]).all())
    assert w_a[-1].item() == pytest.approx(2 / 3, abs=1e-3)
    # Sharper τ_w moves the weight further towards the more confident teacher; larger τ_w towards 1/K.
    sharp = teacher_weights(members, rule="entropy", weight_temperature=0.1)[:, 0]
    flat = teacher_weights(members, rule="entropy", weight_temperature=100.0)[:, 0]
    assert bool((sharp[1:] > w_a[1:]).all()) and bool((flat[1:] < w_a[1:]).all())
    assert flat.sub(0.5).abs().max().item() < 1e-2


def test_confidence_weight_grows_as_teacher_nears_the_label():
    gaps = torch.linspace(-6.0, 6.0, 25)  # teacher A's logit on the label (class 0) minus the other
    members = [torch.stack([gaps, torch.zeros_like(gaps)], dim=1), torch.zeros(25, 2)]
    w_a = teacher_weights(members, rule="confidence", labels=torch.zeros(25, dtype=torch.long))[:, 0]
    assert bool((w_a[1:] > w_a[:-1]).all())
    assert w_a[12].item() == pytest.approx(0.5, abs=1e-7)  # gap 0: both teachers give the label 1/2


@pytest.mark.parametrize("rule", RULES)
def test_weights_rows_sum_to_one_and_probs_are_distributions(rule):
    torch.manual_seed(1)
    members = [torch.randn(6, 4) * 3 for _ in range(3)]
    w = teacher_weights(members, temperature=2.0, **options(rule, 3, 6))
    probs = combine_teacher_probs(members, temperature=2.0, **options(rule, 3, 6))
    assert w.shape == (6, 3) and probs.shape == (6, 4)
    assert torch.allclose(w.sum(1), torch.ones(6)) and bool((w >= 0).all())
    assert torch.allclose(probs.sum(1), torch.ones(6)) and bool((probs > 0).all())
    if rule != "mean_logits":  # a mixture: p̄ = Σ_k w_k p_k
        mix = sum(w[:, k:k + 1] * torch.softmax(members[k] / 2.0, -1) for k in range(3))
        assert torch.allclose(probs, mix, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_one_teacher_reduces_every_rule_to_plain_softmax_and_kl(rule):
    torch.manual_seed(2)
    z, s = torch.randn(5, 4) * 2, torch.randn(5, 4)
    kwargs = dict(options(rule, 1, 5), temperature=3.0)
    assert torch.allclose(combine_teacher_probs([z], **kwargs), torch.softmax(z / 3.0, -1), atol=1e-6)
    assert teacher_weights([z], **kwargs).tolist() == [[1.0]] * 5
    assert multi_teacher_kl(s, [z], **kwargs).item() == pytest.approx(kl(s, z, temperature=3.0).item(), abs=1e-6)


def test_stacked_tensor_equals_list_of_members():
    torch.manual_seed(3)
    members = [torch.randn(4, 3) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 0])
    a = combine_teacher_probs(members, rule="confidence", labels=labels)
    b = combine_teacher_probs(torch.stack(members), rule="confidence", labels=labels)
    assert torch.equal(a, b)


@pytest.mark.parametrize("rule", ["entropy", "confidence", "fixed"])
def test_student_gradient_equals_weighted_sum_of_per_teacher_kls(rule):
    # Σ_k w_k KL(p_k‖q) = KL(p̄‖q) + H(p̄) − Σ_k w_k H(p_k): the difference does not involve the student, so
    # the mixture target trains the student exactly like CA-MKD's per-teacher weighted KL terms.
    torch.manual_seed(4)
    members = [torch.randn(6, 5, dtype=torch.float64) * 2 for _ in range(3)]
    kwargs = dict(options(rule, 3, 6), temperature=2.0)
    w = teacher_weights(members, **kwargs)
    s1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    multi_teacher_kl(s1, members, **kwargs).backward()
    per_teacher = sum((w[:, k] * kl(s2, members[k], temperature=2.0, reduction="none")).mean() for k in range(3))
    per_teacher.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-12)


def test_extreme_logits_and_zero_weights_stay_finite():
    members = [torch.tensor([[1e4, -1e4, 0.0]]), torch.tensor([[-1e4, 1e4, 0.0]])]
    student = torch.tensor([[0.0, 0.0, 5e3]], requires_grad=True)
    for kwargs in ({"rule": "mean_probs"}, {"rule": "fixed", "weights": [1.0, 0.0]}, {"rule": "entropy"},
                   {"rule": "confidence", "labels": torch.tensor([2])}, {"rule": "mean_logits"}):
        value = multi_teacher_kl(student, members, **kwargs)
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), kwargs


def test_low_precision_inputs_compute_in_float32():
    members = [z.to(torch.bfloat16) for z in pair()]
    assert combine_teacher_probs(members, rule="entropy").dtype == torch.float32
    assert multi_teacher_kl(torch.zeros(1, 2, dtype=torch.bfloat16), members, rule="mean_probs").dtype == torch.float32


def test_reductions():
    torch.manual_seed(5)
    members, s = [torch.randn(4, 3) for _ in range(2)], torch.randn(4, 3)
    per = multi_teacher_kl(s, members, rule="entropy", reduction="none")
    assert per.shape == (4,)
    assert multi_teacher_kl(s, members, rule="entropy").item() == pytest.approx(per.mean().item(), abs=1e-7)
    assert multi_teacher_kl(s, members, rule="entropy", reduction="sum").item() == pytest.approx(per.sum().item())


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("weights, message", [
    ([1.0], "got 1 weights for 2 teachers"),
    ([1.0, 2.0, 3.0], "got 3 weights for 2 teachers"),
    ([1.0, -0.5], "must be ≥ 0"),
    ([0.0, 0.0], "must not all be 0"),
    ([1.0, float("nan")], "finite numbers"),
    ([True, 1.0], "finite numbers"),
    (None, "rule 'fixed' needs weights"),
])
def test_fixed_weights_are_validated(weights, message):
    with pytest.raises(KdlabError, match=message):
        combine_teacher_probs(pair(), rule="fixed", weights=weights)


def test_other_validation_errors():
    with pytest.raises(KdlabError, match="only rule 'fixed' takes weights"):
        combine_teacher_probs(pair(), rule="mean_probs", weights=[1.0, 1.0])
    with pytest.raises(KdlabError, match="unknown value 'median'"):
        combine_teacher_probs(pair(), rule="median")
    with pytest.raises(KdlabError, match="needs the labels"):
        combine_teacher_probs(pair(), rule="confidence")
    with pytest.raises(KdlabError, match=r"labels: values must lie in \[0, 2\)"):
        combine_teacher_probs(pair(), rule="confidence", labels=torch.tensor([2]))
    with pytest.raises(KdlabError, match="got no teachers"):
        combine_teacher_probs([], rule="mean_probs")
    with pytest.raises(KdlabError, match=r"member_logits\[1\]: shape \(1, 3\)"):
        combine_teacher_probs([torch.zeros(1, 2), torch.zeros(1, 3)], rule="mean_probs")
    with pytest.raises(KdlabError, match="student shape"):
        multi_teacher_kl(torch.zeros(1, 3), pair(), rule="mean_probs")
    with pytest.raises(KdlabError, match="temperature"):
        combine_teacher_probs(pair(), rule="mean_probs", temperature=0.0)
    with pytest.raises(KdlabError, match="weight_temperature"):
        combine_teacher_probs(pair(), rule="entropy", weight_temperature=-1.0)


# ---------------------------------------------------------------------------
# Independent float64 reference and gradcheck
# ---------------------------------------------------------------------------


def ref_softmax(row, t=1.0):
    top = max(row)
    e = [math.exp((v - top) / t) for v in row]
    return [x / sum(e) for x in e]


def ref_multi_teacher_kl(student, members, rule, temperature, labels, weights=None, weight_temperature=1.0):
    """T²·KL(p̄‖q) averaged over samples, probabilities formed directly (Python floats)."""
    num_teachers, total = len(members), 0.0
    for i in range(len(student)):
        ps = [ref_softmax(m[i], temperature) for m in members]
        if rule == "mean_logits":
            mix = ref_softmax([sum(m[i][c] for m in members) / num_teachers for c in range(len(student[i]))],
                              temperature)
        else:
            if rule == "fixed":
                w = [x / sum(weights) for x in weights]
            elif rule == "mean_probs":
                w = [1 / num_teachers] * num_teachers
            elif rule == "entropy":
                h = [-sum(x * math.log(x) for x in p if x > 0) for p in ps]
                e = [math.exp(-x / weight_temperature) for x in h]
                w = [x / sum(e) for x in e]
            else:  # confidence: CA-MKD
                ce = [-math.log(ref_softmax(m[i])[labels[i]]) for m in members]
                e = [math.exp(x) for x in ce]
                w = [(1 - x / sum(e)) / (num_teachers - 1) for x in e]
            mix = [sum(w[k] * ps[k][c] for k in range(num_teachers)) for c in range(len(student[i]))]
        q = ref_softmax(student[i], temperature)
        total += sum(a * math.log(a / b) for a, b in zip(mix, q) if a > 0)
    return temperature**2 * total / len(student)


@pytest.mark.parametrize("rule", RULES)
def test_multi_teacher_kl_matches_float64_reference(rule):
    torch.manual_seed(6)
    members = [torch.randn(8, 5, dtype=torch.float64) * 3 for _ in range(3)]
    student = torch.randn(8, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (8,))
    weights = [0.2, 0.0, 1.3] if rule == "fixed" else None
    value = multi_teacher_kl(student, members, rule=rule, temperature=2.5, labels=labels, weights=weights,
                             weight_temperature=0.7)
    expected = ref_multi_teacher_kl(student.tolist(), [m.tolist() for m in members], rule, 2.5, labels.tolist(),
                                    weights, 0.7)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_in_student_and_teacher_logits(rule):
    torch.manual_seed(7)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    members = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    kwargs = dict(options(rule, 3, 3), temperature=1.7)
    assert torch.autograd.gradcheck(lambda s, a, b, c: multi_teacher_kl(s, [a, b, c], **kwargs),
                                    (student, *members))
    assert torch.autograd.gradcheck(lambda a, b, c: combine_teacher_probs([a, b, c], **kwargs), tuple(members))
