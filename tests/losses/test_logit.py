"""Tests of kdlab.losses.logit against independent float64 references.

The references use plain Python ``math``/``statistics`` loops over positions
and classes, with probabilities formed directly (softmax with a max shift),
mixtures and renormalised distributions formed explicitly in probability
space, the Pearson correlation from its textbook formula, and LogSum as
``log(sum |d|^p)`` — a different route than the implementation's log-space
arithmetic, gathers and masked batch statistics.
"""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.losses import (
    dist,
    dkd,
    dkd_parts,
    hinge_logits,
    kl,
    logit_standardization,
    logsum,
    mse_logits,
    pearson_distance,
    reverse_kl,
    skew_kl,
    standardize_logits,
)

# ---------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------


def ref_softmax(row, temperature):
    top = max(row)
    weights = [math.exp((value - top) / temperature) for value in row]
    total = sum(weights)
    return [w / total for w in weights]


def ref_kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def ref_standardize(row, eps=1e-7):
    mean = statistics.fmean(row)
    std = statistics.stdev(row)  # Bessel-corrected, like torch.std
    return [(value - mean) / (std + eps) for value in row]


def ref_dkd_parts(student_row, teacher_row, label, temperature):
    """(tckd, nckd) · T², with b and p̂ formed explicitly from the probabilities."""
    q = ref_softmax(student_row, temperature)
    p = ref_softmax(teacher_row, temperature)
    others = [c for c in range(len(p)) if c != label]
    p_rest = sum(p[c] for c in others)
    q_rest = sum(q[c] for c in others)
    tckd = ref_kl([p[label], p_rest], [q[label], q_rest])
    nckd = ref_kl([p[c] / p_rest for c in others], [q[c] / q_rest for c in others])
    return temperature**2 * tckd, temperature**2 * nckd


def ref_pearson(u, v, eps=1e-8):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cu = [x - mu for x in u]
    cv = [x - mv for x in v]
    dot = sum(x * y for x, y in zip(cu, cv))
    return dot / (math.sqrt(sum(x * x for x in cu)) * math.sqrt(sum(y * y for y in cv)) + eps)


def ref_position(name, student_row, teacher_row, temperature, label=None, **options):
    """One position's loss value from raw logit rows (lists of floats)."""
    if name == "skew_kl":
        alpha = options.get("skew", 0.1)
        q = ref_softmax(student_row, temperature)
        p = ref_softmax(teacher_row, temperature)
        if options.get("reverse", False):
            mixture = [alpha * y + (1 - alpha) * x for x, y in zip(p, q)]
            return temperature**2 * ref_kl(q, mixture)
        mixture = [alpha * x + (1 - alpha) * y for x, y in zip(p, q)]
        return temperature**2 * ref_kl(p, mixture)
    if name == "dkd":
        tckd, nckd = ref_dkd_parts(student_row, teacher_row, label, temperature)
        return options.get("alpha", 1.0) * tckd + options.get("beta", 8.0) * nckd
    if name == "logit_standardization":
        q = ref_softmax(ref_standardize(student_row), temperature)
        p = ref_softmax(ref_standardize(teacher_row), temperature)
        return temperature**2 * ref_kl(p, q)
    if name == "hinge_logits":
        margin, squared = options.get("margin", 0.0), options.get("squared", True)
        total = 0.0
        for s, t in zip(student_row, teacher_row):
            h = max(0.0, abs(s / temperature - t / temperature) - margin)
            total += h * h if squared else h
        return total / len(student_row)
    if name == "logsum":
        power, eps = options.get("power", 4.0), options.get("eps", 0.0)
        return math.log(sum(abs((s - t) / temperature) ** power for s, t in zip(student_row, teacher_row)) + eps)
    raise AssertionError(name)


def ref_loss(name, student, teacher, *, temperature=1.0, mask=None, labels=None, reduction="batchmean", **options):
    """Reference for a per-position logit loss on arrays of shape (..., C)."""
    num_classes = student.shape[-1]
    rows_s = np.asarray(student, dtype=np.float64).reshape(-1, num_classes)
    rows_t = np.asarray(teacher, dtype=np.float64).reshape(-1, num_classes)
    flat_labels = None if labels is None else np.asarray(labels).reshape(-1)
    valid = np.ones(rows_s.shape[0], dtype=bool) if mask is None else np.asarray(mask).reshape(-1).astype(bool)
    values = np.zeros(rows_s.shape[0])
    for i in range(rows_s.shape[0]):
        if valid[i]:
            label = None if flat_labels is None else int(flat_labels[i])
            values[i] = ref_position(name, list(rows_s[i]), list(rows_t[i]), temperature, label, **options)
    if reduction == "none":
        return values.reshape(student.shape[:-1])
    if reduction == "sum":
        return values.sum()
    return values.sum() / max(int(valid.sum()), 1)


