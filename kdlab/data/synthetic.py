"""A seeded Gaussian-mixture classification task of any input shape, for tests and smoke runs."""
import math
from pathlib import Path

import torch

from kdlab.config.validate import Samples
from kdlab.data.base import DatasetArrays
from kdlab.errors import KdlabError
from kdlab.registry import register


def gaussian_mixture(
    *, num_classes: int, num_features: int, num_train: int, num_test: int, separation: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample unsquashed ``(x_train, y_train, x_test, y_test)``: x float32 (N, F), y int64 (N,).

    Class means are random directions of length ``separation`` (so two means
    are about ``separation * sqrt(2)`` noise standard deviations apart); each
    sample is its class mean plus unit Gaussian noise. Labels are balanced
    (``i % num_classes``, then shuffled). Everything comes from one
    ``torch.Generator(seed)`` in a fixed order (means, train, test), so the
    train set does not depend on ``num_test``.
    """
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_classes, num_features, generator=generator)
    means = separation * directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
        noise = torch.randn(count, num_features, generator=generator)
        return means[labels] + noise, labels

    x_train, y_train = sample(num_train)
    x_test, y_test = sample(num_test)
    return x_train, y_train, x_test, y_test


@register("dataset", "synthetic")
def synthetic(
    *,
    root: Path | None,
    cache_dir: Path,
    num_classes: int = 4,
    input_shape: tuple[int, ...] = (1, 16),
    num_train: Samples = 512,
    num_test: Samples = 256,
    separation: float = 3.0,
    seed: int = 0,
) -> DatasetArrays:
    """Synthetic: a seeded Gaussian mixture of any input shape, for tests (no files).

    ``num_classes`` Gaussians with random means ``separation`` noise stds from
    the origin (see ``gaussian_mixture``) in ``prod(input_shape)`` dimensions,
    squashed into [0, 1] by a sigmoid and reshaped to ``input_shape`` (channel
    first). Deterministic by ``seed``. ``root`` and ``cache_dir`` are not used.
    """
    if num_classes < 2:
        raise KdlabError(f"data.num_classes: must be at least 2, got {num_classes}; use e.g. 4")
    shape = tuple(input_shape)
    if not shape or any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in shape):
        raise KdlabError(f"data.input_shape: must be one or more positive integers (channel first), got {input_shape!r}; use e.g. [1, 16]")
    if num_train < 1 or num_test < 1:
        raise KdlabError(f"data.num_train/num_test: must be at least 1, got {num_train}/{num_test}; use e.g. 512/256")
    if not (math.isfinite(separation) and separation >= 0):
        raise KdlabError(f"data.separation: must be a finite number >= 0, got {separation}; use e.g. 3.0")
    x_train, y_train, x_test, y_test = gaussian_mixture(
        num_classes=num_classes, num_features=math.prod(shape), num_train=num_train, num_test=num_test,
        separation=separation, seed=seed,
    )
    return DatasetArrays(
        x_train=torch.sigmoid(x_train).reshape(num_train, *shape),
        y_train=y_train,
        x_test=torch.sigmoid(x_test).reshape(num_test, *shape),
        y_test=y_test,
        num_classes=num_classes,
    )

# crop_flip needs (C, H, W) inputs: read from the input_shape option at config validation.
synthetic.image_inputs = lambda options: len(options.get("input_shape", (1, 16))) == 3
