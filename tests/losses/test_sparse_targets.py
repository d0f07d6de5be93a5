"""kdlab.losses.sparse_targets against float64 references written from the equations.

* top-k with a tail bucket: k = V equals the full forward KL (value and gradient); k < V equals a
  plain-Python (k + 1)-class KL;
* the sampled estimator: its EXPECTATION, by exact enumeration of every ordered sample of K tokens
  on a small vocabulary (probability Π r(i_k)), equals the full forward KL's value and its gradient
  with respect to the student logits — with the teacher as proposal and with another proposal.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.losses.sequence import sequence_divergence
from kdlab.losses.sparse_targets import (id_dtype, load_sparse_targets, sample_targets, sampled_kl,
                                         save_sparse_targets, targets_to_torch, topk_tail_kl, topk_targets)

V = 5


def _logits(seed, shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def _full_kl(student, teacher, mask=None, reduction="token", ts=1.0):
    return sequence_divergence(student, teacher, mask, divergence="forward_kl", student_temperature=ts,
                               reduction=reduction)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("ts", [1.0, 2.0])
def test_topk_with_k_equal_to_the_vocabulary_is_the_full_kl(reduction, ts):
    student = _logits(0, (2, 3, V)).requires_grad_()
    teacher = _logits(1, (2, 3, V))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    ids, log_p, tail = topk_targets(teacher, V)
    assert torch.isneginf(tail).all()
    loss = topk_tail_kl(student, ids, log_p, tail, mask, student_temperature=ts, reduction=reduction)
    ref = _full_kl(student, teacher, mask, reduction, ts)
    (grad,) = torch.autograd.grad(loss, student)
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert abs(loss.item() - ref.item()) < 1e-12
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)


def test_topk_tail_bucket_matches_a_plain_python_reference():
    student = _logits(2, (4, V)).requires_grad_()
    teacher = _logits(3, (4, V))
    k = 2
    ids, log_p, tail = topk_targets(teacher, k, temperature=0.7)
    loss = topk_tail_kl(student, ids, log_p, tail)
    total = 0.0
    for row in range(4):
        p = torch.softmax(teacher[row] / 0.7, -1).tolist()
        q = torch.softmax(student[row].detach(), -1).tolist()
        top = sorted(range(V), key=lambda i: -p[i])[:k]
        p_tail, q_tail = 1 - sum(p[i] for i in top), 1 - sum(q[i] for i in top)
        total += sum(p[i] * math.log(p[i] / q[i]) for i in top) + p_tail * math.log(p_tail / q_tail)
    assert abs(loss.item() - total / 4) < 1e-12
    # the tail mass computed from the top-k log-probabilities (tail_log_mass=None) agrees
    assert abs(topk_tail_kl(student, ids, log_p).item() - loss.item()) < 1e-12
    # k < V: a lower bound of the full KL, and a different (biased) gradient
    full = _full_kl(student[None], teacher[None] / 0.7)
    assert loss.item() < full.item()
    (grad,) = torch.autograd.grad(loss, student)
    (full_grad,) = torch.autograd.grad(full, student)
    assert not torch.allclose(grad, full_grad, atol=1e-3)


def _enumerate_expectation(student, teacher_log_p, proposal_log_r, samples, use_proposal):
    """Σ over every ordered K-sample of Π r(i_k) · (estimate, its gradient), one position (V,)."""
    value, grad = 0.0, torch.zeros_like(student)
    r = proposal_log_r.exp()
    for draw in itertools.product(range(V), repeat=samples):
        ids = torch.tensor(draw)
        probability = float(torch.prod(r[ids]))
        s = student.detach().clone().requires_grad_()
        estimate = sampled_kl(s[None], ids[None], teacher_log_p[ids][None],
                              proposal_log_probs=proposal_log_r[ids][None] if use_proposal else None)
        (g,) = torch.autograd.grad(estimate, s)
        value += probability * estimate.item()
        grad += probability * g
    return value, grad


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("use_proposal", [False, True])
def test_sampled_estimator_is_unbiased_by_exact_enumeration(samples, use_proposal):
    student = _logits(4, (V,))
    teacher_log_p = torch.log_softmax(_logits(5, (V,)), -1)
    proposal = torch.log_softmax(_logits(6, (V,)) * 0.3, -1) if use_proposal else teacher_log_p
    value, grad = _enumerate_expectation(student, teacher_log_p, proposal, samples, use_proposal)
    s = student.clone().requires_grad_()
    full = _full_kl(s[None, None], teacher_log_p[None, None])
    (full_grad,) = torch.autograd.grad(full, s)
    assert abs(value - full.item()) < 1e-12
    torch.testing.assert_close(grad, full_grad, atol=1e-12, rtol=1e-12)
    # q − p in closed form, as the module docstring states
    torch.testing.assert_close(grad, torch.softmax(student, -1) - teacher_log_p.exp(), atol=1e-12, rtol=1e-12)


def test_sample_targets_draw_from_the_teacher():
    teacher = _logits(7, (1, V))
    ids, log_p = sample_targets(teacher, 20000, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(ids.reshape(-1), minlength=V).double() / ids.numel()
    torch.testing.assert_close(frequency, torch.softmax(teacher[0], -1), atol=0.015, rtol=0)
    torch.testing.assert_close(log_p, torch.log_softmax(teacher, -1).gather(-1, ids))


def test_masked_positions_and_reductions():
    student = _logits(8, (2, 3, V)).requires_grad_()
    teacher = _logits(9, (2, 3, V))
    mask = torch.tensor([[True, False, False], [True, True, False]])
    ids, log_p = sample_targets(teacher, 4, generator=torch.Generator().manual_seed(1))
    log_p = log_p.clone()
    log_p[~mask] = float("nan")
    per = sampled_kl(student, ids, log_p, mask, reduction="none")
    assert per.shape == (2, 3) and (per[~mask] == 0).all()
    loss = sampled_kl(student, ids, log_p, mask, reduction="sequence")
    expected = (per[0, 0] + per[1, :2].mean()) / 2
    assert abs(loss.item() - expected.item()) < 1e-12
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all() and not grad[~mask].any()
    t_ids, t_log_p, tail = topk_targets(teacher, 2)
    tail = tail.clone()
    tail[~mask] = float("nan")
    loss = topk_tail_kl(student, t_ids, t_log_p, tail, mask)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all() and not grad[~mask].any()


@pytest.mark.parametrize("call, match", [
    (lambda s, t: topk_targets(t, V + 1), r"k = 6 must be an integer in \[1, 5\]"),
    (lambda s, t: sample_targets(t, 0), "K = 0"),
    (lambda s, t: sampled_kl(s, torch.full((2, 1), V), torch.zeros(2, 1)), "another vocabulary"),
    (lambda s, t: sampled_kl(s, torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1)), "positions"),
    (lambda s, t: topk_tail_kl(s, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 2)), "topk_log_probs shape"),
    (lambda s, t: sampled_kl(s, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), reduction="sequence"),
     "needs \\(B, T, V\\)"),
])
def test_bad_input_is_one_clear_error(call, match):
    with pytest.raises(KdlabError, match=match):
        call(_logits(0, (2, V)), _logits(1, (2, V)))


# --------------------------------------------------------------------------- compact storage


def test_id_dtype():
    import numpy as np

    assert id_dtype(65536) == np.uint16 and id_dtype(65537) == np.int32 and id_dtype(151936) == np.int32


def test_saved_targets_round_trip_memory_mapped(tmp_path):
    import numpy as np

    vocab = 40000
    teacher = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(0)) * 3
    student = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(1)) * 3
    ids, log_p, tail = topk_targets(teacher, 8)
    written = save_sparse_targets(tmp_path / "c", ids, log_p, tail, vocab_size=vocab)
    # per token: 8 ids × 2 bytes + 8 log-probs × 2 bytes + 2 bytes of tail (+ the .npy headers)
    assert sum(written.values()) - 3 * 128 == 6 * (8 * 2 + 8 * 2 + 2)
    stored = load_sparse_targets(tmp_path / "c")
    assert isinstance(stored["ids"], np.memmap) and stored["ids"].dtype == np.uint16
    assert stored["log_probs"].dtype == np.float16
    back = targets_to_torch(stored, slice(0, 2))
    assert torch.equal(back["ids"], ids)
    exact = topk_tail_kl(student, ids, log_p, tail)
    compact = topk_tail_kl(student, back["ids"], back["log_probs"], back["tail_log_mass"])
    assert abs(compact.item() - exact.item()) < 1e-2 * max(1.0, abs(exact.item()))


def test_storage_refusals(tmp_path):
    with pytest.raises(KdlabError, match=r"\[0, 5\)"):
        save_sparse_targets(tmp_path, torch.tensor([[5]]), torch.zeros(1, 1), vocab_size=5)
    with pytest.raises(KdlabError, match="no ids.npy"):
        load_sparse_targets(tmp_path / "missing")
