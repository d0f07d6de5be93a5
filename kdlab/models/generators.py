"""Generators for data-free distillation: noise ``z ~ N(0, I)`` -> inputs in [0, 1] of a given shape.

The image generator follows DFAD's ``GeneratorA`` (Fang et al. 2019, official code
``VainF/Data-Free-Adversarial-Distillation``, ``network/gan.py``), itself the
DCGAN/DAFL layout:

    Linear(z -> 2w · H/4 · W/4) -> reshape -> BN
    -> upsample ×2 -> conv3×3 (2w -> 2w) -> BN -> LeakyReLU(0.2)
    -> upsample ×2 -> conv3×3 (2w -> w)  -> BN -> LeakyReLU(0.2)
    -> conv3×3 (w -> C) -> squash

with ``w`` = ``width`` (the official ``ngf`` = 64). Two deliberate differences:

* **Output range.** The official code ends in ``tanh`` and a non-affine
  BatchNorm, because its networks take mean/std-normalised inputs: every
  generated batch has, per channel, the normalised data's mean 0 and variance 1.
  kdlab models take inputs in [0, 1] and normalise inside ``forward``, so here
  the last conv is followed by the same non-affine BatchNorm and then by
  ``sigmoid(a_c + b_c · h)``, with ``(a_c, b_c)`` solved once so that for
  ``h ~ N(0, 1)`` the output has the data's per-channel mean and std
  (``logit_normal_params``): the [0, 1] analogue of the official tail. Without
  statistics (``mean``/``std`` None) it is ``sigmoid(h)`` (mean 0.5, std ≈ 0.21).
* **Any spatial size.** The official code needs H = W divisible by 4 (``img_size // 4``
  then two ×2 upsamplings). Here the seed map is ``ceil(H/4) × ceil(W/4)`` and each
  nearest-neighbour upsampling goes to an explicit size (``ceil(H/2)``, then ``H``),
  which equals the official ×2 whenever H, W are divisible by 4 (8×8 digits,
  32×32 CIFAR) and still lands exactly on odd sizes.

Sequences ``(C, L)`` (MNIST-1D ``(1, 40)``) use the same stack with 1-D
convolutions and BatchNorm1d (40: 10 -> 20 -> 40): it keeps DFAD's design
(local structure from convolutions, BN in every block) rather than an MLP, so one
family covers both. Flat vectors ``(F,)`` have no locality to exploit and get a
two-layer MLP with the same tail (Linear -> BN -> LeakyReLU -> Linear -> BN -> matched sigmoid).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kdlab.config.validate import Width
from kdlab.errors import KdlabError

LEAKY_SLOPE = 0.2  # LeakyReLU slope of the official GeneratorA (and DCGAN)


def _logit_normal_moments(shift: np.ndarray, scale: np.ndarray, nodes: np.ndarray,
                          weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of ``sigmoid(shift + scale·ε)`` by Gauss–Hermite quadrature; arrays ``(K,)``."""
    y = 0.5 * (1.0 + np.tanh(0.5 * (shift[:, None] + scale[:, None] * nodes)))  # (K, Q); sigmoid without overflow
    mean = y @ weights
    return mean, np.sqrt(np.maximum(((y - mean[:, None]) ** 2) @ weights, 0.0))


