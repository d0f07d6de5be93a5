"""Tests of kdlab.losses.divergences against independent float64 references.

The references below use plain Python ``math`` loops over positions and
classes, with probabilities formed directly (softmax with a max shift, KL as
Σ p·log(p/q) skipping p = 0, the JSD mixture M formed explicitly), i.e. a
different route than the implementation's log-space arithmetic.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, generalized_jsd, kl, mse_logits, reverse_kl, tvd

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


def ref_jsd(p, q, beta, scaled):
    if scaled and beta == 0:
        return ref_kl(p, q)
    if scaled and beta == 1:
        return ref_kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    value = beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    return value / (beta * (1 - beta)) if scaled else value


def ref_position(name, student_row, teacher_row, temperature, **options):
    """One position's loss value from raw logit rows (lists of floats)."""
    if name == "mse_logits":
        return sum(((s - t) / temperature) ** 2 for s, t in zip(student_row, teacher_row)) / len(student_row)
    q = ref_softmax(student_row, temperature)
    p = ref_softmax(teacher_row, temperature)
    if name == "kl":
        return temperature**2 * ref_kl(p, q)
    if name == "reverse_kl":
        return temperature**2 * ref_kl(q, p)
    if name == "generalized_jsd":
        return temperature**2 * ref_jsd(p, q, options.get("beta", 0.5), options.get("scaled", False))
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    raise AssertionError(name)


def ref_loss(name, student, teacher, *, temperature=1.0, mask=None, reduction="batchmean", **options):
    """Reference for a logit loss on numpy arrays of shape (..., C)."""
    num_classes = student.shape[-1]
    rows_s = np.asarray(student, dtype=np.float64).reshape(-1, num_classes)
    rows_t = np.asarray(teacher, dtype=np.float64).reshape(-1, num_classes)
    valid = np.ones(rows_s.shape[0], dtype=bool) if mask is None else np.asarray(mask).reshape(-1).astype(bool)
    values = np.zeros(rows_s.shape[0])
    for i in range(rows_s.shape[0]):
        if valid[i]:
            values[i] = ref_position(name, list(rows_s[i]), list(rows_t[i]), temperature, **options)
    if reduction == "none":
        return values.reshape(student.shape[:-1])
    if reduction == "sum":
        return values.sum()
    return values.sum() / max(int(valid.sum()), 1)


def ref_cross_entropy(logits, labels, *, label_smoothing=0.0, mask=None, reduction="batchmean"):
    num_classes = logits.shape[-1]
    rows = np.asarray(logits, dtype=np.float64).reshape(-1, num_classes)
    flat_labels = np.asarray(labels).reshape(-1)
    valid = np.ones(rows.shape[0], dtype=bool) if mask is None else np.asarray(mask).reshape(-1).astype(bool)
    values = np.zeros(rows.shape[0])
    for i in range(rows.shape[0]):
        if not valid[i]:
            continue
        q = ref_softmax(list(rows[i]), 1.0)
        for c in range(num_classes):
            target = (1 - label_smoothing) * (c == flat_labels[i]) + label_smoothing / num_classes
            values[i] -= target * math.log(q[c])
    if reduction == "none":
        return values.reshape(logits.shape[:-1])
    if reduction == "sum":
        return values.sum()
    return values.sum() / max(int(valid.sum()), 1)


LOGIT_LOSSES = {
    "kl": kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "tvd": tvd,
    "mse_logits": mse_logits,
}
SHAPES = [(5, 7), (3, 4, 6)]


def random_pair(shape, *, seed, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    teacher = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype)


