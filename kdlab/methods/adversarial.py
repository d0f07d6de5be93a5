"""The shared min–max toolkit: a discriminator on class-distribution vectors.

Not a method (nothing is registered here). Methods that pit a discriminator
against the student (``adversarial_kd``, self-KD variants with a discriminator)
own a ``Discriminator``, return its parameters from ``adversary_parameters`` and
train it with the GAN losses in ``kdlab.losses.adversarial``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from kdlab.errors import KdlabError


class Discriminator(nn.Module):
    """An MLP that scores vectors of C classes: ``(N, C)`` → one raw score (logit) per sample, ``(N,)``.

    ``depth`` hidden layers of ``width`` units (Linear → LeakyReLU(``negative_slope``)),
    then Linear(·, 1); ``depth = 0`` is a single linear layer (logistic regression on
    the inputs). With ``spectral_norm`` every Linear, the output layer included, is
    wrapped in ``torch.nn.utils.parametrizations.spectral_norm`` (Miyato et al. 2018:
    each layer's weight divided by its largest singular value, estimated by one power
    iteration per training-mode forward). The inputs are probability vectors or
    logits; the module does not care, but its caller must be consistent.
    """

    def __init__(self, num_classes: int, *, width: int = 64, depth: int = 2, spectral_norm: bool = False,
                 negative_slope: float = 0.2):
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 1), ("width", width, 1), ("depth", depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise KdlabError(f"discriminator {name}: expected an integer >= {low}, got {value!r}")
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        features = num_classes
        for _ in range(depth):
            layers += [self._linear(features, width, spectral_norm), nn.LeakyReLU(negative_slope)]
            features = width
        layers.append(self._linear(features, 1, spectral_norm))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def _linear(fan_in: int, fan_out: int, spectral_norm: bool) -> nn.Module:
        layer = nn.Linear(fan_in, fan_out)
        return _spectral_norm(layer) if spectral_norm else layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[-1] != self.num_classes:
            raise KdlabError(f"discriminator: expected inputs of shape (N, {self.num_classes}), "
                             f"got {tuple(x.shape)}")
        return self.net(x).squeeze(-1)  # (N, 1) -> (N,)
