"""Tests of kdlab.losses.sequence against independent float64 references.

The references use plain Python ``math`` loops over sequences, positions and
vocabulary entries, with probabilities formed directly (softmax with a max
shift, KL as Σ a·log(a/b) skipping a = 0, mixtures formed explicitly over
probabilities), i.e. a different route than the implementation's log-space
arithmetic.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.losses import divergences, logit
from kdlab.losses.sequence import (
    DIVERGENCES,
    SequenceDivergenceError,
    count_denominator,
    response_mask,
    sequence_divergence,
    shift_logits_and_mask,
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


def ref_mix(a, b, weight_a):
    return [weight_a * x + (1 - weight_a) * y for x, y in zip(a, b)]


def ref_token(divergence, student_row, teacher_row, *, beta=0.5, scaled=False, skew=0.1, ts=1.0, tt=1.0):
    q = ref_softmax(student_row, ts)
    p = ref_softmax(teacher_row, tt)
    if divergence == "forward_kl":
        return ref_kl(p, q)
    if divergence == "reverse_kl":
        return ref_kl(q, p)
    if divergence == "jsd":
        if beta == 0:
            return ref_kl(p, q)
        if beta == 1:
            return ref_kl(q, p)
        m = ref_mix(p, q, beta)
        value = beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
        return value / (beta * (1 - beta)) if scaled else value
    if divergence == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if divergence == "skew_kl":
        return ref_kl(p, ref_mix(p, q, skew))
    if divergence == "skew_reverse_kl":
        return ref_kl(q, ref_mix(q, p, skew))
    raise AssertionError(divergence)


def ref_sequence_divergence(student, teacher, mask, *, reduction="token", **options):
    """Reference on numpy arrays: student/teacher (B, T, V), mask (B, T)."""
    batch, length, _ = student.shape
    token_sum, token_count, sequence_means = 0.0, 0, []
    for b in range(batch):
        values = [ref_token(options.get("divergence", "forward_kl"), list(student[b, t]), list(teacher[b, t]),
                            **{k: v for k, v in options.items() if k != "divergence"})
                  for t in range(length) if mask[b, t]]
        token_sum += sum(values)
        token_count += len(values)
        if values:
            sequence_means.append(sum(values) / len(values))
    if reduction == "token":
        return token_sum / max(token_count, 1)
    return sum(sequence_means) / max(len(sequence_means), 1)


def random_logits(shape, *, seed, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    teacher = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype)


def ragged_mask(lengths_and_starts, length):
    """(B, T) mask, row b True on [start, start + n) (a prompt before, padding after)."""
    mask = torch.zeros(len(lengths_and_starts), length, dtype=torch.bool)
    for b, (start, n) in enumerate(lengths_and_starts):
        mask[b, start:start + n] = True
    return mask


SHAPE = (3, 5, 6)
MASK = ragged_mask([(1, 4), (0, 2), (2, 3)], 5)  # unequal lengths 4, 2, 3


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


# ---------------------------------------------------------------------------
# Values against the reference
# ---------------------------------------------------------------------------

OPTION_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("tvd", {}),
    ("skew_kl", {"skew": 0.1}),
    ("skew_kl", {"skew": 0.0}),
    ("skew_reverse_kl", {"skew": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
    ("jsd", {"beta": 0.1, "scaled": True}),
    ("jsd", {"beta": 0.9, "scaled": True}),
]


@pytest.mark.parametrize("divergence,options", OPTION_CASES)
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("ts,tt", [(1.0, 1.0), (2.0, 0.5)])
def test_matches_float64_reference(divergence, options, reduction, ts, tt):
    student, teacher = random_logits(SHAPE, seed=5)
    got = sequence_divergence(student, teacher, MASK, divergence=divergence, reduction=reduction,
                              student_temperature=ts, teacher_temperature=tt, **options)
    want = ref_sequence_divergence(student.numpy(), teacher.numpy(), MASK.numpy(), reduction=reduction,
                                   divergence=divergence, ts=ts, tt=tt, **options)
    assert got.dtype == torch.float64 and got.shape == ()
    np.testing.assert_allclose(got.item(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float32_and_bfloat16_inputs(divergence):
    student, teacher = random_logits(SHAPE, seed=6, dtype=torch.float32)
    want = ref_sequence_divergence(student.double().numpy(), teacher.double().numpy(), MASK.numpy(),
                                   divergence=divergence, ts=1.5, tt=1.5)
    got = sequence_divergence(student, teacher, MASK, divergence=divergence, student_temperature=1.5,
                              teacher_temperature=1.5)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), want, rtol=2e-5, atol=1e-6)
    low = sequence_divergence(student.bfloat16(), teacher.bfloat16(), MASK, divergence=divergence)
    assert low.dtype == torch.float32  # computed in float32, not bf16


def test_no_temperature_squared_factor_and_agreement_with_logit_losses():
    student, teacher = random_logits(SHAPE, seed=8)
    common = dict(student_temperature=2.0, teacher_temperature=2.0)
    # The logit losses multiply by T²; here there is no such factor.
    kl = sequence_divergence(student, teacher, MASK, divergence="forward_kl", **common)
    torch.testing.assert_close(kl * 4, divergences.kl(student, teacher, temperature=2.0, mask=MASK))
    rkl = sequence_divergence(student, teacher, MASK, divergence="reverse_kl", **common)
    torch.testing.assert_close(rkl * 4, divergences.reverse_kl(student, teacher, temperature=2.0, mask=MASK))
    for scaled in (False, True):
        jsd = sequence_divergence(student, teacher, MASK, divergence="jsd", beta=0.3, scaled=scaled, **common)
        want = divergences.generalized_jsd(student, teacher, temperature=2.0, mask=MASK, beta=0.3, scaled=scaled)
        torch.testing.assert_close(jsd * 4, want)
    tvd = sequence_divergence(student, teacher, MASK, divergence="tvd", **common)
    torch.testing.assert_close(tvd, divergences.tvd(student, teacher, temperature=2.0, mask=MASK))
    for name, reverse in (("skew_kl", False), ("skew_reverse_kl", True)):
        value = sequence_divergence(student, teacher, MASK, divergence=name, skew=0.2, **common)
        want = logit.skew_kl(student, teacher, temperature=2.0, mask=MASK, skew=0.2, reverse=reverse)
        torch.testing.assert_close(value * 4, want)


# ---------------------------------------------------------------------------
# Generalized JSD: limits and symmetry
# ---------------------------------------------------------------------------


def test_jsd_ends_are_exactly_forward_and_reverse_kl():
    student, teacher = random_logits(SHAPE, seed=9)
    for scaled in (False, True):
        assert torch.equal(sequence_divergence(student, teacher, MASK, divergence="jsd", beta=0.0, scaled=scaled),
                           sequence_divergence(student, teacher, MASK, divergence="forward_kl"))
        assert torch.equal(sequence_divergence(student, teacher, MASK, divergence="jsd", beta=1.0, scaled=scaled),
                           sequence_divergence(student, teacher, MASK, divergence="reverse_kl"))


def test_scaled_jsd_approaches_the_kls_and_unscaled_interior_vanishes():
    # The gap closes linearly in β (its constant grows with χ²(P‖Q), hence moderate logits here).
    student, teacher = random_logits(SHAPE, seed=10, scale=1.0)
    forward = sequence_divergence(student, teacher, MASK, divergence="forward_kl").item()
    reverse = sequence_divergence(student, teacher, MASK, divergence="reverse_kl").item()
    for epsilon, rel in ((1e-4, 1e-3), (1e-6, 1e-5)):
        near0 = sequence_divergence(student, teacher, MASK, divergence="jsd", beta=epsilon, scaled=True).item()
        near1 = sequence_divergence(student, teacher, MASK, divergence="jsd", beta=1 - epsilon, scaled=True).item()
        assert near0 == pytest.approx(forward, rel=rel)
        assert near1 == pytest.approx(reverse, rel=rel)
    # The paper's unscaled interior is ≈ β·KL(P‖Q) near β = 0: the jump to the β = 0 branch is documented.
    unscaled = sequence_divergence(student, teacher, MASK, divergence="jsd", beta=1e-4).item()
    assert unscaled == pytest.approx(1e-4 * forward, rel=1e-2)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_jsd_swapping_teacher_and_student_mirrors_beta(beta, reduction):
    student, teacher = random_logits(SHAPE, seed=11)
    a = sequence_divergence(student, teacher, MASK, divergence="jsd", beta=beta, reduction=reduction,
                            student_temperature=1.3, teacher_temperature=0.7)
    b = sequence_divergence(teacher, student, MASK, divergence="jsd", beta=1.0 - beta, reduction=reduction,
                            student_temperature=0.7, teacher_temperature=1.3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_masked_positions_affect_neither_value_nor_gradient(divergence, chunk_size, reduction):
    student, teacher = random_logits(SHAPE, seed=12)
    poisoned_s, poisoned_t = student.clone(), teacher.clone()
    poisoned_s[~MASK] = torch.tensor([math.nan, math.inf, -math.inf, 1e30, 0.0, 5.0], dtype=torch.float64)
    poisoned_t[~MASK] = torch.tensor([math.inf, math.nan, 3.0, -math.inf, 1e30, 0.0], dtype=torch.float64)
    results = []
    for s, t in ((student, teacher), (poisoned_s, poisoned_t)):
        s, t = s.requires_grad_(), t.requires_grad_()
        loss = sequence_divergence(s, t, MASK, divergence=divergence, reduction=reduction, chunk_size=chunk_size)
        results.append((loss, *grads(loss, s, t)))
    for clean, poisoned in zip(*results):
        assert torch.isfinite(poisoned).all()
        torch.testing.assert_close(clean, poisoned, rtol=0, atol=0)
    assert (results[1][1][~MASK] == 0).all() and (results[1][2][~MASK] == 0).all()


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_all_masked_gives_zero_and_zero_gradient(reduction, chunk_size):
    student, teacher = random_logits(SHAPE, seed=13)
    student[0, 0, 0] = math.nan
    student.requires_grad_()
    mask = torch.zeros(SHAPE[:2], dtype=torch.bool)
    for denominator in (None, 0, count_denominator(mask, reduction)):
        loss = sequence_divergence(student, teacher, mask, divergence="jsd", reduction=reduction,
                                   chunk_size=chunk_size, denominator=denominator)
        (grad,) = grads(loss, student)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


def test_mask_none_means_all_positions_and_01_masks_work():
    student, teacher = random_logits(SHAPE, seed=14)
    full = torch.ones(SHAPE[:2], dtype=torch.bool)
    torch.testing.assert_close(sequence_divergence(student, teacher, None),
                               sequence_divergence(student, teacher, full))
    torch.testing.assert_close(sequence_divergence(student, teacher, None, reduction="sequence"),
                               sequence_divergence(student, teacher, full, reduction="sequence"))
    torch.testing.assert_close(sequence_divergence(student, teacher, MASK.long()),
                               sequence_divergence(student, teacher, MASK))


# ---------------------------------------------------------------------------
# Reductions and micro-batches
# ---------------------------------------------------------------------------


def test_token_versus_sequence_reduction_by_hand():
    # V = 2. Teacher logits (0, 0) -> P = (1/2, 1/2). Student (0, ln 3) -> Q = (1/4, 3/4), so
    # KL(P‖Q) = ½·ln(½/¼) + ½·ln(½/¾) = ½·ln(4/3) =: k; student (0, 0) -> Q = P, KL = 0.
    k = 0.5 * math.log(4 / 3)
    off, on = [0.0, math.log(3.0)], [0.0, 0.0]
    student = torch.tensor([
        [on, off, off, off],  # prompt, then 3 valid tokens of value k each
        [on, on, on, on],  # 1 valid token of value 0, then padding
        [off, off, off, off],  # no valid token: excluded from the sequence mean
    ], dtype=torch.float64)
    teacher = torch.zeros_like(student)
    mask = ragged_mask([(1, 3), (0, 1), (0, 0)], 4)
    token = sequence_divergence(student, teacher, mask, reduction="token")
    sequence = sequence_divergence(student, teacher, mask, reduction="sequence")
    assert token.item() == pytest.approx(3 * k / 4, rel=1e-12)  # 4 valid tokens: (k + k + k + 0) / 4
    assert sequence.item() == pytest.approx((k + 0.0) / 2, rel=1e-12)  # sequence means k and 0, 2 sequences
    assert count_denominator(mask, "token") == 4
    assert count_denominator(mask, "sequence") == 2


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_micro_batches_with_full_denominator_sum_to_full_batch(reduction, chunk_size):
    student, teacher = random_logits((6, 5, 4), seed=15)
    mask = ragged_mask([(1, 4), (0, 2), (2, 3), (0, 0), (0, 5), (3, 1)], 5)  # one empty sequence
    options = dict(divergence="jsd", beta=0.3, reduction=reduction, chunk_size=chunk_size)
    s_full = student.clone().requires_grad_()
    full = sequence_divergence(s_full, teacher, mask, **options)
    (full_grad,) = grads(full, s_full)

    denominator = count_denominator(mask, reduction)
    assert denominator == (15 if reduction == "token" else 5)
    total, micro_grads, start = 0.0, [], 0
    for size in (2, 3, 1):
        part = slice(start, start + size)
        s = student[part].clone().requires_grad_()
        loss = sequence_divergence(s, teacher[part], mask[part], denominator=denominator, **options)
        micro_grads.append(grads(loss, s)[0])
        total = total + loss
        start += size
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat(micro_grads), full_grad, rtol=1e-12, atol=1e-14)
    # A tensor denominator gives the same.
    tensor_denominator = sequence_divergence(student, teacher, mask, denominator=torch.tensor(denominator), **options)
    torch.testing.assert_close(tensor_denominator, full.detach(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,options", [
    ("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.4}), ("jsd", {"beta": 0.2, "scaled": True}),
    ("tvd", {}), ("skew_kl", {}), ("skew_reverse_kl", {}),
])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_chunked_equals_unchunked(divergence, options, reduction):
    student, teacher = random_logits(SHAPE, seed=16)
    length = SHAPE[1]
    results = {}
    for chunk_size in (None, 1, 3, length, length + 4):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        loss = sequence_divergence(s, t, MASK, divergence=divergence, reduction=reduction, chunk_size=chunk_size,
                                   student_temperature=1.2, teacher_temperature=0.8, **options)
        results[chunk_size] = (loss, *grads(loss, s, t))
    for chunk_size, result in results.items():
        for got, want in zip(result, results[None]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"chunk_size={chunk_size}")


def largest_new_tensor_saved_for_backward(fn, *inputs):
    """The most elements of any tensor autograd saves for backward while ``fn()`` runs, not counting
    tensors that share storage with ``inputs`` (views of the logits cost no memory)."""
    input_storages = {tensor.untyped_storage().data_ptr() for tensor in inputs}
    sizes = [0]

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in input_storages:
            sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return max(sizes)


def test_chunked_saves_no_vocabulary_sized_intermediates_and_works_without_grad():
    student, teacher = random_logits(SHAPE, seed=17)
    s = student.clone().requires_grad_()
    batch, length, vocab = SHAPE
    # Unchunked, the softmaxes (B, T, V) are saved for backward; chunked, the checkpointed regions keep
    # only their inputs (views of the logits), so no new tensor larger than the (B, T) values is saved.
    assert largest_new_tensor_saved_for_backward(
        lambda: sequence_divergence(s, teacher, MASK, divergence="jsd"), s, teacher) == batch * length * vocab
    assert largest_new_tensor_saved_for_backward(
        lambda: sequence_divergence(s, teacher, MASK, divergence="jsd", chunk_size=2), s, teacher) <= batch * length
    loss = sequence_divergence(s, teacher, MASK, divergence="jsd", chunk_size=2)
    with torch.no_grad():
        no_grad = sequence_divergence(s, teacher, MASK, divergence="jsd", chunk_size=2)
    torch.testing.assert_close(no_grad, loss.detach())
    assert sequence_divergence(student[:, :0], teacher[:, :0], MASK[:, :0], chunk_size=2).item() == 0.0


def test_gradcheck_jsd_float64():
    student, teacher = random_logits((2, 3, 4), seed=18, scale=1.0)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    s, t = student.requires_grad_(), teacher.requires_grad_()
    for chunk_size, reduction in ((None, "token"), (2, "sequence")):
        def fn(a, b):
            return sequence_divergence(a, b, mask, divergence="jsd", beta=0.3, reduction=reduction,
                                       chunk_size=chunk_size, student_temperature=1.5)
        assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------


def test_shift_logits_and_mask_for_causal_layout():
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 4, 5, -100, -100]])
    logits = torch.randn(2, 5, 10)
    shifted, mask = shift_logits_and_mask(logits, labels)
    assert torch.equal(shifted, logits[:, :-1])
    want = torch.tensor([[False, True, True, True], [True, True, False, False]])
    assert torch.equal(mask, want) and torch.equal(response_mask(labels), want)
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\)"):
        shift_logits_and_mask(logits, labels[:, :4])


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"divergence": "js"}, r"unknown divergence 'js'; use one of 'forward_kl'"),
    ({"divergence": "jsd", "beta": 1.5}, r"beta must lie in \[0, 1\], got 1.5"),
    ({"divergence": "jsd", "beta": -0.1}, r"beta must lie in \[0, 1\]"),
    ({"skew": 1.0}, r"skew must lie in \[0, 1\), got 1.0"),
    ({"skew": -0.5}, r"skew must lie in \[0, 1\)"),
    ({"student_temperature": 0.0}, r"student_temperature must be a finite number > 0, got 0.0"),
    ({"teacher_temperature": -1.0}, r"teacher_temperature must be a finite number > 0"),
    ({"reduction": "mean"}, r"unknown reduction 'mean'"),
    ({"chunk_size": 0}, r"chunk_size must be None or an integer >= 1"),
    ({"denominator": -2}, r"denominator must be a finite number >= 0"),
])
def test_bad_options_raise_value_error(kwargs, match):
    student, teacher = random_logits(SHAPE, seed=19)
    with pytest.raises(ValueError, match=match) as info:
        sequence_divergence(student, teacher, MASK, **kwargs)
    assert isinstance(info.value, KdlabError) and isinstance(info.value, SequenceDivergenceError)


def test_shape_errors_name_both_shapes():
    student = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"teacher vocabulary 7 != student vocabulary 5.*share a tokenizer"):
        sequence_divergence(student, torch.zeros(2, 3, 7), None)
    with pytest.raises(ValueError, match=r"student shape \(2, 3, 5\) != teacher shape \(2, 4, 5\)"):
        sequence_divergence(student, torch.zeros(2, 4, 5), None)
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) does not match the logits' positions \(2, 3\)"):
        sequence_divergence(student, student, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected shape \(B, T, V\), got \(2, 5\)"):
        sequence_divergence(torch.zeros(2, 5), torch.zeros(2, 5), None)
