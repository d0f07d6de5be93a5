"""CC — Peng et al. (ICCV 2019), "Correlation Congruence for Knowledge Distillation".

    L = ce_weight · CE + kl_weight · T²·KL(p_t ‖ p_s) + cc_weight · L_CC(W_s f_s, W_t f_t)

``L_CC`` (eq. 7, ``kdlab.losses.correlation_congruence``) compares the batch correlation matrices
(Gaussian RBF in its order-P Taylor form, eq. 9) of two linear embeddings of the pooled features. Both
embeddings ``W_s`` and ``W_t`` are the method's trainable parameters (the teacher network stays frozen).

Defaults as torchdistill's ILSVRC-2012 sample (``configs/sample/ilsvrc2012/cckd/resnet18_from_resnet50.yaml``:
``Linear4CCKD`` with 128 outputs and bias on ``avgpool`` for both networks, ``KDLoss`` with T = 1 and α = 0,
i.e. no hard-label term, weight 1; ``CCKDLoss`` γ = 0.4, P = 2, weight 0.003).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from kdlab.config.validate import NonNegative, NonNegativeCount, Positive, Width
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.losses.zoo import correlation_congruence
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import pair_shapes
from kdlab.registry import register


@dataclass
class CCHparams:
    ce_weight: NonNegative = 0.0  # torchdistill: KDLoss with α = 0 has no hard-label term
    kl_weight: NonNegative = 1.0
    temperature: Positive = 1.0
    cc_weight: NonNegative = 0.003
    gamma: Positive = 0.4
    max_p: NonNegativeCount = 2  # order P of the Taylor expansion
    kernel: Literal["gaussian", "bilinear"] = "gaussian"
    embed_dim: Width = 128
    student_tap: str = "pool"
    teacher_tap: str = "pool"


@register("method", "cc")
class CC(Method):
    """Correlation congruence: KL(T=1) + 0.003 · ‖C_s − C_t‖ / n² over learned 128-d embeddings."""

    Hparams = CCHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        [(s_shape, t_shape)] = pair_shapes("cc", (hparams.student_tap,), (hparams.teacher_tap,), student=student,
                                           teacher=teacher, input_shape=input_shape, maps=False)
        if len(s_shape) != 1 or len(t_shape) != 1:
            raise KdlabError(f"method.student_tap/teacher_tap: cc embeds pooled vectors, got student {s_shape} and "
                             f"teacher {t_shape}; tap the 'pool' stage")
        self.student_taps, self.teacher_taps = (hparams.student_tap,), (hparams.teacher_tap,)
        self.student_embed = nn.Linear(s_shape[0], hparams.embed_dim)
        self.teacher_embed = nn.Linear(t_shape[0], hparams.embed_dim)

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        e_s = self.student_embed(student_out.features[h.student_tap].float())
        e_t = self.teacher_embed(teacher_out.features[h.teacher_tap].float())
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "kl": h.kl_weight * kl(student_out.logits, teacher_out.logits, temperature=h.temperature),
                "cc": h.cc_weight * correlation_congruence(e_s, e_t, gamma=h.gamma, max_p=h.max_p, kernel=h.kernel)}
