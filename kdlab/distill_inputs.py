"""What ``kdlab.distill`` accepts as data and as models, turned into what the training loop consumes.

Data (``as_splits``), each ending in kdlab ``Splits`` of float32 inputs in [0, 1] and int64 class labels:

* ``(x, y)``: tensors, numpy arrays or nested lists; a stratified test and then val split are held out;
* ``{"train": (x, y), "val": ..., "test": ...}``: each a pair, a ``Dataset`` or a ``DataLoader``;
* a map-style ``torch.utils.data.Dataset`` (``len`` and indexing) or a ``DataLoader`` (iterated once, in its
  own order and batches): materialised in memory when it fits (``MAX_BYTES`` of float32 inputs, estimated
  from the first sample and checked as it fills); larger data belongs in ``kdlab run`` with a dataset;
* a data section as in a config, ``{"dataset": "arrays", "train": "data.npz", "scale": 255}``: the registered
  loader reads the user's ``.npz``, image folder, ... exactly as ``kdlab run`` does.

A sample is ``(input, label, ...)`` or a mapping with an input key (``INPUT_KEYS``) and a label key
(``LABEL_KEYS``); an input may be a PIL image (made channels-first, 8-bit: pass ``scale=255``). Inputs of
any real dtype and range are scaled as the caller says (``scale=255`` divides,
``normalize="per_channel"`` min-max scales each channel over train); values left outside [0, 1] are refused
with one line naming the fix, never clipped silently. Models may return logits, a mapping with ``"logits"``,
or an object with ``.logits`` (Hugging Face outputs): ``logits_hooks`` makes them return the tensor.
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from kdlab.errors import KdlabError

MAX_BYTES = 4 << 30  # float32 inputs held in memory by distill; beyond it, kdlab run with a streaming dataset
INPUT_KEYS = ("x", "input", "inputs", "image", "img", "pixel_values")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")
NORMALIZE = ("none", "per_channel")


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if type(value).__module__.startswith("PIL."):  # a PIL image (a torchvision dataset without ToTensor)
        pixels = np.asarray(value)
        return torch.from_numpy(np.ascontiguousarray(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)))
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise KdlabError(f"data: {what} cannot be read as an array ({exc}); give a tensor or numpy array") from None
    if array.dtype.kind not in "biuf":
        raise KdlabError(f"data: {what} are {array.dtype}, not numbers; give a numeric tensor or array")
    return torch.from_numpy(np.ascontiguousarray(array))


def _labels(value: Any, count: int, where: str) -> torch.Tensor:
    y = _tensor(value, f"{where} labels")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise KdlabError(f"data: {where} labels have shape {tuple(y.shape)}; give N class indices (N,) "
                         "(not one-hot: use y.argmax(1))")
    if len(y) != count:
        raise KdlabError(f"data: {where} has {count} inputs but {len(y)} labels; give one label per input")
    if y.is_floating_point():
        if not bool(torch.all(y == y.round())):
            raise KdlabError(f"data: {where} labels are not whole numbers; labels are class indices 0..K-1")
    if len(y) and int(y.min()) < 0:
        raise KdlabError(f"data: {where} labels include {int(y.min())}; labels are class indices 0..K-1")
    return y.to(torch.int64)


def _sample(item: Any, where: str) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        x = next((item[k] for k in INPUT_KEYS if k in item), None)
        y = next((item[k] for k in LABEL_KEYS if k in item), None)
        if x is None or y is None:
            raise KdlabError(f"data: {where} yields mappings with keys {sorted(item)}; name the input "
                             f"{INPUT_KEYS[:3]}... and the label {LABEL_KEYS[:3]}... (or yield (input, label))")
        return x, y
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise KdlabError(f"data: {where} yields {type(item).__name__}, not (input, label); make it return a pair")


def _batches(source: Any, where: str) -> Iterator[tuple[Any, Any]]:
    """``(inputs, labels)`` batches of a Dataset (read in index order, 256 samples at a time, as lists) or of a
    DataLoader as it batches them (one pass: its shuffling and transforms apply once)."""
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(source, DataLoader):
        for batch in source:
            yield _sample(batch, where)
        return
    if isinstance(source, IterableDataset) or not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise KdlabError(f"data: {where} is a {type(source).__name__} without len() and indexing; give a map-style "
                         "Dataset, or wrap it in a DataLoader (iterated once)")
    for start in range(0, len(source), 256):
        items = [_sample(source[i], where) for i in range(start, min(start + 256, len(source)))]
        yield [x for x, _ in items], [y for _, y in items]


def _stack(values: Any, what: str) -> torch.Tensor:
    if not isinstance(values, list):
        return _tensor(values, what)
    tensors = [_tensor(v, what) for v in values]
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise KdlabError(f"data: {what} come in several shapes {shapes[:3]}; resize them to one (e.g. a transform)")
    return torch.stack(tensors)


def _length(source: Any) -> int | None:
    """How many samples ``source`` holds, when it says (for the memory estimate)."""
    from torch.utils.data import DataLoader

    inner = source.dataset if isinstance(source, DataLoader) else source
    try:
        return len(inner)
    except TypeError:
        return None


def materialise(source: Any, where: str, *, max_bytes: int = MAX_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterate ``source`` once into ``(inputs, labels)``; refused once the float32 inputs would pass ``max_bytes``
    (estimated from the first batch and the length when known, else counted as they come)."""
    xs, ys, held, total = [], [], 0, _length(source)
    for x, y in _batches(source, where):
        x, y = _stack(x, f"{where} inputs"), _stack(y, f"{where} labels")
        held += x.numel() * 4
        need = max(held, x[0].numel() * 4 * total if (total and len(x)) else 0)
        if need > max_bytes:
            raise KdlabError(f"data: {where} needs about {need / 2**30:.1f} GiB as float32, over kdlab.distill's "
                             f"{max_bytes / 2**30:g} GiB in-memory limit; give a subset, or use `kdlab run` with a "
                             "registered dataset")
        xs.append(x)
        ys.append(y)
    if not xs:
        raise KdlabError(f"data: {where} is empty; give at least 2 samples")
    shapes = sorted({tuple(x.shape[1:]) for x in xs})
    if len(shapes) > 1:
        raise KdlabError(f"data: {where} yields inputs of several shapes {shapes[:3]}; resize them to one")
    return torch.cat(xs), torch.cat(ys)


