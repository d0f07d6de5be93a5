"""RandAugment(2, 10) + Cutout: the strong view of MLKD, as vectorised batch ops on the 8-bit grid.

MLKD (Jin, Wang & Lin, CVPR 2023, "Multi-Level Logit Distillation", §4 implementation details) trains on
a weak view (crop + flip) and a strong view that adds ``RandAugment(2, 10)`` from the official code
(Jin-Ying/Multi-Level-Logit-Distillation ``mdistiller/dataset/cifar100.py``): FixMatch's RandAugment
variant (Sohn et al., NeurIPS 2020) — two of the 14 PIL ops of ``augment_list()`` drawn with
replacement, each at a magnitude uniform in its range (the ``10`` is unused), then ``Cutout``.

Images are put on PIL's grid, ``x8 = round(255·x)``, each op computes what Pillow (13) computes on a
uint8 image, and ``x8 / 255`` is returned. Pillow's arithmetic is followed to the bit, so each op equals
PIL exactly (tests/data/test_randaugment.py compares every op with PIL):

* ImageEnhance (Brightness, Color, Contrast, Sharpness) = ``Image.blend(degenerate, img, f)``: float32
  ``d + f·(x − d)`` truncated and clipped (Blend.c); RGB→L is ``(19595R + 38470G + 7471B + 2¹⁵) >> 16``
  (Convert.c); Contrast's grey is ``int(mean(L) + 0.5)``; Sharpness's degenerate is the SMOOTH filter
  (1 1 1 / 1 5 1 / 1 1 1)/13 in float32 with +0.5 rounding, border pixels kept (Filter.c); Color on a
  1-channel image is the identity.
* AutoContrast and Equalize: ImageOps' per-channel lookup tables (cutoff 0).
* Rotate, ShearX/Y: PIL's affine nearest-neighbour sampling in 16.16 fixed point (Geometry.c
  ``affine_fixed``, used while coordinates stay below 32768 px); Rotate builds ``img.rotate(v)``'s matrix
  (about (w/2, h/2), cos/sin rounded to 15 digits). TranslateX/Y: Geometry.c ``ImagingScaleAffine``
  (double positions accumulated pixel by pixel). Fill 0.
* Cutout as ``CutoutAbs``: side ``v·W`` px, v ~ U(0, cutout); its centre is ``np.random.uniform(w)``,
  i.e. numpy's ``uniform(low=w, high=1)`` = w + (1 − w)·U, uniform on (1, w] — not on [0, w) — kept as
  the official code has it; ``ImageDraw.rectangle`` fills x0..x1 *inclusive*; fill (125, 123, 114), 125
  for 1-channel images (our choice: the official code draws RGB only); v = 0 leaves the image as it is.

Deviations: randomness comes from a ``torch.Generator`` (not Python's/numpy's global RNGs); Rotate
follows PIL's affine path for every angle (PIL copies/transposes at exact multiples of 90°, which the
±30° range meets only at 0, where both are the identity); cos/sin come from torch (a last-ulp difference
to libm could move a fixed-point coordinate only at an exact tie).
"""
from __future__ import annotations

import math

import torch

from kdlab.errors import KdlabError

# augment_list() of the official file: (name, low, high); the magnitude is low + (high − low)·U(0, 1).
AUGMENT_LIST = (
    ("AutoContrast", 0.0, 1.0), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95), ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0), ("Identity", 0.0, 1.0), ("Posterize", 4.0, 8.0), ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3), ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3), ("TranslateY", -0.3, 0.3),
)
OPS = tuple(name for name, _, _ in AUGMENT_LIST)
CUTOUT_FILL = (125.0, 123.0, 114.0)  # CutoutAbs's colour; a 1-channel image gets the first


