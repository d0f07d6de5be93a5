"""What datasets return, how they are split, and the memoised entry point the trainer calls.

A dataset factory is registered with ``@register("dataset", name)`` and called
as ``factory(root=..., cache_dir=..., **options)``; it returns
``DatasetArrays`` (train and test only). ``make_splits`` carves a stratified
validation split out of train and computes the per-channel statistics the
models normalise with; ``build_splits`` does both, memoised in-process.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdlab import registry
from kdlab.data.augment import AUGMENTATIONS, augment_batch
from kdlab.data.sequence import SequenceArrays, SequenceInfo, check_sequence_arrays, split_sequences
from kdlab.data.stats import channel_mean_std
from kdlab.data.stratify import holdout_size, stratified_holdout
from kdlab.data.streaming import LazyImages
from kdlab.data.text import TextInfo
from kdlab.errors import KdlabError

__all__ = ["AUGMENTATIONS", "DatasetArrays", "SequenceArrays", "SequenceInfo", "Splits", "augment_batch", "build_splits", "make_splits"]

# Distinct (dataset, options, root) loads kept, and distinct splits of them.
_ARRAYS_CACHE_SIZE = 2
_SPLITS_CACHE_SIZE = 4


def gives_images(dataset, options: dict) -> bool | None:
    """Whether registered dataset ``dataset`` yields (C, H, W) images (its factory's ``image_inputs`` flag or
    function of the options; default True); None for a name that is not registered (reported elsewhere)."""
    try:
        image = getattr(registry.get("dataset", dataset), "image_inputs", True)
    except (KdlabError, TypeError):
        return None
    return bool(image(options) if callable(image) else image)

@dataclass
class DatasetArrays:
    """What a dataset factory returns: the full train set and the test set.

    x_*: float32 (N, *input_shape), channel first, values in [0, 1];
    y_*: int64 (N,) class indices in [0, num_classes).
    Text datasets set ``text``: x_* are then int64 token ids (N, L) in [0, vocab_size).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    text: TextInfo | None = None
    # A validation split the data comes with (an image folder's val/): used as it is, data.val_fraction unused.
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None


@dataclass
class Splits:
    """What the trainer consumes: train/val/test ``(inputs, labels)`` pairs and input statistics.

    ``input_shape`` excludes the batch dim and is channel first. ``mean``/``std``
    are per channel over the train split (after val was carved out); models
    normalise with them internally, so attacks and augmentation see [0, 1]
    inputs. An empty val split has tensors with 0 rows.
    """

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Set for sequence tasks (kdlab.data.sequence): inputs are token ids (N, L) and labels the
    # response targets (N, L), -100 elsewhere; num_classes is the vocabulary, input_shape (context,).
    sequence: "SequenceInfo | None" = None
    # Set for text classification (kdlab.data.text): inputs are padded token ids (N, L), labels classes;
    # mean/std are (0.0,)/(1.0,) (token ids are not normalised), input_shape (L,).
    text: TextInfo | None = None


