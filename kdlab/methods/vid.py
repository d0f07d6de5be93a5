"""VID — Ahn, Hu, Damianou, Lawrence & Dai (CVPR 2019), "Variational Information Distillation for Knowledge Transfer".

    L = ce_weight · CE(y, p_s) + feature_weight · Σ_stages NLL(t | μ(s), σ²)

Per stage: a regressor μ (two bias-free 1×1 convs, C_S → C_T → C_T, nothing between) predicts the teacher's
map from the student's, with one learned variance per teacher channel, ``σ_c² = softplus(α_c) + ε``
(eq. 6; ``kdlab.losses.zoo.vid_nll``). The regressors and the α are the method's parameters: optimised
with the student and checkpointed with it.

The regressor is the authors' official PyTorch release (Amazon 2020, ``wide_residual_network.py``,
``StudentWideResidualNetwork.branch1..3``; loss ``loss.py`` ``GaussianLoss``), not mdistiller's three convs with
ReLUs (RepDistiller's port of an earlier author version). Defaults as mdistiller (``mdistiller/distillers/VID.py``,
``mdistiller/engine/cfg.py``): the three residual stages, CE weight 1, feature weight 1, initial variance 5.0,
ε = 1e-5; the larger map is average-pooled to the smaller's size before the regressor. mdistiller keeps the α in
a plain Python list, so its optimiser never updates them; here they are learned, as in the authors' code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kdlab.config.validate import Positive
from kdlab.losses import cross_entropy
from kdlab.losses.zoo import match_spatial, vid_nll
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import StagePairs, pair_shapes
from kdlab.registry import register


@dataclass
class VIDHparams(StagePairs):
    init_variance: Positive = 5.0  # mdistiller CFG.VID.INIT_PRED_VAR: σ² at the start
    eps: Positive = 1e-5  # mdistiller CFG.VID.EPS: the variance's floor

    def problems(self) -> list[str]:
        found = super().problems()
        if not found and self.init_variance <= self.eps:
            found.append(f"method.init_variance: must exceed method.eps ({self.eps:g}), the variance's floor")
        return found


def regressor(in_channels: int, out_channels: int) -> nn.Sequential:
    """The authors' VID branch: two bias-free 1×1 convs (C_S → C_T → C_T), no nonlinearity, torch's default init."""
    def conv(i, o):
        return nn.Conv2d(i, o, kernel_size=1, bias=False)
    return nn.Sequential(conv(in_channels, out_channels), conv(out_channels, out_channels))


@register("method", "vid")
class VID(Method):
    """Variational information distillation: CE + Σ_stages Gaussian NLL of the teacher map (learned variance)."""

    Hparams = VIDHparams
    revision = 2  # 2: the authors' two linear 1×1 convs as the regressor (was mdistiller's three with ReLUs)

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        pairs = pair_shapes("vid", hparams.student_taps, hparams.teacher_taps, student=student, teacher=teacher,
                            input_shape=input_shape, maps=True)
        self.student_taps, self.teacher_taps = tuple(hparams.student_taps), tuple(hparams.teacher_taps)
        self.regressors = nn.ModuleList(regressor(s[0], t[0]) for s, t in pairs)
        # α with softplus(α) + ε = init_variance at the start.
        alpha = math.log(math.expm1(hparams.init_variance - hparams.eps))
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t[0],), alpha)) for _, t in pairs)

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        feature = 0.0
        for s_tap, t_tap, reg, log_scale in zip(h.student_taps, h.teacher_taps, self.regressors, self.log_scales):
            s, t = match_spatial(student_out.features[s_tap], teacher_out.features[t_tap])
            feature = feature + vid_nll(reg(s), t, log_scale, eps=h.eps)
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "vid": h.feature_weight * feature}