def _pair(value: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        x = _tensor(value[0], f"{where} inputs")
        return x, _labels(value[1], len(x), where)
    x, y = materialise(value, where)
    return x, _labels(y, len(x), where)


def _inputs(x: torch.Tensor, where: str) -> torch.Tensor:
    if x.ndim < 2:
        raise KdlabError(f"data: {where} inputs have shape {tuple(x.shape)}; give (N, features) or (N, C, H, W)")
    return x[:, None] if x.ndim == 3 else x  # (N, H, W) grayscale images get their channel axis


def scale_inputs(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], *, scale: float | None,
                 normalize: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every split's inputs as float32 in [0, 1], by ``scale`` then ``normalize`` (statistics of train)."""
    from kdlab.data.user_files import scale_to_unit

    if normalize not in NORMALIZE:
        raise KdlabError(f"distill: normalize={normalize!r}; choose one of {', '.join(NORMALIZE)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise KdlabError(f"distill: scale={scale!r}; give a positive number, e.g. scale=255 for 8-bit pixels")
    names = list(parts)
    inputs = [_inputs(parts[n][0], n) for n in names]
    for name, x in zip(names, inputs):
        bad = int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
        if bad:  # named before the range check, whose bounds would skip them
            raise KdlabError(f"data: {name} inputs hold {bad} NaN or infinite value(s); drop or repair those samples")
    dims = (0, *range(2, inputs[0].dim()))
    try:
        scaled = scale_to_unit(inputs[0], inputs[1:], scale=scale, normalize=normalize, source="data", dims=dims)
    except KdlabError as exc:
        text = str(exc).replace("set scale: 255", "pass scale=255")  # the loaders' hint, in distill's words
        raise KdlabError(text.replace("normalize: per_channel", "normalize='per_channel'")) from None
    return {n: (x, parts[n][1]) for n, x in zip(names, scaled)}


def _config_splits(data: dict, *, split_seed: int, cache_dir: Path | None):
    """A config's data section (``{"dataset": ..., options}``) through the registered loader, as kdlab run reads it."""
    from kdlab import registry
    from kdlab.config import DataConfig, check_options, parse_dataclass
    from kdlab.data import build_splits
    from kdlab.errors import ConfigError

    errors: list[str] = []
    cfg = parse_dataclass(DataConfig, {"split_seed": split_seed, **data}, "data", errors, extra_ok=True)
    if errors:
        raise ConfigError(errors)
    registry.get("dataset", cfg.dataset, key="data.dataset")
    options = check_options("data", "dataset", cfg.dataset, cfg.options, set(), errors)
    if errors:
        raise ConfigError(errors)
    with contextlib.ExitStack() as stack:
        folder = cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdlab-distill-")))
        return build_splits(cfg.dataset, options, root=cfg.root, cache_dir=folder, val_fraction=cfg.val_fraction,
                            split_seed=cfg.split_seed)


def as_splits(data: Any, *, val_fraction: float, test_fraction: float, split_seed: int, scale: float | None = None,
              normalize: str = "none", cache_dir: Path | None = None):
    """Any accepted form of ``data`` (module docstring) → kdlab ``Splits``."""
    from kdlab.data import Splits, make_splits
    from kdlab.data.base import DatasetArrays
    from kdlab.data.stratify import stratified_holdout

    if isinstance(data, Splits):
        return data
    if isinstance(data, Mapping) and "dataset" in data:
        if scale is not None or normalize != "none":
            raise KdlabError("distill: scale/normalize are options of the data section here; put them in it, "
                             "e.g. {'dataset': 'arrays', 'train': 'x.npz', 'scale': 255}")
        return _config_splits(dict(data), split_seed=split_seed, cache_dir=cache_dir)
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"train", "val", "test"})
        if "train" not in data or unknown:
            raise KdlabError("data: a dict has 'train' (and optionally 'val', 'test') entries, each (x, y), a Dataset "
                             f"or a DataLoader, or a 'dataset' key naming a loader; got keys {sorted(data)}")
        parts = {name: _pair(data[name], name) for name in ("train", "val", "test") if name in data}
    else:
        if not 0.0 <= test_fraction < 1.0:
            raise KdlabError(f"distill: test_fraction must be in [0, 1), got {test_fraction!r}; use e.g. 0.1")
        x, y = _pair(data, "data")
        if len(y) < 2:
            raise KdlabError("data: give at least 2 samples")
        kept, held = stratified_holdout(y, fraction=test_fraction,
                                        generator=torch.Generator().manual_seed(split_seed + 1))
        parts = {"train": (x[kept], y[kept]), "test": (x[held], y[held])}
    parts = scale_inputs(parts, scale=scale, normalize=normalize)
    x, y = parts["train"]
    test = parts.get("test", (x[:0], y[:0]))
    val = parts.get("val")
    arrays = DatasetArrays(x_train=x, y_train=y, x_test=test[0], y_test=test[1],
                           num_classes=max(2, int(torch.cat([p[1] for p in parts.values()]).max()) + 1),
                           x_val=None if val is None else val[0], y_val=None if val is None else val[1])
    return make_splits("tensors", arrays, val_fraction=val_fraction, split_seed=split_seed)


