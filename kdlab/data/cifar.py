"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

The archives unpack to ``cifar-10-batches-py/`` (data_batch_1..5, test_batch)
and ``cifar-100-python/`` (train, test). Each file is a pickled dict with bytes
keys: ``b"data"`` a uint8 array (N, 3072) holding the red, green then blue
32 x 32 planes of each image row-major, and the labels as a list of ints
(``b"labels"``; CIFAR-100 has ``b"fine_labels"`` and ``b"coarse_labels"``).
"""
import pickle
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from kdlab.config.validate import NotInRunId
from kdlab.data import download as downloads
from kdlab.data.base import DatasetArrays
from kdlab.data.files import find_folder, require_root
from kdlab.errors import KdlabError
from kdlab.registry import register

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR100_FOLDER = "cifar-100-python"
_PIXELS = 3 * 32 * 32
_LABEL_MODES = {"fine": (b"fine_labels", 100), "coarse": (b"coarse_labels", 20)}


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle refers to: how numpy rebuilds an array."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    import _codecs

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode}
    # The official files (numpy 1, Python 2) name numpy.core; numpy 2 writes numpy._core.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers only.

    Unpickling can run arbitrary code; a file under data.root is not trusted
    that far, and a genuine CIFAR batch needs nothing else.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_batch(path: Path, *, label_key: bytes, num_classes: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (uint8 (N, 3, 32, 32), int64 (N,)); KdlabError naming the file if malformed."""
    fix = f"re-download and extract {source}"
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise KdlabError(f"{path}: file not found; the folder is incomplete, {fix}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise KdlabError(f"{path}: not a readable CIFAR batch ({error}); {fix}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise KdlabError(f"{path}: expected a dict with keys b'data' and {label_key!r}; {fix}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise KdlabError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, {_PIXELS}); {fix}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise KdlabError(f"{path}: {label_key!r} should hold {data.shape[0]} integer labels, got {labels.dtype} {labels.shape}; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise KdlabError(f"{path}: {label_key!r} has labels outside 0..{num_classes - 1}; {fix}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _locate(root: Path | None, *, dataset: str, folder: str, first_file: str, source: str, download: bool) -> Path:
    """The folder holding the batch files: ``root/folder`` or ``root`` itself (downloaded there if asked)."""
    if download and (root is None or find_folder([Path(root) / folder, Path(root)], (first_file,)) is None):
        downloads.fetch(dataset, root)
    root = require_root(root, dataset=dataset, expected=f"{folder}/", source=source)
    found = find_folder([root / folder, root], (first_file,))
    if found is None:
        parent = root.parent if root.name == folder else root
        expected = parent / folder / first_file
        raise KdlabError(f"data.root: {expected} not found; extract {source} into {parent} so that {expected} exists")
    return found


def _load(folder: Path, train: list[str], test: list[str], *, label_key: bytes, num_classes: int,
          source: str) -> DatasetArrays:
    def read(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_batch(folder / name, label_key=label_key, num_classes=num_classes, source=source) for name in names]
        images = np.concatenate([images for images, _ in parts])
        labels = np.concatenate([labels for _, labels in parts])
        return torch.from_numpy(images).to(torch.float32).div_(255.0), torch.from_numpy(labels)

    x_train, y_train = read(train)
    x_test, y_test = read(test)
    return DatasetArrays(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=num_classes)


@register("dataset", "cifar10")
def cifar10(*, root: Path | None, cache_dir: Path, download: Annotated[bool, NotInRunId()] = False) -> DatasetArrays:
    """CIFAR-10: 32x32 colour images, 10 classes, 50000/10000 (files under data.root).

    Reads ``<root>/cifar-10-batches-py/`` (or ``root`` pointing at that folder).
    Inputs (3, 32, 32) = uint8 / 255; train is data_batch_1..5 in order.
    ``download: true`` fetches and checks the archive into root if it is not there (kdlab.data.download).
    """
    folder = _locate(root, dataset="cifar10", folder=_CIFAR10_FOLDER, first_file="data_batch_1", source=CIFAR10_URL,
                     download=download)
    train = [f"data_batch_{index}" for index in range(1, 6)]
    return _load(folder, train, ["test_batch"], label_key=b"labels", num_classes=10, source=CIFAR10_URL)


@register("dataset", "cifar100")
def cifar100(*, root: Path | None, cache_dir: Path, label_mode: str = "fine",
             download: Annotated[bool, NotInRunId()] = False) -> DatasetArrays:
    """CIFAR-100: 32x32 colour images, 100 fine or 20 coarse classes, 50000/10000 (files under data.root).

    Reads ``<root>/cifar-100-python/`` (or ``root`` pointing at that folder).
    Inputs (3, 32, 32) = uint8 / 255; label_mode "fine" (100 classes) or
    "coarse" (the 20 superclasses). ``download: true`` fetches and checks the
    archive into root if it is not there (kdlab.data.download).
    """
    if label_mode not in _LABEL_MODES:
        raise KdlabError(f"data.label_mode: {label_mode!r} is not allowed; choose one of {', '.join(map(repr, _LABEL_MODES))}")
    label_key, num_classes = _LABEL_MODES[label_mode]
    folder = _locate(root, dataset="cifar100", folder=_CIFAR100_FOLDER, first_file="train", source=CIFAR100_URL,
                     download=download)
    return _load(folder, ["train"], ["test"], label_key=label_key, num_classes=num_classes, source=CIFAR100_URL)
