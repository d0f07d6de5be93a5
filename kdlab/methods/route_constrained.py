"""Route-constrained distillation: the student follows the teacher's training route.

Jin et al., "Knowledge Distillation via Route Constrained Optimization", ICCV 2019:
instead of the converged teacher only, the student distils from a sequence of
the teacher's intermediate checkpoints ("anchor points"), easiest first, which
eases the capacity gap. Stage k of the student's training uses anchor k.

What kdlab implements, and how it differs from the paper:
* anchors are the teacher recipe's kept epochs (``teacher.train.keep_epochs``)
  plus its final weights (``teacher.trajectory: true``); the paper picks them
  with a greedy search — we take the ones the user names;
* the student's training is split into K equal parts (by optimiser step), one per
  anchor; the paper's schedule is per stage — equal parts are our choice;
* the loss at each stage is Hinton KD against the current anchor (the paper
  also mimics the anchor's logits; it uses no hint layers on CIFAR).

This is kdlab's stand-in for SLKD (Liu et al., 2023, "Improving KD via
transferring learning ability"): only its abstract is public, so its method
could not be established; we implement the closest documented idea of
transferring the teacher's learning process and name it for what it is.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdlab.config.validate import Positive, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Method
from kdlab.models.trajectory import TeacherTrajectory
from kdlab.registry import register


@dataclass
class RouteHparams:
    temperature: Positive = 4.0  # T of the KD term at every stage
    alpha: UnitInterval = 0.9  # weight of the KD term; 1 − α weighs the label term


def stage_index(progress: float, stages: int) -> int:
    """The anchor used at ``progress`` ∈ [0, 1]: equal parts of training, the last stage until the end."""
    return min(stages - 1, int(progress * stages))


@register("method", "route_constrained")
class RouteConstrained(Method):
    """Route-constrained KD (Jin et al. 2019): distil from the teacher's checkpoints in training order."""

    Hparams = RouteHparams

    teacher_cacheable = False  # the teacher moves along its trajectory during training

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if not isinstance(teacher, TeacherTrajectory):
            raise KdlabError("method route_constrained needs the teacher's trajectory: set teacher.trajectory: true "
                             "and teacher.train.keep_epochs (e.g. [5, 10, 20])")
        # A plain reference, not a submodule: the teacher is never part of the method's state.
        self.__dict__["_trajectory"] = teacher

    def set_progress(self, step, total_steps):
        super().set_progress(step, total_steps)
        self._trajectory.active = stage_index(self.progress, len(self._trajectory))

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        return {
            "kd": h.alpha * kl(student_out.logits, teacher_out.logits, temperature=h.temperature),
            "ce": (1.0 - h.alpha) * cross_entropy(student_out.logits, batch.labels),
        }
