"""Hinton KD plus a discriminator that tells teacher outputs (real) from student outputs (fake).

The idea — a GAN-style discriminator on the networks' outputs, which the student
learns to fool while it also distils — is the logit-level adversarial KD of Xu,
Hsu & Huang (2018, "Training Shallow and Thin Networks ... with Conditional
Adversarial Networks", ICLR-W) and Belagiannis, Farshad & Galasso (2018,
"Adversarial Network Compression", ECCV-W); Wang et al.'s KDGAN (NeurIPS 2018) is
a three-player relative in which the discriminator's real samples are labels and
the teacher trains too (not implemented here; see docs/methods.md). Per step:

    adversary step (discriminator D, its own optimiser, student outputs detached):
        min_D  L_D(D(q_T), D(q_S)) [+ λ_GP·GP]          q = softmax(z / T_D) or z / T_D
    student step:
        L = α·T²·KL(p_T^t ‖ p_T^s) + (1 − α)·CE + w_adv·L_G(D(q_S))

with L_D / L_G the GAN losses of ``kdlab.losses.adversarial`` (``gan_loss``).
``kd: false`` drops the KL term and weighs CE by 1 (α only splits the budget
between the soft and hard terms). ``adversarial_weight: 0`` drops L_G — the
student then trains exactly as ``kd`` while D still trains, so ``adv/disc_acc``
measures how distinguishable plain-KD outputs are from the teacher's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from kdlab.config.validate import Count, Depth, NonNegative, Positive, UnitInterval, Width
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.losses.adversarial import (
    discriminator_accuracy,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)
from kdlab.methods.adversarial import Discriminator
from kdlab.methods.base import Method
from kdlab.registry import register


@dataclass
class AdversarialKDHparams:
    temperature: Positive = 4.0  # T of the KD term (as in kd)
    alpha: UnitInterval = 0.9  # weight of the KD term; 1 − α weighs CE (CE weight 1 when kd is false)
    kd: bool = True  # false: no KL term ("discriminator only": CE + adversarial)
    adversarial_weight: NonNegative = 0.1  # w_adv of the student's fooling term; 0 = off (D still trains, for disc_acc)
    discriminator_inputs: Literal["probs", "logits"] = "probs"  # what D sees: softmax(z/T_D) or z/T_D
    discriminator_temperature: Positive = 1.0  # T_D: softening before the discriminator
    discriminator_width: Width = 64  # hidden units per layer of D
    discriminator_depth: Depth = 2  # hidden layers of D (0 = linear)
    spectral_norm: bool = False  # spectral normalisation of every Linear in D (Miyato et al. 2018)
    gan_loss: Literal["bce", "lsgan", "hinge"] = "bce"  # non-saturating BCE, least squares or hinge
    gradient_penalty: NonNegative = 0.0  # λ of the WGAN-GP penalty on D (Gulrajani et al. use 10); 0 = off
    discriminator_lr: Positive = 1e-3  # learning rate of D's optimiser (train.optimizer, no weight decay)
    discriminator_steps: Count = 1  # D optimiser steps before each student step


def _num_classes(student, teacher, input_shape) -> int:
    """C from a zoo model's ``num_classes``, else from one probe forward of the student."""
    for network in (student, teacher):
        if isinstance(getattr(network, "num_classes", None), int):
            return network.num_classes
    if input_shape is None:
        raise KdlabError("method adversarial_kd needs the number of classes to size its discriminator: "
                         "pass input_shape (or a student with a num_classes attribute)")
    device = next(iter(student.parameters()), torch.zeros(())).device
    was_training = student.training
    student.eval()
    with torch.no_grad():
        num_classes = student(torch.zeros(1, *input_shape, device=device)).shape[-1]
    student.train(was_training)
    return int(num_classes)


@contextlib.contextmanager
def _without_grad(module: torch.nn.Module):
    """Build the student step's graph without D's parameters: no gradients are computed into D there
    (its own optimiser clears them anyway), and the backward does less work."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@register("method", "adversarial_kd")
class AdversarialKD(Method):
    """KD + a discriminator on output distributions (teacher real, student fake) that the student learns to fool."""

    Hparams = AdversarialKDHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        self.discriminator = Discriminator(_num_classes(student, teacher, input_shape),
                                           width=hparams.discriminator_width, depth=hparams.discriminator_depth,
                                           spectral_norm=hparams.spectral_norm)
        self.adversary_lr = hparams.discriminator_lr
        self.adversary_steps = hparams.discriminator_steps

    def discriminator_inputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What D sees for logits ``(N, C)``: softmax(z / T_D) or z / T_D, in at least float32."""
        h = self.hparams
        z = (logits if logits.dtype == torch.float64 else logits.float()) / h.discriminator_temperature
        return z.softmax(dim=-1) if h.discriminator_inputs == "probs" else z

    def adversary_parameters(self):
        return list(self.discriminator.parameters())

    def adversary_loss(self, batch, student_out, teacher_out):
        h = self.hparams
        real = self.discriminator_inputs(teacher_out.logits.detach())
        fake = self.discriminator_inputs(student_out.logits.detach())
        real_scores, fake_scores = self.discriminator(real), self.discriminator(fake)
        terms = {"disc": discriminator_loss(real_scores, fake_scores, kind=h.gan_loss)}
        if h.gradient_penalty > 0:
            terms["gp"] = gradient_penalty(self.discriminator, real, fake, weight=h.gradient_penalty)
        self.adversary_metrics = {"disc_acc": discriminator_accuracy(real_scores, fake_scores, kind=h.gan_loss)}
        return terms

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        terms = {}
        if h.kd:
            terms["kd"] = h.alpha * kl(student_out.logits, teacher_out.logits, temperature=h.temperature)
        terms["ce"] = (1.0 - h.alpha if h.kd else 1.0) * cross_entropy(student_out.logits, batch.labels)
        if h.adversarial_weight > 0:
            with _without_grad(self.discriminator):
                fake_scores = self.discriminator(self.discriminator_inputs(student_out.logits))
            terms["adv"] = h.adversarial_weight * generator_loss(fake_scores, kind=h.gan_loss)
        return terms
