import gzip
import re
import struct

import numpy as np
import pytest
import torch

from kdlab.data.idx import fashion_mnist, mnist, parse_idx, read_idx
from kdlab.errors import KdlabError


def _idx(array, type_code=0x08):
    """An IDX file's bytes, written from the format description (not from kdlab's parser)."""
    formats = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=formats[type_code]).tobytes()


def _contents(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([9, 2, 6], dtype=np.uint8),
    }


def _write(folder, contents, *, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in contents.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
        else:
            (folder / name).write_bytes(_idx(array))


def _check(data, contents):
    assert data.x_train.shape == (5, 1, 28, 28) and data.x_test.shape == (3, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10
    assert data.y_train.tolist() == [3, 1, 4, 1, 5] and data.y_test.tolist() == [9, 2, 6]
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    train, test = contents["train-images-idx3-ubyte"], contents["t10k-images-idx3-ubyte"]
    for i, h, w in [(0, 0, 0), (1, 27, 0), (4, 13, 27), (2, 5, 9)]:
        assert data.x_train[i, 0, h, w] == torch.tensor(float(train[i, h, w])) / 255
    assert data.x_test[2, 0, 27, 27] == torch.tensor(float(test[2, 27, 27])) / 255


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_plain_and_gzipped(tmp_path, gz):
    contents = _contents()
    _write(tmp_path, contents, gz=gz)
    _check(mnist(root=tmp_path, cache_dir=tmp_path), contents)


def test_torchvision_layouts(tmp_path):
    contents = _contents(1)
    _write(tmp_path / "MNIST" / "raw", contents, gz=True)
    _write(tmp_path / "FashionMNIST" / "raw", contents)
    _check(mnist(root=tmp_path, cache_dir=tmp_path), contents)
    _check(fashion_mnist(root=tmp_path, cache_dir=tmp_path), contents)


def test_parse_other_types_big_endian():
    values = np.array([[-2, 300], [7, -32768]], dtype=np.int16)
    parsed = parse_idx(_idx(values, 0x0B), name="x")
    assert parsed.dtype == np.int16 and parsed.dtype.isnative and np.array_equal(parsed, values)
    floats = np.array([0.5, -1.25, 3e9])
    assert np.array_equal(parse_idx(_idx(floats, 0x0E), name="x"), floats)
    assert np.array_equal(parse_idx(_idx(floats.astype(np.float32), 0x0D), name="x"), floats.astype(np.float32))
    # header bytes by hand: 0000 08 01, one dimension of 3, then the values
    assert parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x08\x09", name="x").tolist() == [7, 8, 9]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x01\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
        (b"\x00\x00", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x04\x01\x02", "truncated: header says shape"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "has trailing bytes"),
    ],
)
def test_bad_headers_name_the_file(tmp_path, content, message):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(KdlabError, match=re.escape(f"{path}: {message}")):
        read_idx(path)


def test_corrupt_files_in_a_dataset(tmp_path):
    contents = _contents()
    _write(tmp_path, contents)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(_idx(contents["train-images-idx3-ubyte"])[:-10])
    with pytest.raises(KdlabError, match=re.escape(f"{images}: truncated")):
        mnist(root=tmp_path, cache_dir=tmp_path)
    images.unlink()
    gzipped = tmp_path / "train-images-idx3-ubyte.gz"
    gzipped.write_bytes(gzip.compress(_idx(contents["train-images-idx3-ubyte"]))[:-20])
    with pytest.raises(KdlabError, match=re.escape(f"{gzipped}: corrupt gzip file")):
        mnist(root=tmp_path, cache_dir=tmp_path)
    gzipped.write_bytes(gzip.compress(_idx(contents["train-images-idx3-ubyte"])))
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.array([1, 2], dtype=np.uint8)))
    with pytest.raises(KdlabError, match=re.escape(f"{labels}: expected 3 uint8 labels")):
        mnist(root=tmp_path, cache_dir=tmp_path)
    labels.write_bytes(_idx(np.array([1, 2, 10], dtype=np.uint8)))
    with pytest.raises(KdlabError, match="labels must be 0..9, found 10"):
        mnist(root=tmp_path, cache_dir=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((3, 32, 32), dtype=np.uint8)))
    with pytest.raises(KdlabError, match=r"expected uint8 images of shape \(N, 28, 28\)"):
        mnist(root=tmp_path, cache_dir=tmp_path)


def test_missing_root_folder_and_files(tmp_path):
    with pytest.raises(KdlabError, match="data.root: dataset 'mnist' .*not set.*ossci-datasets"):
        mnist(root=None, cache_dir=tmp_path)
    with pytest.raises(KdlabError, match="zalandoresearch/fashion-mnist"):
        fashion_mnist(root=tmp_path / "absent", cache_dir=tmp_path)
    expected = tmp_path / "train-images-idx3-ubyte"
    with pytest.raises(KdlabError, match=re.escape(f"{expected} not found (nor .gz, nor under {tmp_path / 'FashionMNIST' / 'raw'})")):
        fashion_mnist(root=tmp_path, cache_dir=tmp_path)
    contents = _contents()
    del contents["t10k-labels-idx1-ubyte"]
    _write(tmp_path, contents)
    with pytest.raises(KdlabError, match=re.escape(f"{tmp_path / 't10k-labels-idx1-ubyte'}: file not found")):
        mnist(root=tmp_path, cache_dir=tmp_path)
