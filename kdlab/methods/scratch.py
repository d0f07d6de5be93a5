"""Training without a teacher: the cross-entropy baseline every KD result is read against."""
from __future__ import annotations

from dataclasses import dataclass

from kdlab.losses import cross_entropy
from kdlab.methods.base import Method
from kdlab.registry import register


@dataclass
class ScratchHparams:
    label_smoothing: float = 0.0  # ε of Szegedy et al. 2016; 0 = plain cross-entropy


@register("method", "scratch")
class Scratch(Method):
    """Cross-entropy on the labels only (no teacher): the from-scratch baseline."""

    Hparams = ScratchHparams
    needs_teacher = False

    def loss_terms(self, batch, student_out, teacher_out):
        return {"ce": cross_entropy(student_out.logits, batch.labels, label_smoothing=self.hparams.label_smoothing)}
