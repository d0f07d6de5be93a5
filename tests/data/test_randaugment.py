"""kdlab.data.randaugment against Pillow, op by op (the official code's op definitions, written here)."""
import numpy as np
import pytest
import torch

from kdlab.data.randaugment import (AUGMENT_LIST, OPS, apply_cutout, apply_op, apply_randaugment, randaugment,
                                    randaugment_params)
from kdlab.errors import KdlabError

try:  # Pillow is the reference only, not a kdlab dependency: the tests that call it skip without it
    from PIL import Image, ImageDraw, ImageEnhance, ImageOps
except ImportError:
    Image = ImageDraw = ImageEnhance = ImageOps = None


@pytest.fixture
def pil():
    pytest.importorskip("PIL")


def _pil_op(name, img, v):
    """The official mdistiller/dataset/cifar100.py op ``name`` at magnitude ``v``, on a PIL image."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(v)
    if name == "Color":
        return ImageEnhance.Color(img).enhance(v)
    if name == "Contrast":
        return ImageEnhance.Contrast(img).enhance(v)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Identity":
        return img
    if name == "Posterize":
        return ImageOps.posterize(img, max(1, int(v)))
    if name == "Rotate":
        return img.rotate(v)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(v)
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0))
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0))
    if name == "Solarize":
        return ImageOps.solarize(img, v)
    if name == "TranslateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, v * img.size[0], 0, 1, 0))
    if name == "TranslateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1]))
    raise AssertionError(name)


def _to_pil(image8):  # (C, H, W) uint8 array -> PIL image (RGB or L)
    return Image.fromarray(image8.transpose(1, 2, 0) if image8.shape[0] == 3 else image8[0])


def _from_pil(img):
    array = np.asarray(img)
    return array.transpose(2, 0, 1) if array.ndim == 3 else array[None]


def _batch(channels, size, seed):
    """Random uint8 images plus edge cases: a constant image, a two-value image, a narrow-range image."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (channels, size, size)) for _ in range(3)]
    images.append(np.full((channels, size, size), 77))
    images.append(np.where(rng.random((channels, size, size)) < 0.3, 40, 200))
    images.append(rng.integers(100, 110, (channels, size, size)))
    checker = (np.arange(size)[:, None] + np.arange(size)) % 2  # grey, mean L exactly 100.5: int(mean + 0.5)
    images.append(np.broadcast_to(100 + checker, (channels, size, size)))
    return np.stack(images).astype(np.uint8)


# Magnitudes that put sampling positions exactly on pixel edges, where PIL's fixed-point rounding decides.
_EXACT = {"Rotate": [0.0, 15.0, -15.0, 5.0], "ShearX": [0.0, 0.2, -0.2, 0.1], "ShearY": [0.0, 0.2, -0.2, 0.1],
          "TranslateX": [0.0, 0.25, -0.125], "TranslateY": [0.0, 0.25, -0.125],
          "Posterize": [1.0, 7.5], "Solarize": [0.0, 1.0, 127.5, 128.0]}


def _magnitudes(name):
    _, low, high = next(entry for entry in AUGMENT_LIST if entry[0] == name)
    inner = [low + (high - low) * u for u in (0.013, 0.25, 0.5, 0.77, 0.999)]
    return [low, high] + inner + _EXACT.get(name, [])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("channels,size", [(3, 16), (1, 16), (3, 32), (1, 32)])
def test_op_equals_pil(name, channels, size, pil):
    magnitudes = _magnitudes(name) + ([0.5] if name == "Posterize" else [])  # int(0.5) = 0 is clamped to 1
    images = _batch(channels, size, seed=size + channels)
    for v in magnitudes:
        ours = apply_op(name, torch.tensor(images, dtype=torch.float32), torch.full((len(images),), v))
        expected = np.stack([_from_pil(_pil_op(name, _to_pil(image), v)) for image in images])
        assert ours.dtype == torch.float32
        np.testing.assert_array_equal(ours.numpy().astype(np.uint8), expected, err_msg=f"{name} v={v}")
        assert torch.equal(ours, ours.round())


def test_ops_take_per_sample_magnitudes(pil):
    images = _batch(3, 16, seed=1)
    for name in ("Rotate", "ShearX", "TranslateY", "Contrast", "Solarize"):
        magnitudes = _magnitudes(name)[: len(images)]
        ours = apply_op(name, torch.tensor(images, dtype=torch.float64), torch.tensor(magnitudes))
        expected = np.stack([_from_pil(_pil_op(name, _to_pil(im), v)) for im, v in zip(images, magnitudes)])
        np.testing.assert_array_equal(ours.numpy().astype(np.uint8), expected, err_msg=name)


def test_equalize_lut_overflow_is_clipped_as_pil(pil):
    # 1 pixel of 0, 255·2 + 1 pixels of 1, then the top value: step 2, remainder 1 -> lut(top) would be 256.
    values = np.array([0] + [1] * 511 + [9] * 64, dtype=np.uint8)
    image = np.random.default_rng(0).permutation(values).reshape(1, 1, 24, 24)
    ours = apply_op("Equalize", torch.tensor(image, dtype=torch.float32), torch.zeros(1))
    expected = _from_pil(ImageOps.equalize(_to_pil(image[0])))
    np.testing.assert_array_equal(ours[0].numpy().astype(np.uint8), expected)


