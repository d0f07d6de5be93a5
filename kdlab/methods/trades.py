"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, ICML 2019, "Theoretically Principled Trade-off
between Robustness and Accuracy"), Eq. 5 as in the official ``yaodongyu/TRADES`` ``trades.py``:

    L = CE(f(x), y) + β · KL( softmax(f(x)) ‖ softmax(f(x')) )
    x' = argmax_{‖x' − x‖_∞ ≤ ε}  KL( softmax(f(x)) ‖ softmax(f(x')) )

with β = 1/λ. Reductions as the code: CE is the batch mean; the robust KL is
summed over classes and samples and divided by the batch size (batchmean, a true
per-sample KL — no 1/C here). The clean prediction f(x) is *not* detached in the
outer loss, so the gradient flows through both arguments of the KL.

Inner max (code): starts at x + 0.001·N(0, 1), student in **eval** mode, then
the loss is computed in train mode. (``model.eval()`` ... ``model.train()``
around the attack is in the later official ``trades_loss(..., distance='l_inf')``,
the version copied by RSLAD's and MTARD's inner losses; an early snapshot of
``trades.py`` attacked in the caller's mode.) Defaults: the paper's CIFAR-10 setting β = 6, ε = 8/255
(code: 0.031), 10 steps of 2/255 (code: 0.007); β = 6 is also the default of the CIFAR script's
``--beta`` (``train_trades_cifar10.py`` at the repository head, 6e8e11b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from kdlab.config.validate import NonNegative, NonNegativeCount, Positive
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Batch
from kdlab.methods.robust_common import RobustMethod, training_mode
from kdlab.registry import register


@dataclass
class TradesHparams:
    beta: NonNegative = 6.0  # β = 1/λ: weight of the robust KL term (paper, CIFAR-10)
    epsilon: NonNegative = 8 / 255  # L∞ radius, in [0, 1] pixel units
    step_size: Positive = 2 / 255  # PGD step (official code: 0.007 ≈ 1.8/255)
    steps: NonNegativeCount = 10  # PGD steps of the inner maximisation (0 = no attack)
    attack_init: Literal["uniform", "normal_0.001", "zero"] = "normal_0.001"  # x + 0.001·N(0, 1) (code)
    attack_mode: Literal["train", "eval"] = "eval"  # student's mode while attacking (code: eval)


@register("method", "trades")
class Trades(RobustMethod):
    """TRADES (Zhang et al. 2019, Eq. 5): CE(f(x), y) + β·KL(f(x)‖f(x')), x' maximising that KL; no teacher."""

    Hparams = TradesHparams
    needs_teacher = False
    teacher_in_loop = False

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        b = hparams.beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and b >= 0):
            raise KdlabError(f"method.beta: must be a finite number >= 0, got {b!r}")

    def make_batch(self, batch: Batch) -> Batch:
        x = batch.inputs
        # The attack's target f(x), in the attack's mode (the code recomputes it inside each step, same values).
        with training_mode(self._student, self.hparams.attack_mode), torch.no_grad():
            clean = self._student(x)
        x_adv = self.attack(x, lambda logits: kl(logits, clean, reduction="sum"))
        return Batch(inputs=x_adv, labels=batch.labels, indices=batch.indices, extras={"clean": x})

    def loss_terms(self, batch, student_out, teacher_out):
        clean_logits = self._student(self.extra(batch, "clean"))  # f(x), train mode, with grad
        return {
            "ce": cross_entropy(clean_logits, batch.labels),
            "robust": self.hparams.beta * kl(student_out.logits, clean_logits),  # KL(f(x) ‖ f(x')), batchmean
        }
