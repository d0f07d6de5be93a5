"""AB — Heo, Lee, Yun & Choi (AAAI 2019), "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons".

Two phases, as the authors' CIFAR code (bhheo/AB_distillation ``cifar10_AB_distillation.py``,
``models/distillation_module.py`` ``Active_Soft_WRN_norelu``):

1. initialisation, the first ``init_fraction`` of training: only the activation-boundary loss
   ``feature_weight · Σ_i 2^{−(n−1−i)} · AB(connector_i(s_i), t_i)`` over the n tapped stages (the last
   weighs 1, each earlier one half the next; authors ``(AB_3 + AB_2/2 + AB_1/4) / 1000 · 3``, so
   ``feature_weight`` 0.003), margin μ 1 (``kdlab.losses.activation_boundary``). ``s_i``/``t_i`` are
   pre-ReLU features (``pre_relu_tap``); a connector (1×1 conv without bias, N(0, √(2/C_out)), then
   BatchNorm) maps the student's channels to the teacher's, none where the widths are equal;
2. the rest: the authors' ``train_KD``, ``kd_weight · KL(p_t ‖ p_s)`` at T = 3 without Hinton's T² and
   without CE (``ce_weight`` 0; torchdistill's DAB recipe instead trains CE alone: ``kd_weight 0,
   ce_weight 1``). The authors build a new optimiser for the second phase, so with ``fresh_optimizer``
   (default) the optimiser's state is cleared at its first step (``resets_optimizer``). The learning-rate
   schedule is the run's one schedule over both phases.

``init_fraction`` 0.05 (1 of 20 epochs) is torchdistill's; the authors' released script sets
``distill_epoch = max_epoch = 1``, a placeholder. The connectors are the method's parameters (checkpointed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from kdlab.config.validate import NonNegative, Positive, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.losses.zoo import activation_boundary
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import StagePairs, pair_shapes, pre_relu_point
from kdlab.registry import register


@dataclass
class ABHparams(StagePairs):
    ce_weight: NonNegative = 0.0  # second phase: the authors' loss is KD alone (``loss = loss_KD# + loss_CE``)
    feature_weight: NonNegative = 0.003  # the authors' ``loss_alter / 1000 * 3`` (torchdistill: 1.0)
    margin: NonNegative = 1.0  # μ (authors' ``margin = 1.0``)
    kd_weight: NonNegative = 1.0  # second phase: KL(p_t ‖ p_s) at temperature T, without Hinton's T² (authors)
    temperature: Positive = 3.0  # the authors' ``temperature = 3``
    init_fraction: UnitInterval = 0.05  # share of training for the AB initialisation (torchdistill: 1 of 20)
    fresh_optimizer: bool = True  # clear the optimiser's state at phase 2 (authors: a new optimiser)

    def problems(self) -> list[str]:
        found = super().problems()
        if self.ce_weight == 0 and self.kd_weight == 0:
            found.append("method.kd_weight: with ce_weight 0 too the second phase has no loss; give either > 0")
        return found


def connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """The authors' connector (``Active_Soft_WRN_norelu``): a bias-free 1×1 conv initialised N(0, √(2/C_out)),
    then BatchNorm at weight 1, bias 0; none (identity) where the widths are equal."""
    if in_channels == out_channels:
        return nn.Sequential()
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / out_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


@register("method", "ab")
class AB(Method):
    """Activation-boundary transfer: AB-loss initialisation of the student's pre-ReLU features, then KD."""

    Hparams = ABHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        pairs = pair_shapes("ab", hparams.student_taps, hparams.teacher_taps, student=student, teacher=teacher,
                            input_shape=input_shape, maps=True)
        for (s_shape, t_shape), s, t in zip(pairs, hparams.student_taps, hparams.teacher_taps):
            if s_shape[1:] != t_shape[1:]:
                raise KdlabError(f"method.student_taps/teacher_taps: ab compares maps neuron by neuron, so paired "
                                 f"stages need equal spatial sizes; {s} is {s_shape} and {t} is {t_shape}")
        # the authors' features before the ReLU where the stage has one (CIFAR ResNets, WRNs), else the tap as given
        self.student_taps = tuple((pre_relu_point(student, s) or (s,))[0] for s in hparams.student_taps)
        self.teacher_taps = tuple((pre_relu_point(teacher, t) or (t,))[0] for t in hparams.teacher_taps)
        # A pre-ReLU tap has its stage's shape (a ReLU's input, a BatchNorm's output).
        self.connectors = nn.ModuleList(connector(s[0], t[0]) for s, t in pairs)

    def initialising(self) -> bool:
        return self.progress < self.hparams.init_fraction

    def teacher_needed(self) -> bool:
        return self.initialising() or self.hparams.kd_weight > 0

    def resets_optimizer(self) -> bool:
        """True at the second phase's first step: the step before still initialised (the test of ``progress``)."""
        h = self.hparams
        previous = min(1.0, (self.step - 1) / max(1, self.total_steps))
        return h.fresh_optimizer and self.step > 0 and previous < h.init_fraction and not self.initialising()

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        zero = student_out.logits.new_zeros(())
        if not self.initialising():
            ce = h.ce_weight * cross_entropy(student_out.logits, batch.labels) if h.ce_weight > 0 else zero
            # kl carries Hinton's T²; the authors' soft term is the bare KL, hence the division.
            kd = (h.kd_weight * kl(student_out.logits, teacher_out.logits, temperature=h.temperature)
                  / h.temperature**2) if h.kd_weight > 0 else zero
            return {"ab": zero, "ce": ce, "kd": kd}
        n = len(self.connectors)  # the last stage weighs 1, each earlier one half the next (authors: 1, 1/2, 1/4)
        ab = sum(activation_boundary(conn(student_out.features[s]), teacher_out.features[t], margin=h.margin)
                 / 2 ** (n - 1 - i)
                 for i, (s, t, conn) in enumerate(zip(self.student_taps, self.teacher_taps, self.connectors)))
        return {"ab": h.feature_weight * ab, "ce": zero, "kd": zero}
