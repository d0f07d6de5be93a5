"""MLKD — Jin, Wang & Lin (CVPR 2023), "Multi-Level Logit Distillation".

Over the temperatures 𝒯 = {2, 3, 4, 5, 6} (``kdlab.losses.mlkd``; ``m``, ``m_c`` the fractions of samples and
classes the confidence masks keep, i.e. at most the median teacher confidence):

    ce       = ce_weight · (CE(z_s^w, y) + CE(z_s^s, y))
    instance = kd_weight · Σ_T [ m · T²KL(z_t^w ‖ z_s^w) + T²KL(z_t^s ‖ z_s^s) ]
    batch    = kd_weight · Σ_T m · ‖G_t^w − G_s^w‖²/B        G = P Pᵀ  (B × B)
    class    = kd_weight · Σ_T m_c · ‖M_t^w − M_s^w‖²/C      M = Pᵀ P  (C × C)

with ``w``/``s`` the weak and strong views. Transcribed from the official code
(Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/distillers/KD_ours.py``, trained by ``AugTrainer``):
its ``kd_loss``/``bc_loss``/``cc_loss`` reduce to a scalar *before* the mask multiplies it, so a mask enters as the
fraction it keeps; the strong view's batch and class losses are computed there but left out of the total,
and two of the strong instance terms (T = 2, 6) read the weak view — moot here, see below. Defaults: 𝒯 and
``CFG.KD`` (T 4 is among 𝒯; CE weight 0.1, KD weight 0.9).

Views: the official strong view is the weak view's crop-and-flip recipe followed by RandAugment(2, 10) and
Cutout (``mdistiller/dataset/cifar100.py``, ``get_cifar100_train_transform_strong``). With ``strong_view:
randaugment`` (default) ``make_batch`` builds it from the loop's (weak) batch with
``kdlab.data.randaugment`` and ``loss_terms`` runs the student (train mode, its own BatchNorm batch, as the
official second forward) and the teacher (eval, no gradient) on it. One difference, by construction: the strong
view shares the weak view's crop and flip (kdlab augments a batch once), where the official code draws a
second crop. Its random numbers come from a generator seeded by a saved seed, the step and the micro-batch, so
a resumed run draws the same views. ``strong_view: weak`` is the official loss with ``image_strong =
image_weak`` (one forward each), the only choice for inputs that are not 1- or 3-channel images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kdlab.config.validate import NonNegative, Positive
from kdlab.data.base import gives_images
from kdlab.data.randaugment import randaugment
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy
from kdlab.losses.divergences import _compute_dtype
from kdlab.losses.mlkd import batch_alignment, class_alignment, confidence_masks, instance_alignment
from kdlab.methods.base import Method
from kdlab.methods.robust_common import training_mode
from kdlab.registry import register

STRONG_CHANNELS = (1, 3)  # RandAugment's colour ops read grey or RGB images


def mlkd_terms(s_weak, t_weak, s_strong, t_strong, labels, *, temperatures, ce_weight: float,
               kd_weight: float) -> dict[str, torch.Tensor]:
    """The four MLKD terms of one batch from both views' logits (the formula in the module docstring)."""
    mask, class_mask = confidence_masks(t_weak)
    dtype = _compute_dtype(s_weak, t_weak)  # the fractions at the losses' precision (float64 stays float64)
    m, m_c = mask.to(dtype).mean(), class_mask.to(dtype).mean()
    instance = sum(m * instance_alignment(s_weak, t_weak, T) + instance_alignment(s_strong, t_strong, T)
                   for T in temperatures)
    return {"ce": ce_weight * (cross_entropy(s_weak, labels) + cross_entropy(s_strong, labels)),
            "instance": kd_weight * instance,
            "batch": kd_weight * m * sum(batch_alignment(s_weak, t_weak, T) for T in temperatures),
            "class": kd_weight * m_c * sum(class_alignment(s_weak, t_weak, T) for T in temperatures)}


@dataclass
class MLKDHparams:
    ce_weight: NonNegative = 0.1  # official CFG.KD.LOSS.CE_WEIGHT
    kd_weight: NonNegative = 0.9  # CFG.KD.LOSS.KD_WEIGHT, on every alignment term
    temperatures: tuple[Positive, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)  # KD_ours.py: T 4 (CFG.KD.TEMPERATURE), 3, 5, 2, 6
    strong_view: Literal["randaugment", "weak"] = "randaugment"  # the official RandAugment(2, 10) + Cutout view

    def problems(self) -> list[str]:
        return [] if self.temperatures else ["method.temperatures: give at least one temperature"]

    @staticmethod
    def check_config(cfg, errors: list[str]) -> None:
        if cfg.method.options.get("strong_view", "randaugment") == "randaugment" and gives_images(cfg.data.dataset, cfg.data.options) is False:
            errors.append(f"method.strong_view: randaugment needs image inputs (C, H, W) but dataset "
                          f"{cfg.data.dataset!r} gives vectors or tokens; set method.strong_view: weak")


@register("method", "mlkd")
class MLKD(Method):
    """Multi-level logit distillation: instance, batch and class alignment over several temperatures."""

    Hparams = MLKDHparams
    teacher_cacheable = True  # the loop's teacher forward sees the weak view, unchanged by make_batch

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if hparams.strong_view == "randaugment" and input_shape is not None and (
                len(input_shape) != 3 or input_shape[0] not in STRONG_CHANNELS):
            raise KdlabError(f"method.strong_view: randaugment needs 1- or 3-channel images (C, H, W), but the "
                             f"inputs are {tuple(input_shape)}; set method.strong_view: weak")
        self.__dict__["_student"] = student  # plain references: not the method's parameters or state
        self.__dict__["_teacher"] = teacher
        if hparams.strong_view == "randaugment":  # drawn only here: a one-view run keeps the global stream as it was
            device = next(iter(student.parameters()), torch.zeros(())).device
            self.register_buffer("augment_seed", torch.randint(0, 2**62, (1,)).to(device))  # checkpointed

    def _generator(self, device: torch.device) -> torch.Generator:
        seed = int(self.augment_seed) * 1_000_003 + self.step + 0x9E3779B97F4A7C15 * self.micro_batch
        return torch.Generator(device=device).manual_seed(seed % 2**63)

    @torch.no_grad()
    def _teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits in eval mode, on its own device and dtype (``teacher.device``/``dtype``)."""
        weight = next(iter(self._teacher.parameters()), None)
        if weight is not None:
            inputs = inputs.to(weight.device, weight.dtype if weight.is_floating_point() else inputs.dtype)
        with training_mode(self._teacher, "eval"):
            return self._teacher(inputs).float()

    def make_batch(self, batch):
        if self.hparams.strong_view == "randaugment":
            batch.extras["strong"] = randaugment(batch.inputs, generator=self._generator(batch.inputs.device))
        return batch

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        s, t = student_out.logits, teacher_out.logits
        s_strong, t_strong = s, t
        if h.strong_view == "randaugment":
            strong = batch.extras["strong"]
            s_strong = self._student(strong)  # train mode, with gradient: the official second student forward
            t_strong = self._teacher_logits(strong).to(s.device)
        return mlkd_terms(s, t, s_strong, t_strong, batch.labels, temperatures=h.temperatures,
                          ce_weight=h.ce_weight, kd_weight=h.kd_weight)
