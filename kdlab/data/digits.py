"""scikit-learn's bundled 8x8 digits (UCI optical digits test set, 1797 images); no download."""
from pathlib import Path

import numpy as np
import torch

from kdlab.data.base import DatasetArrays
from kdlab.data.stratify import stratified_holdout
from kdlab.errors import KdlabError
from kdlab.registry import register

# The test split's own seed: fixed so the test set never depends on a run's split_seed.
_TEST_SPLIT_SEED = 0
_MAX_VALUE = 16.0  # pixel values are counts of set bits in 4x4 blocks: 0..16


@register("dataset", "digits")
def digits(*, root: Path | None, cache_dir: Path, test_fraction: float = 0.2) -> DatasetArrays:
    """Digits: scikit-learn's bundled 8x8 handwritten digits, 10 classes, 1797 images (no download).

    Inputs (1, 8, 8) = value / 16. There is no official test split: a
    stratified ``test_fraction`` is held out with a fixed seed (0), so the
    test set is the same in every run. ``root`` and ``cache_dir`` are not used.
    """
    if not 0.0 < test_fraction < 1.0:
        raise KdlabError(f"data.test_fraction: must be in (0, 1), got {test_fraction}; use e.g. 0.2")
    from sklearn.datasets import load_digits  # deferred: scikit-learn is slow to import

    bunch = load_digits()
    inputs = torch.from_numpy((bunch.data / _MAX_VALUE).astype(np.float32)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(_TEST_SPLIT_SEED)
    train, test = stratified_holdout(labels, fraction=test_fraction, generator=generator)
    return DatasetArrays(
        x_train=inputs[train], y_train=labels[train], x_test=inputs[test], y_test=labels[test], num_classes=10
    )