def random_mask(position_shape, *, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(position_shape, generator=generator) < 0.6
    mask.view(-1)[0] = True  # at least one valid position
    mask.view(-1)[-1] = False  # at least one masked position
    return mask


# ---------------------------------------------------------------------------
# Values against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_logit_loss_matches_float64_reference(name, shape, temperature, reduction):
    student, teacher = random_pair(shape, seed=len(shape) * 10 + int(temperature * 2))
    got = LOGIT_LOSSES[name](student, teacher, temperature=temperature, reduction=reduction)
    want = ref_loss(name, student.numpy(), teacher.numpy(), temperature=temperature, reduction=reduction)
    assert got.dtype == torch.float64
    assert tuple(got.shape) == (shape[:-1] if reduction == "none" else ())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_float32_inputs_match_reference(name):
    student, teacher = random_pair((6, 9), seed=1, dtype=torch.float32)
    got = LOGIT_LOSSES[name](student, teacher, temperature=2.0)
    want = ref_loss(name, student.double().numpy(), teacher.double().numpy(), temperature=2.0)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_generalized_jsd_matches_reference_over_beta(beta, scaled, shape):
    student, teacher = random_pair(shape, seed=7)
    got = generalized_jsd(student, teacher, temperature=1.5, beta=beta, scaled=scaled, reduction="none")
    want = ref_loss("generalized_jsd", student.numpy(), teacher.numpy(), temperature=1.5, reduction="none",
                    beta=beta, scaled=scaled)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_cross_entropy_matches_reference(shape, label_smoothing, reduction):
    logits, _ = random_pair(shape, seed=3)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(4))
    got = cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    want = ref_cross_entropy(logits.numpy(), labels.numpy(), label_smoothing=label_smoothing, reduction=reduction)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_cross_entropy_agrees_with_torch_label_smoothing():
    logits, _ = random_pair((8, 5), seed=11)
    labels = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(12))
    got = cross_entropy(logits, labels, label_smoothing=0.2)
    want = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Hand-worked examples (2 classes)
# ---------------------------------------------------------------------------

# Teacher logits (0, 0) -> p = (1/2, 1/2); student logits (0, ln 3) -> q = (1/4, 3/4).
TEACHER_2 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
STUDENT_2 = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)


def test_hand_worked_kl():
    # KL(p‖q) = ½·ln(½ / ¼) + ½·ln(½ / ¾) = ½·ln 2 + ½·ln(2/3) = ½·ln(4/3) ≈ 0.143841
    assert kl(STUDENT_2, TEACHER_2).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    # T = 2: q = softmax(0, ln√3) = (1, √3)/(1 + √3); p stays uniform.
    # KL = ½·ln(½/q0) + ½·ln(½/q1) = ½·ln(¼ / (q0·q1)), q0·q1 = √3/(1+√3)² = √3/(4 + 2√3)
    #    = ½·ln((2 + √3)/(2√3)) = ½·ln(½ + 1/√3);  times T² = 4  ->  2·ln(½ + 1/√3) ≈ 0.149017
    assert kl(STUDENT_2, TEACHER_2, temperature=2.0).item() == pytest.approx(
        2 * math.log(0.5 + 1 / math.sqrt(3)), rel=1e-12
    )


def test_hand_worked_reverse_kl():
    # KL(q‖p) = ¼·ln(¼ / ½) + ¾·ln(¾ / ½) = −¼·ln 2 + ¾·ln(3/2) ≈ 0.130812
    want = -0.25 * math.log(2) + 0.75 * math.log(1.5)
    assert reverse_kl(STUDENT_2, TEACHER_2).item() == pytest.approx(want, rel=1e-12)


def test_hand_worked_generalized_jsd():
    # β = ½: M = (⅜, ⅝).
    # KL(p‖M) = ½·ln(½/⅜) + ½·ln(½/⅝) = ½·ln(4/3) + ½·ln(4/5) = ½·ln(16/15)
    # KL(q‖M) = ¼·ln(¼/⅜) + ¾·ln(¾/⅝) = ¼·ln(2/3) + ¾·ln(6/5)
    # JSD = ½·KL(p‖M) + ½·KL(q‖M) = ¼·ln(16/15) + ⅛·ln(2/3) + ⅜·ln(6/5) ≈ 0.033822
    want = 0.25 * math.log(16 / 15) + 0.125 * math.log(2 / 3) + 0.375 * math.log(6 / 5)
    assert generalized_jsd(STUDENT_2, TEACHER_2).item() == pytest.approx(want, rel=1e-12)
    # scaled: divide by β(1−β) = ¼
    assert generalized_jsd(STUDENT_2, TEACHER_2, scaled=True).item() == pytest.approx(4 * want, rel=1e-12)
    # β = 0 and β = 1: exactly 0 unscaled; scaled gives KL(p‖q) and KL(q‖p) from the examples above.
    assert generalized_jsd(STUDENT_2, TEACHER_2, beta=0.0).item() == 0.0
    assert generalized_jsd(STUDENT_2, TEACHER_2, beta=1.0).item() == 0.0
    assert generalized_jsd(STUDENT_2, TEACHER_2, beta=0.0, scaled=True).item() == pytest.approx(
        0.5 * math.log(4 / 3), rel=1e-12
    )
    assert generalized_jsd(STUDENT_2, TEACHER_2, beta=1.0, scaled=True).item() == pytest.approx(
        -0.25 * math.log(2) + 0.75 * math.log(1.5), rel=1e-12
    )


