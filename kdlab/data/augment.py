"""Train-time batch augmentation, vectorised and driven by a ``torch.Generator``.

Every kind is two steps: ``draw_params`` (the random numbers, on the generator's device, in a fixed
order) and ``apply_params`` (a deterministic function of the images and those numbers). Resident and
streamed data (``data/resident.py``, ``data/streaming.py``) share both, so the same draws give the same
augmented tensors whichever path serves the batch.

* ``crop_flip``: the CIFAR recipe (zero-pad 4, random crop, horizontal flip);
* ``flip``: horizontal flip with probability 1/2;
* ``rrc_flip``: random-resized-crop as torchvision's ``RandomResizedCrop`` draws it (scale (0.08, 1),
  aspect ratio (3/4, 4/3) log-uniform, 10 tries then a centre crop), resized back to the image's size
  with bilinear interpolation (``F.interpolate``'s, align_corners=False, no antialias), then the flip.
  Plain torch: torchvision does not import beside the pinned torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError

AUGMENTATIONS = ("none", "crop_flip", "flip", "rrc_flip")
RRC_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults
RRC_RATIO = (3 / 4, 4 / 3)
_RRC_TRIES = 10


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
    result; the crop itself is one gather on the inputs' device. ``"flip"`` and
    ``"rrc_flip"``: see the module docstring (``draw_params`` then ``apply_params``).
    Raises KdlabError for an unknown kind or for an image augmentation on non-image inputs.
    """
    if kind == "none":
        return inputs
    check_kind(kind, tuple(inputs.shape[1:]))
    params = draw_params(kind, len(inputs), shape=tuple(inputs.shape[1:]), generator=generator, padding=padding)
    return apply_params(kind, inputs, tuple(p.to(inputs.device) for p in params), padding=padding)


def check_kind(kind: str, sample_shape: tuple[int, ...]) -> None:
    """KdlabError for an unknown kind, or an image augmentation on inputs that are not (C, H, W) images."""
    if kind not in AUGMENTATIONS:
        raise KdlabError(f"data.augment: unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if kind != "none" and len(sample_shape) != 3:
        raise KdlabError(
            f"data.augment: {kind} needs image inputs (C, H, W) but this dataset's inputs have shape "
            f"{tuple(sample_shape)}; set data.augment: none"
        )


def draw_params(kind: str, count: int, *, shape: tuple[int, ...], generator: torch.Generator,
                padding: int = 4) -> tuple[torch.Tensor, ...]:
    """The random numbers of ``count`` samples' augmentation (each a ``(count,)`` tensor on the generator's
    device): crop_flip (top, left, flip); flip (flip,); rrc_flip (top, left, height, width, flip).
    ``shape`` is one sample's (C, H, W). The draw order is fixed: a seed fixes every value."""
    if kind == "crop_flip":
        return crop_flip_params(count, generator=generator, padding=padding)
    if kind == "flip":
        return (torch.rand(count, generator=generator, device=generator.device) < 0.5,)
    if kind == "rrc_flip":
        return (*rrc_params(count, height=shape[-2], width=shape[-1], generator=generator),
                torch.rand(count, generator=generator, device=generator.device) < 0.5)
    return ()


def apply_params(kind: str, inputs: torch.Tensor, params: tuple[torch.Tensor, ...], *,
                 padding: int = 4) -> torch.Tensor:
    """``inputs`` (N, C, H, W) augmented with ``draw_params``' numbers (on the inputs' device)."""
    if kind == "crop_flip":
        return apply_crop_flip(inputs, *params, padding=padding)
    if kind == "flip":
        return torch.where(params[0][:, None, None, None], inputs.flip(-1), inputs)
    if kind == "rrc_flip":
        return apply_resized_crop(inputs, *params)
    return inputs


def rrc_params(count: int, *, height: int, width: int, generator: torch.Generator,
               scale: tuple[float, float] = RRC_SCALE, ratio: tuple[float, float] = RRC_RATIO):
    """Random-resized-crop boxes ``(top, left, box_height, box_width)`` (int64, each ``(count,)``).

    torchvision's ``RandomResizedCrop.get_params``, vectorised: up to 10 tries of an area fraction
    uniform in ``scale`` and an aspect ratio log-uniform in ``ratio`` (w = round(sqrt(area·r)),
    h = round(sqrt(area/r))); the first try that fits is kept, placed uniformly; a sample with no
    fitting try gets the centre crop of the ratio clamped to ``ratio``. All tries are drawn (fixed order).
    """
    draw = {"generator": generator, "device": generator.device, "dtype": torch.float64}
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(count, _RRC_TRIES, **draw))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * torch.rand(count, _RRC_TRIES, **draw))
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first fitting try (0 when none fits)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    # The fallback centre crop (torchvision's): the whole image, cut to the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    u_top, u_left = torch.rand(count, **draw), torch.rand(count, **draw)
    top = torch.where(found, (u_top * (height - h + 1)).long(), (height - fallback_h) // 2)
    left = torch.where(found, (u_left * (width - w + 1)).long(), (width - fallback_w) // 2)
    return top, left, h, w


def apply_resized_crop(inputs: torch.Tensor, top: torch.Tensor, left: torch.Tensor, box_height: torch.Tensor,
                       box_width: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each sample's box resized to the full H x W (bilinear, as ``F.interpolate(crop, align_corners=False)``),
    then flipped where ``flip``; one ``grid_sample`` on the inputs' device.

    Source coordinates are clamped to the box, so no pixel outside it is read (interpolate's edge rule)."""
    count, _, height, width = inputs.shape
    device, dtype = inputs.device, torch.float64

    def axis(start, size, out):  # (N, out) sampling positions, in grid_sample's [-1, 1] units
        step = size.to(dtype)[:, None] / out
        source = (torch.arange(out, device=device, dtype=dtype)[None] + 0.5) * step - 0.5
        source = torch.minimum(source.clamp_min(0), (size - 1).to(dtype)[:, None]) + start.to(dtype)[:, None]
        return (2 * source + 1) / out - 1

    ys = axis(top, box_height, height)
    xs = axis(left, box_width, width)
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1).to(inputs.dtype)
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
