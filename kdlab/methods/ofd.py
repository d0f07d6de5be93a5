"""OFD — Heo, Kim, Yun, Park, Kwak & Choi (ICCV 2019), "A Comprehensive Overhaul of Feature Distillation".

    L = ce_weight · CE + feature_weight · Σ_i 2^{−(n−1−i)} · d_p(connector_i(s_i), pool(t_i), m_i)

over the n tapped stages (the last one weighted 1, each earlier one half the next), with ``s_i``/``t_i``
each stage's pre-ReLU output, ``m_i`` the margin from the teacher's BatchNorm before that ReLU
(``kdlab.losses.ofd``), the teacher map average-pooled to the student's size, and a connector per stage
(1×1 conv without bias, He-normal init, then BatchNorm) from the student's channels to the teacher's.

As the authors' code (clovaai/overhaul-distillation, ``CIFAR-100/distiller.py``, ``train_with_distillation.py``:
``CE + loss_distill.sum() / batch_size / 1000``): CE weight 1, feature weight 0.001, the three residual
stages, pre-ReLU features and margins from the models' ``extract_feature(preReLU=True)`` and
``get_bn_before_relu``: for the CIFAR ResNets the last block's sum before its ReLU (``relu2``'s input) with
that block's ``bn2`` (the BN on the residual branch), for the pre-activation WRNs the stage output through
the BN the next ReLU follows (the next stage's first ``bn1``, or the final BN in ``pool``). mdistiller agrees.
The margins are a buffer, fixed from the trained teacher when the method is built (saved in checkpoints).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kdlab.config.validate import NonNegative
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy
from kdlab.losses.ofd import ofd_margin, ofd_partial_l2
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import CIFAR_STAGES, StagePairs, pre_relu_point
from kdlab.models.taps import tap_shapes
from kdlab.registry import register


@dataclass
class OFDHparams(StagePairs):
    feature_weight: NonNegative = 0.001  # the authors' `/ 1000` (mdistiller CFG.OFD.LOSS.FEAT_WEIGHT)


def _pre_relu(net: nn.Module, stage: str, role: str, key: str) -> tuple[str, str]:
    """``(tap, bn)`` of ``stage``'s pre-ReLU output (``zoo_common.pre_relu_point``), or a one-line refusal."""
    try:
        net.get_submodule(stage)
    except AttributeError:
        stages = ", ".join(getattr(net, "feature_stages", ())) or "(none)"
        raise KdlabError(f"{key}: {role} stage {stage!r} does not exist; named stages: {stages}") from None
    point = pre_relu_point(net, stage)
    if point is None:
        raise KdlabError(f"{key}: ofd needs stages of residual blocks ending in bn2 and relu2 (the CIFAR ResNets' "
                         f"{', '.join(CIFAR_STAGES)}) or WRN stages followed by a BN; {role} stage {stage!r} is not one")
    return point


def connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """The authors' ``build_feature_connector`` (mdistiller's, kernel 1): conv N(0, √(2/(k²·C_out))) init, BN at (1, 0)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / out_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


@register("method", "ofd")
class OFD(Method):
    """Overhaul of feature distillation: CE + 0.001 · partial L2 on pre-ReLU stage outputs with a BN-derived margin."""

    Hparams = OFDHparams
    revision = 2  # 2: WRN taps through the next BN, as the authors (was mid-block); old runs get other ids

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if input_shape is None:
            raise KdlabError("method ofd needs the input shape to size its connectors")
        s_points = [_pre_relu(student, s, "student", "method.student_taps") for s in hparams.student_taps]
        t_points = [_pre_relu(teacher, t, "teacher", "method.teacher_taps") for t in hparams.teacher_taps]
        self.student_taps = tuple(tap for tap, _ in s_points)
        self.teacher_taps = tuple(tap for tap, _ in t_points)
        device = next(iter(student.parameters()), torch.zeros(())).device
        probe = torch.zeros(2, *input_shape, device=device)
        s_shapes = tap_shapes(student, self.student_taps, probe)
        t_shapes = tap_shapes(teacher, self.teacher_taps, probe)
        self.connectors = nn.ModuleList()
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            (_, c_s, h_s, w_s), (_, c_t, h_t, w_t) = s_shapes[s_tap], t_shapes[t_tap]
            if h_s > h_t or w_s > w_t:
                raise KdlabError(f"method.student_taps/teacher_taps: ofd pools the teacher map to the student's size, "
                                 f"but {s_tap} is larger ({h_s}×{w_s}) than {t_tap} ({h_t}×{w_t}); pair later "
                                 "student stages")
            self.connectors.append(connector(c_s, c_t))
        for i, (_, bn_path) in enumerate(t_points):  # E[x | x < 0] from the trained teacher's BN before the ReLU
            bn = teacher.get_submodule(bn_path)
            self.register_buffer(f"margin{i}", ofd_margin(bn.weight, bn.bias).float().to(device))

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        n = len(self.student_taps)
        feature = 0.0
        for i, (s_tap, t_tap, conn) in enumerate(zip(self.student_taps, self.teacher_taps, self.connectors)):
            s = conn(student_out.features[s_tap])
            t = nn.functional.adaptive_avg_pool2d(teacher_out.features[t_tap], s.shape[-2:])
            feature = feature + ofd_partial_l2(s, t, getattr(self, f"margin{i}")) / 2 ** (n - i - 1)
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "ofd": h.feature_weight * feature}
