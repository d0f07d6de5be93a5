"""MLKD's pieces (Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023): instance-, batch- and
class-level alignment of tempered predictions, and the teacher-confidence masks.

As the official ``mdistiller/distillers/KD_ours.py`` (Jin-Ying/Multi-Level-Logit-Distillation):
``kd_loss`` (instance), ``bc_loss`` (batch: the B×B Gram matrix of the predictions) and ``cc_loss`` (class:
the C×C Gram matrix); the masks keep samples (classes) whose teacher confidence is at most the median.
Not registered: method ``mlkd`` combines them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError
from kdlab.losses.divergences import _compute_dtype


def _tempered(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise KdlabError(f"loss mlkd: logits {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} must be "
                         "equal (N, C)")
    if not temperature > 0:
        raise KdlabError(f"loss mlkd: temperature {temperature} must be > 0")
    dtype = _compute_dtype(student_logits, teacher_logits)  # at least float32; float64 stays float64
    return (F.log_softmax(student_logits.to(dtype) / temperature, dim=1),
            F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1))


def instance_alignment(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """``T² · mean_i KL(p_t,i ‖ p_s,i)`` at temperature T (``kd_loss``, reduce=True)."""
    log_q, log_p = _tempered(student_logits, teacher_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * temperature ** 2


def batch_alignment(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """``‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B``: the samples' prediction similarities (``bc_loss``, reduce=True)."""
    log_q, log_p = _tempered(student_logits, teacher_logits, temperature)
    q, p = log_q.exp(), log_p.exp()
    return ((p @ p.T - q @ q.T) ** 2).sum() / p.shape[0]


def class_alignment(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """``‖P_tᵀ P_t − P_sᵀ P_s‖²_F / C``: the classes' co-prediction (``cc_loss``, reduce=True)."""
    log_q, log_p = _tempered(student_logits, teacher_logits, temperature)
    q, p = log_q.exp(), log_p.exp()
    return ((p.T @ p - q.T @ q) ** 2).sum() / p.shape[1]


def _at_most_median(values: torch.Tensor) -> torch.Tensor:
    # np.percentile(·, 50) interpolates linearly between the middle values, as torch.quantile does
    return values <= torch.quantile(values, 0.5)


def confidence_masks(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample mask (B,), class mask (C,)), bool: a sample whose teacher's top probability, a class whose summed
    teacher probability over the batch, is at most the median (``mask``, ``class_conf_mask``; no gradient)."""
    with torch.no_grad():
        p = F.softmax(teacher_logits.float() if teacher_logits.dtype != torch.float64 else teacher_logits, dim=1)
        return _at_most_median(p.max(dim=1).values), _at_most_median(p.sum(dim=0))