def ref_dist(student, teacher, *, temperature=1.0, mask=None, reduction="batchmean", beta=1.0, gamma=1.0):
    """DIST over the valid rows taken as one batch; "none" = β·inter(row) + γ·intra, replicated."""
    num_classes = student.shape[-1]
    rows_s = np.asarray(student, dtype=np.float64).reshape(-1, num_classes)
    rows_t = np.asarray(teacher, dtype=np.float64).reshape(-1, num_classes)
    valid = np.ones(rows_s.shape[0], dtype=bool) if mask is None else np.asarray(mask).reshape(-1).astype(bool)
    kept = [i for i in range(rows_s.shape[0]) if valid[i]]
    probs_s = {i: ref_softmax(list(rows_s[i]), temperature) for i in kept}
    probs_t = {i: ref_softmax(list(rows_t[i]), temperature) for i in kept}
    intra = 0.0
    for c in range(num_classes):
        column_s = [probs_s[i][c] for i in kept]
        column_t = [probs_t[i][c] for i in kept]
        intra += 1.0 - ref_pearson(column_s, column_t)
    intra /= num_classes
    values = np.zeros(rows_s.shape[0])
    for i in kept:
        inter = 1.0 - ref_pearson(probs_s[i], probs_t[i])
        values[i] = temperature**2 * (beta * inter + gamma * intra)
    if reduction == "none":
        return values.reshape(student.shape[:-1])
    if reduction == "sum":
        return values.sum()
    return values.sum() / max(len(kept), 1)


SHAPES = [(5, 7), (3, 4, 6)]
REDUCTIONS = ["batchmean", "sum", "none"]


def random_pair(shape, *, seed, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    teacher = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype)


def random_labels(position_shape, num_classes, *, seed):
    return torch.randint(0, num_classes, position_shape, generator=torch.Generator().manual_seed(seed))


def random_mask(position_shape, *, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(position_shape, generator=generator) < 0.6
    mask.view(-1)[0] = True  # at least one valid position
    mask.view(-1)[1] = True  # two, so DIST's intra-class term is not degenerate
    mask.view(-1)[-1] = False  # at least one masked position
    return mask


# (case id, function name, temperature, options). dkd needs labels; the others are plain logit losses.
CASES = [
    ("skew_forward", "skew_kl", 2.0, {"skew": 0.1}),
    ("skew_reverse", "skew_kl", 0.5, {"skew": 0.3, "reverse": True}),
    ("dkd", "dkd", 4.0, {"alpha": 1.0, "beta": 8.0}),
    ("logit_standardization", "logit_standardization", 2.0, {}),
    ("hinge_squared", "hinge_logits", 1.5, {"margin": 0.5}),
    ("hinge_abs", "hinge_logits", 1.0, {"margin": 1.0, "squared": False}),
    ("logsum", "logsum", 1.0, {"power": 4.0}),
    ("logsum_p2_eps", "logsum", 2.0, {"power": 2.0, "eps": 1e-5}),
    ("dist", "dist", 4.0, {"beta": 1.0, "gamma": 2.0}),
]
CASE_IDS = [case[0] for case in CASES]
FUNCTIONS = {
    "skew_kl": skew_kl,
    "dkd": dkd,
    "logit_standardization": logit_standardization,
    "hinge_logits": hinge_logits,
    "logsum": logsum,
    "dist": dist,
}


def call(name, student, teacher, *, labels=None, **kwargs):
    if name == "dkd":
        kwargs["labels"] = labels
    return FUNCTIONS[name](student, teacher, **kwargs)


def reference(name, student, teacher, *, labels=None, **kwargs):
    if name == "dist":
        return ref_dist(student, teacher, **kwargs)
    return ref_loss(name, student, teacher, labels=labels, **kwargs)


# ---------------------------------------------------------------------------
# Values against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference(case, shape, reduction, masked):
    _, name, temperature, options = case
    student, teacher = random_pair(shape, seed=len(shape) + 3 * masked)
    labels = random_labels(shape[:-1], shape[-1], seed=1)
    mask = random_mask(shape[:-1], seed=2) if masked else None
    if masked:
        labels = torch.where(mask, labels, torch.full_like(labels, -100))  # padding labels are ignored
    got = call(name, student, teacher, labels=labels, temperature=temperature, mask=mask, reduction=reduction,
               **options)
    want = reference(name, student.numpy(), teacher.numpy(), labels=labels.numpy(), temperature=temperature,
                     mask=None if mask is None else mask.numpy(), reduction=reduction, **options)
    assert got.dtype == torch.float64
    assert tuple(got.shape) == (shape[:-1] if reduction == "none" else ())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_inputs_match_reference(case):
    _, name, temperature, options = case
    student, teacher = random_pair((6, 9), seed=1, dtype=torch.float32)
    labels = random_labels((6,), 9, seed=3)
    got = call(name, student, teacher, labels=labels, temperature=temperature, **options)
    want = reference(name, student.double().numpy(), teacher.double().numpy(), labels=labels.numpy(),
                     temperature=temperature, **options)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), want, rtol=2e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Hand-worked examples
# ---------------------------------------------------------------------------


