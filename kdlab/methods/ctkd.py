"""CTKD — Li et al. (AAAI 2023), "Curriculum Temperature for Knowledge Distillation".

Global temperature (``temperature_module: global``, the default):

    T = t_start + t_range · sigmoid(τ)            τ a learned scalar (init 1)
    L = ce_weight · CE + kl_weight · T²·KL(p_t^T ‖ p_s^T)

Instance-wise temperature (``temperature_module: instance``): a two-layer MLP over the concatenated teacher and
student logits gives one τ_i per sample, ``T_i = t_start + t_range · sigmoid(τ_i)``, and the KD term is the mean
of the per-sample ``T_i²·KL`` (``kdlab.losses.ctkd.kl_at_instance_temperatures``).

The student minimises L; the temperature module receives L's gradient through a gradient-reversal layer scaled
by −λ, so the temperature *maximises* the distillation loss (the adversarial curriculum, §3), with λ rising from
0 to ``lambda_max`` along a half cosine over the first ``lambda_epochs`` epochs (``kdlab.losses.ctkd.cosine_lambda``).

As the official code (zhengli97/CTKD: ``models/temp_global.py`` ``Global_T``, ``helper/loops.py``,
``train_student.py`` ``CosineDecay``, ``scripts/run_cifar_distill.sh``): τ init 1, ``t_start`` 1,
``t_end`` 20 (our ``t_range``), λ from 0 to 1 over 10 epochs (``--decay_max 0 --decay_min -1 --decay_loops 10``;
the epoch index is 1-based, read at each epoch's start), CE weight 0.1 (``-r``), KL weight 0.9 (``-a``). The
instance-wise module's code is not in the repository (its README links a download): the call
``mlp_net(logit_t, logit_s, cos_value)`` then ``t_start + t_end · sigmoid(·)`` (``helper/loops.py``) and the
per-sample loss (README) are official; the MLP's width (``instance_hidden``) and its detached inputs are our
choices (docs/methods.md). The module is a method parameter set, optimised by the student's optimiser (as there)
and saved in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from kdlab.config.schema import OMIT_DEFAULT
from kdlab.config.validate import Count, NonNegative, Positive, UnitInterval, Weight, Width
from kdlab.losses import cross_entropy
from kdlab.losses.ctkd import (cosine_lambda, kl_at_instance_temperatures, kl_at_learned_temperature,
                               reverse_gradient)
from kdlab.methods.adversarial_kd import _num_classes
from kdlab.methods.base import Method
from kdlab.registry import register


@dataclass
class CTKDHparams:
    ce_weight: NonNegative = 0.1
    kl_weight: NonNegative = 0.9
    t_start: Positive = 1.0  # the lowest temperature
    t_range: Positive = 20.0  # T = t_start + t_range · sigmoid(τ) (official t_end)
    init: Weight = 1.0  # global τ at the start (T ≈ 15.6 with the defaults)
    lambda_max: UnitInterval = 1.0  # the reversal's final strength
    lambda_epochs: Count = 10  # epochs of the cosine rise
    # One learned T, or an MLP giving one per sample; the instance MLP's hidden width (ours: the official module
    # is not published). Added after the first ctkd runs: at their defaults, not in the run id.
    temperature_module: Literal["global", "instance"] = field(default="global", metadata=OMIT_DEFAULT)
    instance_hidden: Width = field(default=256, metadata=OMIT_DEFAULT)


class InstanceTemperature(nn.Module):
    """τ_i = MLP([z_t,i, z_s,i]): Linear(2C → hidden), ReLU, Linear(hidden → 1); inputs detached (the module
    learns the temperature; the logits learn through the loss, not through its input)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([teacher_logits.detach(), student_logits.detach()], dim=1).to(self.net[0].weight.dtype)
        return self.net(inputs).squeeze(1)


@register("method", "ctkd")
class CTKD(Method):
    """Curriculum temperature: KD at a learned temperature (global or per sample) trained adversarially."""

    Hparams = CTKDHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if hparams.temperature_module == "instance":
            self.temperature_net = InstanceTemperature(_num_classes(student, teacher, input_shape), hparams.instance_hidden)
            self._last_temperature: torch.Tensor | None = None  # the last batch's mean T, for metrics()
        else:
            self.tau = nn.Parameter(torch.full((1,), float(hparams.init)))

    def reversal(self) -> float:
        """λ for this step: the epoch (1-based, as the official loop) of the step about to be taken."""
        epoch = self.step // self.steps_per_epoch + 1 if self.steps_per_epoch else 1
        return cosine_lambda(epoch, lambda_max=self.hparams.lambda_max, epochs=self.hparams.lambda_epochs)

    def temperature(self, teacher_logits: torch.Tensor | None = None,
                    student_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The global T (1,), or with the instance module one T per sample (N,) for these logits."""
        h = self.hparams
        raw = self.tau if h.temperature_module == "global" else self.temperature_net(teacher_logits, student_logits)
        return h.t_start + h.t_range * torch.sigmoid(reverse_gradient(raw, self.reversal()))

    def metrics(self) -> dict[str, float]:
        if self.hparams.temperature_module == "global":
            with torch.no_grad():
                temperature = float(self.temperature())
        else:  # the mean over the epoch's last batch
            last = self._last_temperature
            temperature = float(last) if last is not None else float("nan")
        return {"temperature": temperature, "lambda": self.reversal()}

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        s, t = student_out.logits, teacher_out.logits
        if h.temperature_module == "global":
            kl = kl_at_learned_temperature(s, t, self.temperature())
        else:
            temperatures = self.temperature(t, s)
            self._last_temperature = temperatures.detach().mean()
            kl = kl_at_instance_temperatures(s, t, temperatures)
        return {"ce": h.ce_weight * cross_entropy(s, batch.labels), "kl": h.kl_weight * kl}
