"""Generators for data-free distillation: noise ``z ~ N(0, I)`` -> inputs in [0, 1] of a given shape.

The image generator follows DFAD's ``GeneratorA`` (Fang et al. 2019, official code
``VainF/Data-Free-Adversarial-Distillation``, ``network/gan.py``), itself the
DCGAN/DAFL layout:

    Linear(z -> 2w · H/4 · W/4) -> reshape -> BN
    -> upsample ×2 -> conv3×3 (2w -> 2w) -> BN -> LeakyReLU(0.2)
    -> upsample ×2 -> conv3×3 (2w -> w)  -> BN -> LeakyReLU(0.2)
    -> conv3×3 (w -> C) -> squash

with ``w`` = ``width`` (the official ``ngf`` = 64). Two deliberate differences:

* **Output range.** The official code ends in ``tanh`` followed by a non-affine
  BatchNorm, because its networks take mean/std-normalised inputs. kdlab models
  take inputs in [0, 1] and normalise inside ``forward``, so the output here is a
  ``sigmoid`` into [0, 1] and the teacher's own normalisation does the rest.
* **Any spatial size.** The official code needs H = W divisible by 4 (``img_size // 4``
  then two ×2 upsamplings). Here the seed map is ``ceil(H/4) × ceil(W/4)`` and each
  nearest-neighbour upsampling goes to an explicit size (``ceil(H/2)``, then ``H``),
  which equals the official ×2 whenever H, W are divisible by 4 (8×8 digits,
  32×32 CIFAR) and still lands exactly on odd sizes.

Sequences ``(C, L)`` (MNIST-1D ``(1, 40)``) use the same stack with 1-D
convolutions and BatchNorm1d (40: 10 -> 20 -> 40): it keeps DFAD's design
(local structure from convolutions, BN in every block) rather than an MLP, so one
family covers both. Flat vectors ``(F,)`` have no locality to exploit and get a
two-layer MLP (Linear -> BN -> LeakyReLU -> Linear -> sigmoid).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdlab.errors import KdlabError

LEAKY_SLOPE = 0.2  # LeakyReLU slope of the official GeneratorA (and DCGAN)


def _up_sizes(size: int) -> tuple[int, int, int]:
    """Seed, middle and final length of one axis: ceil(n/4) -> ceil(n/2) -> n."""
    return math.ceil(size / 4), math.ceil(size / 2), size


class ConvGenerator(nn.Module):
    """DFAD's GeneratorA for ``(C, L)`` or ``(C, H, W)`` outputs in [0, 1] (see the module docstring)."""

    def __init__(self, input_shape: tuple[int, ...], *, latent_dim: int, width: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = int(latent_dim)
        channels, *spatial = self.input_shape
        two_d = len(spatial) == 2
        conv, batch_norm = (nn.Conv2d, nn.BatchNorm2d) if two_d else (nn.Conv1d, nn.BatchNorm1d)
        axes = [_up_sizes(size) for size in spatial]
        self.seed_size = tuple(a[0] for a in axes)  # (H/4, W/4) or (L/4,), rounded up
        middle_size, final_size = tuple(a[1] for a in axes), tuple(a[2] for a in axes)
        self.project = nn.Linear(latent_dim, 2 * width * math.prod(self.seed_size))
        self.body = nn.Sequential(
            batch_norm(2 * width),
            nn.Upsample(size=middle_size, mode="nearest"),
            conv(2 * width, 2 * width, 3, padding=1),
            batch_norm(2 * width),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Upsample(size=final_size, mode="nearest"),
            conv(2 * width, width, 3, padding=1),
            batch_norm(width),
            nn.LeakyReLU(LEAKY_SLOPE),
            conv(width, channels, 3, padding=1),
            batch_norm(channels, affine=False) if not __import__("os").environ.get("GEN_NOBN") else nn.Identity(),
        )
        import os
        mu, sd = float(os.environ.get("GEN_MU", "0.5")), float(os.environ.get("GEN_SD", "0"))
        self.register_buffer("out_shift", torch.tensor(math.log(mu / (1 - mu))))
        self.register_buffer("out_scale", torch.tensor(sd / (mu * (1 - mu)) if sd > 0 else 1.0))

    def forward(self, z: Tensor) -> Tensor:
        """``z (N, latent_dim)`` -> inputs ``(N, *input_shape)`` in [0, 1]."""
        seed = self.project(z.flatten(1))
        seed = seed.view(z.shape[0], -1, *self.seed_size)  # (N, 2w, H/4, W/4) or (N, 2w, L/4)
        return torch.sigmoid(self.out_shift + self.out_scale * self.body(seed))


class MLPGenerator(nn.Module):
    """Flat ``(F,)`` outputs in [0, 1]: Linear -> BN -> LeakyReLU -> Linear -> sigmoid."""

    def __init__(self, input_shape: tuple[int, ...], *, latent_dim: int, width: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = int(latent_dim)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 2 * width), nn.BatchNorm1d(2 * width), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(2 * width, self.input_shape[0]), nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1))


def check_generator_output(generator: nn.Module, input_shape: Sequence[int], *, latent_dim: int) -> None:
    """Raise ``KdlabError`` unless ``generator`` maps ``(N, latent_dim)`` noise to ``(N, *input_shape)``.

    Probes a batch of two in eval mode (BatchNorm needs no batch statistics then)
    without gradients, and restores the generator's mode.
    """
    was_training = generator.training
    generator.eval()
    try:
        device = next(iter(generator.parameters()), torch.zeros(())).device
        with torch.no_grad():
            out = generator(torch.zeros(2, latent_dim, device=device))
    finally:
        generator.train(was_training)
    if tuple(out.shape[1:]) != tuple(input_shape):
        raise KdlabError(f"generator output {tuple(out.shape[1:])} does not match the teacher's input shape "
                         f"{tuple(input_shape)}; build the generator for the dataset's input_shape")


def build_generator(input_shape: Sequence[int], *, latent_dim: int = 64, width: int = 64) -> nn.Module:
    """A generator of inputs in [0, 1] of ``input_shape`` (channel first, no batch dim) from ``latent_dim`` noise.

    ``(C, H, W)`` and ``(C, L)``: DFAD's GeneratorA with 2-D / 1-D convolutions
    (``width`` = its ``ngf``); ``(F,)``: a two-layer MLP. The output shape is
    checked against ``input_shape`` before the generator is returned.
    """
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else (input_shape,)
    if (not 1 <= len(shape) <= 3
            or any(not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1 for d in shape)):
        raise KdlabError(f"generator: input_shape {shape!r} must be (F,), (C, L) or (C, H, W) positive integers; "
                         "check the dataset's input_shape")
    for key, value in (("latent_dim", latent_dim), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise KdlabError(f"generator: {key}={value!r} must be a positive integer; set e.g. {key}: 64")
    shape = tuple(int(d) for d in shape)
    cls = MLPGenerator if len(shape) == 1 else ConvGenerator
    generator = cls(shape, latent_dim=int(latent_dim), width=int(width))
    check_generator_output(generator, shape, latent_dim=int(latent_dim))
    return generator
