import pytest
import torch

from kdlab.data.synthetic import synthetic
from kdlab.errors import KdlabError


def _make(tmp_path, **options):
    return synthetic(root=None, cache_dir=tmp_path, **options)


@pytest.mark.parametrize("shape", [(1, 16), (3, 4, 5), (7,), (2, 1, 2, 3)])
def test_any_shape_types_and_range(tmp_path, shape):
    data = _make(tmp_path, input_shape=shape, num_train=30, num_test=12, num_classes=3)
    assert data.x_train.shape == (30, *shape) and data.x_test.shape == (12, *shape)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    assert data.num_classes == 3
    assert torch.bincount(data.y_train).tolist() == [10, 10, 10]
    assert torch.bincount(data.y_test).tolist() == [4, 4, 4]


def test_deterministic_by_seed(tmp_path):
    first, again, other = _make(tmp_path, seed=5), _make(tmp_path, seed=5), _make(tmp_path, seed=6)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.x_train, other.x_train)


def test_train_does_not_depend_on_num_test(tmp_path):
    assert torch.equal(_make(tmp_path, num_test=10).x_train, _make(tmp_path, num_test=99).x_train)


def _nearest_mean_accuracy(data):
    # Undo the sigmoid, fit class means on train, classify test by the closest mean.
    def features(x):
        return torch.logit(x.double().flatten(1), eps=1e-12)

    train, test = features(data.x_train), features(data.x_test)
    means = torch.stack([train[data.y_train == label].mean(0) for label in range(data.num_classes)])
    predicted = torch.cdist(test, means).argmin(1)
    return (predicted == data.y_test).double().mean().item()


def test_separation_controls_difficulty(tmp_path):
    easy = _make(tmp_path, separation=6.0, num_train=400, num_test=400)
    hard = _make(tmp_path, separation=0.0, num_train=400, num_test=400)
    assert _nearest_mean_accuracy(easy) > 0.97
    assert _nearest_mean_accuracy(hard) < 0.4  # chance is 0.25


@pytest.mark.parametrize(
    "options, key",
    [
        ({"num_classes": 1}, "data.num_classes"),
        ({"input_shape": ()}, "data.input_shape"),
        ({"input_shape": (3, 0)}, "data.input_shape"),
        ({"num_train": 0}, "data.num_train"),
        ({"separation": -1.0}, "data.separation"),
    ],
)
def test_bad_options(tmp_path, options, key):
    with pytest.raises(KdlabError, match=key):
        _make(tmp_path, **options)
