"""arrays: .npz and .npy files written by the test with numpy, any dtype, scaled as the options say."""
import numpy as np
import pytest
import torch

from kdlab.data.arrays import arrays
from kdlab.errors import KdlabError


def _images(n, seed=0, dtype=np.uint8, shape=(3, 4, 4)):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype(dtype)


def test_npz_with_scale_255(tmp_path):
    x, y = _images(10), np.arange(10) % 3
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=_images(4, 1), y=np.array([0, 1, 2, 2]))
    data = arrays(root=tmp_path, cache_dir=tmp_path, train="train.npz", test="test.npz", scale=255)
    assert data.x_train.dtype == torch.float32 and data.x_train.shape == (10, 3, 4, 4)
    assert torch.equal(data.x_train, torch.from_numpy(x).float() / 255)
    assert data.y_train.tolist() == y.tolist() and data.num_classes == 3 and data.y_test.tolist() == [0, 1, 2, 2]


def test_npy_pair_absolute_paths_named_keys_and_carved_test(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(20, 5)))  # float64 features
    np.save(tmp_path / "y.npy", (np.arange(20) % 2).astype(np.float32))  # whole-number float labels
    data = arrays(root=None, cache_dir=tmp_path, train=[str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                  normalize="per_channel", test_fraction=0.25)
    assert data.x_train.shape == (15, 5) and data.x_test.shape == (5, 5)
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    assert torch.equal(data.x_train.amin(0), torch.zeros(5)) and torch.equal(data.x_train.amax(0), torch.ones(5))
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 2), np.float16), targets=np.array([0, 1, 0, 1], np.uint8))
    data = arrays(root=tmp_path, cache_dir=tmp_path, train="d.npz", x_key="inputs", y_key="targets", test_fraction=0.5)
    assert data.x_train.dtype == torch.float32 and data.num_classes == 2


def test_channels_last_grayscale_and_bool(tmp_path):
    np.savez(tmp_path / "hwc.npz", x=_images(4, shape=(5, 6, 3)), y=np.array([0, 1, 0, 1]))
    data = arrays(root=tmp_path, cache_dir=tmp_path, train="hwc.npz", scale=255, channels_last=True, test_fraction=0.5)
    assert data.x_train.shape == (2, 3, 5, 6)
    np.savez(tmp_path / "gray.npz", x=np.ones((4, 7, 7), bool), y=np.array([0, 1, 0, 1]))
    data = arrays(root=tmp_path, cache_dir=tmp_path, train="gray.npz", test_fraction=0.5, num_classes=5)
    assert data.x_train.shape == (2, 1, 7, 7) and float(data.x_train.max()) == 1.0 and data.num_classes == 5


@pytest.mark.parametrize("x, y, options, message", [
    (np.zeros((4, 3)), np.zeros(5, int), {}, r"train.npz: 4 inputs but 5 labels"),
    (np.zeros((4, 3)), np.array([0, 1, 2, 7]), {"num_classes": 3}, r"label 7 is out of range for data.num_classes: 3"),
    (np.zeros((4, 3)), np.array([0, -1, 1, 0]), {}, r"labels include -1; labels are class indices"),
    (np.zeros((4, 3)), np.eye(4)[:, :2], {}, r"labels have shape \(4, 2\).*not one-hot"),
    (np.zeros((4, 3)), np.array([0, 0.5, 1, 1]), {}, r"labels are float64 with non-integer values"),
    (np.zeros(4), np.array([0, 1, 0, 1]), {}, r"inputs have shape \(4,\); they need a sample axis"),
    (np.array(["a", "b", "c", "d"])[:, None], np.array([0, 1, 0, 1]), {}, "inputs are <U1, not numbers"),
    (np.full((4, 3), 200, np.uint8), np.array([0, 1, 0, 1]), {}, r"values span \[200, 200\], not \[0, 1\]; set scale: 255"),
    (np.zeros((4, 3, 2)), np.array([0, 1, 0, 1]), {"channels_last": True, "x_key": "nope"}, r"no array 'nope' \(it holds x, y\)"),
])
def test_bad_arrays_are_one_line_naming_the_file(tmp_path, x, y, options, message):
    np.savez(tmp_path / "train.npz", x=x, y=y)
    with pytest.raises(KdlabError, match=message) as error:
        arrays(root=tmp_path, cache_dir=tmp_path, train="train.npz", **options)
    assert "train.npz" in str(error.value) and "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(KdlabError, match=r"missing.npz: file not found \(data.train\)"):
        arrays(root=tmp_path, cache_dir=tmp_path, train="missing.npz")
    with pytest.raises(KdlabError, match="data.train: 'x.npz' is a relative path but data.root is not set"):
        arrays(root=None, cache_dir=tmp_path, train="x.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(KdlabError, match="broken.npz: not a readable .npy/.npz file"):
        arrays(root=tmp_path, cache_dir=tmp_path, train="broken.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    with pytest.raises(KdlabError, match="objects.npy: holds Python objects"):
        arrays(root=tmp_path, cache_dir=tmp_path, train=["objects.npy", "y.npy"])
    with pytest.raises(KdlabError, match="y.npy: a single .npy holds one array"):
        arrays(root=tmp_path, cache_dir=tmp_path, train="y.npy")
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 3)), y=np.array([0, 1, 0, 1]))
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(KdlabError, match=r"b.npz: test inputs have shape \(2,\) per sample but train \(3,\)"):
        arrays(root=tmp_path, cache_dir=tmp_path, train="a.npz", test="b.npz")


def test_a_pair_with_mismatched_lengths_names_both_files(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    with pytest.raises(KdlabError, match=r"/x.npy \+ y.npy: 3 inputs but 2 labels"):
        arrays(root=tmp_path, cache_dir=tmp_path, train=["x.npy", "y.npy"])