def log_tensor(rows):
    """Logits whose softmax (T = 1) is exactly ``rows``."""
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_hand_worked_skew_kl():
    # p = (½, ½) (teacher), q = (¼, ¾) (student), α = 0.1.
    # Forward: m = 0.1·p + 0.9·q = (0.05 + 0.225, 0.05 + 0.675) = (0.275, 0.725)
    #   KL(p‖m) = ½·ln(½/0.275) + ½·ln(½/0.725) = ½·ln(0.25 / 0.199375) ≈ 0.113137
    # Reverse: m' = 0.1·q + 0.9·p = (0.025 + 0.45, 0.075 + 0.45) = (0.475, 0.525)
    #   KL(q‖m') = ¼·ln(0.25/0.475) + ¾·ln(0.75/0.525) ≈ 0.106941
    student, teacher = log_tensor([[0.25, 0.75]]), log_tensor([[0.5, 0.5]])
    assert skew_kl(student, teacher).item() == pytest.approx(0.5 * math.log(0.25 / 0.199375), rel=1e-12)
    want_reverse = 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525)
    assert skew_kl(student, teacher, reverse=True).item() == pytest.approx(want_reverse, rel=1e-12)


def test_hand_worked_dkd():
    # Label t = 0; teacher p = (½, ¼, ¼), student q = (¼, ¼, ½).
    # b^T = (½, ½), b^S = (¼, ¾): TCKD = ½·ln(½/¼) + ½·ln(½/¾) = ½·ln(4/3) ≈ 0.143841
    # p̂^T = (¼, ¼)/½ = (½, ½), p̂^S = (¼, ½)/¾ = (⅓, ⅔):
    #   NCKD = ½·ln(½/⅓) + ½·ln(½/⅔) = ½·ln(9/8) ≈ 0.058892
    # KD = KL(p‖q) = ½·ln 2 + ¼·ln 1 + ¼·ln(½) = ¼·ln 2, and
    #   TCKD + (1 − ½)·NCKD = ½·ln(4/3) + ¼·ln(9/8) = ¼·ln(16/9 · 9/8) = ¼·ln 2   (eq. 5)
    student, teacher, labels = log_tensor([[0.25, 0.25, 0.5]]), log_tensor([[0.5, 0.25, 0.25]]), torch.tensor([0])
    tckd, nckd = dkd_parts(student, teacher, labels=labels)
    assert tckd.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert nckd.item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-12)
    assert kl(student, teacher).item() == pytest.approx(0.25 * math.log(2), rel=1e-12)
    # DKD (α = 1, β = 8) = ½·ln(4/3) + 4·ln(9/8) ≈ 0.614973
    assert dkd(student, teacher, labels=labels).item() == pytest.approx(
        0.5 * math.log(4 / 3) + 4 * math.log(9 / 8), rel=1e-12
    )


def test_hand_worked_dist():
    # Student probabilities S = [[½, ⅓, ⅙], [⅓, ⅙, ½]], teacher T = [[½, ⅙, ⅓], [⅙, ⅓, ½]].
    # Inter-class, row 1: centred (every row has mean ⅓) s' = (⅙, 0, −⅙), t' = (⅙, −⅙, 0):
    #   s'·t' = 1/36, ‖s'‖² = ‖t'‖² = 2/36  ->  ρ = ½, d = ½.
    # Row 2: s' = (0, −⅙, ⅙), t' = (−⅙, 0, ⅙): same numbers, d = ½.  L_inter = ½.
    # Intra-class, with 2 samples ρ = ±1 (sign of the two columns' slopes):
    #   class 1: s ½ → ⅓ (down), t ½ → ⅙ (down): ρ = 1, d = 0
    #   class 2: s ⅓ → ⅙ (down), t ⅙ → ⅓ (up):   ρ = −1, d = 2
    #   class 3: s ⅙ → ½ (up),   t ⅓ → ½ (up):   ρ = 1, d = 0      L_intra = 2/3.
    # DIST (β = γ = 1, T = 1) = ½ + ⅔ = 7/6 ≈ 1.166667 (up to the ε = 1e-8 in ρ).
    student = log_tensor([[1 / 2, 1 / 3, 1 / 6], [1 / 3, 1 / 6, 1 / 2]])
    teacher = log_tensor([[1 / 2, 1 / 6, 1 / 3], [1 / 6, 1 / 3, 1 / 2]])
    assert dist(student, teacher).item() == pytest.approx(7 / 6, rel=1e-6)
    assert dist(student, teacher, beta=1.0, gamma=0.0).item() == pytest.approx(0.5, rel=1e-6)
    assert dist(student, teacher, beta=0.0, gamma=1.0).item() == pytest.approx(2 / 3, rel=1e-6)
    # "none": each row's own d plus the shared intra term: (½ + ⅔, ½ + ⅔); "sum" = 2 · 7/6.
    np.testing.assert_allclose(dist(student, teacher, reduction="none").numpy(), [7 / 6, 7 / 6], rtol=1e-6)
    assert dist(student, teacher, reduction="sum").item() == pytest.approx(7 / 3, rel=1e-6)


def test_hand_worked_logsum():
    # d = (1, 2, 0): Σ|d|⁴ = 1 + 16 + 0 = 17 -> ln 17 ≈ 2.833213 (the 0 counts as (1e-12)⁴ = 1e-48).
    # p = 2: 1 + 4 = 5 -> ln 5.  T = 2: Σ|d/2|⁴ = 17/16 -> ln 17 − 4·ln 2 ≈ 0.060625.
    # eps = 1e-5 (the DeiT variant): ln(17 + 1e-5).
    student, teacher = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    assert logsum(student, teacher).item() == pytest.approx(math.log(17), rel=1e-14)
    assert logsum(student, teacher, power=2.0).item() == pytest.approx(math.log(5), rel=1e-14)
    assert logsum(student, teacher, temperature=2.0).item() == pytest.approx(math.log(17) - 4 * math.log(2), rel=1e-12)
    assert logsum(student, teacher, eps=1e-5).item() == pytest.approx(math.log(17 + 1e-5), rel=1e-14)


