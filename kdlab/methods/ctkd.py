"""CTKD — Li et al. (AAAI 2023), "Curriculum Temperature for Knowledge Distillation", global-temperature form.

    T = t_start + t_range · sigmoid(τ)            τ a learned scalar (init 1)
    L = ce_weight · CE + kl_weight · T²·KL(p_t^T ‖ p_s^T)

The student minimises L; τ receives L's gradient through a gradient-reversal layer scaled by −λ, so the
temperature *maximises* the distillation loss (the adversarial curriculum, §3), with λ rising from 0 to
``lambda_max`` along a half cosine over the first ``lambda_epochs`` epochs (``kdlab.losses.ctkd.cosine_lambda``).

As the official code (zhengli97/CTKD: ``models/temp_global.py`` ``Global_T``, ``helper/loops.py``,
``train_student.py`` ``CosineDecay``, ``scripts/run_cifar_distill.sh``): τ init 1, ``t_start`` 1,
``t_end`` 20 (our ``t_range``), λ from 0 to 1 over 10 epochs (``--decay_max 0 --decay_min -1 --decay_loops 10``;
the epoch index is 1-based, read at each epoch's start), CE weight 0.1 (``-r``), KL weight 0.9 (``-a``). τ is a
method parameter, optimised by the student's optimiser (as there) and saved in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdlab.config.validate import Count, NonNegative, Positive, UnitInterval, Weight
from kdlab.losses import cross_entropy
from kdlab.losses.ctkd import cosine_lambda, kl_at_learned_temperature, reverse_gradient
from kdlab.methods.base import Method
from kdlab.registry import register


@dataclass
class CTKDHparams:
    ce_weight: NonNegative = 0.1
    kl_weight: NonNegative = 0.9
    t_start: Positive = 1.0  # the lowest temperature
    t_range: Positive = 20.0  # T = t_start + t_range · sigmoid(τ) (official t_end)
    init: Weight = 1.0  # τ at the start (T ≈ 15.6 with the defaults)
    lambda_max: UnitInterval = 1.0  # the reversal's final strength
    lambda_epochs: Count = 10  # epochs of the cosine rise


@register("method", "ctkd")
class CTKD(Method):
    """Curriculum temperature: KD at a learned global temperature trained adversarially (gradient reversal)."""

    Hparams = CTKDHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        self.tau = nn.Parameter(torch.full((1,), float(hparams.init)))

    def reversal(self) -> float:
        """λ for this step: the epoch (1-based, as the official loop) of the step about to be taken."""
        epoch = self.step // self.steps_per_epoch + 1 if self.steps_per_epoch else 1
        return cosine_lambda(epoch, lambda_max=self.hparams.lambda_max, epochs=self.hparams.lambda_epochs)

    def temperature(self) -> torch.Tensor:
        h = self.hparams
        return h.t_start + h.t_range * torch.sigmoid(reverse_gradient(self.tau, self.reversal()))

    def metrics(self) -> dict[str, float]:
        with torch.no_grad():
            return {"temperature": float(self.temperature()), "lambda": self.reversal()}

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        t = self.temperature()
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "kl": h.kl_weight * kl_at_learned_temperature(student_out.logits, teacher_out.logits, t)}
