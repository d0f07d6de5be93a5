"""kdlab.losses.fused: the fused (hidden states + output layer) sequence divergence equals the unfused one.

The reference is ``sequence_divergence`` on the materialised logits ``hidden @ weight.T + bias`` with
autograd's gradients (itself tested against plain-Python float64 references in test_sequence.py);
the fused path computes its gradients in closed form, chunk by chunk, so agreement to 1e-6 in
float64 checks those closed forms for every divergence, temperature, mask and reduction. gradcheck
checks them against finite differences as well.
"""
from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.losses import fused as fused_module
from kdlab.losses.fused import default_chunk_rows, fused_sequence_divergence
from kdlab.losses.sequence import DIVERGENCES, count_denominator, sequence_divergence
from kdlab.methods.scratch import sequence_cross_entropy

B, T, H, V = 3, 5, 4, 11
TOL = 1e-6


def make(seed=0, *, bias=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 1.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.5).requires_grad_() if bias else None
    teacher = torch.randn(B, T, V, generator=g, dtype=dtype) * 2.0
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0, 0] = True
    mask[2] = False  # one sequence with no response token
    return hidden, weight, b, teacher, mask


def unfused(hidden, weight, bias, teacher, mask, **kw):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return sequence_divergence(logits, teacher, mask, **kw)


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def assert_same(fused_loss, fused_grads, ref_loss, ref_grads, tol=TOL):
    assert abs(fused_loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))
    for got, want in zip(fused_grads, ref_grads, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_equal_unfused(divergence, reduction, temperatures, masked):
    hidden, weight, bias, teacher, mask = make()
    mask = mask if masked else None
    kw = dict(divergence=divergence, reduction=reduction, student_temperature=temperatures[0],
              teacher_temperature=temperatures[1], beta=0.3, skew=0.2)
    loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias, chunk_size=4, **kw)
    ref = unfused(hidden, weight, bias, teacher, mask, **kw)
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)))


@pytest.mark.parametrize("beta", [0.0, 1e-3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("scaled", [False, True])
def test_jsd_beta_including_exact_ends(beta, scaled):
    hidden, weight, bias, teacher, mask = make(1)
    kw = dict(divergence="jsd", beta=beta, scaled=scaled, reduction="token")
    loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias, chunk_size=2, **kw)
    ref = unfused(hidden, weight, bias, teacher, mask, **kw)
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)))


@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew", [0.0, 0.1, 0.9])
def test_skew_values(divergence, skew):
    hidden, weight, bias, teacher, mask = make(2)
    kw = dict(divergence=divergence, skew=skew, student_temperature=1.3)
    loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias, **kw)
    ref = unfused(hidden, weight, bias, teacher, mask, **kw)
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)))


def test_tvd_tie_subgradient_matches_autograd():
    # Student = teacher at every position: p = q exactly, autograd's abs gives the subgradient 0.
    hidden, weight, bias, _, mask = make(3)
    teacher = (hidden @ weight.T + bias).detach()
    loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias, divergence="tvd")
    ref = unfused(hidden, weight, bias, teacher, mask, divergence="tvd")
    assert loss.item() == 0.0
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)))


@pytest.mark.parametrize("chunk_size", [1, 3, B * T, 1000, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    hidden, weight, bias, teacher, mask = make(4)
    loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias, divergence="jsd",
                                     chunk_size=chunk_size)
    ref = unfused(hidden, weight, bias, teacher, mask, divergence="jsd")
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)))


def test_teacher_hidden_states_and_weight_equal_teacher_logits():
    hidden, weight, bias, _, mask = make(5)
    g = torch.Generator().manual_seed(9)
    t_hidden, t_weight, t_bias = (torch.randn(B, T, 6, generator=g, dtype=torch.float64),
                                  torch.randn(V, 6, generator=g, dtype=torch.float64),
                                  torch.randn(V, generator=g, dtype=torch.float64))
    t_hidden[~mask] = float("nan")  # masked-out teacher rows never reach anything
    kw = dict(divergence="reverse_kl", teacher_temperature=0.7, reduction="sequence")
    loss = fused_sequence_divergence(hidden, weight, None, mask, student_bias=bias, teacher_hidden=t_hidden,
                                     teacher_weight=t_weight, teacher_bias=t_bias, chunk_size=2, **kw)
    teacher = torch.nan_to_num(t_hidden) @ t_weight.T + t_bias
    ref = unfused(hidden, weight, bias, teacher, mask, **kw)
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_ce_equals_sequence_cross_entropy(reduction):
    hidden, weight, bias, _, _ = make(6)
    labels = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    targets = labels[:, 1:]
    loss = fused_sequence_divergence(hidden, weight, None, targets != -100, student_bias=bias, labels=targets,
                                     divergence="ce", reduction=reduction, chunk_size=4)
    # sequence_cross_entropy takes the unshifted (B, L, V) logits; the last position is dropped there
    logits = torch.cat([hidden @ weight.T + bias, torch.zeros(B, 1, V, dtype=torch.float64)], dim=1)
    ref = sequence_cross_entropy(logits, labels, reduction=reduction)
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)))