def test_hand_worked_standardize_and_hinge():
    # z = (1, 2, 3): mean 2, Bessel std √((1 + 0 + 1)/2) = 1 -> (−1, 0, 1)/(1 + 1e-7).
    got = standardize_logits(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), [[-1 / (1 + 1e-7), 0.0, 1 / (1 + 1e-7)]], rtol=1e-14)
    # Hinge, z_s − z_t = (0.2, −1.5, 3): margin 0.5 -> (0, 1, 2.5); squared mean = (0 + 1 + 6.25)/3
    student = torch.tensor([[0.2, -1.5, 3.0]], dtype=torch.float64)
    teacher = torch.zeros(1, 3, dtype=torch.float64)
    assert hinge_logits(student, teacher, margin=0.5).item() == pytest.approx(7.25 / 3, rel=1e-12)
    assert hinge_logits(student, teacher, margin=0.5, squared=False).item() == pytest.approx(3.5 / 3, rel=1e-12)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(case, masked):
    _, name, temperature, options = case
    student, teacher = random_pair((2, 3, 4), seed=5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    labels = random_labels((2, 3), 4, seed=6)
    mask = random_mask((2, 3), seed=7) if masked else None
    for reduction in ("batchmean", "none"):
        assert torch.autograd.gradcheck(
            lambda s, t: call(name, s, t, labels=labels, temperature=temperature, mask=mask, reduction=reduction,
                              **options),
            (student, teacher),
        )


def test_gradcheck_pearson_distance_and_standardize():
    a, b = random_pair((3, 5), seed=8)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: pearson_distance(x, y, dim=0), (a, b))
    assert torch.autograd.gradcheck(lambda x: standardize_logits(x), (a,))


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mask_ignores_positions_and_nan_garbage(case):
    _, name, temperature, options = case
    student, teacher = random_pair((3, 5, 4), seed=12)
    labels = random_labels((3, 5), 4, seed=13)
    mask = random_mask((3, 5), seed=14)
    garbage_student, garbage_teacher = student.clone(), teacher.clone()
    garbage_student[~mask] = float("nan")
    garbage_teacher[~mask] = float("inf")
    garbage_teacher[~mask, 0] = float("-inf")
    garbage_labels = torch.where(mask, labels, torch.full_like(labels, -100))
    s = garbage_student.requires_grad_(True)
    t = garbage_teacher.requires_grad_(True)
    value = call(name, s, t, labels=garbage_labels, temperature=temperature, mask=mask, **options)
    value.backward()
    # Same as the loss over the valid rows only, taken as a flat (K, C) batch.
    s_valid = student[mask].clone().requires_grad_(True)
    t_valid = teacher[mask].clone().requires_grad_(True)
    want = call(name, s_valid, t_valid, labels=labels[mask], temperature=temperature, **options)
    want.backward()
    assert torch.isfinite(value)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad[~mask] == 0).all() and (t.grad[~mask] == 0).all()
    torch.testing.assert_close(s.grad[mask], s_valid.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t.grad[mask], t_valid.grad, rtol=1e-10, atol=1e-12)
    # An all-masked batch gives 0, not NaN.
    nothing = torch.zeros(3, 5, dtype=torch.bool)
    assert call(name, student, teacher, labels=labels, temperature=temperature, mask=nothing, **options).item() == 0.0


# ---------------------------------------------------------------------------
# Skew KL
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_skew_kl_ends_are_kl_and_zero(shape):
    student, teacher = random_pair(shape, seed=15)
    for temperature in (1.0, 3.0):
        for reverse, plain in ((False, kl), (True, reverse_kl)):
            at_zero = skew_kl(student, teacher, temperature=temperature, skew=0.0, reverse=reverse, reduction="none")
            torch.testing.assert_close(at_zero, plain(student, teacher, temperature=temperature, reduction="none"),
                                       rtol=0, atol=0)
            assert skew_kl(student, teacher, skew=1.0, reverse=reverse).item() == 0.0
            # Skewing towards the distribution itself shrinks the divergence monotonically.
            values = [skew_kl(student, teacher, skew=a, reverse=reverse).item() for a in (0.0, 0.1, 0.5, 0.9)]
            assert values[0] > values[1] > values[2] > values[3] > 0


def test_skew_kl_has_the_gradient_of_distillm_cross_entropy_form():
    # DistiLLM's code minimises −Σ p·log(αp + (1−α)q) (cross-entropy to the mixture); it differs
    # from KL(p‖m) by H(p), which does not depend on the student: the student gradients agree.
    student, teacher = random_pair((4, 6), seed=16)
    s1 = student.clone().requires_grad_(True)
    skew_kl(s1, teacher, skew=0.1).backward()
    s2 = student.clone().requires_grad_(True)
    p, q = torch.softmax(teacher, -1), torch.softmax(s2, -1)
    (-(p * torch.log(0.1 * p + 0.9 * q)).sum(-1).mean()).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)