def randaugment(inputs: torch.Tensor, *, generator: torch.Generator, num_ops: int = 2,
                cutout: float = 0.5) -> torch.Tensor:
    """The official strong augmentation of each image: ``num_ops`` random ops, then Cutout.

    inputs: float (N, C, H, W) in [0, 1], C in {1, 3}, any device. Returns the same shape, dtype and
    device, on the 1/255 grid. Draws (``randaugment_params``) come from ``generator`` on its device, so
    a seed fixes the output. KdlabError for other channel counts.
    """
    if inputs.dim() != 4 or inputs.shape[1] not in (1, 3):
        raise KdlabError(f"randaugment needs 1- or 3-channel images (N, C, H, W); got shape {tuple(inputs.shape)}")
    params = randaugment_params(len(inputs), generator=generator, num_ops=num_ops)
    return apply_randaugment(inputs, *(p.to(inputs.device) for p in params), cutout=cutout)


def randaugment_params(count: int, *, generator: torch.Generator, num_ops: int = 2):
    """``(ops, u, cut)``: op indices into ``OPS`` (int64 (count, num_ops)), their magnitude draws U(0, 1)
    (float64 (count, num_ops)) and Cutout's draws (float64 (count, 3): size, centre x, centre y).

    Drawn in this order from ``generator`` on its device; an op is ``floor(14·U)`` as ``random.choices``
    picks it (with replacement)."""
    draw = {"generator": generator, "device": generator.device, "dtype": torch.float64}
    ops = (torch.rand(count, num_ops, **draw) * len(OPS)).long().clamp_max(len(OPS) - 1)
    return ops, torch.rand(count, num_ops, **draw), torch.rand(count, 3, **draw)


def apply_randaugment(inputs: torch.Tensor, ops: torch.Tensor, u: torch.Tensor, cut: torch.Tensor, *,
                      cutout: float = 0.5) -> torch.Tensor:
    """``inputs`` augmented with ``randaugment_params``' draws (on the inputs' device): each op applied to
    the samples that drew it at that position, in order, then Cutout of side ``cut[:, 0]·cutout·W``."""
    images8 = (inputs.float() * 255).round().clamp(0, 255)
    for position in range(ops.shape[1]):
        for index, (name, low, high) in enumerate(AUGMENT_LIST):
            rows = (ops[:, position] == index).nonzero().squeeze(1)
            if len(rows):
                magnitude = low + (high - low) * u[rows, position]
                images8[rows] = apply_op(name, images8[rows], magnitude)
    images8 = apply_cutout(images8, cut[:, 0] * cutout, cut[:, 1], cut[:, 2])
    return (images8 / 255).to(inputs.dtype)


def apply_op(name: str, images8: torch.Tensor, magnitudes) -> torch.Tensor:
    """One op on (n, C, H, W) images holding integers 0..255 (any float dtype), per-sample magnitudes (n,)
    (or one for all) as the official op functions take them (Rotate in degrees, TranslateX as a fraction
    of W, ...); returns the same dtype, values still integers 0..255."""
    x = images8
    v = torch.as_tensor(magnitudes, dtype=torch.float64, device=x.device).reshape(-1).expand(len(x))
    height, width = x.shape[-2:]
    if name == "Identity":
        return x
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, v)
    if name == "Color":
        return _blend(_luma(x).expand_as(x), x, v) if x.shape[1] == 3 else x
    if name == "Contrast":
        mean = _luma(x).double().sum(dim=(1, 2, 3)) / (height * width)  # ImageStat: sum / count
        return _blend(torch.floor(mean + 0.5).to(x.dtype)[:, None, None, None].expand_as(x), x, v)
    if name == "Sharpness":
        return _blend(_smooth(x), x, v)
    if name == "Posterize":
        shift = 2.0 ** (8 - v.trunc().clamp(1, 8))[:, None, None, None]  # keep the top int(v) bits
        return (torch.floor(x.double() / shift) * shift).to(x.dtype)
    if name == "Solarize":
        return torch.where(x.double() >= v[:, None, None, None], 255 - x, x)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if name == "Rotate":
        return _affine_fixed(x, _rotate_matrix(v, width, height))
    if name == "ShearX":
        return _affine_fixed(x, torch.stack([one, v, zero, zero, one, zero], 1))
    if name == "ShearY":
        return _affine_fixed(x, torch.stack([one, zero, zero, v, one, zero], 1))
    if name == "TranslateX":
        return _affine_scale(x, torch.stack([one, zero, v * width, zero, one, zero], 1))
    if name == "TranslateY":
        return _affine_scale(x, torch.stack([one, zero, zero, zero, one, v * height], 1))
    raise KdlabError(f"randaugment: unknown op {name!r}; choose one of {', '.join(OPS)}")


