from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from kdlab.data.digits import digits
from kdlab.errors import KdlabError


@pytest.fixture(scope="module")
def reference():
    bunch = load_digits()
    return bunch.data, bunch.target


def _pairs(inputs, labels):
    return Counter((row.tobytes(), int(label)) for row, label in zip(inputs.reshape(len(labels), -1), labels))


def test_shapes_values_and_contents(tmp_path, reference):
    data = digits(root=None, cache_dir=tmp_path)
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_test.shape == (359, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_test.dtype == torch.int64
    assert data.num_classes == 10
    assert data.x_train.min() == 0 and data.x_train.max() == 1
    # Together, train and test are exactly sklearn's images / 16 with their labels.
    inputs, labels = reference
    expected = _pairs((inputs / 16).astype(np.float32), labels)
    combined = torch.cat([data.x_train, data.x_test]).numpy()
    assert _pairs(combined, torch.cat([data.y_train, data.y_test]).numpy()) == expected


def test_test_split_is_stratified_and_fixed(tmp_path, reference):
    first, again = digits(root=None, cache_dir=tmp_path), digits(root=None, cache_dir=tmp_path)
    assert torch.equal(first.x_test, again.x_test) and torch.equal(first.y_test, again.y_test)
    class_counts = np.bincount(reference[1])
    test_counts = torch.bincount(first.y_test).numpy()
    assert np.all(np.abs(test_counts - class_counts * 0.2) < 1)


def test_test_fraction_option(tmp_path):
    data = digits(root=None, cache_dir=tmp_path, test_fraction=0.5)
    assert len(data.x_test) == round(1797 * 0.5) and len(data.x_train) + len(data.x_test) == 1797


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2])
def test_bad_test_fraction(tmp_path, bad):
    with pytest.raises(KdlabError, match="data.test_fraction"):
        digits(root=None, cache_dir=tmp_path, test_fraction=bad)