def test_skew_kl_near_one_keeps_precision():
    # α = 1 − 1e-9: KL(p‖m) ≈ (1−α)²/2·χ²(p‖q) ~ 1e-18; formed in probability space it would be lost.
    student, teacher = random_pair((3, 5), seed=17, scale=1.0)
    value = skew_kl(student, teacher, skew=1 - 1e-9, reduction="none")
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    chi2 = ((p - q) ** 2 / p).sum(-1)
    np.testing.assert_allclose(value.numpy(), (1e-9) ** 2 / 2 * chi2.numpy(), rtol=1e-4)


# ---------------------------------------------------------------------------
# DKD
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd(shape, temperature):
    # Eq. 5: KL(p^T‖p^S) = TCKD + (1 − p_t^T)·NCKD per sample (both sides times T² here).
    student, teacher = random_pair(shape, seed=18, scale=4.0)
    labels = random_labels(shape[:-1], shape[-1], seed=19)
    tckd, nckd = dkd_parts(student, teacher, labels=labels, temperature=temperature)
    p_target = torch.softmax(teacher / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    kd = kl(student, teacher, temperature=temperature, reduction="none")
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kd, rtol=1e-10, atol=1e-12)
    assert (tckd >= 0).all() and (nckd >= 0).all()
    # DKD is the decoupled weighting, and α = β = 1 is not KD (NCKD loses its (1 − p_t) factor).
    value = dkd(student, teacher, labels=labels, temperature=temperature, alpha=2.0, beta=0.5, reduction="none")
    torch.testing.assert_close(value, 2.0 * tckd + 0.5 * nckd, rtol=1e-12, atol=1e-12)
    unit = dkd(student, teacher, labels=labels, temperature=temperature, alpha=1.0, beta=1.0)
    assert unit.item() > kl(student, teacher, temperature=temperature).item()


def test_dkd_confident_teacher_stays_finite():
    # Teacher sure of the target (p_t^T ≈ 1): b^T has a ~e^{-1000} tail; nothing may be log 0.
    student = torch.tensor([[0.0, 1.0, -1.0], [1e4, -1e4, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1000.0, 0.0, 0.0], [-1e4, 1e4, 0.0]])
    labels = torch.tensor([0, 1])
    tckd, nckd = dkd_parts(student, teacher, labels=labels)
    value = dkd(student, teacher, labels=labels)
    value.backward()
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all() and torch.isfinite(student.grad).all()
    # Row 0: NCKD between p̂^T = (½, ½) and p̂^S = softmax(1, −1): finite and independent of the target logit.
    want = 0.5 * math.log(0.5 / (math.exp(1) / (math.exp(1) + math.exp(-1)))) + 0.5 * math.log(
        0.5 / (math.exp(-1) / (math.exp(1) + math.exp(-1)))
    )
    assert nckd[0].item() == pytest.approx(want, rel=1e-5)


