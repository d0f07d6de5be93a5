"""MNIST and Fashion-MNIST from their IDX files (plain or gzipped).

IDX format (LeCun): two zero bytes, a type code byte (0x08 unsigned byte,
0x09 signed byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), a byte
giving the number of dimensions, then each dimension as a big-endian uint32,
then the values big-endian in row-major order.
"""
import gzip
import math
import struct
import zlib
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

MNIST_SOURCE = "a MNIST mirror such as https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_SOURCE = "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(content: bytes, *, name: str) -> np.ndarray:
    """Decode the bytes of one IDX file into an array of its shape (native byte order).

    name: the file, for error messages. Raises KdlabError on a bad magic
    number, an unknown type code, or a payload shorter or longer than the
    header's dimensions say.
    """
    if len(content) < 4 or content[:2] != b"\x00\x00":
        raise KdlabError(f"{name}: not an IDX file (starts with {content[:4].hex() or 'nothing'}, expected 0000 + type + rank); re-download it")
    type_code, rank = content[2], content[3]
    if type_code not in _IDX_TYPES:
        raise KdlabError(f"{name}: unknown IDX type code 0x{type_code:02x}; the file is corrupt, re-download it")
    header_size = 4 + 4 * rank
    if len(content) < header_size:
        raise KdlabError(f"{name}: truncated IDX header ({len(content)} bytes, need {header_size}); re-download it")
    shape = struct.unpack(f">{rank}I", content[4:header_size])
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = math.prod(shape) * dtype.itemsize
    payload = len(content) - header_size
    if payload != expected:
        problem = "truncated" if payload < expected else "has trailing bytes"
        raise KdlabError(f"{name}: {problem}: header says shape {shape} ({expected} bytes) but {payload} bytes follow; re-download it")
    values = np.frombuffer(content, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gunzipping it first if it is gzip-compressed (detected by content, not name)."""
    content = path.read_bytes()
    if content[:2] == _GZIP_MAGIC:
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error) as error:
            raise KdlabError(f"{path}: corrupt gzip file ({error}); re-download it") from None
    return parse_idx(content, name=str(path))


def _find_file(folder: Path, name: str, *, source: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise KdlabError(f"{folder / name}: file not found (nor {name}.gz); put the four IDX files in {folder} (download from {source})")


def _read_pair(folder: Path, images_name: str, labels_name: str, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels int64 (N,) from one images/labels file pair."""
    images_path = _find_file(folder, images_name, source=source)
    labels_path = _find_file(folder, labels_name, source=source)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise KdlabError(f"{images_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}; re-download it")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise KdlabError(
            f"{labels_path}: expected {images.shape[0]} uint8 labels to match {images_path.name}, got {labels.dtype} {labels.shape}; re-download it"
        )
    if labels.size and labels.max() > 9:
        raise KdlabError(f"{labels_path}: labels must be 0..9, found {int(labels.max())}; re-download it")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load(root: Path | None, *, dataset: str, subfolder: Path, source: str, download: bool) -> DatasetArrays:
    marker = IDX_FILES[0]
    if download and (root is None or find_folder([Path(root), Path(root) / subfolder], (marker, f"{marker}.gz")) is None):
        downloads.fetch(dataset, root)
    root = require_root(root, dataset=dataset, expected="the four IDX files", source=source)
    folder = find_folder([root, root / subfolder], (marker, f"{marker}.gz"))
    if folder is None:
        raise KdlabError(
            f"data.root: {root / marker} not found (nor .gz, nor under {root / subfolder}); "
            f"put {', '.join(IDX_FILES)} (optionally .gz) there (download from {source})"
        )
    x_train, y_train = _read_pair(folder, IDX_FILES[0], IDX_FILES[1], source=source)
    x_test, y_test = _read_pair(folder, IDX_FILES[2], IDX_FILES[3], source=source)
    return DatasetArrays(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=10)


@register("dataset", "mnist")
def mnist(*, root: Path | None, cache_dir: Path, download: Annotated[bool, NotInRunId()] = False) -> DatasetArrays:
    """MNIST: 28x28 handwritten digits, 10 classes, 60000/10000 (IDX files under data.root).

    Reads the four IDX files (plain or .gz) from ``root`` or ``root/MNIST/raw``
    (torchvision's layout). Inputs (1, 28, 28) = uint8 / 255. ``download: true``
    fetches and checks the four .gz files into ``root/MNIST/raw`` if they are not there.
    """
    return _load(root, dataset="mnist", subfolder=Path("MNIST", "raw"), source=MNIST_SOURCE, download=download)


@register("dataset", "fashion_mnist")
def fashion_mnist(*, root: Path | None, cache_dir: Path, download: Annotated[bool, NotInRunId()] = False) -> DatasetArrays:
    """Fashion-MNIST: 28x28 clothing images, 10 classes, 60000/10000 (IDX files under data.root).

    Reads the four IDX files (plain or .gz) from ``root`` or
    ``root/FashionMNIST/raw`` (torchvision's layout). Inputs (1, 28, 28) = uint8 / 255.
    ``download: true`` fetches and checks the four .gz files into ``root/FashionMNIST/raw``.
    """
    return _load(root, dataset="fashion_mnist", subfolder=Path("FashionMNIST", "raw"), source=FASHION_MNIST_SOURCE,
                 download=download)
