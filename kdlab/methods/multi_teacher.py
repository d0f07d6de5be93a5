"""Multi-teacher KD: Hinton KD against one target combined from K teachers.

    L = α · T² · KL(p̄_T ‖ p_T^student) + (1 − α) · CE(y, p_1^student)

with ``p̄_T`` the teachers' combined distribution at temperature T under
``rule`` (``kdlab.losses.ensemble``: ``fixed`` weights, ``mean_probs``,
``mean_logits``, per-sample ``entropy`` weights (label-free), or CA-MKD's
per-sample ``confidence`` weights from each teacher's cross-entropy with the
label, Zhang et al., ICASSP 2022). With one teacher every rule is plain ``kd``.

The teacher must be a ``kdlab.models.TeacherEnsemble``: the loop runs it once,
and each member's logits are tapped at ``members.k``. Its own output (the mean
of the member logits) is only what the loop's agreement metrics see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from kdlab.config.validate import Positive, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, multi_teacher_kl
from kdlab.losses.ensemble import check_rule_options
from kdlab.methods.base import Method
from kdlab.models.ensemble import TeacherEnsemble
from kdlab.registry import register


@dataclass
class MultiTeacherHparams:
    rule: Literal["fixed", "mean_probs", "mean_logits", "entropy", "confidence"] = "mean_probs"  # combination
    weights: Optional[tuple[float, ...]] = None  # rule fixed only: one weight ≥ 0 per teacher (normalised)
    temperature: Positive = 4.0  # T: softens the teachers and the student in the soft term
    alpha: UnitInterval = 0.9  # weight of the soft (teachers) term; 1 − α weighs the label term
    weight_temperature: Positive = 1.0  # rule entropy only: τ_w of w_k ∝ exp(−H_k/τ_w); larger = closer to mean


@register("method", "multi_teacher")
class MultiTeacher(Method):
    """Multi-teacher KD: α·T²·KL(combined teachers‖student) + (1−α)·CE; rules fixed/mean/entropy/confidence."""

    Hparams = MultiTeacherHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if not isinstance(teacher, TeacherEnsemble):
            raise KdlabError("method multi_teacher needs several teachers: give teacher.members")
        try:
            check_rule_options(hparams.rule, num_teachers=len(teacher), weights=hparams.weights,
                               weight_temperature=hparams.weight_temperature)
        except KdlabError as exc:
            raise KdlabError(f"method.rule/weights/weight_temperature: {exc}") from None
        self.teacher_taps = tuple(teacher.feature_stages)  # "members.0", ..., one per teacher

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        members = [teacher_out.features[name] for name in self.teacher_taps]
        soft = multi_teacher_kl(student_out.logits, members, rule=h.rule, weights=h.weights,
                                temperature=h.temperature, labels=batch.labels,
                                weight_temperature=h.weight_temperature)
        return {
            "kd": h.alpha * soft,
            "ce": (1.0 - h.alpha) * cross_entropy(student_out.logits, batch.labels),
        }
