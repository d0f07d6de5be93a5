"""ARD: Adversarially Robust Distillation (Goldblum, Fowl, Feizi & Goldstein, AAAI 2020), as in the
official ``goldblum/AdversariallyRobustDistillation`` ``main.py``:

    L = α · T² · KL( softmax(T(x)/T) ‖ softmax(S(x')/T) ) · s  +  (1 − α) · CE(S(x), y)
    x' = argmax_{‖x' − x‖_∞ ≤ ε}  CE(S(x'), y)

The teacher sees the *clean* x; the student's KD term is on x', its CE term on x.
The inner max is the **student's CE with the true label** (``AttackPGD``: not a KL
to the teacher), from a uniform start, with the student in **train** mode (the
code calls ``net.train()`` and attacks through it, so BatchNorm uses batch
statistics and updates its running averages during the attack).

Reduction: the code's ``nn.KLDivLoss()`` has the default element-wise mean, i.e.
KL/C. ``kl_reduction: paper`` (default) keeps that effective weight: s = 1/C on a
batchmean KL; ``batchmean`` sets s = 1 (α·T²·KL at face value, C times larger).
CE is the batch mean. The clean student forward runs even at α = 1 (the code
does, and in train mode it moves BatchNorm's running averages).

Defaults: the code's CIFAR-10 arguments T = 30, α = 1.0 (KD term only), ε = 8/255,
10 steps of 2/255.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdlab.config.validate import NonNegative, NonNegativeCount, Positive, UnitInterval
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Batch
from kdlab.methods.robust_common import RobustMethod, kl_scale
from kdlab.registry import register


@dataclass
class ARDHparams:
    temperature: Positive = 30.0  # T of the KD term (code default, CIFAR-10)
    alpha: UnitInterval = 1.0  # weight of the KD term; 1 − α weighs the clean CE (code default: KD only)
    kl_reduction: Literal["paper", "batchmean"] = "paper"  # paper: KL/C as the code's KLDivLoss(); batchmean: KL
    epsilon: NonNegative = 8 / 255  # L∞ radius, in [0, 1] pixel units
    step_size: Positive = 2 / 255  # PGD step
    steps: NonNegativeCount = 10  # PGD steps of the inner maximisation (0 = no attack)
    attack_init: Literal["uniform", "normal_0.001", "zero"] = "uniform"  # x + U(−ε, ε) (code)
    attack_mode: Literal["train", "eval"] = "train"  # student's mode while attacking (code: train)


@register("method", "ard")
class ARD(RobustMethod):
    """ARD (Goldblum et al. 2020): α·T²·KL(T(x)‖S(x')) + (1−α)·CE(S(x), y), x' from PGD on the student's CE."""

    Hparams = ARDHparams
    teacher_in_loop = False

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)

    def make_batch(self, batch: Batch) -> Batch:
        x, labels = batch.inputs, batch.labels
        teacher_clean = self.teacher_logits(self._teacher, x)
        x_adv = self.attack(x, lambda logits: cross_entropy(logits, labels))
        return Batch(inputs=x_adv, labels=labels, indices=batch.indices,
                     extras={"clean": x, "teacher_clean": teacher_clean})

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        adv_logits = student_out.logits  # S(x'), the loop's train-mode forward
        clean_logits = self._student(self.extra(batch, "clean"))  # S(x), train mode
        scale = kl_scale(h.kl_reduction, adv_logits.shape[-1])
        return {
            # kl() carries the T² factor.
            "kd": h.alpha * scale * kl(adv_logits, self.extra(batch, "teacher_clean"), temperature=h.temperature),
            "ce": (1.0 - h.alpha) * cross_entropy(clean_logits, batch.labels),
        }
