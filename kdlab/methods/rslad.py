"""RSLAD: Robust Soft Label Adversarial Distillation (Zi, Zhao, Ma & Jiang, ICCV 2021, "Revisiting
Adversarial Robustness Distillation: Robust Soft Labels Make Student Better"), as in the official
``zibojia/RSLAD`` (``rslad_loss.py``, ``resnet18_rslad_cifar10.py``):

    L = (1 − α) · KL( softmax(T(x)) ‖ softmax(S(x')) ) · s  +  α · KL( softmax(T(x)) ‖ softmax(S(x)) ) · s
    x' = argmax_{‖x' − x‖_∞ ≤ ε}  KL( softmax(T(x)) ‖ softmax(S(x')) )

with α = 1/6 (code: ``5/6.0*kl_Loss1 + 1/6.0*kl_Loss2``). Every term uses the
robust teacher's soft labels on the *clean* x (no hard labels anywhere), all at
temperature 1. The inner max (``rslad_inner_loss``) maximises the KL to those
soft labels (summed), from x + 0.001·N(0, 1), with the student in **eval** mode.

Reduction: the code's ``kl_loss`` is averaged with ``torch.mean`` over batch ×
classes, i.e. KL/C. ``kl_reduction: paper`` (default) keeps those effective
weights: s = 1/C on a batchmean KL; ``batchmean`` sets s = 1. (The code's
``log(p + 1e-5)`` on the teacher side is not reproduced: the KL here is exact.)

Defaults: the code's CIFAR-10 script: ε = 8/255, 10 steps of 2/255.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdlab.config.validate import NonNegative, NonNegativeCount, Positive, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses import kl
from kdlab.methods.base import Batch
from kdlab.methods.robust_common import RobustMethod, kl_scale
from kdlab.registry import register


@dataclass
class RSLADHparams:
    natural_weight: UnitInterval = 1 / 6  # α: weight of the clean KL; 1 − α (= 5/6) weighs the adversarial KL (code)
    kl_reduction: Literal["paper", "batchmean"] = "paper"  # paper: KL/C as the code's torch.mean; batchmean: KL
    epsilon: NonNegative = 8 / 255  # L∞ radius, in [0, 1] pixel units
    step_size: Positive = 2 / 255  # PGD step
    steps: NonNegativeCount = 10  # PGD steps of the inner maximisation (0 = no attack)
    attack_init: Literal["uniform", "normal_0.001", "zero"] = "normal_0.001"  # x + 0.001·N(0, 1) (code)
    attack_mode: Literal["train", "eval"] = "eval"  # student's mode while attacking (code: eval)


@register("method", "rslad")
class RSLAD(RobustMethod):
    """RSLAD (Zi et al. 2021): 5/6·KL(T(x)‖S(x')) + 1/6·KL(T(x)‖S(x)), x' maximising KL(T(x)‖S(x'))."""

    Hparams = RSLADHparams
    teacher_in_loop = False

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        a = hparams.natural_weight
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise KdlabError(f"method.natural_weight: must lie in [0, 1], got {a!r}")

    def make_batch(self, batch: Batch) -> Batch:
        x = batch.inputs
        teacher_clean = self.teacher_logits(self._teacher, x)  # the robust soft labels
        x_adv = self.attack(x, lambda logits: kl(logits, teacher_clean, reduction="sum"))
        return Batch(inputs=x_adv, labels=batch.labels, indices=batch.indices,
                     extras={"clean": x, "teacher_clean": teacher_clean})

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        soft_labels = self.extra(batch, "teacher_clean")
        clean_logits = self._student(self.extra(batch, "clean"))  # S(x), train mode
        scale = kl_scale(h.kl_reduction, soft_labels.shape[-1])
        return {
            "adv": (1.0 - h.natural_weight) * scale * kl(student_out.logits, soft_labels),
            "nat": h.natural_weight * scale * kl(clean_logits, soft_labels),
        }
