"""MNIST-1D (Greydanus 2020), generated offline and cached on disk.

The ``mnist1d`` package generates the dataset from ten 1-D digit templates
with its own seed; its ``get_dataset``/download helpers are never called (they
fetch a pickle from GitHub). Generation takes under a second for 5000 samples
but is cached anyway, so every run of a study reads the same bytes.
"""
import errno
import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from kdlab.config.validate import Samples
from kdlab.data.base import DatasetArrays
from kdlab.errors import KdlabError, WorkspaceError
from kdlab.registry import register

# Bump when the cached content changes meaning, so stale caches are not read.
_CACHE_FORMAT = 1
_NUM_CLASSES = 10
_MIN_SAMPLES = 20  # 2 per class, so the 20% test split is not empty


def generation_arguments(*, num_samples: int, seed: int, final_seq_length: int) -> dict:
    """mnist1d's default generation arguments with ours applied, without its download url."""
    from mnist1d.data import get_dataset_args

    arguments = get_dataset_args(as_dict=True)
    arguments.pop("url", None)
    arguments.update(num_samples=num_samples, seed=seed, final_seq_length=final_seq_length)
    return arguments


def generate(arguments: dict) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset``; returns raw float64 x/x_test (N, L) and int64 y/y_test.

    make_dataset reseeds Python's and numpy's global generators; their states
    are restored afterwards so kdlab does not disturb the caller's randomness.
    """
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(arguments)))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def cache_path(cache_dir: Path, arguments: dict) -> Path:
    """Where the arrays for ``arguments`` are cached: ``cache_dir/mnist1d/<hash of arguments>.npz``."""
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        version = "unknown"
    key = json.dumps({"format": _CACHE_FORMAT, "mnist1d": version, "arguments": arguments}, sort_keys=True)
    return Path(cache_dir) / "mnist1d" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (then they are regenerated)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: stored[key] for key in ("x", "y", "x_test", "y_test")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + rename) so a concurrent or killed run never leaves half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    except OSError as error:
        raise KdlabError(f"{path.parent}: cannot write the mnist1d cache ({error}); make the cache folder writable") from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if hasattr(os, "fchmod"):  # mkstemp made it 0600; respect the user's umask
                from kdlab.store.files import default_file_mode
                os.fchmod(handle.fileno(), default_file_mode())
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise WorkspaceError(f"{path}: cannot write the mnist1d cache ({error.strerror}); free disk space or "
                                 "pass --workspace DIR to another folder") from None
        raise


def scale_to_unit(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map both by the affine map taking the train set's global [min, max] to [0, 1]; clip test into [0, 1].

    One global (not per-position) map keeps the signal's shape; computed on
    train only so test statistics never leak. Returns float32 arrays.
    """
    low, high = float(x_train.min()), float(x_train.max())
    span = high - low if high > low else 1.0
    train = (x_train - low) / span
    test = np.clip((x_test - low) / span, 0.0, 1.0)
    return train.astype(np.float32), test.astype(np.float32)


@register("dataset", "mnist1d")
def mnist1d(
    *, root: Path | None, cache_dir: Path, num_samples: Samples = 5000, seed: int = 42, final_seq_length: int = 40
) -> DatasetArrays:
    """MNIST-1D: 1-D digit signals, 10 classes, generated offline (default 4000/1000).

    ``num_samples`` are generated with mnist1d's generation ``seed`` (42 gives
    the published dataset's recipe) and split 80/20 into train/test as mnist1d
    does; ``num_samples`` is rounded down to a multiple of 10 (equal classes).
    Inputs (1, final_seq_length), scaled to [0, 1] by the train split's global
    min/max. Cached under ``cache_dir/mnist1d/``; ``root`` is not used.
    """
    if num_samples < _MIN_SAMPLES:
        raise KdlabError(f"data.num_samples: must be at least {_MIN_SAMPLES}, got {num_samples}; use e.g. 5000")
    if final_seq_length < 2:
        raise KdlabError(f"data.final_seq_length: must be at least 2, got {final_seq_length}; use e.g. 40")
    arguments = generation_arguments(num_samples=num_samples, seed=seed, final_seq_length=final_seq_length)
    path = cache_path(cache_dir, arguments)
    raw = _read_cache(path)
    if raw is None:
        raw = generate(arguments)
        _write_cache(path, raw)
    x_train, x_test = scale_to_unit(raw["x"], raw["x_test"])
    return DatasetArrays(
        x_train=torch.from_numpy(x_train).unsqueeze(1),
        y_train=torch.from_numpy(raw["y"].astype(np.int64)),
        x_test=torch.from_numpy(x_test).unsqueeze(1),
        y_test=torch.from_numpy(raw["y_test"].astype(np.int64)),
        num_classes=_NUM_CLASSES,
    )

mnist1d.image_inputs = False  # (1, 40) vectors: data.augment crop_flip is refused at config validation