def test_dkd_requires_valid_labels():
    student, teacher = random_pair((2, 3), seed=20)
    with pytest.raises(KdlabError, match="labels are required"):
        dkd(student, teacher)
    with pytest.raises(KdlabError, match="labels"):
        dkd(student, teacher, labels=torch.tensor([0, 3]))
    with pytest.raises(KdlabError, match="labels"):
        dkd(student, teacher, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(KdlabError, match="2 classes"):
        dkd(student[:, :1], teacher[:, :1], labels=torch.tensor([0, 0]))
    with pytest.raises(KdlabError, match="alpha"):
        dkd(student, teacher, labels=torch.tensor([0, 1]), alpha=-1.0)
    with pytest.raises(KdlabError, match="beta"):
        dkd(student, teacher, labels=torch.tensor([0, 1]), beta=float("nan"))


# ---------------------------------------------------------------------------
# DIST
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_dist_of_identical_inputs_is_zero(shape):
    _, teacher = random_pair(shape, seed=21)
    # 0 up to the ε = 1e-8 in ρ: d = ε/(‖y'‖² + ε) ~ 1e-6 here, where a centred probability row or
    # class column y' is small (and times T²); exactly 0 with ε = 0 in pearson_distance.
    for temperature in (1.0, 4.0):
        values = dist(teacher, teacher, temperature=temperature, reduction="none")
        assert values.abs().max().item() < 1e-4
    probabilities = torch.softmax(teacher, -1)
    assert pearson_distance(probabilities, probabilities, eps=0.0).abs().max().item() < 1e-15
    student, _ = random_pair(shape, seed=21)
    assert dist(student, teacher).item() > 0.1


def test_pearson_distance_is_invariant_to_positive_affine_maps_of_its_inputs():
    a, b = random_pair((4, 7), seed=22)
    base = pearson_distance(a, b, eps=0.0)
    scale_a, scale_b = torch.rand(4, 1, dtype=torch.float64) + 0.1, torch.rand(4, 1, dtype=torch.float64) * 5 + 0.1
    shift_a, shift_b = torch.randn(4, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    torch.testing.assert_close(pearson_distance(scale_a * a + shift_a, scale_b * b + shift_b, eps=0.0), base,
                               rtol=1e-12, atol=1e-12)
    # A negative scale flips ρ: d → 2 − d.
    torch.testing.assert_close(pearson_distance(-scale_a * a, b, eps=0.0), 2 - base, rtol=1e-12, atol=1e-12)
    # With the default ε the invariance holds to O(ε / (‖a'‖‖b'‖)).
    torch.testing.assert_close(pearson_distance(3 * a + 1, b), pearson_distance(a, b), rtol=1e-6, atol=1e-7)
    # Against the textbook formula, row by row.
    want = [1 - ref_pearson(list(x), list(y), eps=0.0) for x, y in zip(a.numpy(), b.numpy())]
    np.testing.assert_allclose(base.numpy(), want, rtol=1e-12)


def test_dist_acts_on_probabilities_not_logits():
    # A per-row logit shift cancels in the softmax, so DIST is unchanged ...
    student, teacher = random_pair((6, 5), seed=23)
    shift = torch.randn(6, 1, dtype=torch.float64)
    torch.testing.assert_close(dist(student + shift, teacher), dist(student, teacher), rtol=1e-12, atol=1e-12)
    # ... but a logit scale is not an affine map of the probabilities: DIST changes.
    assert abs(dist(3.0 * student, teacher).item() - dist(student, teacher).item()) > 1e-3
    # A positive affine map of the student's probabilities leaves the inter-class relation alone:
    # feed log(a·p + b) as logits (their softmax is a·p + b renormalised = (a·p + b)/(a + C·b)).
    p = torch.softmax(student, -1)
    mapped = torch.log(2.0 * p + 0.3)
    torch.testing.assert_close(dist(mapped, teacher, gamma=0.0), dist(student, teacher, gamma=0.0),
                               rtol=1e-6, atol=1e-8)


def test_dist_single_valid_position_has_constant_intra_term():
    student, teacher = random_pair((1, 6), seed=24)
    inter = 1 - ref_pearson(ref_softmax(list(student[0].numpy()), 1.0), ref_softmax(list(teacher[0].numpy()), 1.0))
    # ρ of a one-sample column is 0/(0 + ε) = 0, so L_intra = 1 (as in the official code), with no gradient:
    # the student gradient is that of the inter-class term alone.
    s = student.clone().requires_grad_(True)
    value = dist(s, teacher)
    value.backward()
    assert value.item() == pytest.approx(inter + 1.0, rel=1e-9)
    s_inter = student.clone().requires_grad_(True)
    dist(s_inter, teacher, gamma=0.0).backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad, s_inter.grad, rtol=1e-12, atol=1e-15)


def test_pearson_distance_of_constant_vectors_has_finite_gradients():
    constant = torch.full((2, 4), 0.25, dtype=torch.float64, requires_grad=True)
    other = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64, requires_grad=True)
    value = pearson_distance(constant, other)
    value.sum().backward()
    assert value.tolist() == [1.0, 1.0]
    assert torch.isfinite(constant.grad).all() and torch.isfinite(other.grad).all()
    # Row 1, both constant: no gradient. Row 0: the ε-regularised −b'/ε with respect to the constant a.
    assert (constant.grad[1] == 0).all() and (other.grad == 0).all()
    torch.testing.assert_close(constant.grad[0], -(other[0] - other[0].mean()).detach() / 1e-8)


# ---------------------------------------------------------------------------
# Logit standardization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_logit_standardization_with_kl_is_kl_of_standardized_logits(shape):
    student, teacher = random_pair(shape, seed=25)
    for temperature in (1.0, 2.0):
        got = logit_standardization(student, teacher, temperature=temperature, reduction="none")
        want = kl(standardize_logits(student), standardize_logits(teacher), temperature=temperature,
                  reduction="none")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_logit_standardization_is_invariant_to_per_sample_shift_and_scale(shape):
    student, teacher = random_pair(shape, seed=26)
    generator = torch.Generator().manual_seed(27)
    position_shape = shape[:-1] + (1,)
    scale_s = 0.2 + 5 * torch.rand(position_shape, generator=generator, dtype=torch.float64)
    scale_t = 0.2 + 5 * torch.rand(position_shape, generator=generator, dtype=torch.float64)
    shift_s = 10 * torch.randn(position_shape, generator=generator, dtype=torch.float64)
    shift_t = 10 * torch.randn(position_shape, generator=generator, dtype=torch.float64)
    base = logit_standardization(student, teacher, temperature=2.0, reduction="none")
    moved = logit_standardization(scale_s * student + shift_s, scale_t * teacher + shift_t, temperature=2.0,
                                  reduction="none")
    torch.testing.assert_close(moved, base, rtol=1e-6, atol=1e-8)  # exact up to ε = 1e-7 against σ
    # Plain KL is not: the same maps change it.
    assert (kl(scale_s * student + shift_s, scale_t * teacher + shift_t, reduction="none") - kl(
        student, teacher, reduction="none")).abs().max() > 1e-2


