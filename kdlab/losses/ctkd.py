"""CTKD's pieces (Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023): the KD loss at
a learned (tensor) temperature, global or one per sample, the gradient-reversal layer and the cosine λ schedule.

Not registered: the temperature is the method's parameter, not a config number.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError
from kdlab.losses.divergences import _compute_dtype


def kl_at_learned_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              temperature: torch.Tensor) -> torch.Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, batch mean, differentiable in ``T`` (a 0-dim or ``(1,)`` tensor).

    As CTKD's ``DistillKL`` (``distiller_zoo/KD.py``: ``KLDivLoss(reduction='batchmean')(log_softmax(y_s/T),
    softmax(y_t/T)) · T · T``).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise KdlabError(f"loss ctkd: logits {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} must be "
                         "equal (N, C)")
    dtype = _compute_dtype(student_logits, teacher_logits)  # at least float32; float64 stays float64
    t = temperature.reshape(()).to(dtype)
    log_q = F.log_softmax(student_logits.to(dtype) / t, dim=1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / t, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * t * t


def kl_at_instance_temperatures(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                temperatures: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``mean_i T_i² · Σ_c p̃_ic (log p̃_ic − log q_ic)``, one temperature ``T_i`` per sample (``temperatures`` (N,)),
    with ``p̃ = softmax(z_t/T_i) + eps`` and ``q = softmax(z_s/T_i)``.

    As the official instance-wise CTKD (zhengli97/CTKD ``README.md`` "Instance-wise Temperature": the per-sample
    ``KL_Loss`` averaged over the batch, its teacher probabilities shifted by 1e-7 inside and outside the log).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise KdlabError(f"loss ctkd: logits {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} must be "
                         "equal (N, C)")
    if temperatures.shape != student_logits.shape[:1]:
        raise KdlabError(f"loss ctkd: {tuple(temperatures.shape)} temperatures for {student_logits.shape[0]} samples; "
                         "give one per sample")
    dtype = _compute_dtype(student_logits, teacher_logits)
    t = temperatures.to(dtype).unsqueeze(1)
    log_q = F.log_softmax(student_logits.to(dtype) / t, dim=1)
    p = F.softmax(teacher_logits.to(dtype) / t, dim=1) + eps
    return ((p * (p.log() - log_q)).sum(dim=1) * t.squeeze(1) ** 2).mean()


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the backward multiplies the gradient by ``−scale`` (Ganin & Lempitsky 2015)."""
    return _Reverse.apply(x, float(scale))


def cosine_lambda(epoch: int, *, lambda_max: float, epochs: int) -> float:
    """CTKD's curriculum: λ rises from 0 to ``lambda_max`` along a half cosine over ``epochs``, then stays.

    ``λ(e) = lambda_max · (1 − cos(π·min(e, E)/E)) / 2`` — the official ``CosineDecay(max_value=0,
    min_value=−1, num_loops=10)`` with the sign moved into the reversal (it returns −λ and multiplies the
    gradient by it).
    """
    e = min(max(epoch, 0), epochs)
    return lambda_max * (1.0 - math.cos(math.pi * e / epochs)) / 2.0
