"""Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation"
(AAAI 2024; arXiv 2303.11098, first titled "A closer look at the training dynamics of KD").

The recipe, as in the official ImageNet code (``OurDistillationLoss``):

    f_s = W_p · z_s                      a linear projector on the student's pooled feature
    ẑ_s = BN(f_s),  ẑ_t = BN(z_t)        BatchNorm without affine parameters (eps 1e-4), both sides
    L_rep = log Σ_{b,d} |ẑ_s − ẑ_t|^p    the LogSum soft maximum over the whole batch, p = 4
    L = CE + 2.0·L_rep + KL(p_t ‖ p_s) at T = 1

Each design decision is a switch, so the paper's ablation can be rerun:
``projector`` (linear W_p, or none — then the widths must match),
``normalize`` (the affine-free BatchNorm, or none), and ``distance``
(``logsum``, or ``l2`` — the mean squared difference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kdlab.config.validate import NonNegative, Positive
from kdlab.errors import KdlabError
from kdlab.losses import batchnorm_standardize, cross_entropy, kl, logsum
from kdlab.methods.adapters import make_adapter
from kdlab.methods.base import Method
from kdlab.models.taps import tap_shapes
from kdlab.registry import register


@dataclass
class MilesHparams:
    projector: bool = True  # linear projector W_p on the student feature (owned by the method)
    normalize: bool = True  # BatchNorm without affine parameters on both sides
    distance: Literal["logsum", "l2"] = "logsum"  # soft maximum (LogSum) or mean squared difference
    power: Positive = 4.0  # p of LogSum (the official code hard-codes 4)
    feature_weight: NonNegative = 2.0  # weight of L_rep (official ImageNet config: 2.0)
    kl_weight: NonNegative = 1.0  # weight of KL(teacher‖student)
    ce_weight: NonNegative = 1.0
    temperature: Positive = 1.0  # of the KL term (the recipe uses T = 1)
    student_tap: str = "pool"  # the pooled, penultimate feature of zoo models
    teacher_tap: str = "pool"
    bn_eps: Positive = 1e-4  # BatchNorm1d(eps=1e-4, affine=False) in the official code


@register("method", "miles")
class Miles(Method):
    """Miles & Mikolajczyk's projector + BatchNorm + LogSum feature recipe with KL at T=1 (switchable)."""

    Hparams = MilesHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        self.student_taps = (hparams.student_tap,)
        self.teacher_taps = (hparams.teacher_tap,)
        if input_shape is None:
            raise KdlabError("method miles needs the input shape to size its projector")
        device = next(iter(student.parameters()), torch.zeros(())).device
        probe = torch.zeros(2, *input_shape, device=device)  # 2 samples: BatchNorm needs more than one
        s_shape = tap_shapes(student, [hparams.student_tap], probe)[hparams.student_tap]
        t_shape = tap_shapes(teacher, [hparams.teacher_tap], probe)[hparams.teacher_tap]
        if len(s_shape) != 2 or len(t_shape) != 2:
            raise KdlabError(f"method.student_tap/teacher_tap: the recipe works on pooled vectors, got student "
                             f"{hparams.student_tap} {tuple(s_shape[1:])} and teacher {hparams.teacher_tap} "
                             f"{tuple(t_shape[1:])}; tap the 'pool' stage")
        if hparams.projector:
            self.projector = make_adapter(s_shape[1:], t_shape[1:], kind="linear",
                                          student_tap=hparams.student_tap, teacher_tap=hparams.teacher_tap)
        elif s_shape[1] != t_shape[1]:
            raise KdlabError(f"method.projector: false needs equal feature widths, but the student's is {s_shape[1]} "
                             f"and the teacher's {t_shape[1]}; set projector: true")
        else:
            self.projector = None

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        z_s = student_out.features[h.student_tap].float()
        z_t = teacher_out.features[h.teacher_tap].float()
        if self.projector is not None:
            z_s = self.projector(z_s)
        if h.normalize:
            z_s = batchnorm_standardize(z_s, eps=h.bn_eps)
            z_t = batchnorm_standardize(z_t, eps=h.bn_eps)
        if h.distance == "logsum":
            # log Σ_{b,d}: the per-row log-sums combined by logsumexp over the batch (official form).
            rep = torch.logsumexp(logsum(z_s, z_t, power=h.power, reduction="none"), dim=0)
        else:
            rep = (z_s - z_t).pow(2).mean()
        return {
            "ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
            "kl": h.kl_weight * kl(student_out.logits, teacher_out.logits, temperature=h.temperature),
            "feature": h.feature_weight * rep,
        }
