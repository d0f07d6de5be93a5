import io
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch

from kdlab.data.cifar import cifar10, cifar100
from kdlab.errors import KdlabError


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's cPickle wrote its str: (SHORT_)BINSTRING opcodes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_string
    dispatch[str] = save_string


def _dump(path, batch, *, official_style=True):
    """Pickle like the official files (Python 2, protocol 2, numpy.core.multiarray), else as numpy 2 does today."""
    if official_style:
        buffer = io.BytesIO()
        _Python2Pickler(buffer, protocol=2).dump(batch)
        content = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    else:
        content = pickle.dumps(batch, protocol=4)
    path.write_bytes(content)


def _images(count, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(count, 3072), dtype=np.uint8)


def _write_cifar10(parent, *, official_style=True):
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data, train_labels = [], []
    for index in range(1, 6):
        data, labels = _images(3, index), [(index + k) % 10 for k in range(3)]
        train_data.append(data)
        train_labels += labels
        batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data, b"filenames": [b"a.png"] * 3}
        _dump(folder / f"data_batch_{index}", batch, official_style=official_style)
    test = _images(4, 99)
    _dump(folder / "test_batch", {b"labels": [9, 0, 1, 2], b"data": test}, official_style=official_style)
    return folder, np.concatenate(train_data), train_labels, test


@pytest.mark.parametrize("official_style", [True, False])
def test_cifar10_contents(tmp_path, official_style):
    folder, train, train_labels, test = _write_cifar10(tmp_path, official_style=official_style)
    data = cifar10(root=tmp_path, cache_dir=tmp_path)
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10
    assert data.y_train.tolist() == train_labels and data.y_test.tolist() == [9, 0, 1, 2]
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    # A row is the red, green, blue planes, each 32 rows of 32 pixels.
    rng = np.random.default_rng(0)
    for _ in range(200):
        i, c, h, w = rng.integers(15), rng.integers(3), rng.integers(32), rng.integers(32)
        assert data.x_train[i, c, h, w] == torch.tensor(float(train[i, c * 1024 + h * 32 + w])) / 255
    assert data.x_test[3, 2, 31, 31] == torch.tensor(float(test[3, 3071])) / 255


def test_root_may_be_the_folder_itself(tmp_path):
    folder, *_ = _write_cifar10(tmp_path)
    from_parent = cifar10(root=tmp_path, cache_dir=tmp_path)
    from_folder = cifar10(root=folder, cache_dir=tmp_path)
    assert torch.equal(from_parent.x_train, from_folder.x_train)


def _write_cifar100(parent):
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", 6), ("test", 2)):
        batch = {b"data": _images(count, count), b"fine_labels": [99 - k for k in range(count)],
                 b"coarse_labels": [19 - k for k in range(count)], b"filenames": [b"x"] * count}
        _dump(folder / name, batch)
    return folder


def test_cifar100_fine_and_coarse(tmp_path):
    _write_cifar100(tmp_path)
    fine = cifar100(root=tmp_path, cache_dir=tmp_path)
    coarse = cifar100(root=tmp_path, cache_dir=tmp_path, label_mode="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.y_train.tolist() == [99, 98, 97, 96, 95, 94] and coarse.y_test.tolist() == [19, 18]
    assert fine.x_train.shape == (6, 3, 32, 32)
    assert fine.x_test[1, 0, 0, 1] == torch.tensor(float(_images(2, 2)[1, 1])) / 255
    with pytest.raises(KdlabError, match="data.label_mode: 'medium'"):
        cifar100(root=tmp_path, cache_dir=tmp_path, label_mode="medium")


def test_missing_root_folder_and_files(tmp_path):
    with pytest.raises(KdlabError, match="data.root: dataset 'cifar10' .* data.root is not set.*cifar-10-python.tar.gz"):
        cifar10(root=None, cache_dir=tmp_path)
    with pytest.raises(KdlabError, match=re.escape(f"folder {tmp_path / 'nowhere'} does not exist")):
        cifar10(root=tmp_path / "nowhere", cache_dir=tmp_path)
    expected = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(KdlabError, match=re.escape(f"{expected} not found; extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")):
        cifar10(root=tmp_path, cache_dir=tmp_path)
    with pytest.raises(KdlabError, match=re.escape(str(tmp_path / "cifar-100-python" / "train"))):
        cifar100(root=tmp_path, cache_dir=tmp_path)
    empty = tmp_path / "cifar-10-batches-py"
    empty.mkdir()
    with pytest.raises(KdlabError, match=re.escape(f"{empty / 'data_batch_1'} not found; extract")):
        cifar10(root=empty, cache_dir=tmp_path)
    empty.rmdir()
    folder, *_ = _write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(KdlabError, match=re.escape(f"{folder / 'data_batch_3'}: file not found")):
        cifar10(root=tmp_path, cache_dir=tmp_path)


def test_malformed_batches(tmp_path):
    folder, *_ = _write_cifar10(tmp_path)
    path = folder / "test_batch"
    _dump(path, {b"data": _images(2, 0), b"labels": [1, 10]})
    with pytest.raises(KdlabError, match=re.escape(f"{path}: b'labels' has labels outside 0..9")):
        cifar10(root=tmp_path, cache_dir=tmp_path)
    _dump(path, {b"data": _images(2, 0)[:, :100], b"labels": [1, 2]})
    with pytest.raises(KdlabError, match=r"expected uint8 \(N, 3072\)"):
        cifar10(root=tmp_path, cache_dir=tmp_path)
    _dump(path, {b"pixels": _images(2, 0), b"labels": [1, 2]})
    with pytest.raises(KdlabError, match="expected a dict with keys b'data'"):
        cifar10(root=tmp_path, cache_dir=tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(KdlabError, match=re.escape(f"{path}: not a readable CIFAR batch")):
        cifar10(root=tmp_path, cache_dir=tmp_path)


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_pickles_that_run_code_are_refused(tmp_path):
    folder, *_ = _write_cifar10(tmp_path)
    target = tmp_path / "created_by_pickle"
    _dump(folder / "test_batch", {b"data": _Payload(str(target)), b"labels": []}, official_style=False)
    with pytest.raises(KdlabError, match="refusing to load posix.makedirs|refusing to load os.makedirs"):
        cifar10(root=tmp_path, cache_dir=tmp_path)
    assert not target.exists()