def check_arrays(name: str, arrays: Any) -> None:
    """Raise KdlabError unless ``arrays`` keeps the ``DatasetArrays`` contract (dtypes, shapes, ranges)."""
    where = f"dataset {name!r}"
    if not isinstance(arrays, DatasetArrays):
        raise KdlabError(f"{where}: its factory returned {type(arrays).__name__}, not DatasetArrays; return kdlab.data.DatasetArrays")
    num_classes = arrays.num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise KdlabError(f"{where}: num_classes must be an integer >= 2, got {num_classes!r}; fix the dataset factory")
    text = arrays.text
    given_val = ("val",) if arrays.x_val is not None or arrays.y_val is not None else ()
    for split in ("train", "test", *given_val):
        inputs, labels = getattr(arrays, f"x_{split}"), getattr(arrays, f"y_{split}")
        if text is not None:
            _check_token_ids(where, split, inputs, labels, text)
        elif isinstance(inputs, LazyImages):  # decoded per item from 8-bit pixels: float32 in [0, 1] by construction
            pass
        elif not isinstance(inputs, torch.Tensor) or inputs.dtype != torch.float32 or inputs.dim() < 2:
            raise KdlabError(f"{where}: x_{split} must be a float32 tensor (N, C, ...), got {_describe(inputs)}; fix the dataset factory")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != inputs.shape[:1]:
            raise KdlabError(
                f"{where}: y_{split} must be an int64 tensor of shape ({inputs.shape[0]},), got {_describe(labels)}; fix the dataset factory"
            )
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise KdlabError(f"{where}: y_{split} has labels outside [0, {num_classes}); fix the dataset factory")
        if isinstance(inputs, LazyImages):
            continue
        bad = int((~torch.isfinite(inputs)).sum()) if inputs.numel() and text is None else 0
        if bad:  # named before the range check, whose min/max would only print nan
            raise KdlabError(f"{where}: x_{split} holds {bad} NaN or infinite value(s); drop or repair those "
                             "samples in the factory")
        if inputs.numel() and text is None:
            low, high = torch.aminmax(inputs)
            if not (float(low) >= 0.0 and float(high) <= 1.0):  # also catches NaN
                raise KdlabError(
                    f"{where}: x_{split} values span [{float(low)}, {float(high)}], not [0, 1]; scale inputs to [0, 1] in the factory"
                )
    if arrays.x_train.shape[0] == 0:
        raise KdlabError(f"{where}: the train split is empty; check the dataset's options")
    for split in ("test", *given_val):
        if arrays.x_train.shape[1:] != getattr(arrays, f"x_{split}").shape[1:]:
            raise KdlabError(
                f"{where}: train inputs have shape {tuple(arrays.x_train.shape[1:])} but {split} inputs "
                f"{tuple(getattr(arrays, f'x_{split}').shape[1:])}; fix the dataset factory"
            )


def _check_token_ids(where: str, split: str, inputs: Any, labels: Any, text: TextInfo) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dtype != torch.int64 or inputs.dim() != 2:
        raise KdlabError(f"{where}: x_{split} must be an int64 tensor of token ids (N, L), got {_describe(inputs)}; "
                         "fix the dataset factory")
    if inputs.numel() and not (0 <= int(inputs.min()) and int(inputs.max()) < text.vocab_size):
        raise KdlabError(f"{where}: x_{split} has token ids outside [0, {text.vocab_size}); fix the dataset factory")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def make_splits(name: str, arrays: DatasetArrays, *, val_fraction: float, split_seed: int) -> Splits:
    """Carve a validation split out of train and compute the train statistics.

    The val split is stratified: ``round(N * val_fraction)`` train samples
    (at least 1 when val_fraction > 0), taken from every class in proportion
    to its count, chosen by a ``torch.Generator`` seeded with ``split_seed``
    (see ``stratify.stratified_holdout``); the remaining train samples keep
    their original order, and so do the val samples. ``val_fraction == 0``
    gives val tensors with 0 rows. The test split is passed through untouched, and so
    is a val split the arrays bring (``x_val``/``y_val``): then nothing is carved.
    mean/std: per channel over the final train split (population std).
    """
    _check_split_arguments(val_fraction, split_seed)
    if isinstance(arrays, SequenceArrays):
        return split_sequences(name, arrays, val_fraction=val_fraction, split_seed=split_seed)
    check_arrays(name, arrays)
    x_train, y_train = arrays.x_train, arrays.y_train
    if arrays.x_val is not None:  # the data's own val split
        val = (arrays.x_val, arrays.y_val)
    elif val_fraction > 0 and x_train.shape[0] < 2:
        raise KdlabError(f"data.val_fraction: dataset {name!r} has {x_train.shape[0]} train sample(s), too few to carve a val split; set data.val_fraction: 0")
    elif holdout_size(x_train.shape[0], val_fraction) == 0:
        val = (x_train[:0], y_train[:0])
    else:
        generator = torch.Generator().manual_seed(split_seed)
        kept, held = stratified_holdout(y_train, fraction=val_fraction, generator=generator)
        val = (x_train[held], y_train[held])
        x_train, y_train = x_train[kept], y_train[kept]
    if arrays.text is not None:
        mean, std = (0.0,), (1.0,)
    else:  # a streamed split's over its decoded images, chunk by chunk
        mean, std = x_train.channel_stats() if isinstance(x_train, LazyImages) else channel_mean_std(x_train)
    return Splits(
        name=name,
        train=(x_train, y_train),
        val=val,
        test=(arrays.x_test, arrays.y_test),
        num_classes=arrays.num_classes,
        input_shape=tuple(x_train.shape[1:]),
        mean=mean,
        std=std,
        text=arrays.text,
    )


