"""MLKD — Jin, Wang & Lin (CVPR 2023), "Multi-Level Logit Distillation".

Over the temperatures 𝒯 = {2, 3, 4, 5, 6} (``kdlab.losses.mlkd``; ``m``, ``m_c`` the fractions of samples and
classes the confidence masks keep, i.e. at most the median teacher confidence):

    ce       = ce_weight · (CE(z_s^w, y) + CE(z_s^s, y))
    instance = kd_weight · Σ_T [ m · T²KL(z_t^w ‖ z_s^w) + T²KL(z_t^s ‖ z_s^s) ]
    batch    = kd_weight · Σ_T m · ‖G_t^w − G_s^w‖²/B        G = P Pᵀ  (B × B)
    class    = kd_weight · Σ_T m_c · ‖M_t^w − M_s^w‖²/C      M = Pᵀ P  (C × C)

with ``w``/``s`` the weak and strong views. Transcribed from the official code
(Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/distillers/KD_ours.py``, trained by ``AugTrainer``):
its ``kd_loss``/``bc_loss``/``cc_loss`` reduce to a scalar *before* the mask multiplies it, so a mask enters as the
fraction it keeps; the strong view's batch and class losses are computed there but left out of the total,
and two of the strong instance terms (T = 2, 6) read the weak view — moot here, see below. Defaults: 𝒯 and
``CFG.KD`` (T 4 is among 𝒯; CE weight 0.1, KD weight 0.9).

Views: the official strong view adds RandAugment(2, 10) to the weak crop-and-flip; kdlab's batch pipeline has
no RandAugment, so the strong view *is* the weak one (``strong = weak``: the official loss with
``image_strong = image_weak``, one forward). docs/methods.md records the choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlab.config.validate import NonNegative, Positive
from kdlab.losses import cross_entropy
from kdlab.losses.divergences import _compute_dtype
from kdlab.losses.mlkd import batch_alignment, class_alignment, confidence_masks, instance_alignment
from kdlab.methods.base import Method
from kdlab.registry import register


def mlkd_terms(s_weak, t_weak, s_strong, t_strong, labels, *, temperatures, ce_weight: float,
               kd_weight: float) -> dict[str, torch.Tensor]:
    """The four MLKD terms of one batch from both views' logits (the formula in the module docstring)."""
    mask, class_mask = confidence_masks(t_weak)
    dtype = _compute_dtype(s_weak, t_weak)  # the fractions at the losses' precision (float64 stays float64)
    m, m_c = mask.to(dtype).mean(), class_mask.to(dtype).mean()
    instance = sum(m * instance_alignment(s_weak, t_weak, T) + instance_alignment(s_strong, t_strong, T)
                   for T in temperatures)
    return {"ce": ce_weight * (cross_entropy(s_weak, labels) + cross_entropy(s_strong, labels)),
            "instance": kd_weight * instance,
            "batch": kd_weight * m * sum(batch_alignment(s_weak, t_weak, T) for T in temperatures),
            "class": kd_weight * m_c * sum(class_alignment(s_weak, t_weak, T) for T in temperatures)}


@dataclass
class MLKDHparams:
    ce_weight: NonNegative = 0.1  # official CFG.KD.LOSS.CE_WEIGHT
    kd_weight: NonNegative = 0.9  # CFG.KD.LOSS.KD_WEIGHT, on every alignment term
    temperatures: tuple[Positive, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)  # KD_ours.py: T 4 (CFG.KD.TEMPERATURE), 3, 5, 2, 6

    def problems(self) -> list[str]:
        return [] if self.temperatures else ["method.temperatures: give at least one temperature"]


@register("method", "mlkd")
class MLKD(Method):
    """Multi-level logit distillation: instance, batch and class alignment over several temperatures."""

    Hparams = MLKDHparams

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        s, t = student_out.logits, teacher_out.logits
        return mlkd_terms(s, t, s, t, batch.labels, temperatures=h.temperatures, ce_weight=h.ce_weight,
                          kd_weight=h.kd_weight)
