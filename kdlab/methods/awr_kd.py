"""SRST-AWR: adaptively weighted robust regularisation with a semi-supervised teacher (Yang, Kong & Kim,
ICCV 2023, "Enhancing Adversarial Robustness in Low-Label Regime via Adaptively Weighted Regularization
and Knowledge Distillation", arXiv 2308.04061), as in the official ``dyoony/SRST_AWR``
``loss.py::SRST_AWR_KD_loss``:

    L = LS-CE_ε( f(x_l), y_l )
      + λ · mean_u[ w(x_u) · KL( p_θ(x_u) ‖ p_θ(x̂_u) ) ]
      + γ · KL( softmax(f_T(x_u)/τ) ‖ softmax(f(x_u)/τ) )
    w(x) = β·⟨p_T(x), p_θ(x)⟩ + (1 − β)·(1 − ⟨p_T(x), p_θ(x̂)⟩)

p = softmax at temperature 1, p_T the (fixed) teacher's. Reductions as the code:
LS-CE is the mean over labelled rows; the weighted KL is summed over classes and
averaged over the unlabelled rows; the KD term is batchmean with **no τ² factor**.
p_T is detached; the student's probabilities inside w are **not** (the code keeps
their graph), nor is p_θ(x_u) inside the KL. The code's ``+1e-12`` inside the logs
is not reproduced (exact log-softmax).

Inner max (``attacks/pgd.py::PGD_Linf``): uniform start clamped to [0, 1], student
in **eval** mode (``bn_mode='eval'``); ``perturb_loss: kl`` maximises
KL(p_θ(x) ‖ p_θ(x')) (CIFAR-10), ``ce`` the CE with the teacher's argmax
pseudo-label (CIFAR-100, STL-10).

Labels: the low-label regime arrives as ``labels == -1`` on the training rows
whose label is hidden (``kdlab.data.lowlabel.keep_labels_per_class``). Within a
batch, the labelled rows (label ≥ 0) feed the LS-CE term and **all** rows serve
as the unlabelled set x_u. The paper's code draws separate labelled (64) and
unlabelled (128) batches, and its unlabelled set includes the labelled images
(``include_lb_to_ulb=True``); one mixed batch keeps the second property, but the
labelled share of a batch is the data's label fraction rather than 64/(64+128),
and BatchNorm sees one batch instead of two. A batch without labelled rows gives
a 0 CE term.

Defaults: the README's CIFAR-10 row: ε_LS = 0.2, λ = 20, γ = 4, β = 0.5, τ = 1.2,
perturb_loss kl, ε = 8/255, 10 steps of ε/4 = 2/255.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kdlab.config.validate import NonNegative, NonNegativeCount, Positive, UnitInterval
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Batch
from kdlab.methods.robust_common import RobustMethod, training_mode
from kdlab.registry import register


@dataclass
class AWRKDHparams:
    label_smoothing: UnitInterval = 0.2  # ε of the labelled LS-CE term
    robust_weight: NonNegative = 20.0  # λ: weight of the adaptively weighted robust KL
    distill_weight: NonNegative = 4.0  # γ: weight of the KD term (no τ² factor, as the code)
    beta: UnitInterval = 0.5  # β of w(x): mix of clean agreement and adversarial disagreement with the teacher
    temperature: Positive = 1.2  # τ of the KD term (CIFAR-10; 1.0 for CIFAR-100 / STL-10)
    perturb_loss: Literal["kl", "ce"] = "kl"  # attack objective: KL(p(x)‖p(x')) or CE with teacher pseudo-labels
    epsilon: NonNegative = 8 / 255  # L∞ radius, in [0, 1] pixel units
    step_size: Positive = 2 / 255  # PGD step (code: ε/4)
    steps: NonNegativeCount = 10  # PGD steps of the inner maximisation (0 = no attack)
    attack_init: Literal["uniform", "normal_0.001", "zero"] = "uniform"  # x + U(−ε, ε), clamped (code)
    attack_mode: Literal["train", "eval"] = "eval"  # student's mode while attacking (code: bn_mode eval)


def awr_weights(teacher_probs: torch.Tensor, clean_probs: torch.Tensor, adversarial_probs: torch.Tensor,
                beta: float) -> torch.Tensor:
    """w(x) = β·⟨p_T(x), p_θ(x)⟩ + (1 − β)·(1 − ⟨p_T(x), p_θ(x̂)⟩), per row: ``(N, C)`` probabilities → ``(N,)``.

    Gradients flow through the student's probabilities (the official code does not detach them).
    """
    agreement = (teacher_probs * clean_probs).sum(dim=-1)
    adversarial_agreement = (teacher_probs * adversarial_probs).sum(dim=-1)
    return beta * agreement + (1.0 - beta) * (1.0 - adversarial_agreement)


@register("method", "awr_kd")
class AWRKD(RobustMethod):
    """SRST-AWR (Yang et al. 2023): LS-CE on labelled rows + λ·AWR-weighted KL(p(x)‖p(x̂)) + γ·KD on all rows."""

    Hparams = AWRKDHparams
    teacher_in_loop = False
    uses_unlabelled = True  # rows with label -1 (data.labels_per_class) feed the robust and KD terms

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)

    def make_batch(self, batch: Batch) -> Batch:
        x = batch.inputs
        teacher_clean = self.teacher_logits(self._teacher, x)
        if self.hparams.perturb_loss == "kl":
            with training_mode(self._student, self.hparams.attack_mode), torch.no_grad():
                clean = self._student(x)  # the attack's target p_θ(x), in the attack's mode
            objective = lambda logits: kl(logits, clean, reduction="sum")  # noqa: E731  KL(p(x) ‖ p(x'))
        else:
            pseudo = teacher_clean.argmax(dim=-1)
            objective = lambda logits: cross_entropy(logits, pseudo)  # noqa: E731
        x_adv = self.attack(x, objective)
        return Batch(inputs=x_adv, labels=batch.labels, indices=batch.indices,
                     extras={"clean": x, "teacher_clean": teacher_clean})

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        teacher_clean = self.extra(batch, "teacher_clean")
        clean_logits = self._student(self.extra(batch, "clean"))  # f(x_u), train mode, with grad
        adv_logits = student_out.logits  # f(x̂_u)
        labelled = batch.labels >= 0
        teacher_probs = torch.softmax(teacher_clean.to(clean_logits.dtype), dim=-1).detach()
        weights = awr_weights(teacher_probs, torch.softmax(clean_logits, dim=-1), torch.softmax(adv_logits, dim=-1),
                              h.beta)
        robust = kl(adv_logits, clean_logits, reduction="none")  # KL(p_θ(x_u) ‖ p_θ(x̂_u)) per row
        return {
            "ce": cross_entropy(clean_logits, batch.labels, label_smoothing=h.label_smoothing, mask=labelled),
            "robust": h.robust_weight * (weights * robust).mean(),
            # kl() carries τ²; the code's KD term has none.
            "kd": h.distill_weight * kl(clean_logits, teacher_clean, temperature=h.temperature) / h.temperature**2,
        }
