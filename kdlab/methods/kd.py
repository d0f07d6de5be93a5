"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", §2.

    L = α · T² · KL(p_T^teacher ‖ p_T^student) + (1 − α) · CE(y, p_1^student)

``kdlab.losses.kl`` already carries the T² factor (it keeps the soft term's
gradient scale independent of T, Hinton §2), so ``α`` weighs the terms as written.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdlab.config.validate import Positive, UnitInterval
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Method
from kdlab.registry import register


@dataclass
class KDHparams:
    temperature: Positive = 4.0  # T: softens both distributions in the soft term
    alpha: UnitInterval = 0.9  # weight of the soft (teacher) term; 1 − α weighs the label term


@register("method", "kd")
class KD(Method):
    """Hinton KD: α·T²·KL(teacher‖student) at temperature T + (1−α)·cross-entropy."""

    Hparams = KDHparams
    assistant_hparams = ("temperature", "alpha")  # a TAKD chain's assistants train with the student's T and α

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        return {
            "kd": h.alpha * kl(student_out.logits, teacher_out.logits, temperature=h.temperature),
            "ce": (1.0 - h.alpha) * cross_entropy(student_out.logits, batch.labels),
        }
