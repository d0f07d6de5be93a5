"""PGD adversarial training (Madry, Makelov, Schmidt, Tsipras & Vladu, ICLR 2018, "Towards Deep Learning
Models Resistant to Adversarial Attacks"), the saddle-point problem of §2 (Eq. 2.1):

    min_θ  E_(x,y) [ max_{‖δ‖_∞ ≤ ε} CE(f_θ(x + δ), y) ]

The inner max is PGD on the student's CE with the label from a uniform random
start (§2.1); the outer loss is the plain CE on the adversarial inputs only
(no clean term), mean over the batch. No teacher.

Defaults are the official CIFAR-10 config (``MadryLab/cifar10_challenge``
``config.json``): ε = 8/255, 10 steps of 2/255, random start. The attack runs
the network in **train** mode: ``train.py`` builds ``Model(mode='train')`` and
attacks that same graph (batch statistics in BatchNorm). One PyTorch difference:
train-mode attack forwards here also update BatchNorm's running averages, which
TF's update ops did not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdlab.config.validate import NonNegative, NonNegativeCount, Positive
from kdlab.losses import cross_entropy
from kdlab.methods.base import Batch
from kdlab.methods.robust_common import RobustMethod
from kdlab.registry import register


@dataclass
class AdversarialTrainingHparams:
    epsilon: NonNegative = 8 / 255  # L∞ radius, in [0, 1] pixel units
    step_size: Positive = 2 / 255  # PGD step (sign of the gradient times this)
    steps: NonNegativeCount = 10  # PGD steps of the inner maximisation (0 = clean training)
    attack_init: Literal["uniform", "normal_0.001", "zero"] = "uniform"  # start: x + U(−ε, ε) (Madry)
    attack_mode: Literal["train", "eval"] = "train"  # student's BN/dropout mode while attacking (Madry: train)


@register("method", "adversarial_training")
class AdversarialTraining(RobustMethod):
    """PGD-AT (Madry et al. 2018): cross-entropy on PGD-CE adversarial inputs; no teacher."""

    Hparams = AdversarialTrainingHparams
    needs_teacher = False
    teacher_in_loop = False

    def make_batch(self, batch: Batch) -> Batch:
        labels = batch.labels
        x_adv = self.attack(batch.inputs, lambda logits: cross_entropy(logits, labels))
        return Batch(inputs=x_adv, labels=labels, indices=batch.indices, extras={"clean": batch.inputs})

    def loss_terms(self, batch, student_out, teacher_out):
        return {"ce": cross_entropy(student_out.logits, batch.labels)}
