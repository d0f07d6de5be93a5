"""AI-KD: Kim, Suh, Baek, Kim, Jeong, Cho, Kim, "AI-KD: Adversarial learning and Implicit regularization for
self-Knowledge Distillation" (arXiv 2211.10938; Knowledge-Based Systems 293:111692, 2024).

Self-distillation with a pre-trained copy of the student's own architecture ("the teacher" in kdlab's
terms) and a discriminator. Per step:

    adversary step (D, its own optimiser; the student's outputs detached):
        min_D  −log D(p_pre) − log(1 − D(p_S))                  (``gan_loss: bce``; p = softmax at T = 1)
    student step:
        L = L_PSKD + λ_kd · T² · KL(p_pre^T ‖ p_S^T) + λ_adv · (−log D(p_S))
        L_PSKD = mean_batch Σ_c −ỹ_t,c log p_S,c,   ỹ_t = (1 − α_t)·onehot(y) + α_t·p_S^{t−1}(x)

Verified (paper abstract, the only part of the paper that could be read): AI-KD distils "the deterministic
and progressive knowledge which are from the pre-trained and previous epoch predictive probabilities", and
"deploys a discriminator to distinguish the distributions between the pre-trained and student models while
the student model is trained to fool the discriminator". The progressive part is PS-KD, whose target,
α_t schedule (α_T = 0.8) and memory are verified in PS-KD's official code and shared with ``pskd``
(``kdlab.methods.pskd.ProgressiveTargets``: see that module for what is verified and chosen there).

Chosen, not verified (no official AI-KD code was found and the method section could not be read):

* the deterministic term as forward KL(p_pre ‖ p_S) with ``kdlab.losses.kl``'s T² factor, at T = 1,
  weight λ_kd = 1;
* the adversarial game: the non-saturating BCE GAN (Goodfellow et al. 2014) on softmax probabilities at
  T = 1, pre-trained = real, student = fake; λ_adv = 0.1; ``gan_loss`` also offers least-squares and hinge;
* D: ``kdlab.methods.adversarial.Discriminator``, an MLP C → 64 → 64 → 1 with LeakyReLU(0.2), trained by
  ``train.optimizer`` at lr 1e-3 without weight decay, one step before each student step;
* the student starts from its own initialisation (``student.checkpoint`` can start it from the
  pre-trained weights instead); the pre-trained model is frozen (the loop's teacher).

The teacher must have the student's architecture (same state-dict keys and shapes), checked at build.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kdlab.config.validate import Count, Depth, NonNegative, Positive, UnitInterval, Width
from kdlab.errors import KdlabError
from kdlab.losses import kl
from kdlab.losses.adversarial import discriminator_accuracy, discriminator_loss, generator_loss
from kdlab.methods.adversarial import Discriminator
from kdlab.methods.base import Method
from kdlab.methods.pskd import ProgressiveTargets, num_classes_of
from kdlab.registry import register

_SAME_ARCHITECTURE = ("aikd needs a pre-trained model of the student's architecture as the teacher: "
                      "set teacher.model and its options equal to the student's")


@dataclass
class AIKDHparams:
    alpha_T: UnitInterval = 0.8  # PS-KD's α_T (official PS-KD default)
    kd_weight: NonNegative = 1.0  # λ_kd of KL(pre-trained ‖ student) — chosen (paper's value not verified)
    temperature: Positive = 1.0  # T of the KL term (with T²) — chosen
    adversarial_weight: NonNegative = 0.1  # λ_adv of the student's fooling term; 0 = off (D still trains) — chosen
    discriminator_width: Width = 64  # hidden units per layer of D — chosen
    discriminator_depth: Depth = 2  # hidden layers of D (0 = linear) — chosen
    gan_loss: Literal["bce", "lsgan", "hinge"] = "bce"  # bce = non-saturating −log D(p_S) for the student
    discriminator_lr: Positive = 1e-3  # learning rate of D's optimiser — chosen
    discriminator_steps: Count = 1  # D optimiser steps before each student step


def check_same_architecture(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """``KdlabError`` unless the two networks have the same state-dict keys with the same shapes."""
    s = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    t = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    if s == t:
        return
    differing = sorted(set(s) ^ set(t)) or sorted(k for k in s if s[k] != t[k])
    shown = ", ".join(f"{k} (student {s.get(k)}, teacher {t.get(k)})" for k in differing[:3])
    raise KdlabError(f"{_SAME_ARCHITECTURE}; they differ at {shown}" + (" ..." if len(differing) > 3 else ""))


@register("method", "aikd")
class AIKD(Method):
    """AI-KD: PS-KD + KL to a pre-trained same-architecture model + a discriminator the student fools."""

    per_sample_state = True  # past predictions per train sample
    Hparams = AIKDHparams
    needs_teacher = True

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if teacher is None:
            raise KdlabError(_SAME_ARCHITECTURE)
        check_same_architecture(student, teacher)
        num_classes = num_classes_of(student, input_shape, "aikd")
        self.progressive = ProgressiveTargets(hparams.alpha_T, train_size=train_size, num_classes=num_classes,
                                              method="aikd")
        self.discriminator = Discriminator(num_classes, width=hparams.discriminator_width,
                                           depth=hparams.discriminator_depth)
        self.adversary_lr = hparams.discriminator_lr
        self.adversary_steps = hparams.discriminator_steps

    def adversary_parameters(self):
        return list(self.discriminator.parameters())

    @staticmethod
    def _probs(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def adversary_loss(self, batch, student_out, teacher_out):
        h = self.hparams
        real = self.discriminator(self._probs(teacher_out.logits.detach()))
        fake = self.discriminator(self._probs(student_out.logits.detach()))
        self.adversary_metrics = {"disc_acc": discriminator_accuracy(real, fake, kind=h.gan_loss)}
        return {"disc": discriminator_loss(real, fake, kind=h.gan_loss)}

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        logits = student_out.logits
        return {
            "pskd": self.progressive.loss(logits, batch.labels, batch.indices, step=self.step,
                                          total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch),
            "kd": h.kd_weight * kl(logits, teacher_out.logits, temperature=h.temperature),
            "adv": h.adversarial_weight * generator_loss(self.discriminator(self._probs(logits)), kind=h.gan_loss),
        }
