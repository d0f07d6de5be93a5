"""ReviewKD's hierarchical context loss (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review",
CVPR 2021, §3.3, HCL).

Per stage, the MSE of the maps plus the MSE of their average-pooled 4×4, 2×2 and 1×1 versions (only the
levels smaller than the map's height), each level weighted half the one before, divided by the sum of the
weights; the stages' values are summed. As the official ``hcl`` (dvlab-research/ReviewKD
``CIFAR-100/model/reviewkd.py``; mdistiller ``distillers/ReviewKD.py`` ``hcl_loss`` is the same code).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError

LEVELS = (4, 2, 1)  # the pyramid's pooled sizes, finest first


def hcl(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
        levels: Sequence[int] = LEVELS) -> torch.Tensor:
    """Σ_stages [mse(s, t) + Σ_l w_l · mse(pool_l(s), pool_l(t))] / (1 + Σ_l w_l), w halving from ½ per used level.

    Maps are (N, C, H, W) with equal shapes per stage; a level l is used where l < H (official ``if l >= h``).
    """
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise KdlabError(f"loss hcl: {len(student_maps)} student maps for {len(teacher_maps)} teacher maps; "
                         "give one of each per stage")
    total = 0.0
    for s, t in zip(student_maps, teacher_maps):
        if s.shape != t.shape or s.ndim != 4:
            raise KdlabError(f"loss hcl: maps {tuple(s.shape)} and {tuple(t.shape)} must be equal (N, C, H, W)")
        loss = F.mse_loss(s, t)
        weight = weights = 1.0
        for level in levels:
            if level >= s.shape[2]:
                continue
            weight /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level)) * weight
            weights += weight
        total = total + loss / weights
    return total