def build_splits(
    dataset: str, options: dict, *, root: str | None, cache_dir: Path, val_fraction: float, split_seed: int
) -> Splits:
    """Load dataset ``dataset`` from the registry with ``options`` and split it (``make_splits``).

    ``root`` (data.root, ``~`` expanded) is passed to the factory as a Path or
    None; ``cache_dir`` is where the factory may write caches. Memoised
    in-process with a small LRU keyed by all arguments (a study builds the same
    data for every run): the factory's arrays (last 2) and the splits (last 4).
    Each call returns its own ``Splits`` object but the tensors are shared
    between calls, so treat them as read-only.
    """
    root_key = None if root is None else str(Path(root).expanduser().resolve())
    cache_key = str(Path(cache_dir).expanduser().resolve())
    _check_split_arguments(val_fraction, split_seed)
    splits = _cached_splits(dataset, _freeze(options or {}), root_key, cache_key, float(val_fraction), split_seed)
    return dataclasses.replace(splits)


def _check_split_arguments(val_fraction: Any, split_seed: Any) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise KdlabError(f"data.val_fraction: must be a number in [0, 1), got {val_fraction!r}; use e.g. 0.1, or 0 for no val split")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise KdlabError(f"data.split_seed: must be an integer, got {split_seed!r}; use e.g. 0")


def _freeze(value: Any) -> Any:
    """A hashable, order-independent stand-in for an options value (dicts sorted, lists to tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((str(key), _freeze(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"  # NaN != NaN would defeat the cache
    return value


@functools.lru_cache(maxsize=_SPLITS_CACHE_SIZE)
def _cached_splits(dataset: str, options: tuple, root: str | None, cache_dir: str, val_fraction: float,
                   split_seed: int) -> Splits:
    arrays = _cached_arrays(dataset, options, root, cache_dir)
    return make_splits(dataset, arrays, val_fraction=val_fraction, split_seed=split_seed)


@functools.lru_cache(maxsize=_ARRAYS_CACHE_SIZE)
def _cached_arrays(dataset: str, options: tuple, root: str | None, cache_dir: str) -> DatasetArrays:
    factory = registry.get("dataset", dataset, key="data.dataset")
    kwargs = dict(options)
    _check_options(dataset, factory, kwargs)
    arrays = factory(root=None if root is None else Path(root), cache_dir=Path(cache_dir), **kwargs)
    if isinstance(arrays, SequenceArrays):
        check_sequence_arrays(dataset, arrays)
    else:
        check_arrays(dataset, arrays)
    return arrays


def _check_options(dataset: str, factory: Any, options: dict) -> None:
    """Unknown or missing factory options -> KdlabError (the config layer checks types first)."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    known = [n for n in parameters if n not in ("root", "cache_dir")]
    for key in options:
        if key not in known:
            raise KdlabError(f"data.{key}: unknown option for dataset {dataset!r}; its options are: {', '.join(known) or '(none)'}")
    for key in known:
        if parameters[key].default is inspect.Parameter.empty and key not in options:
            raise KdlabError(f"data.{key}: dataset {dataset!r} needs this option; set it in the data section")


def clear_cache() -> None:
    """Forget every memoised load and split (e.g. after the files under data.root changed)."""
    _cached_splits.cache_clear()
    _cached_arrays.cache_clear()
