"""One divergence family: the sequence path (``sequence_divergence``) and the classification path
(the registered losses) agree on the same float64 tensors, for every divergence, mask and reduction.

The classification side is reduced independently of ``reduce_positions``' sequence branch: the
"sequence" reduction is rebuilt from one registered-loss call per row. The registered losses carry
T² at a shared temperature (not ``tvd``); the sequence path has no T², so it is multiplied here.
"""
from __future__ import annotations

import pytest
import torch

from kdlab.losses import divergences, logit
from kdlab.losses.divergences import DIVERGENCE_FAMILY as FAMILY, reduce_positions
from kdlab.losses.sequence import DIVERGENCES, FAMILY_MEMBERS, sequence_divergence

SHAPE = (4, 6, 5)


def _logits(seed):
    generator = torch.Generator().manual_seed(seed)
    return tuple(3 * torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(2))


def _masks():
    ragged = torch.zeros(SHAPE[:2], dtype=torch.bool)
    for row, (start, n) in enumerate([(1, 4), (0, 6), (2, 1), (0, 0)]):  # the last row has no valid token
        ragged[row, start:start + n] = True
    return {"none": None, "ragged": ragged, "ragged_01": ragged.double(),
            "all_masked": torch.zeros(SHAPE[:2], dtype=torch.bool)}


def _classification(divergence, options):
    """The registered loss (and its T² convention) for a sequence spelling with its options."""
    beta, scaled, skew = options.get("beta", 0.5), options.get("scaled", False), options.get("skew", 0.1)
    if divergence == "jsd" and beta in (0.0, 1.0):  # GKD's jsd ends are the KLs
        return divergences.kl if beta == 0.0 else divergences.reverse_kl, {}, True
    table = {
        "forward_kl": (divergences.kl, {}, True),
        "reverse_kl": (divergences.reverse_kl, {}, True),
        "jsd": (divergences.generalized_jsd, {"beta": beta, "scaled": scaled}, True),
        "tvd": (divergences.tvd, {}, False),
        "skew_kl": (logit.skew_kl, {"skew": skew}, True),
        "skew_reverse_kl": (logit.skew_kl, {"skew": skew, "reverse": True}, True),
    }
    return table[divergence]


CASES = [("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}), ("skew_kl", {"skew": 0.2}),
         ("skew_reverse_kl", {"skew": 0.3}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.3}),
         ("jsd", {"beta": 0.3, "scaled": True}), ("jsd", {"beta": 1.0})]


def test_every_sequence_divergence_is_a_member_of_the_family():
    assert {name for name, _ in CASES} == set(DIVERGENCES)
    assert {name for name, _ in FAMILY_MEMBERS.values()} == set(FAMILY)


@pytest.mark.parametrize("divergence,options", CASES)
@pytest.mark.parametrize("mask_name", list(_masks()))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_sequence_path_equals_classification_path(divergence, options, mask_name, temperature, chunk_size):
    student, teacher = _logits(seed=len(divergence) + int(10 * temperature))
    mask = _masks()[mask_name]
    loss, loss_options, t_squared = _classification(divergence, options)
    factor = temperature**2 if t_squared else 1.0
    common = dict(temperature=temperature, **loss_options)

    def sequence(reduction):
        return factor * sequence_divergence(student, teacher, mask, divergence=divergence, reduction=reduction,
                                            student_temperature=temperature, teacher_temperature=temperature,
                                            chunk_size=chunk_size, **options)

    # token = batchmean over the valid positions
    torch.testing.assert_close(sequence("token"), loss(student, teacher, mask=mask, **common),
                               rtol=1e-12, atol=1e-14)
    # sequence = the mean over sequences with a valid token of each sequence's own batchmean
    valid = torch.ones(SHAPE[:2], dtype=torch.bool) if mask is None else mask != 0
    rows = [loss(student[b:b + 1], teacher[b:b + 1], mask=valid[b:b + 1], **common)
            for b in range(SHAPE[0]) if valid[b].any()]
    want = torch.stack(rows).mean() if rows else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(sequence("sequence"), want, rtol=1e-12, atol=1e-14)
    # the registered losses' own reductions: "none" is the per-position value, "sum" its total
    per_position = loss(student, teacher, mask=mask, reduction="none", **common)
    assert per_position.shape == SHAPE[:2]
    assert (per_position[~valid] == 0).all()
    torch.testing.assert_close(loss(student, teacher, mask=mask, reduction="sum", **common),
                               per_position.sum(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(reduce_positions(per_position, valid, "sequence"), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence,options", CASES)
def test_gradients_agree(divergence, options):
    student, teacher = _logits(seed=99)
    mask = _masks()["ragged"]
    loss, loss_options, t_squared = _classification(divergence, options)
    factor = 4.0 if t_squared else 1.0
    grads = []
    for path in ("sequence", "classification"):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        if path == "sequence":
            value = factor * sequence_divergence(s, t, mask, divergence=divergence, student_temperature=2.0,
                                                 teacher_temperature=2.0, **options)
        else:
            value = loss(s, t, mask=mask, temperature=2.0, **loss_options)
        grads.append(torch.autograd.grad(value, (s, t)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_reduce_positions_sequence_sum_and_denominator():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    assert reduce_positions(values, valid, "sequence_sum").item() == pytest.approx((3.0 + 7.0) / 2)
    assert reduce_positions(values, valid, "sequence").item() == pytest.approx((1.5 + 7.0) / 2)
    assert reduce_positions(values, valid, "batchmean").item() == pytest.approx(10.0 / 3)
    assert reduce_positions(values, valid, "batchmean", denominator=5).item() == pytest.approx(2.0)
    assert reduce_positions(values, valid, "sequence", denominator=torch.tensor(0.0)).item() == 8.5
    assert reduce_positions(values, torch.zeros_like(valid), "sequence").item() == 0.0
