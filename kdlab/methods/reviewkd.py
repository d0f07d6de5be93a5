"""ReviewKD — Chen, Liu, Zhao & Jia (CVPR 2021), "Distilling Knowledge via Knowledge Review".

    L = ce_weight · CE + reviewkd_weight · min(epoch / warmup_epochs, 1) · Σ_i HCL(F_i, T_i)

The review path (§3.2, the residual learning framework with ABF): the student's stages are visited from the
deepest to the shallowest; at stage i an attention-based fusion (ABF) takes the stage's features X_i
(1×1 conv + BN to ``mid`` channels) and the fused features Y_{i+1} carried up from the deeper stages
(nearest-upsampled to X_i's size), weighs them by two spatial attention maps (a 1×1 conv on their
concatenation, sigmoid), and carries the fusion on to stage i − 1; a 3×3 conv + BN maps the fusion to the
teacher's channels, F_i, compared with the teacher's stage i by the hierarchical context loss
(§3.3, ``kdlab.losses.reviewkd.hcl``: pyramid levels 4, 2, 1 with weights halving). The deepest stage has
nothing to fuse with. The ABFs are the method's parameters (trained with the student, checkpointed).

As the official code (dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py`` ``ABF``/``ReviewKD``/``hcl``,
``CIFAR-100/train.py``) and mdistiller (``distillers/ReviewKD.py``, ``engine/cfg.py`` ``REVIEWKD``): the
stages are the three residual stages and the pooled feature as a 1×1 map; the student's stage outputs after
their ReLU (``STU_PREACT: False``), the teacher's before it (``preact_feats[1:]``) and its pooled feature;
``mid = min(512, C_in of the deepest stage)``; conv weights Kaiming-uniform with a = 1; when a fused map's
size differs from the teacher's, it is nearest-resized to the teacher's before the 3×3 conv (and carried on
at that size). Defaults (mdistiller cfg.py; train.py's argparse defaults): CE 1, ReviewKD weight 1, warm-up
20 epochs with mdistiller's 1-based epoch (the first epoch weighs 1/20; the official train.py's 0-based
epoch gives the first epoch none). The CIFAR recipes raise the weight (5 for resnet32x4 → resnet8x4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.config.validate import NonNegative, NonNegativeCount, Width
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy
from kdlab.losses.reviewkd import hcl
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import CIFAR_STAGES, pair_shapes
from kdlab.models.taps import INPUT_SUFFIX
from kdlab.registry import register

REVIEW_TAPS = (*CIFAR_STAGES, "pool")  # mdistiller: feats[1:] + pooled_feat (as a 1×1 map)


@dataclass
class ReviewKDHparams:
    ce_weight: NonNegative = 1.0  # mdistiller CFG.REVIEWKD.CE_WEIGHT
    reviewkd_weight: NonNegative = 1.0  # CFG.REVIEWKD.REVIEWKD_WEIGHT; official --kd-loss-weight
    warmup_epochs: NonNegativeCount = 20  # CFG.REVIEWKD.WARMUP_EPOCHS; official --kd-warm-up (0: none)
    max_mid_channel: Width = 512  # CFG.REVIEWKD.MAX_MID_CHANNEL
    student_preact: bool = False  # CFG.REVIEWKD.STU_PREACT
    teacher_preact: bool = True  # the teacher's preact_feats
    student_taps: tuple[str, ...] = REVIEW_TAPS  # shallow to deep
    teacher_taps: tuple[str, ...] = REVIEW_TAPS
    # The ABF channel lists of the official configs (IN_CHANNELS, OUT_CHANNELS); None = read from the taps.
    in_channels: tuple[Width, ...] | None = None
    out_channels: tuple[Width, ...] | None = None

    def problems(self) -> list[str]:
        n = len(self.student_taps)
        if not n:
            return ["method.student_taps: give at least one tap, e.g. [stage1, stage2, stage3, pool]"]
        found = []
        if len(self.teacher_taps) != n:
            found.append(f"method.teacher_taps: {len(self.teacher_taps)} teacher stages for {n} student stages; "
                         "the review pairs the i-th student stage with the i-th teacher stage, so give as many")
        for key, channels in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            if channels is not None and len(channels) != n:
                found.append(f"method.{key}: {len(channels)} ABF channel counts for {n} stages "
                             f"(student_taps/teacher_taps); give one per stage or leave {key} unset")
        return found[:1]


class ABF(nn.Module):
    """Attention-based fusion (official ``ABF``): returns (output for the loss, fused map carried on)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def review(abfs: nn.ModuleList, features: list[torch.Tensor], out_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The review path: ABFs from the deepest stage to the shallowest; outputs in stage order (shallow first)."""
    outputs: list[torch.Tensor] = [None] * len(features)  # type: ignore[list-item]
    residual = None
    for i in reversed(range(len(features))):
        outputs[i], residual = abfs[i](features[i], residual, out_sizes[i])
    return outputs


def _as_map(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape, 1, 1) if x.ndim == 2 else x


def _preact_tap(net: nn.Module, stage: str, role: str, key: str) -> str:
    """The input of the ReLU that ends ``stage``'s last block: the stage's pre-activation output."""
    children = list(net.get_submodule(stage).named_children())
    if not children or not hasattr(children[-1][1], "relu2"):
        raise KdlabError(f"{key}: {role} stage {stage!r} does not end in a residual block with relu2, so it has no "
                         f"pre-activation output to tap; set method.{role}_preact: false or tap "
                         f"{', '.join(CIFAR_STAGES)} of a CIFAR ResNet")
    return f"{stage}.{children[-1][0]}.relu2{INPUT_SUFFIX}"


@register("method", "reviewkd")
class ReviewKD(Method):
    """Knowledge review: CE + HCL between ABF-fused student stages (deep to shallow) and the teacher's stages."""

    Hparams = ReviewKDHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        h = hparams
        pairs = pair_shapes("reviewkd", h.student_taps, h.teacher_taps, student=student, teacher=teacher,
                            input_shape=input_shape, maps=False)
        for (s_shape, t_shape), s, t in zip(pairs, h.student_taps, h.teacher_taps):
            if len(s_shape) not in (1, 3) or len(t_shape) not in (1, 3):
                raise KdlabError(f"method.student_taps/teacher_taps: reviewkd fuses (C, H, W) maps or pooled (C,) "
                                 f"vectors, but {s} is {s_shape} and {t} is {t_shape}")
        s_channels = [s[0] for s, _ in pairs]
        t_channels = [t[0] for _, t in pairs]
        for key, given, probed in (("in_channels", h.in_channels, s_channels),
                                   ("out_channels", h.out_channels, t_channels)):
            if given is not None and list(given) != probed:
                raise KdlabError(f"method.{key}: {list(given)} does not match the channels of the "
                                 f"{'student' if key == 'in_channels' else 'teacher'} taps, {probed}; "
                                 f"leave {key} unset to read them from the taps")
        self.student_taps = tuple(_preact_tap(student, s, "student", "method.student_taps")
                                  if h.student_preact and len(shape) == 3 else s
                                  for s, (shape, _) in zip(h.student_taps, pairs))
        self.teacher_taps = tuple(_preact_tap(teacher, t, "teacher", "method.teacher_taps")
                                  if h.teacher_preact and len(shape) == 3 else t
                                  for t, (_, shape) in zip(h.teacher_taps, pairs))
        self.out_sizes = [tuple(t[1:]) if len(t) == 3 else (1, 1) for _, t in pairs]
        mid = min(h.max_mid_channel, s_channels[-1])
        n = len(pairs)
        self.abfs = nn.ModuleList(ABF(c_s, mid, c_t, fuse=i < n - 1)
                                  for i, (c_s, c_t) in enumerate(zip(s_channels, t_channels)))

    def warmup(self) -> float:
        """min(epoch / warmup_epochs, 1) with the 1-based epoch of the step about to be taken (mdistiller)."""
        epochs = self.hparams.warmup_epochs
        if not epochs:
            return 1.0
        epoch = self.step // self.steps_per_epoch + 1 if self.steps_per_epoch else 1
        return min(epoch / epochs, 1.0)

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        features = [_as_map(student_out.features[tap]) for tap in self.student_taps]
        if self.training and any(f.shape[0] * f.shape[2] * f.shape[3] < 2 for f in features):
            # BatchNorm in training mode needs two values per channel; the pooled 1×1 stage has one per sample.
            raise KdlabError(f"method reviewkd: a training batch of {features[0].shape[0]} sample(s) leaves its ABF "
                             "BatchNorm one value per channel on a 1×1 stage; choose train.batch_size so that no "
                             "batch (the last one of an epoch included) holds a single sample")
        targets = [_as_map(teacher_out.features[tap]) for tap in self.teacher_taps]
        fused = review(self.abfs, features, self.out_sizes)
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "reviewkd": h.reviewkd_weight * self.warmup() * hcl(fused, targets)}
