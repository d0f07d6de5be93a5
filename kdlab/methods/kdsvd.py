"""KDSVD — Lee, Kim & Song (ECCV 2018), "Self-supervised Knowledge Distillation Using Singular Value Decomposition".

    L = ce_weight · CE(y, p_s) + feature_weight · kdsvd(stages_s, stages_t)

``kdlab.losses.zoo.kdsvd`` (the authors' ``KD_SVD``, ``sseung0703/KD_methods_with_TF``). Defaults as the authors
(``K = 1``; CE and distillation added with weight 1; the last block of each residual stage, after its ReLU) and
mdistiller (``cfg.py``: ``KDSVD.K = 1``, weights 1; the three residual stages). No trainable parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdlab.config.validate import Count
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy
from kdlab.losses.zoo import kdsvd
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import StagePairs, pair_shapes
from kdlab.registry import register


@dataclass
class KDSVDHparams(StagePairs):
    k: Count = 1  # teacher singular vectors kept (the student keeps k + 3); the authors' K, mdistiller CFG.KDSVD.K

    def problems(self) -> list[str]:
        found = super().problems()
        if not found and len(self.student_taps) < 2:
            found.append("method.student_taps: kdsvd correlates consecutive stages; give at least two taps")
        return found


@register("method", "kdsvd")
class KDSVD(Method):
    """KDSVD: CE + the RBF correlations of consecutive stages' SVD-compressed features (the authors' form)."""

    Hparams = KDSVDHparams
    revision = 2  # 2: the authors' (N, H·W, C) view (was mdistiller's (N, C·H, W)); old runs get other ids

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        pairs = pair_shapes("kdsvd", hparams.student_taps, hparams.teacher_taps, student=student, teacher=teacher,
                            input_shape=input_shape, maps=True)
        for (s_shape, t_shape), s, t in zip(pairs, hparams.student_taps, hparams.teacher_taps):
            if s_shape[0] != t_shape[0]:
                raise KdlabError(f"method.student_taps/teacher_taps: kdsvd's singular vectors run over the channels, "
                                 f"so paired stages need equal channel counts; {s} is {s_shape} and {t} is {t_shape}")
        self.student_taps, self.teacher_taps = tuple(hparams.student_taps), tuple(hparams.teacher_taps)

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        feature = kdsvd([student_out.features[s] for s in h.student_taps],
                        [teacher_out.features[t] for t in h.teacher_taps], k=h.k)
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "kdsvd": h.feature_weight * feature}
