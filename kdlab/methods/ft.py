"""FT — Kim, Park & Kwak (NeurIPS 2018), "Paraphrasing Complex Network: Network Compression via Factor Transfer".

As the authors' code (github.com/Jangho-Kim/Factor-Transfer-pytorch: ``train_Paraphraser.py``,
``train_student.py``, ``Models/FeatureProjection.py``, ``utils.FT``), in one run of two phases:

1. the first ``paraphraser_fraction`` of training: the paraphraser P (an autoencoder on the teacher's last
   stage, after its ReLU) learns to reconstruct it, ``‖P(t) − t‖₁`` averaged over every element (the
   authors' ``nn.L1Loss()``; torchdistill's recipe uses a summed MSE instead — the authors win); the
   student is not trained (no term reaches it, so its optimiser skips it);
2. the rest: ``ce_weight · CE + ft_weight · FT(translator(s), encoder(t))`` (eq. 4;
   ``kdlab.losses.zoo.factor_transfer``, p = 1: ``L1Loss`` of the per-sample L2-normalised flattened factors)
   with the paraphraser frozen and only its encoder used, the translator trained with the student.

Paraphraser and translator as the authors' ``Paraphraser`` and ``Translator``: 3×3 convs (stride 1, padding 1,
bias, PyTorch's default initialisation) each followed by LeakyReLU(0.1), no BatchNorm; encoder
C → C → k·C → k·C, decoder (transposed convs) k·C → k·C → C → C; translator C_s → C_s → k·C_t → k·C_t, with
``round(C_t · k)`` factor channels. Defaults from the authors' CIFAR run (``train_student.py``): β = 500,
k = 0.5, CE weight 1, p = 1; the paraphraser phase 0.025 of training = their 6 paraphraser epochs
(``range(0, 5 + 1)``) within kdlab's 240-epoch CIFAR-100 recipes. Both modules are the method's parameters,
so they are checkpointed with it and a resumed run continues from the trained paraphraser.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdlab.config.validate import Count, NonNegative, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy
from kdlab.losses.zoo import factor_transfer
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import pair_shapes
from kdlab.registry import register


@dataclass
class FTHparams:
    ce_weight: NonNegative = 1.0
    ft_weight: NonNegative = 500.0  # β, the authors' train_student.py (torchdistill's ImageNet recipe: 1000)
    rate: UnitInterval = 0.5  # k, the paraphrase rate: the factor has k·C_t channels
    p: Count = 1  # the norm of the FT loss
    paraphraser_fraction: UnitInterval = 0.025  # share of training for the paraphraser (the authors: 6 epochs = 6/240)
    student_tap: str = "stage3"  # the last stage (the authors: layer3's output of the CIFAR ResNets)
    teacher_tap: str = "stage3"

    def problems(self) -> list[str]:
        return ["method.rate: must be > 0 (the factor needs at least one channel)"] if self.rate <= 0 else []


def _conv(i: int, o: int, transposed: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return [conv(i, o, kernel_size=3, stride=1, padding=1), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """The teacher-side autoencoder; its encoder's output is the teacher factor."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, f = channels, factor_channels
        self.encoder = nn.Sequential(*_conv(c, c), *_conv(c, f), *_conv(f, f))
        self.decoder = nn.Sequential(*_conv(f, f, True), *_conv(f, c, True), *_conv(c, c, True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def translator(channels: int, factor_channels: int) -> nn.Sequential:
    return nn.Sequential(*_conv(channels, channels), *_conv(channels, factor_channels),
                         *_conv(factor_channels, factor_channels))


@register("method", "ft")
class FT(Method):
    """Factor transfer: train a paraphraser on the teacher's last stage, then CE + 500 · L1 of normalised factors."""

    Hparams = FTHparams
    revision = 2  # 2: the authors' L1 reconstruction loss and round(C·k) channels; old runs get other ids

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        [(s_shape, t_shape)] = pair_shapes("ft", (hparams.student_tap,), (hparams.teacher_tap,), student=student,
                                           teacher=teacher, input_shape=input_shape, maps=True)
        if s_shape[1:] != t_shape[1:]:
            raise KdlabError(f"method.student_tap/teacher_tap: ft compares factors position by position, so the maps "
                             f"need equal spatial sizes; {hparams.student_tap} is {s_shape} and "
                             f"{hparams.teacher_tap} is {t_shape}")
        factor = max(1, round(t_shape[0] * hparams.rate))  # the authors: int(round(C · k)) (torchdistill: int)
        self.student_taps, self.teacher_taps = (hparams.student_tap,), (hparams.teacher_tap,)
        self.paraphraser = Paraphraser(t_shape[0], factor)
        self.translator = translator(s_shape[0], factor)

    def paraphrasing(self) -> bool:
        return self.progress < self.hparams.paraphraser_fraction

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        t = teacher_out.features[h.teacher_tap].float()
        zero = t.new_zeros(())
        if self.paraphrasing():  # the student is left alone: no term depends on it
            return {"reconstruction": (self.paraphraser(t) - t).abs().mean(), "ce": zero, "ft": zero}  # nn.L1Loss()
        with torch.no_grad():  # the paraphraser is frozen once trained
            factor_t = self.paraphraser.encoder(t)
        factor_s = self.translator(student_out.features[h.student_tap].float())
        return {"reconstruction": zero,
                "ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "ft": h.ft_weight * factor_transfer(factor_s, factor_t, p=h.p)}