# ---------------------------------------------------------------------------- models


def logits_of(output: Any, role: str) -> torch.Tensor:
    """The logits of a model's output: the tensor, ``output["logits"]`` or ``output.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    keys = f" with keys {sorted(output)}" if isinstance(output, Mapping) else ""
    raise KdlabError(f"{role}: its forward returns {type(output).__name__}{keys}; kdlab needs the logits: a tensor, "
                     "a dict with 'logits' or an output with .logits (wrap the model to return them)")


@contextlib.contextmanager
def logits_hooks(**models: nn.Module | None):
    """While open, each model returns its logits tensor (a forward hook, first of all hooks; removed on exit)."""
    handles = []
    try:
        for role, model in models.items():
            if model is not None:
                handles.append(model.register_forward_hook(
                    lambda module, args, output, role=role: logits_of(output, role), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def kept_as_found(**models: nn.Module | None):
    """Restore each model's per-module train/eval mode, per-parameter ``requires_grad`` and device on exit
    (also on an exception); the weights are left as trained."""
    saved = []
    for model in models.values():
        if model is None:
            continue
        first = next(iter(model.parameters()), None)
        saved.append((model, [(m, m.training) for m in model.modules()],
                      [(p, p.requires_grad) for p in model.parameters()], None if first is None else first.device))
    try:
        yield
    finally:
        for model, modes, flags, device in saved:
            if device is not None:
                model.to(device)
            for module, training in modes:
                module.training = training
            for param, flag in flags:
                param.requires_grad_(flag)
