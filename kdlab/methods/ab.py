"""AB — Heo, Lee, Yun & Choi (AAAI 2019), "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons".

Two phases, as torchdistill's DAB recipe (``configs/sample/ilsvrc2012/dab/resnet18_from_resnet50.yaml``):

1. initialisation, the first ``init_fraction`` of training: only the activation-boundary loss
   ``ab_weight · Σ_stages AB(connector(s), t)`` (``kdlab.losses.activation_boundary``, margin μ), with one
   connector per stage (1×1 conv without bias → BatchNorm, ``Connector4DAB``) mapping the student's stage
   output to the teacher's channels;
2. the rest: ``ce_weight · CE`` alone (its ``KDLoss`` with α = 1 has no soft term); the teacher is not run
   (``teacher_needed``) and the connectors are unused. torchdistill builds each stage its own optimiser, so
   with ``fresh_optimizer`` (default) the optimiser's state (Adam's moments, SGD's momentum) is cleared at the
   first CE step (``resets_optimizer``): the boundary loss's large gradients do not carry into CE. The learning
   rate schedule is the run's one schedule over both stages.

Defaults: margin 1.0, AB weight 1, one of 20 epochs for initialisation (``init_fraction`` 0.05), the three
residual stages. torchdistill taps the stage outputs after their ReLU; the teacher's side is unaffected
(ρ(t) = 1[t > 0] is the same before and after a ReLU), and the connector's BatchNorm output on the student's side
can take either sign, as the loss needs. The connectors are the method's parameters (checkpointed with it).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kdlab.config.validate import NonNegative, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy
from kdlab.losses.zoo import activation_boundary
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import StagePairs, pair_shapes
from kdlab.registry import register


@dataclass
class ABHparams(StagePairs):
    feature_weight: NonNegative = 1.0  # the AB loss's weight in the initialisation phase (torchdistill: 1.0)
    margin: NonNegative = 1.0  # μ (torchdistill AltActTransferLoss margin)
    init_fraction: UnitInterval = 0.05  # share of training for the AB initialisation (torchdistill: 1 of 20 epochs)
    fresh_optimizer: bool = True  # clear the optimiser's state when CE starts (torchdistill: a new stage optimiser)


def connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """torchdistill's ``Connector4DAB``: a bias-free 1×1 conv, then BatchNorm."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels))


@register("method", "ab")
class AB(Method):
    """Activation-boundary transfer: AB-loss initialisation of the student through connectors, then CE."""

    Hparams = ABHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        pairs = pair_shapes("ab", hparams.student_taps, hparams.teacher_taps, student=student, teacher=teacher,
                            input_shape=input_shape, maps=True)
        for (s_shape, t_shape), s, t in zip(pairs, hparams.student_taps, hparams.teacher_taps):
            if s_shape[1:] != t_shape[1:]:
                raise KdlabError(f"method.student_taps/teacher_taps: ab compares maps neuron by neuron, so paired "
                                 f"stages need equal spatial sizes; {s} is {s_shape} and {t} is {t_shape}")
        self.student_taps, self.teacher_taps = tuple(hparams.student_taps), tuple(hparams.teacher_taps)
        self.connectors = nn.ModuleList(connector(s[0], t[0]) for s, t in pairs)

    def initialising(self) -> bool:
        return self.progress < self.hparams.init_fraction

    def teacher_needed(self) -> bool:
        return self.initialising()

    def resets_optimizer(self) -> bool:
        """True at the first CE step: the step before it still initialised (same float test as ``progress``)."""
        h = self.hparams
        previous = min(1.0, (self.step - 1) / max(1, self.total_steps))
        return h.fresh_optimizer and self.step > 0 and previous < h.init_fraction and not self.initialising()

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        zero = student_out.logits.new_zeros(())
        if not self.initialising():
            return {"ab": zero, "ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels)}
        ab = sum(activation_boundary(conn(student_out.features[s]), teacher_out.features[t], margin=h.margin)
                 for s, t, conn in zip(h.student_taps, h.teacher_taps, self.connectors))
        return {"ab": h.feature_weight * ab, "ce": zero}