def test_logit_standardization_passes_options_to_other_bases():
    student, teacher = random_pair((5, 6), seed=28)
    labels = random_labels((5,), 6, seed=29)
    got = logit_standardization(student, teacher, temperature=2.0, base="dkd", labels=labels, beta=2.0)
    want = dkd(standardize_logits(student), standardize_logits(teacher), labels=labels, temperature=2.0, beta=2.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = logit_standardization(student, teacher, base="skew_kl", skew=0.2, eps=1e-3)
    want = skew_kl(standardize_logits(student, eps=1e-3), standardize_logits(teacher, eps=1e-3), skew=0.2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad in ("no_such_loss", "cross_entropy", "logit_standardization", 3):
        with pytest.raises(KdlabError, match="base|unknown loss"):
            logit_standardization(student, teacher, base=bad)


def test_standardize_logits_of_a_constant_row_is_zero_with_zero_gradient():
    logits = torch.tensor([[2.0, 2.0, 2.0], [1.0, 2.0, 4.0]], requires_grad=True)
    out = standardize_logits(logits)
    out.sum().backward()
    assert (out[0] == 0).all() and torch.isfinite(logits.grad).all()
    with pytest.raises(KdlabError, match="eps"):
        standardize_logits(logits, eps=0.0)
    with pytest.raises(KdlabError, match="2 classes"):
        standardize_logits(torch.zeros(3, 1))


# ---------------------------------------------------------------------------
# Hinge and LogSum
# ---------------------------------------------------------------------------


def test_hinge_with_zero_margin_is_mse_and_large_margin_is_zero():
    student, teacher = random_pair((3, 4, 5), seed=30)
    torch.testing.assert_close(hinge_logits(student, teacher, temperature=2.0, reduction="none"),
                               mse_logits(student, teacher, temperature=2.0, reduction="none"), rtol=0, atol=0)
    assert hinge_logits(student, teacher, margin=1e3).item() == 0.0
    with pytest.raises(KdlabError, match="margin"):
        hinge_logits(student, teacher, margin=-0.1)


def test_logsum_batch_form_and_soft_maximum():
    student, teacher = random_pair((6, 8), seed=31)
    mask = random_mask((6,), seed=32)
    values = logsum(student, teacher, mask=mask, reduction="none")
    # The official loss, log Σ_{b,d} |d|⁴ over the whole (valid) batch, is logsumexp of the per-row values.
    difference = (student - teacher)[mask]
    torch.testing.assert_close(torch.logsumexp(values[mask], dim=0), torch.log(difference.abs().pow(4).sum()),
                               rtol=1e-12, atol=1e-12)
    # Soft maximum: p·log max|d| ≤ log Σ|d|^p ≤ p·log max|d| + log C.
    top = (student - teacher).abs().amax(-1).log()
    for power in (1.0, 4.0, 16.0):
        v = logsum(student, teacher, power=power, reduction="none")
        assert (v >= power * top - 1e-12).all() and (v <= power * top + math.log(8) + 1e-12).all()


def test_logsum_at_zero_difference_is_finite_with_zero_gradient():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], requires_grad=True)
    teacher = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 0.5]])
    values = logsum(student, teacher, reduction="none")
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(student.grad).all()
    assert (student.grad[0] == 0).all()
    # Row 1: only the middle entry differs (by ½): value 4·ln ½ (+ the two floors, ~1e-48), gradient 4/d there.
    assert values[1].item() == pytest.approx(4 * math.log(0.5), rel=1e-6)
    assert student.grad[1].tolist() == pytest.approx([0.0, 8.0, 0.0], rel=1e-6)
    # eps bounds it below: log(0 + eps).
    assert logsum(teacher, teacher, eps=1e-5).item() == pytest.approx(math.log(1e-5), rel=1e-6)


# ---------------------------------------------------------------------------
# Dtypes and extremes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("low_precision", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32_results(case, low_precision):
    _, name, temperature, options = case
    student, teacher = random_pair((4, 3, 16), seed=33, dtype=torch.float32)
    labels = random_labels((4, 3), 16, seed=34)
    student_low, teacher_low = student.to(low_precision), teacher.to(low_precision)
    s = student_low.clone().requires_grad_(True)
    value = call(name, s, teacher_low, labels=labels, temperature=temperature, **options)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert s.grad.dtype == low_precision and torch.isfinite(s.grad.float()).all()
    # Upcast happens before any arithmetic: same as feeding the rounded values in float32.
    torch.testing.assert_close(value, call(name, student_low.float(), teacher_low.float(), labels=labels,
                                           temperature=temperature, **options))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [0.1, 4.0])
def test_extreme_logits_stay_finite(case, temperature):
    _, name, _, options = case
    generator = torch.Generator().manual_seed(35)
    signs_s = torch.randint(0, 2, (4, 6), generator=generator) * 2 - 1
    signs_t = torch.randint(0, 2, (4, 6), generator=generator) * 2 - 1
    labels = random_labels((4,), 6, seed=36)
    for dtype in (torch.float32, torch.bfloat16):
        student = (1e4 * signs_s).to(dtype).requires_grad_(True)
        teacher = (1e4 * signs_t).to(dtype).requires_grad_(True)
        value = call(name, student, teacher, labels=labels, temperature=temperature, **options)
        value.backward()
        assert torch.isfinite(value)
        assert torch.isfinite(student.grad.float()).all() and torch.isfinite(teacher.grad.float()).all()