def apply_cutout(images8: torch.Tensor, size: torch.Tensor, u_x: torch.Tensor, u_y: torch.Tensor) -> torch.Tensor:
    """Official ``Cutout(img, size)`` (size a fraction of W, 0 = no cutout) with numpy's centre draws
    replaced by ``u_x``, ``u_y`` ~ U(0, 1): the centre is ``w + (1 − w)·u`` (``np.random.uniform(w)``)."""
    count, channels, height, width = images8.shape
    side = size.double() * width
    x0 = torch.floor((width + (1.0 - width) * u_x.double() - side / 2).clamp_min(0))
    y0 = torch.floor((height + (1.0 - height) * u_y.double() - side / 2).clamp_min(0))
    x1 = torch.minimum(x0 + side, torch.full_like(x0, width)).floor()  # the rectangle casts to int
    y1 = torch.minimum(y0 + side, torch.full_like(y0, height)).floor()
    xs = torch.arange(width, device=images8.device, dtype=torch.float64)
    ys = torch.arange(height, device=images8.device, dtype=torch.float64)
    inside_x = (xs >= x0[:, None]) & (xs <= x1[:, None])  # ImageDraw.rectangle includes x1 and y1
    inside_y = (ys >= y0[:, None]) & (ys <= y1[:, None])
    box = inside_y[:, :, None] & inside_x[:, None, :] & (size > 0)[:, None, None]
    fill = torch.tensor(CUTOUT_FILL[:channels], dtype=images8.dtype, device=images8.device)
    return torch.where(box[:, None], fill[None, :, None, None], images8)


def _blend(degenerate, image, factor):
    """``Image.blend(degenerate, image, factor)`` (Blend.c): float32 ``d + f·(x − d)``, clipped, truncated."""
    f = factor.to(torch.float32)[:, None, None, None]
    d = degenerate.to(torch.float32)
    out = d + f * (image.to(torch.float32) - d)  # two float32 roundings, as the C expression
    return out.clamp(0, 255).trunc().to(image.dtype)


def _luma(x):
    """PIL's RGB → L (Convert.c ``L24``), (n, 1, H, W); a 1-channel image is its own L."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(x.dtype)[:, None]


def _smooth(x):
    """ImageFilter.SMOOTH (Filter.c ``ImagingFilter3x3``): float32 kernel/13, row y+1 first, +0.5 then
    truncated; the border rows and columns keep the original (an image under 3 px is copied)."""
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x
    k1, k5 = (torch.tensor([1.0, 5.0], dtype=torch.float32, device=x.device) / torch.tensor(13.0, device=x.device))
    f = x.to(torch.float32)

    def row(r, centre):  # one kernel row over columns x-1, x, x+1, summed left to right
        return (r[..., :-2] * k1 + r[..., 1:-1] * centre) + r[..., 2:] * k1

    ss = 0.5 + row(f[:, :, 2:], k1)
    ss = ss + row(f[:, :, 1:-1], k5)
    ss = ss + row(f[:, :, :-2], k1)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = ss.clamp(0, 255).trunc().to(x.dtype)
    return out


def _autocontrast(x):
    """ImageOps.autocontrast, cutoff 0: each channel's [lo, hi] to [0, 255] via int(i·scale + offset)."""
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp_min(1)  # tensor / tensor: 255.0 / t would be 255·(1/t)
    offset = -lo * scale
    out = (x.double() * scale + offset).floor().clamp(0, 255).to(x.dtype)
    return torch.where(hi > lo, out, x)