def test_gradcheck_tiny():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for divergence in DIVERGENCES:
        def fn(h, w, b, divergence=divergence):
            return fused_sequence_divergence(h, w, teacher, mask, student_bias=b, divergence=divergence, beta=0.4,
                                             student_temperature=1.5, reduction="sequence", chunk_size=2)
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_masked_positions_never_leak_nan_and_all_masked_is_zero():
    hidden, weight, bias, teacher, mask = make(8)
    hidden.data[~mask] = float("nan")
    teacher[~mask] = float("inf")
    loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias, divergence="jsd")
    for grad in grads(loss, (hidden, weight, bias)):
        assert torch.isfinite(grad).all()
    none = torch.zeros(B, T, dtype=torch.bool)
    loss = fused_sequence_divergence(hidden, weight, teacher, none, student_bias=bias, reduction="sequence")
    assert loss.item() == 0.0
    for grad in grads(loss, (hidden, weight, bias)):
        assert not grad.any()


def test_denominator_micro_batches_sum_to_the_full_batch():
    hidden, weight, bias, teacher, mask = make(9)
    full = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias)
    denominator = count_denominator(mask, "token")
    halves = sum(fused_sequence_divergence(hidden[rows], weight, teacher[rows], mask[rows], student_bias=bias,
                                           denominator=denominator) for rows in (slice(0, 1), slice(1, B)))
    assert abs(float(full) - float(halves)) < 1e-12


def test_upstream_gradient_scales_and_tied_weight_accumulates():
    hidden, weight, bias, teacher, mask = make(10)
    def extra():  # the weight used elsewhere too (e.g. tied embeddings)
        return (weight ** 2).sum() * 0.1

    loss = 3.0 * fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias) + extra()
    ref = 3.0 * unfused(hidden, weight, bias, teacher, mask) + extra()
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)))


def test_weight_without_grad_and_no_bias():
    hidden, weight, _, teacher, mask = make(11, bias=False)
    weight = weight.detach()
    loss = fused_sequence_divergence(hidden, weight, teacher, mask)
    ref = unfused(hidden, weight, None, teacher, mask)
    assert_same(loss, grads(loss, (hidden,)), ref, grads(ref, (hidden,)))


def test_no_gradient_work_without_grad(monkeypatch):
    calls = []
    original = fused_module._grad_log_q
    monkeypatch.setattr(fused_module, "_grad_log_q", lambda *a, **k: calls.append(1) or original(*a, **k))
    hidden, weight, bias, teacher, mask = make(12)
    with torch.no_grad():
        loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias)
    assert not calls and not loss.requires_grad
    assert abs(float(loss) - float(unfused(hidden, weight, bias, teacher, mask))) < 1e-12
    fused_sequence_divergence(hidden.detach(), weight.detach(), teacher, mask)
    assert not calls


def test_second_backward_through_a_retained_graph():
    hidden, weight, bias, teacher, mask = make(13)
    loss = 2.0 * fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias)
    first = torch.autograd.grad(loss, (hidden, weight, bias), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight, bias))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_float32_and_bfloat16_inputs():
    hidden, weight, bias, teacher, mask = make(14, dtype=torch.float32)
    loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias, divergence="jsd")
    ref = unfused(hidden, weight, bias, teacher, mask, divergence="jsd")
    assert_same(loss, grads(loss, (hidden, weight, bias)), ref, grads(ref, (hidden, weight, bias)), tol=1e-5)
    low = hidden.detach().bfloat16().requires_grad_()
    loss = fused_sequence_divergence(low, weight, teacher, mask, student_bias=bias)
    (grad,) = torch.autograd.grad(loss, low)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16


def test_default_chunk_rows():
    assert default_chunk_rows(131072, 1024) == 32
    assert default_chunk_rows(11, 7) == 7
    assert default_chunk_rows(10**12, 5) == 1


@pytest.mark.parametrize("bad, match", [
    (dict(divergence="nope"), "unknown divergence"),
    (dict(reduction="sum"), "unknown reduction"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(beta=2.0), "beta"),
    (dict(weight=torch.zeros(V, H + 1, dtype=torch.float64)), "hidden width"),
    (dict(teacher=torch.zeros(B, T, V + 1, dtype=torch.float64)), "share the vocabulary"),
    (dict(teacher=None), "no teacher"),
    (dict(teacher_hidden=torch.zeros(B, T, 2)), "not both"),
    (dict(divergence="ce"), "needs labels"),
    (dict(mask=torch.ones(B, T + 1, dtype=torch.bool)), "mask shape"),
])
def test_bad_input_is_one_clear_error(bad, match):
    hidden, weight, bias, teacher, mask = make(15)
    args = dict(weight=weight, teacher=teacher, mask=mask)
    kw = {}
    for key, value in bad.items():
        (args if key in args else kw)[key] = value
    if "teacher_hidden" in kw:
        kw["teacher_weight"] = torch.zeros(V, 2)
    with pytest.raises(KdlabError, match=match):
        fused_sequence_divergence(hidden, args["weight"], args["teacher"], args["mask"], **kw)


def test_under_autocast_the_projection_runs_in_the_autocast_dtype():
    hidden, weight, bias, teacher, mask = make(16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_sequence_divergence(hidden, weight, teacher, mask, student_bias=bias)
        ref = sequence_divergence(torch.nn.functional.linear(hidden, weight, bias), teacher, mask)
    got, want = grads(loss, (hidden, weight, bias)), grads(ref, (hidden, weight, bias))
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-2 * abs(ref.item())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=3e-2, atol=3e-2)