def logit_normal_params(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` such that ``sigmoid(a + b·ε)``, ``ε ~ N(0, 1)``, has mean ``mean`` and std ``std``.

    Elementwise over scalars or sequences (float64 arrays out). The moments are
    Gauss–Hermite integrals (80 nodes); for a fixed b the mean rises with a, and at
    the matched mean the std rises with b, so two nested bisections solve it.
    Feasible targets have 0 < mean < 1 and std < sqrt(mean·(1 − mean)) (the
    Bernoulli bound); others are clipped to mean ∈ [0.01, 0.99] and 0.99 × the bound.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    mean = np.clip(np.atleast_1d(np.asarray(mean, dtype=np.float64)), 0.01, 0.99)
    std = np.clip(np.atleast_1d(np.asarray(std, dtype=np.float64)), 1e-4, 0.99 * np.sqrt(mean * (1.0 - mean)))

    def shift_for(scale: np.ndarray) -> np.ndarray:
        low, high = -10.0 - 10.0 * scale, 10.0 + 10.0 * scale  # beyond ±(10 + 10·b) the mean is saturated
        for _ in range(80):
            middle = (low + high) / 2
            below = _logit_normal_moments(middle, scale, nodes, weights)[0] < mean
            low, high = np.where(below, middle, low), np.where(below, high, middle)
        return (low + high) / 2

    low, high = np.zeros_like(mean), np.full_like(mean, 50.0)
    for _ in range(50):
        middle = (low + high) / 2
        below = _logit_normal_moments(shift_for(middle), middle, nodes, weights)[1] < std
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    scale = (low + high) / 2
    return shift_for(scale), scale


class _MatchedSigmoid(nn.Module):
    """``sigmoid(a_c + b_c · h)`` per channel: standardised ``h`` -> [0, 1] with the data's mean and std."""

    def __init__(self, input_shape: tuple[int, ...], mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        channels = input_shape[0]
        if mean is None or std is None:
            shift, scale = np.zeros(channels), np.ones(channels)
        else:
            if len(mean) != channels or len(std) != channels:
                raise KdlabError(f"generator: {len(mean)} means and {len(std)} stds for {channels} channels; "
                                 "give one per channel")
            shift, scale = logit_normal_params(mean, std)
        view = (channels,) + (1,) * (len(input_shape) - 1)  # broadcasts over (N, C, *spatial)
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(view))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(view))

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.shift + self.scale * h)


def _up_sizes(size: int) -> tuple[int, int, int]:
    """Seed, middle and final length of one axis: ceil(n/4) -> ceil(n/2) -> n."""
    return math.ceil(size / 4), math.ceil(size / 2), size


class ConvGenerator(nn.Module):
    """DFAD's GeneratorA for ``(C, L)`` or ``(C, H, W)`` outputs in [0, 1] (see the module docstring)."""

    def __init__(self, input_shape: tuple[int, ...], *, latent_dim: int, width: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
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
            batch_norm(channels, affine=False),  # the official tail's standardisation ...
            _MatchedSigmoid(self.input_shape, mean, std),  # ... mapped into [0, 1] with the data's statistics
        )

    def forward(self, z: Tensor) -> Tensor:
        """``z (N, latent_dim)`` -> inputs ``(N, *input_shape)`` in [0, 1]."""
        seed = self.project(z.flatten(1))
        seed = seed.view(z.shape[0], -1, *self.seed_size)  # (N, 2w, H/4, W/4) or (N, 2w, L/4)
        return self.body(seed)


class MLPGenerator(nn.Module):
    """Flat ``(F,)`` outputs in [0, 1]: Linear -> BN -> LeakyReLU -> Linear -> BN (no affine) -> matched sigmoid.

    A flat input's "channels" are its F features (as in kdlab's ``Normalize``), so
    the statistics and the final standardisation are per feature.
    """

    def __init__(self, input_shape: tuple[int, ...], *, latent_dim: int, width: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = int(latent_dim)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 2 * width), nn.BatchNorm1d(2 * width), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(2 * width, self.input_shape[0]), nn.BatchNorm1d(self.input_shape[0], affine=False),
            _MatchedSigmoid(self.input_shape, mean, std),
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


def build_generator(input_shape: Sequence[int], *, latent_dim: int = 64, width: Width = 64,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """A generator of inputs in [0, 1] of ``input_shape`` (channel first, no batch dim) from ``latent_dim`` noise.

    ``(C, H, W)`` and ``(C, L)``: DFAD's GeneratorA with 2-D / 1-D convolutions
    (``width`` = its ``ngf``); ``(F,)``: a two-layer MLP. ``mean``/``std`` (one per
    channel, or one for all) are the data statistics a batch of outputs should
    have — those the teacher normalises with; None gives ``sigmoid`` of a
    standardised map. The output shape is checked against ``input_shape``.
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
    if (mean is None) != (std is None):
        raise KdlabError("generator: give both mean and std (the data statistics), or neither")
    if mean is not None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        mean, std = (mean * shape[0] if len(mean) == 1 else mean), (std * shape[0] if len(std) == 1 else std)
        if not all(0.0 < m < 1.0 and 0.0 < s < math.sqrt(m * (1.0 - m)) for m, s in zip(mean, std)):
            raise KdlabError(f"generator: mean {mean} and std {std} are not statistics of inputs in [0, 1] "
                             "(need 0 < mean < 1 and 0 < std < sqrt(mean·(1 − mean))); pass the dataset's")
    cls = MLPGenerator if len(shape) == 1 else ConvGenerator
    generator = cls(shape, latent_dim=int(latent_dim), width=int(width), mean=mean, std=std)
    check_generator_output(generator, shape, latent_dim=int(latent_dim))
    return generator
