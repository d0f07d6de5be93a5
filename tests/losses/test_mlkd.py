"""MLKD's alignments and masks and CTKD's per-sample temperature loss against float64 references transcribed from
the official code (KD_ours.py's kd_loss / bc_loss / cc_loss, np.percentile masks; CTKD's README KL_Loss)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.losses.ctkd import kl_at_instance_temperatures
from kdlab.losses.mlkd import batch_alignment, class_alignment, confidence_masks, instance_alignment


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def softmax(z, T):
    e = np.exp((z - z.max(axis=1, keepdims=True)) / T)
    return e / e.sum(axis=1, keepdims=True)


def kd_ref(s, t, T):
    p, q = softmax(t.numpy(), T), softmax(s.numpy(), T)
    return sum(sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)) / len(p) * T * T


def bc_ref(s, t, T):  # bc_loss: B×B Gram matrices of the predictions, squared differences summed, / batch size
    p, q = softmax(t.numpy(), T), softmax(s.numpy(), T)
    B = len(p)
    return sum((float(p[i] @ p[j]) - float(q[i] @ q[j])) ** 2 for i in range(B) for j in range(B)) / B


def cc_ref(s, t, T):  # cc_loss: C×C Gram matrices (classes), / class count
    p, q = softmax(t.numpy(), T), softmax(s.numpy(), T)
    C = p.shape[1]
    return sum((float(p[:, a] @ p[:, b]) - float(q[:, a] @ q[:, b])) ** 2 for a in range(C) for b in range(C)) / C


@pytest.mark.parametrize("T", [2.0, 4.0, 6.0])
def test_each_level_equals_its_float64_reference_and_gradchecks(T):
    s, t = randn(6, 5, seed=1), 3 * randn(6, 5, seed=2)
    assert instance_alignment(s, t, T).item() == pytest.approx(kd_ref(s, t, T), rel=1e-10)
    assert batch_alignment(s, t, T).item() == pytest.approx(bc_ref(s, t, T), rel=1e-10)
    assert class_alignment(s, t, T).item() == pytest.approx(cc_ref(s, t, T), rel=1e-10)
    x = s.clone().requires_grad_()
    for fn in (instance_alignment, batch_alignment, class_alignment):
        assert torch.autograd.gradcheck(lambda v: fn(v, t, T), (x,))
        assert fn(t, t, T).item() == pytest.approx(0.0, abs=1e-12)  # equal logits: aligned at every level


def test_hand_worked_batch_and_class_levels():
    # two samples, two classes, T = 1: teacher predictions (1, 0) and (0, 1) (up to e⁻⁴⁰), student uniform (½, ½).
    # batch: teacher P Pᵀ = I, student all ½; four squared differences of ¼ sum to 1; / B = 2 → 0.5.
    # class: teacher Pᵀ P = I, student all ½ as well → 1 / C = 0.5.
    t = torch.tensor([[40.0, 0.0], [0.0, 40.0]], dtype=torch.float64)
    s = torch.zeros(2, 2, dtype=torch.float64)
    assert batch_alignment(s, t, 1.0).item() == pytest.approx(0.5, abs=1e-12)
    assert class_alignment(s, t, 1.0).item() == pytest.approx(0.5, abs=1e-12)
    # three samples: B and C differ, the divisors with them (student Gram entries ½ against teacher 1 / 0)
    t3 = torch.tensor([[40.0, 0.0], [0.0, 40.0], [40.0, 0.0]], dtype=torch.float64)
    s3 = torch.zeros(3, 2, dtype=torch.float64)
    assert batch_alignment(s3, t3, 1.0).item() == pytest.approx(9 * 0.25 / 3, abs=1e-12)
    # teacher PᵀP = [[2, 0], [0, 1]], student all ¾: (5/4)² + 2·(3/4)² + (1/4)² = 2.75; / C = 2 → 1.375
    assert class_alignment(s3, t3, 1.0).item() == pytest.approx(1.375, abs=1e-12)


@pytest.mark.parametrize("batch", [6, 7])  # even: the median between two values; odd: one of them
def test_masks_are_the_official_percentile_rule(batch):
    t = 2 * randn(batch, 5, seed=batch)
    mask, class_mask = confidence_masks(t)
    p = softmax(t.numpy(), 1.0)
    conf, class_conf = p.max(axis=1), p.sum(axis=0)
    assert mask.tolist() == list(conf <= np.percentile(conf, 50))
    assert class_mask.tolist() == list(class_conf <= np.percentile(class_conf, 50))
    assert int(mask.sum()) == math.ceil(batch / 2)


def test_bad_shapes_are_refused():
    with pytest.raises(KdlabError, match="must be equal"):
        instance_alignment(torch.zeros(2, 3), torch.zeros(2, 4), 2.0)


def test_instance_temperature_kl_is_the_readme_per_sample_loss():
    s, t = randn(4, 5, seed=3), 3 * randn(4, 5, seed=4)
    temps = torch.tensor([1.5, 4.0, 9.0, 20.0], dtype=torch.float64)
    expected = 0.0
    for zs, zt, T in zip(s.numpy(), t.numpy(), temps.tolist()):  # README KL_Loss, transcribed
        log_q = np.log(softmax(zs[None], T)[0])
        p = softmax(zt[None], T)[0] + 1e-7
        expected += T * T * float((p * (np.log(p) - log_q)).sum())
    got = kl_at_instance_temperatures(s, t, temps)
    assert got.item() == pytest.approx(expected / 4, rel=1e-10)
    x, tt = s.clone().requires_grad_(), temps.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_at_instance_temperatures(a, t, b), (x, tt))
    with pytest.raises(KdlabError, match="one per sample"):
        kl_at_instance_temperatures(s, t, temps[:3])
