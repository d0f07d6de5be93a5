"""Training without a teacher: the cross-entropy baseline every KD result is read against.

On a sequence task this is supervised fine-tuning (SFT): next-token
cross-entropy on the reference responses only,

    L_SFT(θ) = − (1/|R|) Σ_{(b, t) ∈ R} log p_θ(y_{b,t} | y_{b,<t}, x_b),

R the response tokens of the batch (EOS included; prompt and padding excluded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from annotated_types import Interval

from kdlab.losses import cross_entropy
from kdlab.losses.sequence import response_units
from kdlab.methods.base import Method
from kdlab.registry import register


def sequence_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "token",
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy on the response tokens: logits (B, L, V) at t predict labels (B, L) at t + 1."""
    targets = labels[:, 1:]
    mask = targets != -100
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none",
                                label_smoothing=label_smoothing)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "token":
        return per_token.sum() / mask.sum().clamp_min(1)
    counts = mask.sum(dim=1)
    has_response = counts > 0
    per_sequence = per_token.sum(dim=1) / counts.clamp_min(1)
    return (per_sequence * has_response).sum() / has_response.sum().clamp_min(1)


@dataclass
class ScratchHparams:
    label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.0  # ε of Szegedy et al. 2016; 0 = plain cross-entropy


@register("method", "scratch")
class Scratch(Method):
    """Cross-entropy on the labels only (no teacher): the from-scratch baseline; SFT on sequence tasks."""

    Hparams = ScratchHparams
    needs_teacher = False
    data_kinds = ("classification", "sequence")

    def loss_count(self, batch):
        """Gradient accumulation: SFT averages over response tokens, classification over samples."""
        if self.sequence is not None:
            return response_units(batch.labels, "token")
        return super().loss_count(batch)

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        if self.sequence is not None:
            return {"ce": sequence_cross_entropy(student_out.logits, batch.labels, label_smoothing=h.label_smoothing)}
        return {"ce": cross_entropy(student_out.logits, batch.labels, label_smoothing=h.label_smoothing)}