def _equalize(x):
    """ImageOps.equalize per channel: step = (n − count of the top value) // 255; lut[i] =
    (step // 2 + #pixels below i) // step (clipped to 255); step 0 leaves the channel unchanged."""
    count, channels, height, width = x.shape
    flat = x.long().reshape(count * channels, height * width)
    hist = torch.zeros(count * channels, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    top = hist.gather(1, flat.amax(dim=1, keepdim=True))
    step = (height * width - top) // 255
    below = hist.cumsum(dim=1) - hist
    safe = step.clamp_min(1)
    lut = ((safe // 2 + below) // safe).clamp_max(255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.reshape(x.shape).to(x.dtype)


def _rotate_matrix(angle, width, height):
    """``Image.rotate(angle)``'s AFFINE data (output → input), about (w/2, h/2), as Image.py builds it."""
    angle = torch.fmod(angle, 360.0)
    angle = torch.where(angle < 0, angle + 360.0, angle)  # Python's angle % 360.0
    theta = -(angle * (math.pi / 180.0))  # -math.radians(angle)

    def round15(t):  # round(t, 15): the double nearest k·1e-15
        return torch.round(t * 1e15) / 1e15

    cos, sin, msin = round15(torch.cos(theta)), round15(torch.sin(theta)), round15(-torch.sin(theta))
    cx, cy = width / 2, height / 2
    c = (cos * -cx + sin * -cy) + 0.0 + cx
    f = (msin * -cx + cos * -cy) + 0.0 + cy
    return torch.stack([cos, sin, c, msin, cos, f], 1)


def _gather(x, xin, yin):
    """``x`` sampled at integer source pixels (xin, yin) (n, H, W); outside the image → 0."""
    count, channels, height, width = x.shape
    valid = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
    index = (yin.clamp(0, height - 1) * width + xin.clamp(0, width - 1)).reshape(count, 1, -1)
    out = x.reshape(count, channels, -1).gather(2, index.expand(count, channels, -1)).reshape(x.shape)
    return torch.where(valid[:, None], out, torch.zeros((), dtype=x.dtype, device=x.device))


def _affine_fixed(x, a):
    """Geometry.c ``affine_fixed``: nearest neighbour in 16.16 fixed point (FIX(v) = floor(v·65536 + 0.5);
    the pixel centre enters through a[2] + a[0]/2 + a[1]/2; input pixel = coordinate >> 16)."""
    height, width = x.shape[-2:]

    def fix(v):
        return torch.floor(v * 65536.0 + 0.5).long()[:, None, None]

    a0, a1, a3, a4 = fix(a[:, 0]), fix(a[:, 1]), fix(a[:, 3]), fix(a[:, 4])
    a2 = fix(a[:, 2] + a[:, 0] * 0.5 + a[:, 1] * 0.5)
    a5 = fix(a[:, 5] + a[:, 3] * 0.5 + a[:, 4] * 0.5)
    xs = torch.arange(width, device=x.device)[None, None, :]
    ys = torch.arange(height, device=x.device)[None, :, None]
    return _gather(x, (a2 + ys * a1 + xs * a0) >> 16, (a5 + ys * a4 + xs * a3) >> 16)


def _affine_scale(x, a):
    """Geometry.c ``ImagingScaleAffine`` (a[1] = a[3] = 0): positions start at a[2] + a[0]/2 and grow by
    a[0] per pixel, accumulated in double one pixel at a time as the C loop does; COORD truncates."""
    height, width = x.shape[-2:]

    def coords(start, step, size):
        positions, current = [], start
        for _ in range(size):
            positions.append(current)
            current = current + step
        p = torch.stack(positions, 1)
        return torch.where(p < 0, -1, p.trunc().long())

    xin = coords(a[:, 2] + a[:, 0] * 0.5, a[:, 0], width)[:, None, :]
    yin = coords(a[:, 5] + a[:, 4] * 0.5, a[:, 4], height)[:, :, None]
    return _gather(x, xin.expand(-1, height, -1), yin.expand(-1, -1, width))
