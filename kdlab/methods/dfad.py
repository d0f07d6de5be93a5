"""Fang et al. (2019), "Data-Free Adversarial Distillation" (DFAD), arXiv 1912.11006.

A generator G plays a min-max game with the student S against a fixed teacher T,
on the model discrepancy between their logits (the paper's mean absolute error):

    imitation  (S, k times):  min_S  D(S(x), T(x)),   x = G(z) detached,  z ~ N(0, I)
    generation (G, once):     min_G −D(S(x), T(x)),   x = G(z) with grad through T and S
    D = mean |S(x) − T(x)|   (official code: ``F.l1_loss(s_logit, t_logit)``, mean over batch × classes)

No real input and no label is used. The loop still draws its data batches (they
set the batch size and the number of steps), but ``make_batch`` reads only the
batch's size: the inputs are replaced by G(z) and the labels by −1 placeholders
(the generated inputs have no labels; a loss that tried to use them would fail
loudly instead of silently learning from the real ones).

The generator is DFAD's GeneratorA (``kdlab.models.generators``); its batches get,
per channel, the mean and std the teacher normalises with — the [0, 1] analogue
of the official generator's final non-affine BatchNorm in normalised space.

Mapping onto kdlab's loop: the generator is this method's adversary (its own
optimiser, at ``generator_lr``, never touched by the main one); it steps once
every ``student_steps_per_generator_step`` student steps, *before* that step's
student loss, whereas the official code steps it after each block of k student
steps — the same alternation shifted by one student step. As in the official
code, the generator and the student are in train mode during the generator step
(the student's BatchNorm statistics also see that batch); the teacher stays in
eval mode with frozen weights, but is called with autograd on so that the
gradient reaches the generated inputs. The student's parameter gradients left by
that backward are discarded: the loop zero-grads the main optimiser right before
the student's own backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kdlab.config.validate import Count, Positive, Width
from kdlab.errors import KdlabError
from kdlab.losses import kl
from kdlab.methods.base import Batch, Method
from kdlab.models.common import Normalize
from kdlab.models.generators import build_generator
from kdlab.registry import register

DISCREPANCIES = ("l1_logits", "kl")


@dataclass
class DFADHparams:
    latent_dim: Width = 64  # size of the noise z; the official code uses 256 (CIFAR) and 100 (MNIST)
    generator_width: Width = 64  # the generator's base channel count (official ngf = 64)
    generator_lr: Positive = 1e-3  # the generator's learning rate (official: Adam, 1e-3)
    student_steps_per_generator_step: Count = 5  # k: imitation steps per generation step (official: 5)
    discrepancy: Literal["l1_logits", "kl"] = "l1_logits"  # l1_logits: the paper's MAE; kl: KL(T‖S) at T = 1
    adversarial: bool = True  # False: a control — the generator stays at its random initialisation


def teacher_statistics(teacher) -> tuple[list[float] | None, list[float] | None]:
    """Per-channel mean and std of the teacher's input normalisation (its first ``Normalize``).

    None when it has none, or when they are not statistics of [0, 1] data (e.g. an
    identity ``Normalize(0, 1)``): the generator then ends in a plain sigmoid.
    """
    norm = next((m for m in teacher.modules() if isinstance(m, Normalize)), None) if teacher is not None else None
    if norm is None:
        return None, None
    mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    if not all(0.0 < m < 1.0 and 0.0 < s < math.sqrt(m * (1.0 - m)) for m, s in zip(mean, std)):
        return None, None
    return mean, std


def discrepancy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The model discrepancy D(S, T) on a batch: mean |S − T| over all logits, or KL(p_T ‖ p_S) per sample."""
    if kind == "l1_logits":
        return F.l1_loss(student_logits.float(), teacher_logits.float())
    return kl(student_logits, teacher_logits, temperature=1.0)


@register("method", "dfad")
class DFAD(Method):
    """DFAD (Fang et al. 2019), data-free: a generator maximises the logit MAE that the student minimises."""

    Hparams = DFADHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        h = hparams
        if input_shape is None:
            raise KdlabError("method dfad needs the dataset's input_shape to build its generator; "
                             "pass input_shape when building the method")
        k = h.student_steps_per_generator_step
        # Generated batches get the statistics the teacher normalises with (the official generator's last
        # BatchNorm does the same in normalised space); build_generator checks its output shape.
        mean, std = teacher_statistics(teacher)
        self.generator = build_generator(tuple(input_shape), latent_dim=h.latent_dim, width=h.generator_width,
                                         mean=mean, std=std)
        if not h.adversarial:
            self.generator.requires_grad_(False)  # no adversary optimiser is built, and no gradient reaches it
        self.adversary_every = int(k)
        self.adversary_steps = 1
        self.adversary_lr = float(h.generator_lr)
        # Plain references, not submodules: neither network is part of the method's state.
        self.__dict__["_teacher"] = teacher
        self.__dict__["_student"] = student

    def _generate(self, size: int) -> torch.Tensor:
        """G(z) for ``size`` fresh z ~ N(0, I) from the global RNG (checkpointed, so a resume replays it)."""
        device = next(self.generator.parameters()).device
        z = torch.randn(size, self.hparams.latent_dim, device=device)
        self.generator.train()
        return self.generator(z)

    def make_batch(self, batch: Batch) -> Batch:
        """Generated inputs of the data batch's size; its inputs and labels are never read."""
        size = batch.labels.shape[0]  # the shape only
        with torch.no_grad():
            inputs = self._generate(size)
        placeholder = torch.full((size,), -1, dtype=torch.long, device=inputs.device)
        return Batch(inputs=inputs, labels=placeholder, indices=None)

    def adversary_parameters(self):
        return list(self.generator.parameters()) if self.hparams.adversarial else []

    def adversary_loss(self, batch, student_out, teacher_out):
        x = self._generate(batch.inputs.shape[0])  # fresh z, with grad
        d = discrepancy(self._student(x), self._teacher(x), self.hparams.discrepancy)
        self.adversary_metrics = {"discrepancy": float(d.detach())}
        return {"neg_discrepancy": -d}  # G maximises D

    def loss_terms(self, batch, student_out, teacher_out):
        return {"discrepancy": discrepancy(student_out.logits, teacher_out.logits, self.hparams.discrepancy)}
