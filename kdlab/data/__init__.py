"""Datasets, splits and augmentation.

Importing this package registers the built-in datasets (``kdlab list datasets``).
"""
from kdlab.data import (arrays, cifar, digits, docstrings, hf_dataset, idx, image_folder, mnist1d,  # noqa: F401
                        synthetic, table)  # (registers the datasets)
from kdlab.data.base import AUGMENTATIONS, DatasetArrays, Splits, augment_batch, build_splits, make_splits
from kdlab.data.sequence import IGNORE, SequenceArrays, SequenceInfo, prompt_lengths

__all__ = ["AUGMENTATIONS", "DatasetArrays", "IGNORE", "SequenceArrays", "SequenceInfo", "Splits", "augment_batch",
           "build_splits", "make_splits", "prompt_lengths"]
