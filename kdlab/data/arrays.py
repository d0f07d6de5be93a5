"""Arrays from the user's ``.npz`` / ``.npy`` files: inputs (N, ...) and integer labels (N,).

``train`` (and optional ``test``) name either one ``.npz`` holding the inputs and labels under
``x_key``/``y_key`` (default ``x``/``y``), or a pair ``[inputs.npy, labels.npy]``. Inputs may be of any
real dtype; they are made float32 in [0, 1] as the config says (``scale: 255`` divides; ``normalize:
per_channel`` min-max scales each channel over train). Shapes: (N, F) vectors, (N, H, W) grayscale
images (a channel axis is added), (N, C, H, W) images, or (N, H, W, C) with ``channels_last: true``.
Files are loaded with ``allow_pickle=False``: an object array is refused, never unpickled.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval, Le, MinLen

from kdlab.data.base import DatasetArrays
from kdlab.data.user_files import carve_test, scale_to_unit, user_file
from kdlab.errors import KdlabError
from kdlab.registry import register

FileName = Annotated[str, MinLen(1)]
Files = Union[FileName, tuple[FileName, FileName]]


def _load(path: Path, keys: tuple[str, ...] | None) -> dict[str, np.ndarray] | np.ndarray:
    """The arrays ``keys`` of an .npz (a dict), or the one array of an .npy (``keys`` None)."""
    problem = None
    try:
        with open(path, "rb") as handle:  # ours to close, also when numpy fails half-way
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                if keys is not None:
                    problem = (f"a single .npy holds one array; give it as an .npz with keys {keys[0]!r} and "
                               f"{keys[1]!r}, or as a pair [inputs.npy, labels.npy]")
                else:
                    return loaded
            elif keys is None:
                problem = "an .npz where a .npy was expected; give the pair as [inputs.npy, labels.npy]"
            else:
                missing = [k for k in keys if k not in loaded.files]
                if missing:
                    problem = (f"no array {missing[0]!r} (it holds {', '.join(loaded.files) or 'nothing'}); "
                               "name the keys with data.x_key / data.y_key")
                else:
                    return {k: loaded[k] for k in keys}
    except ValueError as error:
        if "pickle" in str(error):
            raise KdlabError(f"{path}: holds Python objects (pickled), not numbers; save plain numeric arrays "
                             "(np.save / np.savez)") from None
        raise KdlabError(f"{path}: not a readable .npy/.npz file ({error}); save it with np.save / np.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise KdlabError(f"{path}: not a readable .npy/.npz file ({error}); save it with np.save / np.savez") from None
    raise KdlabError(f"{path}: {problem}")


def read_pair(root: Path | None, files: str | tuple[str, str], *, key: str, x_key: str, y_key: str):
    """``(inputs, labels, source)`` as numpy arrays from one .npz or a pair of .npy files."""
    if isinstance(files, str):
        path = user_file(root, files, key=key)
        loaded = _load(path, (x_key, y_key))
        return loaded[x_key], loaded[y_key], str(path)
    paths = [user_file(root, name, key=key) for name in files]
    return _load(paths[0], None), _load(paths[1], None), f"{paths[0]} + {paths[1].name}"


def _inputs(x: np.ndarray, source: str, *, channels_last: bool) -> torch.Tensor:
    if x.dtype.kind not in "biuf":
        raise KdlabError(f"{source}: inputs are {x.dtype}, not numbers; save a numeric array (any int, uint, "
                         "float or bool dtype)")
    if x.ndim < 2:
        raise KdlabError(f"{source}: inputs have shape {x.shape}; they need a sample axis and at least one more, "
                         "(N, features) or (N, C, H, W)")
    if channels_last:
        if x.ndim < 3:
            raise KdlabError(f"{source}: channels_last needs inputs (N, ..., C), got shape {x.shape}; "
                             "set data.channels_last: false")
        x = np.moveaxis(x, -1, 1)
    elif x.ndim == 3:
        x = x[:, None]  # (N, H, W) grayscale images
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _labels(y: np.ndarray, count: int, source: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise KdlabError(f"{source}: labels have shape {y.shape}; they must be N class indices (N,) "
                         "(not one-hot: use y.argmax(1))")
    if y.shape[0] != count:
        raise KdlabError(f"{source}: {count} inputs but {y.shape[0]} labels; both must have one row per sample")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # whole numbers stored as floats
    if y.dtype.kind not in "iub":
        raise KdlabError(f"{source}: labels are {y.dtype} with non-integer values; labels are class indices 0..K-1")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise KdlabError(f"{source}: labels include {int(y.min())}; labels are class indices 0..K-1")
    return torch.from_numpy(y)


@register("dataset", "arrays")
def arrays(
    *,
    root: Path | None,
    cache_dir: Path,
    train: Files = "train.npz",
    test: Optional[Files] = None,
    x_key: Annotated[str, MinLen(1)] = "x",
    y_key: Annotated[str, MinLen(1)] = "y",
    scale: Optional[Annotated[float, Gt(0), Le(1e12)]] = None,
    normalize: Literal["none", "per_channel"] = "none",
    channels_last: bool = False,
    num_classes: Optional[Annotated[int, Ge(2), Le(1 << 24)]] = None,
    test_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.2,
) -> DatasetArrays:
    """Arrays: your inputs and labels from .npz (x/y keys) or a pair of .npy files, scaled to [0, 1] as you say.

    ``train``/``test``: an .npz path or [inputs.npy, labels.npy] (relative paths are under data.root;
    train defaults to root/train.npz);
    without ``test`` a stratified ``test_fraction`` of train is held out. ``scale: 255`` divides,
    ``normalize: per_channel`` min-max scales each channel (feature) over train. ``num_classes``
    defaults to the largest label + 1.
    """
    x, y, source = read_pair(root, train, key="train", x_key=x_key, y_key=y_key)
    x_train, y_train = _inputs(x, source, channels_last=channels_last), _labels(y, len(x), source)
    if test is not None:
        x, y, test_source = read_pair(root, test, key="test", x_key=x_key, y_key=y_key)
        x_test, y_test = _inputs(x, test_source, channels_last=channels_last), _labels(y, len(x), test_source)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise KdlabError(f"{test_source}: test inputs have shape {tuple(x_test.shape[1:])} per sample but train "
                             f"{tuple(x_train.shape[1:])}; save both with the same shape")
    else:
        test_source = source
        x_train, y_train, x_test, y_test = carve_test(x_train, y_train, test_fraction, source=source)
    if len(x_train) == 0:
        raise KdlabError(f"{source}: no samples; the train file holds 0 rows")
    top = max(int(y_train.max()), int(y_test.max()) if len(y_test) else 0)
    if num_classes is None:
        num_classes = max(top + 1, 2)
    elif top >= num_classes:
        where = source if int(y_train.max()) >= num_classes else test_source
        raise KdlabError(f"{where}: label {top} is out of range for data.num_classes: {num_classes}; "
                         f"labels must be 0..{num_classes - 1}, raise num_classes or fix the labels")
    dims = (0, *range(2, x_train.dim()))
    x_train, x_test = scale_to_unit(x_train, [x_test], scale=scale, normalize=normalize, source=source, dims=dims)
    return DatasetArrays(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=num_classes)
