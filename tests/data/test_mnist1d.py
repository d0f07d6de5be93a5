import numpy as np
import pytest
import torch
from mnist1d.data import get_dataset_args, make_dataset

import kdlab.data.mnist1d as module
from kdlab.data.mnist1d import mnist1d
from kdlab.errors import KdlabError


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    import mnist1d.data

    def refuse(*args, **kwargs):
        raise AssertionError("mnist1d must be generated, never downloaded")

    monkeypatch.setattr(mnist1d.data, "get_dataset", refuse)


def test_generated_matches_mnist1d_scaled_by_train_min_max(tmp_path):
    data = mnist1d(root=None, cache_dir=tmp_path, num_samples=600, seed=3)
    args = get_dataset_args()
    args.num_samples, args.seed = 600, 3
    raw = make_dataset(args)
    low, high = raw["x"].min(), raw["x"].max()
    assert data.x_train.shape == (480, 1, 40) and data.x_test.shape == (120, 1, 40)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10
    np.testing.assert_allclose(data.x_train[:, 0].numpy(), (raw["x"] - low) / (high - low), atol=1e-6)
    np.testing.assert_allclose(data.x_test[:, 0].numpy(), np.clip((raw["x_test"] - low) / (high - low), 0, 1), atol=1e-6)
    assert data.x_train.min() == 0 and data.x_train.max() == 1
    assert 0 <= data.x_test.min() and data.x_test.max() <= 1
    assert np.array_equal(data.y_train.numpy(), raw["y"]) and np.array_equal(data.y_test.numpy(), raw["y_test"])


def test_second_call_reads_the_cache(tmp_path, monkeypatch):
    first = mnist1d(root=None, cache_dir=tmp_path, num_samples=600)
    cached = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(cached) == 1
    assert not list((tmp_path / "mnist1d").glob("*.tmp"))

    def refuse(arguments):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(module, "generate", refuse)
    second = mnist1d(root=None, cache_dir=tmp_path, num_samples=600)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_other_arguments_get_their_own_cache_and_data(tmp_path):
    base = mnist1d(root=None, cache_dir=tmp_path, num_samples=600, seed=1)
    other_seed = mnist1d(root=None, cache_dir=tmp_path, num_samples=600, seed=2)
    shorter = mnist1d(root=None, cache_dir=tmp_path, num_samples=600, seed=1, final_seq_length=20)
    assert len(list((tmp_path / "mnist1d").glob("*.npz"))) == 3
    assert not torch.equal(base.x_train, other_seed.x_train)
    assert shorter.x_train.shape == (480, 1, 20)


def test_corrupt_cache_is_regenerated(tmp_path):
    first = mnist1d(root=None, cache_dir=tmp_path, num_samples=600)
    (path,) = (tmp_path / "mnist1d").glob("*.npz")
    path.write_bytes(b"not a zip file")
    second = mnist1d(root=None, cache_dir=tmp_path, num_samples=600)
    assert torch.equal(first.x_train, second.x_train)
    assert path.read_bytes()[:2] == b"PK"  # rewritten as a real .npz


def test_global_random_state_is_left_alone(tmp_path):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    mnist1d(root=None, cache_dir=tmp_path, num_samples=600)
    assert np.random.rand() == expected


@pytest.mark.parametrize("options, key", [({"num_samples": 10}, "data.num_samples"), ({"final_seq_length": 1}, "data.final_seq_length")])
def test_bad_options(tmp_path, options, key):
    with pytest.raises(KdlabError, match=key):
        mnist1d(root=None, cache_dir=tmp_path, **options)