# ---------------------------------------------------------------------------
# Errors and registry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unknown_reduction_and_bad_shapes(case):
    _, name, _, options = case
    student, teacher = random_pair((2, 3), seed=37)
    labels = torch.tensor([0, 1])
    with pytest.raises(KdlabError, match="'batchmean', 'sum', 'none'"):
        call(name, student, teacher, labels=labels, reduction="mean", **options)
    with pytest.raises(KdlabError, match="shape"):
        call(name, student, teacher[:, :2], labels=labels, **options)
    with pytest.raises(KdlabError, match="temperature"):
        call(name, student, teacher, labels=labels, temperature=0.0, **options)
    with pytest.raises(KdlabError, match="mask"):
        call(name, student, teacher, labels=labels, mask=torch.ones(3, dtype=torch.bool), **options)


def test_bad_hyperparameters_raise_one_line_kdlab_errors():
    student, teacher = random_pair((2, 3), seed=38)
    bad_calls = [
        ("skew", lambda: skew_kl(student, teacher, skew=1.5)),
        ("skew", lambda: skew_kl(student, teacher, skew=-0.1)),
        ("beta", lambda: dist(student, teacher, beta=-1.0)),
        ("gamma", lambda: dist(student, teacher, gamma="x")),
        ("margin", lambda: hinge_logits(student, teacher, margin=float("inf"))),
        ("power", lambda: logsum(student, teacher, power=0.0)),
        ("eps", lambda: logsum(student, teacher, eps=-1.0)),
        ("eps", lambda: pearson_distance(student, teacher, eps=-1.0)),
        ("shapes", lambda: pearson_distance(student, teacher[:, :2])),
    ]
    for match, bad in bad_calls:
        with pytest.raises(KdlabError, match=match) as caught:
            bad()
        assert "\n" not in str(caught.value)


def test_losses_are_registered_with_their_kinds():
    for name in ("skew_kl", "dist", "logit_standardization", "hinge_logits", "logsum"):
        assert registry.get("loss", name) is FUNCTIONS[name]
        assert FUNCTIONS[name].loss_kind == "logit"
    # DKD needs labels, so it is not a plain "logit" loss (the generic contract skips it).
    assert registry.get("loss", "dkd") is dkd and dkd.loss_kind == "logit_label"
    logit_names = [n for n in registry.names("loss") if getattr(registry.get("loss", n), "loss_kind", None) == "logit"]
    assert "dkd" not in logit_names and "dist" in logit_names


def _official_dist_pearson(a, b, eps=1e-8):
    """The official DIST code's ρ, transcribed (hunto/image_classification_sota lib/models/losses/dist_kd.py):
    its own cosine_similarity adds eps to the product of the norms of the centred rows."""
    a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def test_pearson_distance_is_the_official_dist_form_not_torch_cosine_similarity():
    # Issue 17 item 3 asked for torch's cosine_similarity form; the official code (and mmrazor) add ε to
    # the product of the norms, which is what DIST's published numbers were computed with. Pinned here.
    u = torch.tensor([1e-5, -1e-5], dtype=torch.float64)
    official = 1.0 - 2e-10 / (2e-10 + 1e-8)  # ‖u'‖² = 2e-10
    assert pearson_distance(u, u).item() == pytest.approx(official, rel=1e-14)
    assert pearson_distance(u, u).item() == pytest.approx(0.980392156862745, rel=1e-12)
    assert pearson_distance(u, u, eps=0.0).item() == pytest.approx(0.0, abs=1e-15)  # the exact ρ = 1
    torch_form = 1.0 - torch.nn.functional.cosine_similarity(u, u, dim=0, eps=1e-8)
    assert torch_form.item() == pytest.approx(0.0, abs=1e-15)  # torchdistill's form: differs, documented
    # Rows spanning norms from 1e-7 to 1, where the two forms disagree most, against the transcription.
    gen = torch.Generator().manual_seed(31)
    scales = torch.logspace(-7, 0, 8, dtype=torch.float64)[:, None]
    a = torch.randn(8, 5, generator=gen, dtype=torch.float64) * scales
    b = torch.randn(8, 5, generator=gen, dtype=torch.float64) * scales.flip(0)
    torch.testing.assert_close(pearson_distance(a, b), 1.0 - _official_dist_pearson(a, b), rtol=1e-13, atol=1e-15)


def test_pearson_distance_gradient_matches_the_official_form_and_torch_cosine_at_eps_zero():
    gen = torch.Generator().manual_seed(32)
    a = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * 1e-4).requires_grad_(True)
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    got = torch.autograd.grad(pearson_distance(a, b).sum(), (a, b))
    want = torch.autograd.grad((1.0 - _official_dist_pearson(a, b)).sum(), (a, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)
    # With ε = 0 the distance is exactly 1 − cosine of the centred rows, gradients included.
    got = torch.autograd.grad(pearson_distance(a, b, eps=0.0).sum(), (a, b))
    centred = [x - x.mean(1, keepdim=True) for x in (a, b)]
    cosine = torch.nn.functional.cosine_similarity(*centred, dim=1, eps=1e-300)
    want = torch.autograd.grad((1.0 - cosine).sum(), (a, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
