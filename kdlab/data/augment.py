"""Train-time batch augmentation, vectorised and driven by a ``torch.Generator``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError

AUGMENTATIONS = ("none", "crop_flip")


def augment_batch(
    inputs: torch.Tensor, *, kind: str, generator: torch.Generator, padding: int = 4
) -> torch.Tensor:
    """Augment a training batch; returns a tensor of the same shape, dtype and device.

    inputs: float (N, C, H, W) images in [0, 1] (any shape for ``kind="none"``).
    kind: ``"none"`` returns ``inputs`` itself; ``"crop_flip"`` is the standard
    CIFAR recipe (He et al. 2016): zero-pad ``padding`` pixels on each side,
    crop a random H x W window back, and flip horizontally with probability
    1/2, independently per sample. Zero padding (black, as torchvision's
    ``RandomCrop(padding=4)`` on unnormalised images) is used rather than
    reflection. The random offsets and flips are drawn from ``generator`` (on
    its own device, then moved to the inputs'), so a generator seed fixes the
    result; the crop itself is one gather on the inputs' device.
    Raises KdlabError for an unknown kind or for crop_flip on non-image inputs.
    """
    if kind == "none":
        return inputs
    if kind != "crop_flip":
        raise KdlabError(f"data.augment: unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if inputs.dim() != 4:
        shape = tuple(inputs.shape[1:])
        raise KdlabError(
            f"data.augment: crop_flip needs image inputs (C, H, W) but this dataset's inputs have shape {shape}; "
            "set data.augment: none"
        )
    top, left, flip = crop_flip_params(len(inputs), generator=generator, padding=padding)
    return apply_crop_flip(inputs, top.to(inputs.device), left.to(inputs.device), flip.to(inputs.device),
                           padding=padding)


def crop_flip_params(count: int, *, generator: torch.Generator, padding: int = 4):
    """Random crop offsets ``top``, ``left`` (int64 in [0, 2·padding]) and ``flip`` (bool), each ``(count,)``.

    Drawn from ``generator`` on its own device, in this order (top, left, flip).
    """
    draw = {"generator": generator, "device": generator.device}
    top = torch.randint(0, 2 * padding + 1, (count,), **draw)
    left = torch.randint(0, 2 * padding + 1, (count,), **draw)
    flip = torch.rand(count, **draw) < 0.5
    return top, left, flip


def apply_crop_flip(inputs: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, *,
                    padding: int = 4) -> torch.Tensor:
    """Zero-pad ``inputs`` (N, C, H, W) by ``padding``, crop H x W at (top, left) per sample, then flip
    the samples where ``flip``; one gather on the inputs' device (parameters on the same device)."""
    count, channels, height, width = inputs.shape
    padded = F.pad(inputs, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(height, device=inputs.device)  # (N, H)
    columns = torch.arange(width, device=inputs.device).expand(count, width)
    columns = torch.where(flip[:, None], columns.flip(1), columns) + left[:, None]  # (N, W)
    samples = torch.arange(count, device=inputs.device)[:, None, None, None]
    channel = torch.arange(channels, device=inputs.device)[None, :, None, None]
    return padded[samples, channel, rows[:, None, :, None], columns[:, None, None, :]]
