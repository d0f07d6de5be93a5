"""NST — Huang & Wang (2017), "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer".

    L = ce_weight · CE(y, p_s) + feature_weight · Σ_stages MMD²_poly2(F_s, F_t)

(the paper's eq. 4 writes the feature term as λ/2 · L_MMD²; mdistiller folds the ½ into its
weight, ``NST.LOSS.FEAT_WEIGHT = 50``, which is the default here). The loss is ``kdlab.losses.nst``.
The authors' code (TuSimple/neuron-selectivity-transfer, ImageNet only: ``config/cfgs.py``,
``symbol/inception_bn.py``) uses the same weight, ``kt_weight = 50`` with CE 1, on one pair of maps: the last
block's BN outputs (pre-ReLU) of student and teacher. It has no CIFAR code, so the taps stay mdistiller's
CIFAR ones (``mdistiller/engine/cfg.py``, ``mdistiller/distillers/NST.py``): the three residual stages
(``feats[1:]``), CE weight 1, feature weight 50. No trainable parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdlab.config.validate import NonNegative
from kdlab.losses import cross_entropy
from kdlab.losses.zoo import nst
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import StagePairs, pair_shapes
from kdlab.registry import register


@dataclass
class NSTHparams(StagePairs):
    feature_weight: NonNegative = 50.0  # mdistiller CFG.NST.LOSS.FEAT_WEIGHT


@register("method", "nst")
class NST(Method):
    """Neuron selectivity transfer: CE + 50 · Σ_stages MMD² (polynomial kernel) of channel distributions."""

    Hparams = NSTHparams
    revision = 2  # 2: the authors' ε = 1e-10 under the root in the channel normalisation; old runs get other ids

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        pair_shapes("nst", hparams.student_taps, hparams.teacher_taps, student=student, teacher=teacher,
                            input_shape=input_shape, maps=True)
        self.student_taps, self.teacher_taps = tuple(hparams.student_taps), tuple(hparams.teacher_taps)

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        feature = sum(nst(student_out.features[s], teacher_out.features[t])
                      for s, t in zip(h.student_taps, h.teacher_taps))
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "nst": h.feature_weight * feature}