def test_hand_worked_tvd():
    # ½·(|½ − ¼| + |½ − ¾|) = ½·(¼ + ¼) = ¼
    assert tvd(STUDENT_2, TEACHER_2).item() == pytest.approx(0.25, rel=1e-12)


def test_hand_worked_mse_logits():
    # z_s − z_t = (0, ln 3): mean of squares = (ln 3)²/2 ≈ 0.603474; T = 2 halves both: (ln 3)²/8
    assert mse_logits(STUDENT_2, TEACHER_2).item() == pytest.approx(math.log(3) ** 2 / 2, rel=1e-12)
    assert mse_logits(STUDENT_2, TEACHER_2, temperature=2.0).item() == pytest.approx(math.log(3) ** 2 / 8, rel=1e-12)


def test_hand_worked_cross_entropy():
    labels = torch.tensor([1])
    # q = (¼, ¾), y = 1: −ln ¾ ≈ 0.287682
    assert cross_entropy(STUDENT_2, labels).item() == pytest.approx(-math.log(0.75), rel=1e-12)
    # ε = 0.1, C = 2: target = 0.9·(0, 1) + 0.05 = (0.05, 0.95)
    # −(0.05·ln ¼ + 0.95·ln ¾) = 0.05·1.386294 + 0.95·0.287682 ≈ 0.342613
    want = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75))
    assert cross_entropy(STUDENT_2, labels, label_smoothing=0.1).item() == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------

