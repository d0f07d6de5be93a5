"""OFD's pieces (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019): the margin from
the teacher's BatchNorm statistics and the partial L2 distance on pre-ReLU features.

Not registered: the loss needs the per-channel margin, which the method derives from the teacher.
"""
from __future__ import annotations

import math

import torch

from kdlab.errors import KdlabError
from kdlab.losses.features import _check_pair


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """Per channel, the expectation of the teacher's negative pre-activations, ``E[x | x < 0]``.

    Heo et al. eq. 3 (the margin ``m = E[F_t | F_t < 0]``), with each channel's pre-activation taken as
    Gaussian with the BatchNorm's affine parameters, mean β and standard deviation |γ|:
    ``m = β − |γ| φ(β/|γ|) / Φ(−β/|γ|)``. As the authors' ``get_margin_from_BN`` (and mdistiller's
    ``init_ofd_modules``): where ``Φ(−β/|γ|) ≤ 0.001`` (almost no negative values) the margin is ``−3|γ|``.
    Returns a float64 ``(C,)`` tensor.
    """
    margins = []
    for gamma, beta in zip(bn_weight.detach().double().tolist(), bn_bias.detach().double().tolist()):
        s = abs(gamma)
        if s == 0.0:  # a dead channel: constant β; below-zero mass is 0 or 1, the official formula divides by 0
            margins.append(min(beta, 0.0))
            continue
        below = _normal_cdf(-beta / s)
        if below > 0.001:
            margins.append(beta - s * math.exp(-((beta / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below)
        else:
            margins.append(-3.0 * s)
    return torch.tensor(margins, dtype=torch.float64)


def ofd_partial_l2(student_feature, teacher_feature, margin):
    """OFD's partial L2 distance (eq. 4) between the (connected) student and the teacher pre-activation.

    As the authors' ``distillation_loss`` (clovaai/overhaul-distillation, ``CIFAR-100/distiller.py``): the
    target is ``max(t, m)`` (teacher value ``t``, the channel's margin ``m``) and an element counts,
    ``(s − max(t, m))²``, where ``s > max(t, m)`` or ``max(t, m) > 0``. With ``m ≤ 0`` (every BN margin):
    ``(s − m)²`` where ``s > m ≥ t``; ``(s − t)²`` where ``t > 0``, or where ``m < t ≤ 0`` and ``s > t``; 0
    elsewhere. Summed over channels and positions, averaged over the batch (the authors sum, and their
    train script divides by the batch size).

    Shapes: equal ``(N, C, H, W)``; ``margin`` ``(C,)``. Dtype: at least float32.
    """
    dtype = _check_pair("ofd", student_feature, teacher_feature)
    if student_feature.shape != teacher_feature.shape or student_feature.ndim != 4 or margin.shape != (
            student_feature.shape[1],):
        raise KdlabError(f"loss ofd: student {tuple(student_feature.shape)}, teacher {tuple(teacher_feature.shape)} "
                         f"and margin {tuple(margin.shape)} do not fit; give equal (N, C, H, W) maps, one margin "
                         "per channel")
    s = student_feature.to(dtype)
    target = torch.maximum(teacher_feature.to(dtype), margin.to(dtype).reshape(1, -1, 1, 1))
    counted = (s > target) | (target > 0)
    return ((s - target).square() * counted).sum() / s.shape[0]