def _official_cutout(img, v, u_x, u_y):
    """CutoutAbs with numpy's np.random.uniform(w) written as the value it returns for draw u."""
    v = v * img.size[0]
    w, h = img.size
    x0 = int(max(0, w + (1.0 - w) * u_x - v / 2.0))
    y0 = int(max(0, h + (1.0 - h) * u_y - v / 2.0))
    xy = (x0, y0, min(w, x0 + v), min(h, y0 + v))
    img = img.copy()
    ImageDraw.Draw(img).rectangle(xy, (125, 123, 114) if img.mode == "RGB" else 125)
    return img


def test_numpy_uniform_of_w_is_low_w_high_one():
    # the official centre: np.random.uniform(w) = uniform(low=w, high=1) = w + (1 - w)·U
    np.random.seed(5)
    drawn = np.random.uniform(32)
    np.random.seed(5)
    assert drawn == 32 + (1.0 - 32) * np.random.random()


@pytest.mark.parametrize("channels", [3, 1])
def test_cutout_equals_imagedraw_rectangle(channels, pil):
    images = _batch(channels, 32, seed=3)
    rng = np.random.default_rng(4)
    for size in (0.0, 0.01, 0.1, 0.25, 0.37, 0.5):
        u_x, u_y = rng.random(len(images)), rng.random(len(images))
        u_x[0], u_y[0] = 0.0, 0.999999  # a box against the right/bottom and one at the top-left
        ours = apply_cutout(torch.tensor(images, dtype=torch.float32), torch.full((len(images),), size),
                            torch.tensor(u_x), torch.tensor(u_y))
        expected = np.stack([_from_pil(_official_cutout(_to_pil(im), size, a, b)) if size > 0 else im
                             for im, a, b in zip(images, u_x, u_y)])
        np.testing.assert_array_equal(ours.numpy().astype(np.uint8), expected, err_msg=f"size {size}")


def test_randaugment_is_seeded_and_keeps_shape_dtype_grid():
    inputs = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = randaugment(inputs, generator=torch.Generator().manual_seed(1))
    again = randaugment(inputs, generator=torch.Generator().manual_seed(1))
    other = randaugment(inputs, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == inputs.shape and first.dtype == inputs.dtype and first.device == inputs.device
    assert torch.allclose(first * 255, (first * 255).round(), atol=1e-9)
    assert first.min() >= 0 and first.max() <= 1
    grey = randaugment(inputs[:, :1].float(), generator=torch.Generator().manual_seed(1))
    assert grey.shape == (16, 1, 32, 32) and grey.dtype == torch.float32


def test_randaugment_is_the_ops_then_cutout_of_its_draws(pil):
    inputs = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ops, u, cut = randaugment_params(48, generator=torch.Generator().manual_seed(9))
    ours = randaugment(inputs, generator=torch.Generator().manual_seed(9), cutout=0.5)
    assert len(set(ops.flatten().tolist())) == len(OPS)  # every op occurs
    for i in range(48):  # one sample at a time, through PIL
        img = _to_pil((inputs[i] * 255).round().byte().numpy())
        for position in range(2):
            name, low, high = AUGMENT_LIST[int(ops[i, position])]
            img = _pil_op(name, img, low + (high - low) * float(u[i, position]))
        v = float(cut[i, 0]) * 0.5
        img = _official_cutout(img, v, float(cut[i, 1]), float(cut[i, 2])) if v > 0 else img
        np.testing.assert_array_equal((ours[i] * 255).round().byte().numpy(), _from_pil(img))


def test_randaugment_refuses_other_channel_counts():
    with pytest.raises(KdlabError, match="1- or 3-channel") as info:
        randaugment(torch.rand(2, 2, 8, 8), generator=torch.Generator())
    assert "\n" not in str(info.value)


def test_every_op_is_drawn_about_equally():
    ops, u, cut = randaugment_params(2000, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(ops.flatten(), minlength=len(OPS)).double() / 2000
    assert ops.shape == (2000, 2) and len(frequency) == 14
    assert torch.all((frequency - 2 / 14).abs() < 0.03), frequency
    assert 0 <= u.min() and u.max() < 1 and cut.shape == (2000, 3)


def test_one_magnitude_serves_the_whole_batch():
    images = torch.tensor(_batch(3, 16, seed=2), dtype=torch.float32)
    for name in ("Rotate", "TranslateX", "Brightness"):
        assert torch.equal(apply_op(name, images, 0.2), apply_op(name, images, torch.full((len(images),), 0.2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_result_for_the_same_draws():
    inputs = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    params = randaugment_params(256, generator=torch.Generator().manual_seed(1))
    expected = apply_randaugment(inputs, *params)
    ours = apply_randaugment(inputs.cuda(), *(p.cuda() for p in params))
    assert torch.equal(ours.cpu(), expected)
    out = randaugment(inputs.cuda(), generator=torch.Generator("cuda").manual_seed(1))
    assert out.device.type == "cuda" and out.shape == inputs.shape