GRADCHECK_CASES = [
    ("kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.3}),
    ("generalized_jsd", {"beta": 0.3, "scaled": True}),
    ("generalized_jsd", {"beta": 0.0, "scaled": True}),
    ("generalized_jsd", {"beta": 1.0, "scaled": True}),
    ("generalized_jsd", {"beta": 0.0}),
    ("tvd", {}),
    ("mse_logits", {}),
]


@pytest.mark.parametrize("name,options", GRADCHECK_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(name, options, masked):
    student, teacher = random_pair((2, 3, 4), seed=5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    mask = random_mask((2, 3), seed=6) if masked else None
    fn = LOGIT_LOSSES[name]
    for reduction in ("batchmean", "none"):
        assert torch.autograd.gradcheck(
            lambda s, t: fn(s, t, temperature=1.7, mask=mask, reduction=reduction, **options), (student, teacher)
        )


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_cross_entropy(masked):
    logits, _ = random_pair((2, 3, 4), seed=8)
    logits.requires_grad_(True)
    labels = torch.randint(0, 4, (2, 3), generator=torch.Generator().manual_seed(9))
    mask = random_mask((2, 3), seed=10) if masked else None
    assert torch.autograd.gradcheck(
        lambda z: cross_entropy(z, labels, label_smoothing=0.1, mask=mask, reduction="batchmean"), (logits,)
    )


def test_temperature_squared_keeps_kl_gradient_scale_but_tvd_decays_like_one_over_t():
    # Hinton §2: at high T the soft-target gradient scales as 1/T², so T²·KL has a
    # T-independent gradient; TVD's sign factor does not shrink, so its gradient ~ 1/T.
    student, teacher = random_pair((16, 10), seed=21, scale=1.0)

    def grad_norm(fn, temperature):
        s = student.clone().requires_grad_(True)
        fn(s, teacher, temperature=temperature).backward()
        return s.grad.norm().item()

    assert grad_norm(kl, 100.0) / grad_norm(kl, 200.0) == pytest.approx(1.0, rel=0.02)
    assert grad_norm(tvd, 100.0) / grad_norm(tvd, 200.0) == pytest.approx(2.0, rel=0.02)


# ---------------------------------------------------------------------------
# Masks and reductions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_mask_ignores_positions_and_nan_garbage(name):
    fn = LOGIT_LOSSES[name]
    student, teacher = random_pair((3, 5, 4), seed=12)
    mask = random_mask((3, 5), seed=13)
    garbage_student = student.clone()
    garbage_teacher = teacher.clone()
    garbage_student[~mask] = float("nan")
    garbage_teacher[~mask] = float("inf")
    garbage_teacher[~mask, 0] = float("-inf")
    s = garbage_student.requires_grad_(True)
    t = garbage_teacher.requires_grad_(True)
    value = fn(s, t, temperature=2.0, mask=mask)
    value.backward()
    # Same as the loss over the valid rows only, taken as a flat (K, C) batch.
    s_valid = student[mask].clone().requires_grad_(True)
    t_valid = teacher[mask].clone().requires_grad_(True)
    want = fn(s_valid, t_valid, temperature=2.0)
    want.backward()
    assert torch.isfinite(value)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad[~mask] == 0).all() and (t.grad[~mask] == 0).all()
    torch.testing.assert_close(s.grad[mask], s_valid.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.grad[mask], t_valid.grad, rtol=1e-12, atol=1e-12)
    # Reference with the mask (the clean logits; masked rows are never read).
    np.testing.assert_allclose(
        value.item(), ref_loss(name, student.numpy(), teacher.numpy(), temperature=2.0, mask=mask.numpy()), rtol=1e-10
    )


def test_cross_entropy_mask_ignores_nan_logits_and_padding_labels():
    logits, _ = random_pair((3, 5, 4), seed=14)
    labels = torch.randint(0, 4, (3, 5), generator=torch.Generator().manual_seed(15))
    mask = random_mask((3, 5), seed=16)
    garbage = logits.clone()
    garbage[~mask] = float("nan")
    padded_labels = torch.where(mask, labels, torch.full_like(labels, -100))
    z = garbage.requires_grad_(True)
    value = cross_entropy(z, padded_labels, label_smoothing=0.1, mask=mask)
    value.backward()
    want = ref_cross_entropy(logits.numpy(), labels.numpy(), label_smoothing=0.1, mask=mask.numpy())
    np.testing.assert_allclose(value.item(), want, rtol=1e-10)
    assert torch.isfinite(z.grad).all() and (z.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_reductions_are_consistent(name):
    fn = LOGIT_LOSSES[name]
    student, teacher = random_pair((3, 4, 5), seed=17)
    mask = random_mask((3, 4), seed=18)
    per_position = fn(student, teacher, mask=mask, reduction="none")
    assert per_position.shape == (3, 4)
    assert (per_position[~mask] == 0).all()
    total = fn(student, teacher, mask=mask, reduction="sum")
    mean = fn(student, teacher, mask=mask, reduction="batchmean")
    torch.testing.assert_close(total, per_position.sum())
    torch.testing.assert_close(mean, total / mask.sum())
    # Without a mask a (N, L, C) batch is averaged over all N·L positions.
    unmasked = fn(student, teacher, reduction="none")
    torch.testing.assert_close(fn(student, teacher), unmasked.sum() / 12)
    # A 0/1 float mask means the same as the bool mask.
    torch.testing.assert_close(fn(student, teacher, mask=mask.double()), mean)
    # An all-masked batch gives 0, not NaN.
    assert fn(student, teacher, mask=torch.zeros(3, 4, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_kl_of_identical_distributions_is_zero_and_kl_is_nonnegative(temperature):
    student, teacher = random_pair((64, 10), seed=19, dtype=torch.float32)
    for fn in (kl, reverse_kl, generalized_jsd, tvd):
        assert fn(teacher, teacher, temperature=temperature).item() == 0.0
        values = fn(student, teacher, temperature=temperature, reduction="none")
        assert (values >= 0).all()


def test_tensor_temperature_is_differentiable():
    # A learned temperature (0-dim tensor) gets a gradient through both 1/T and T².
    student, teacher = random_pair((4, 5), seed=31)
    temperature = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    value = kl(student, teacher, temperature=temperature)
    torch.testing.assert_close(value, kl(student, teacher, temperature=2.0))
    value.backward()
    assert temperature.grad is not None and torch.isfinite(temperature.grad)
    assert torch.autograd.gradcheck(lambda t: kl(student, teacher, temperature=t), (temperature,))


def test_kl_is_invariant_to_a_constant_logit_shift():
    student, teacher = random_pair((5, 6), seed=20)
    torch.testing.assert_close(kl(student + 7.0, teacher - 3.0), kl(student, teacher))


def test_jsd_is_symmetric_at_half_and_bounded_by_log_two():
    student, teacher = random_pair((50, 8), seed=22, scale=5.0)
    torch.testing.assert_close(generalized_jsd(student, teacher), generalized_jsd(teacher, student))
    assert (generalized_jsd(student, teacher, reduction="none") <= math.log(2)).all()
    # Disjoint supports attain the bound log 2.
    far_student = torch.tensor([[1e4, -1e4, 0.0]])
    far_teacher = torch.tensor([[-1e4, 1e4, 0.0]])
    assert generalized_jsd(far_student, far_teacher).item() == pytest.approx(math.log(2), rel=1e-6)


def test_tvd_is_in_unit_interval_and_reaches_one():
    student, teacher = random_pair((100, 5), seed=23, scale=10.0)
    values = tvd(student, teacher, reduction="none")
    assert (values >= 0).all() and (values <= 1).all()
    assert tvd(torch.tensor([[1e4, 0.0]]), torch.tensor([[0.0, 1e4]])).item() == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_jsd_limits(dtype):
    # Small β: with M = Q + β(P − Q), KL(P‖M) = KL(P‖Q) + O(β) and KL(Q‖M) = β²/2·χ²(P‖Q) + O(β³),
    # so JSD(β)/(β(1−β)) → KL(P‖Q) = KL(teacher‖student) = kl(); β → 1 mirrors it (β ↔ 1−β,
    # P ↔ Q): → KL(Q‖P) = KL(student‖teacher) = reverse_kl(). A flat student and a peaked
    # teacher make the two KLs far apart, so landing on the wrong one would show.
    generator = torch.Generator().manual_seed(24)
    flat = 0.5 * torch.randn(6, 5, generator=generator, dtype=torch.float64)
    peaked = 4.0 * torch.randn(6, 5, generator=generator, dtype=torch.float64)
    flat, peaked = flat.to(dtype), peaked.to(dtype)
    for student, teacher in ((flat, peaked), (peaked, flat)):
        forward = kl(student, teacher).item()
        reverse = reverse_kl(student, teacher).item()
        assert abs(forward - reverse) > 0.5 * min(forward, reverse)
        at_zero = generalized_jsd(student, teacher, beta=0.0, scaled=True).item()
        at_one = generalized_jsd(student, teacher, beta=1.0, scaled=True).item()
        assert at_zero == pytest.approx(forward, rel=1e-6)
        assert at_one == pytest.approx(reverse, rel=1e-6)
        # Approach from inside: the gap to the end value shrinks as β nears the end.
        steps = (1e-2, 1e-4, 1e-8)
        gaps = [abs(generalized_jsd(student, teacher, beta=b, scaled=True).item() - at_zero) for b in steps]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 * at_zero
        gaps = [abs(generalized_jsd(student, teacher, beta=1 - b, scaled=True).item() - at_one) for b in steps]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 * at_one
    # Convergence is O(β) with coefficient ~ χ²: fast where the limit KL's second argument
    # is flat (KL(peaked‖flat)), slow where it has tiny probabilities under the other's
    # mass — hence 1e-8 above. The well-conditioned ends are close already at 1e-4:
    near_zero = generalized_jsd(flat, peaked, beta=1e-4, scaled=True).item()
    assert near_zero == pytest.approx(kl(flat, peaked).item(), rel=1e-3)
    # The well-conditioned β → 1 case (peaked student, flat teacher) is close already at 1 − 1e-4.
    near_one = generalized_jsd(peaked, flat, beta=1 - 1e-4, scaled=True).item()
    assert near_one == pytest.approx(reverse_kl(peaked, flat).item(), rel=1e-3)


def test_unscaled_jsd_vanishes_linearly_at_the_ends():
    student, teacher = random_pair((6, 5), seed=25)
    forward = kl(student, teacher).item()
    value = generalized_jsd(student, teacher, beta=1e-6).item()
    assert value == pytest.approx(1e-6 * forward, rel=1e-4)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@pytest.mark.parametrize("low_precision", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32_results(name, low_precision):
    fn = LOGIT_LOSSES[name]
    student, teacher = random_pair((4, 3, 16), seed=26, dtype=torch.float32)
    student_low, teacher_low = student.to(low_precision), teacher.to(low_precision)
    s = student_low.clone().requires_grad_(True)
    value = fn(s, teacher_low, temperature=2.0)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert s.grad.dtype == low_precision and torch.isfinite(s.grad.float()).all()
    # Upcast happens before any arithmetic: same as feeding the rounded values in float32 ...
    torch.testing.assert_close(value, fn(student_low.float(), teacher_low.float(), temperature=2.0))
    # ... and close to the float32 result (the difference is only the input rounding).
    torch.testing.assert_close(value, fn(student, teacher, temperature=2.0), rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0])
def test_extreme_logits_stay_finite(name, dtype, temperature):
    fn = LOGIT_LOSSES[name]
    generator = torch.Generator().manual_seed(27)
    signs_s = torch.randint(0, 2, (4, 6), generator=generator) * 2 - 1
    signs_t = torch.randint(0, 2, (4, 6), generator=generator) * 2 - 1
    student = (1e4 * signs_s).to(dtype).requires_grad_(True)
    teacher = (1e4 * signs_t).to(dtype).requires_grad_(True)
    value = fn(student, teacher, temperature=temperature)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad.float()).all() and torch.isfinite(teacher.grad.float()).all()


def test_extreme_logits_cross_entropy_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], requires_grad=True)
    value = cross_entropy(logits, torch.tensor([1, 2]), label_smoothing=0.1)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    # Row 1 puts its label at probability 1: −ln 1 = 0; row 0 misses by 1e4 nats: −log q_1 = 2e4.
    assert cross_entropy(logits.detach(), torch.tensor([1, 2]), reduction="none").tolist() == [2e4, 0.0]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_unknown_reduction_names_the_allowed_values(name):
    student, teacher = random_pair((2, 3), seed=28)
    with pytest.raises(KdlabError, match="'batchmean', 'sum', 'none'"):
        LOGIT_LOSSES[name](student, teacher, reduction="mean")
    with pytest.raises(KdlabError, match="reduction"):
        cross_entropy(student, torch.tensor([0, 1]), reduction="mean")


def test_bad_inputs_raise_kdlab_error():
    student, teacher = random_pair((2, 3), seed=29)
    with pytest.raises(KdlabError, match="beta"):
        generalized_jsd(student, teacher, beta=1.5)
    with pytest.raises(KdlabError, match="beta"):
        generalized_jsd(student, teacher, beta=-0.1)
    with pytest.raises(KdlabError, match="temperature"):
        kl(student, teacher, temperature=0.0)
    with pytest.raises(KdlabError, match="temperature"):
        kl(student, teacher, temperature=float("nan"))
    with pytest.raises(KdlabError, match="shape"):
        kl(student, teacher[:, :2])
    with pytest.raises(KdlabError, match="mask"):
        kl(student, teacher, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(KdlabError, match=r"\(N, C\)"):
        tvd(student[0], teacher[0])
    with pytest.raises(KdlabError, match="labels"):
        cross_entropy(student, torch.tensor([0, 3]))
    with pytest.raises(KdlabError, match="labels"):
        cross_entropy(student, torch.tensor([0.0, 1.0]))
    with pytest.raises(KdlabError, match="label_smoothing"):
        cross_entropy(student, torch.tensor([0, 1]), label_smoothing=2.0)
    with pytest.raises(KdlabError) as caught:
        kl(student, teacher, temperature=-1.0)
    assert "\n" not in str(caught.value)  # one line


# ---------------------------------------------------------------------------
# Registry contract: every registered logit loss
# ---------------------------------------------------------------------------


def registered_logit_losses():
    names = registry.names("loss")
    return [name for name in names if getattr(registry.get("loss", name), "loss_kind", None) == "logit"]


def test_builtin_losses_are_registered_with_their_kind():
    assert set(LOGIT_LOSSES) <= set(registered_logit_losses())
    assert registry.get("loss", "cross_entropy").loss_kind == "label"
    assert registry.get("loss", "kl") is kl


@pytest.mark.parametrize("name", registered_logit_losses())
@pytest.mark.parametrize("shape", SHAPES)
def test_logit_loss_contract(name, shape):
    fn = registry.get("loss", name)
    student, teacher = random_pair(shape, seed=30, dtype=torch.float32)
    student.requires_grad_(True)
    value = fn(student, teacher, temperature=2.0, mask=None, reduction="batchmean")
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert fn(student, teacher, reduction="none").shape == shape[:-1]
    assert fn(student, teacher, reduction="sum").shape == ()
