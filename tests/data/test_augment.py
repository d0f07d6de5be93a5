import numpy as np
import pytest
import torch

from kdlab.data.augment import augment_batch
from kdlab.errors import KdlabError


def _images(count=64, channels=3, height=10, width=12, seed=0):
    # Distinct positive values: a crop is recognisable and padding (0) stands out.
    return torch.rand(count, channels, height, width, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.1


def _explain(original: np.ndarray, augmented: np.ndarray, padding: int):
    """Brute force: the (top, left, flipped) whose zero-padded crop gives ``augmented``, or None."""
    _, height, width = original.shape
    padded = np.pad(original, ((0, 0), (padding, padding), (padding, padding)))
    for flipped in (False, True):
        source = padded[:, :, ::-1] if flipped else padded
        for top in range(2 * padding + 1):
            for left in range(2 * padding + 1):
                if np.array_equal(source[:, top:top + height, left:left + width], augmented):
                    return top, left, flipped
    return None


def test_none_returns_the_inputs():
    inputs = _images()
    assert augment_batch(inputs, kind="none", generator=torch.Generator()) is inputs


def test_crop_flip_is_a_padded_crop_with_optional_flip_and_both_vary():
    inputs = _images()
    output = augment_batch(inputs, kind="crop_flip", generator=torch.Generator().manual_seed(3))
    assert output.shape == inputs.shape and output.dtype == inputs.dtype
    explanations = [_explain(x.numpy(), y.numpy(), 4) for x, y in zip(inputs, output)]
    assert all(item is not None for item in explanations)
    flips = [flipped for _, _, flipped in explanations]
    offsets = {(top, left) for top, left, _ in explanations}
    assert 10 < sum(flips) < 54  # about half flipped
    assert len(offsets) > 20  # of 81 possible offsets, per sample
    assert any(top != 4 or left != 4 for top, left, _ in explanations)
    assert (output == 0).any()  # zero padding shows where the window left the image


def test_deterministic_by_generator_and_independent_of_global_seed():
    inputs = _images(count=16)
    torch.manual_seed(1)
    first = augment_batch(inputs, kind="crop_flip", generator=torch.Generator().manual_seed(11))
    torch.manual_seed(2)
    again = augment_batch(inputs, kind="crop_flip", generator=torch.Generator().manual_seed(11))
    other = augment_batch(inputs, kind="crop_flip", generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_padding_option_and_single_channel():
    inputs = _images(count=8, channels=1, height=8, width=8)
    output = augment_batch(inputs, kind="crop_flip", generator=torch.Generator().manual_seed(0), padding=1)
    assert all(_explain(x.numpy(), y.numpy(), 1) is not None for x, y in zip(inputs, output))


def test_one_dimensional_inputs_are_refused():
    with pytest.raises(KdlabError, match="crop_flip.*data.augment: none"):
        augment_batch(torch.rand(4, 1, 40), kind="crop_flip", generator=torch.Generator())


def test_unknown_kind_is_refused():
    with pytest.raises(KdlabError, match="data.augment.*'cutout'.*crop_flip"):
        augment_batch(_images(count=2), kind="cutout", generator=torch.Generator())
