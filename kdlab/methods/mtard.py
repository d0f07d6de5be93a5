"""MTARD / B-MTARD: multi-teacher adversarial robustness distillation (Zhao et al., ECCV 2022, "Enhanced
Accuracy and Robustness via Multi-Teacher Adversarial Distillation"; extended by Zhao, Wang & Wei,
"Mitigating the Accuracy-Robustness Trade-off via Multi-Teacher Adversarial Distillation", arXiv 2306.16170,
TPAMI 2024 as "Balanced MTARD"). Two fixed teachers: a clean (naturally trained) T_nat supervises the student
on x, a robust (adversarially trained) T_adv on x':

    L = w_adv · KL( softmax(T_adv(x')/τ_adv) ‖ softmax(S(x')) ) · s
      + w_nat · KL( softmax(T_nat(x)/τ_nat) ‖ softmax(S(x)) ) · s
    x' = argmax_{‖x' − x‖_∞ ≤ ε}  CE(S(x'), y)

Only the teachers are tempered (the student stays at temperature 1) and there is
no τ² factor. Inner max (``mtard_loss.py::mtard_inner_loss_ce``): the student's
CE with the label, from x + 0.001·N(0, 1), student in **eval** mode.
``teacher.members`` must be ``[clean, robust]``, in that order.

Reduction: the code's ``kl_loss`` is averaged with ``torch.mean`` over batch ×
classes (KL/C). ``kl_reduction: paper`` (default) keeps that (s = 1/C on a
batchmean KL); ``batchmean`` sets s = 1. The balance rules below only use loss
*ratios*, so they do not depend on s.

``balance`` (per training step, from the step's detached losses; state in buffers,
so it is checkpointed and resumed; the update rules are the pure functions of
``kdlab.losses.balancing``):

* ``none``: fixed w_adv, w_nat, τ_adv, τ_nat (the hyperparameters).
* ``eccv``: Normalization Loss Balance (ECCV code ``mtard_resnet18_cifar10.py``):
  ℓ̂_i = L_i(t)/L_i(0) with the first step's losses as reference; then
  w_i ← w_i − η_w·(w_i − ℓ̂_i/Σ_j ℓ̂_j), clipped at 0 and renormalised to sum 1.
  The weights are updated *before* this step's loss is formed (as in the code). The
  teacher whose loss has fallen less (relatively) gets more weight. τ stay fixed.
  (The ECCV code writes w_adv = 1 − w_nat and the TPAMI code r_i = ℓ̂_i/mean(ℓ̂) then
  r_i/Σr plus the clip; for two teachers both are exactly this rule.)
* ``entropy`` (B-MTARD, TPAMI code ``MTARD-extension/resnet18_mtard_cifar10.py``):
  the weight rule above *and* the Entropy-Based Balance of the temperatures, with
  H the mean entropy of each tempered teacher on its own input at this step's τ:
  τ_adv ← clip(τ_adv − η_τ·sign(H_adv − H_nat), τ_min, τ_max), τ_nat likewise with the
  sign reversed; the new τ apply from the next step. The code writes
  sign(Ĥ_adv/Ĥ_nat − 1) with Ĥ = mean(p·log p) = −H/C < 0, which has the same sign
  as H_adv − H_nat whenever H_nat > 0; the difference form cannot divide by 0.

Not reproduced: the codes divide η_w and η_τ by 10 at the learning-rate drops
(epochs 215, 260, 285); here they are constant. The extension calls its inner loss
``rslad_inner_loss_ce_2`` (not in the stored ECCV ``mtard_loss.py``); it is taken
to be the ECCV ``mtard_inner_loss_ce``.

Defaults: the codes' CIFAR-10 settings: w = 0.5/0.5, η_w = 0.025, τ = 1, η_τ = 0.001,
τ ∈ [1, 10], ε = 8/255, 10 steps of 2/255; ``balance: entropy`` (full B-MTARD).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from kdlab.config.validate import NonNegative, NonNegativeCount, Positive, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.losses.balancing import entropy_balance_step, mean_entropy, normalization_balance_step
from kdlab.methods.base import Batch
from kdlab.methods.robust_common import RobustMethod, kl_scale
from kdlab.models.ensemble import TeacherEnsemble
from kdlab.registry import register


@dataclass
class MTARDHparams:
    balance: Literal["none", "eccv", "entropy"] = "entropy"  # none: fixed; eccv: weights; entropy: weights + τ
    weight_adv: NonNegative = 0.5  # w_adv (initial value when balancing): weight of the robust teacher's term
    weight_nat: NonNegative = 0.5  # w_nat (initial value when balancing): weight of the clean teacher's term
    weight_lr: UnitInterval = 0.025  # η_w of the Normalization Loss Balance
    temperature_adv: Positive = 1.0  # τ_adv (initial value under balance entropy) of the robust teacher
    temperature_nat: Positive = 1.0  # τ_nat (initial value under balance entropy) of the clean teacher
    temperature_lr: NonNegative = 0.001  # η_τ of the Entropy-Based Balance
    temperature_min: Positive = 1.0  # lower clip of τ under balance entropy
    temperature_max: Positive = 10.0  # upper clip of τ under balance entropy
    kl_reduction: Literal["paper", "batchmean"] = "paper"  # paper: KL/C as the code's torch.mean; batchmean: KL
    epsilon: NonNegative = 8 / 255  # L∞ radius, in [0, 1] pixel units
    step_size: Positive = 2 / 255  # PGD step
    steps: NonNegativeCount = 10  # PGD steps of the inner maximisation (0 = no attack)
    attack_init: Literal["uniform", "normal_0.001", "zero"] = "normal_0.001"  # x + 0.001·N(0, 1) (code)
    attack_mode: Literal["train", "eval"] = "eval"  # student's mode while attacking (code: eval)

    def problems(self) -> list[str]:
        """Rules between fields (each field's own bounds are declared above)."""
        out = []
        if self.balance != "none" and self.weight_adv + self.weight_nat <= 0:
            out.append("method.weight_adv: the sum with method.weight_nat must be > 0 when balancing (they are normalised)")
        if self.temperature_min > self.temperature_max:
            out.append(f"method.temperature_min: {self.temperature_min!r} exceeds temperature_max {self.temperature_max!r}")
        return out




@register("method", "mtard")
class MTARD(RobustMethod):
    """MTARD/B-MTARD (Zhao et al. 2022/2024): clean teacher on x, robust teacher on x', balanced weights and τ."""

    Hparams = MTARDHparams
    teacher_in_loop = False

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if not isinstance(teacher, TeacherEnsemble) or len(teacher) != 2:
            got = f"{len(teacher)} teachers" if isinstance(teacher, TeacherEnsemble) else "one teacher network"
            raise KdlabError(f"method mtard needs exactly two teachers, got {got}; give teacher.members: "
                             "[clean, robust] (the naturally trained one first, the adversarially trained one second)")
        h = hparams
        weights = torch.tensor([float(h.weight_adv), float(h.weight_nat)])
        if h.balance != "none":
            weights = weights / weights.sum()
        # Buffers: the balance state is saved in checkpoints and restored on resume.
        self.register_buffer("weights", weights)  # (w_adv, w_nat)
        self.register_buffer("temperatures", torch.tensor([float(h.temperature_adv), float(h.temperature_nat)]))
        self.register_buffer("initial_losses", torch.full((2,), math.nan))  # (L_adv(0), L_nat(0)); NaN = unset

    def make_batch(self, batch: Batch) -> Batch:
        x, labels = batch.inputs, batch.labels
        clean_teacher, robust_teacher = self._teacher.members
        teacher_nat = self.teacher_logits(clean_teacher, x)
        x_adv = self.attack(x, lambda logits: cross_entropy(logits, labels))
        teacher_adv = self.teacher_logits(robust_teacher, x_adv)
        return Batch(inputs=x_adv, labels=labels, indices=batch.indices,
                     extras={"clean": x, "teacher_nat": teacher_nat, "teacher_adv": teacher_adv})

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        teacher_adv, teacher_nat = self.extra(batch, "teacher_adv"), self.extra(batch, "teacher_nat")
        clean_logits = self._student(self.extra(batch, "clean"))  # S(x), train mode
        scale = kl_scale(h.kl_reduction, teacher_adv.shape[-1])
        tempered_adv = teacher_adv / self.temperatures[0]  # only the teachers are tempered
        tempered_nat = teacher_nat / self.temperatures[1]
        loss_adv = scale * kl(student_out.logits, tempered_adv)  # KL(softmax(T_adv(x')/τ_adv) ‖ softmax(S(x')))
        loss_nat = scale * kl(clean_logits, tempered_nat)
        if self.training and h.balance != "none":
            self._balance(torch.stack([loss_adv.detach(), loss_nat.detach()]), tempered_adv, tempered_nat)
        return {"adv": self.weights[0] * loss_adv, "nat": self.weights[1] * loss_nat}

    @torch.no_grad()
    def _balance(self, losses: torch.Tensor, tempered_adv: torch.Tensor, tempered_nat: torch.Tensor) -> None:
        """This step's updates, in the codes' order: τ for the next step; weights for this step's loss."""
        h = self.hparams
        if h.balance == "entropy":
            entropies = torch.stack([mean_entropy(tempered_adv), mean_entropy(tempered_nat)])
            self.temperatures.copy_(entropy_balance_step(self.temperatures, entropies, h.temperature_lr,
                                                         h.temperature_min, h.temperature_max))
        losses = losses.to(self.initial_losses.dtype)
        # First step: the reference losses (no device sync: where, not an if on a tensor).
        self.initial_losses.copy_(torch.where(torch.isnan(self.initial_losses), losses, self.initial_losses))
        self.weights.copy_(normalization_balance_step(self.weights, losses, self.initial_losses, h.weight_lr))

    def metrics(self) -> dict[str, float]:
        """The balance state, for logging: current weights and teacher temperatures (reads them back: a sync)."""
        w, t = self.weights.tolist(), self.temperatures.tolist()
        return {"weight_adv": w[0], "weight_nat": w[1], "temperature_adv": t[0], "temperature_nat": t[1]}
