"""A Hugging Face ``datasets`` dataset for image or text classification (the optional ``datasets`` extra).

Where the data comes from (exactly one):

* ``path``: a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
  (``state.json`` / ``dataset_dict.json`` inside), or one local data file
  (``.csv``, ``.json``, ``.jsonl``, ``.parquet``) read as the train split;
* ``data_files``: ``{split: file}`` local data files, each read with
  ``datasets.load_dataset(<format>, data_files=...)`` (format from the suffix).

Splits are the dataset's own where it has them: ``train`` (required when there
are several; a lone split is train), ``test``, and ``validation`` (or ``val``,
``valid``, ``dev``) kept as the validation split. Other splits (IMDB's
``unsupervised``) are not read. Without ``test`` a stratified ``test_fraction``
of train is held out with a fixed seed; without a validation split
``data.val_fraction`` is carved from train by ``data.split_seed``, as for every
dataset. So test and validation never overlap.

Columns are named in the config: ``label_column`` and one of ``image_column``
(a ``datasets.Image`` column, or nested lists / arrays of 0..255 pixels shaped
H×W or H×W×C) or ``text_column`` (strings). Images are decoded with Pillow,
converted to RGB or grayscale and resized to ``size`` (bilinear), as the
image-folder dataset does; texts are tokenized with the encoders' WordPiece
(``kdlab.data.text``). Labels: a ``ClassLabel`` column gives the classes;
whole numbers are class ids (``num_classes`` if given, else the largest + 1);
strings are classes named in sorted order. A label outside the classes is one
line naming the file, row and value.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional, Union

import numpy as np
import torch
from annotated_types import Ge, Interval, Le, MinLen

from kdlab.data.base import DatasetArrays
from kdlab.data.image_folder import Side, _pillow
from kdlab.data.text import TextInfo, WordPiece, vocab_path
from kdlab.data.user_files import carve_test
from kdlab.errors import KdlabError
from kdlab.registry import register

Column = Annotated[str, MinLen(1)]
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict, Dataset)
DATA_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".pq": "parquet"}
VAL_SPLITS = ("validation", "val", "valid", "dev")


def library():
    """The ``datasets`` module, or one line saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise KdlabError("data.dataset: reading a Hugging Face dataset needs the datasets library; "
                         "pip install 'kdlab[datasets]' (or pip install datasets)") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    """No progress bars or info logs while kdlab reads (one run may read the data many times)."""
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def resolve(root: Path | None, name: str) -> Path:
    """``name`` as a path: absolute or ``~`` as given, a relative one under data.root when it is set."""
    path = Path(name).expanduser()
    return Path(root).expanduser() / path if root is not None and not path.is_absolute() else path


def _data_file(datasets, path: Path, split: str, cache_dir: Path | None, key: str):
    fmt = DATA_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise KdlabError(f"{path}: unknown data file type {path.suffix or '(none)'!r} ({key}); use "
                         f"{', '.join(DATA_FORMATS)}, or a save_to_disk folder")
    if not path.is_file():
        raise KdlabError(f"{path}: file not found ({key}); check the path (relative paths are under data.root)")
    try:
        return datasets.load_dataset(fmt, data_files={split: str(path)}, split=split,  # None: the library's cache
                                     cache_dir=None if cache_dir is None else str(Path(cache_dir) / "hf_datasets"))
    except Exception as error:  # noqa: BLE001 - the library wraps parser errors in its own classes
        cause = error.__cause__ or error
        raise KdlabError(f"{path}: not a readable {fmt} file ({type(cause).__name__}: {str(cause)[:120]}); "
                         "fix or re-save it") from None


def load_hf(root: Path | None, cache_dir: Path | None, *, path: Optional[str], data_files: Optional[dict[str, str]]
            ) -> dict[str, tuple[Any, str]]:
    """``{split: (datasets.Dataset, source)}``; source names the folder or file in error messages."""
    if (path is None) == (data_files is None):
        raise KdlabError("data.path: give exactly one of path (a save_to_disk folder or a data file) and "
                         "data_files ({split: file})")
    datasets = library()
    with _quiet(datasets):
        if data_files is not None:
            if not data_files:
                raise KdlabError("data.data_files: empty; map split names to files, e.g. {train: train.csv}")
            return {split: (_data_file(datasets, resolve(root, name), split, cache_dir, f"data.data_files.{split}"),
                            str(resolve(root, name))) for split, name in data_files.items()}
        folder = resolve(root, path)
        if folder.is_file():
            return {"train": (_data_file(datasets, folder, "train", cache_dir, "data.path"), str(folder))}
        if not folder.is_dir():
            raise KdlabError(f"{folder}: not found (data.path); give a save_to_disk folder or a data file "
                             "(relative paths are under data.root)")
        if not any((folder / marker).is_file() for marker in SAVED_MARKERS):
            raise KdlabError(f"{folder}: not a Hugging Face datasets folder (no {' or '.join(SAVED_MARKERS)}; "
                             "data.path); write it with save_to_disk, or list data files in data.data_files")
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as error:  # noqa: BLE001 - a damaged folder: missing shards, bad JSON
            raise KdlabError(f"{folder}: unreadable datasets folder ({type(error).__name__}: {str(error)[:120]}); "
                             "save it again with save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {split: (part, str(folder / split)) for split, part in loaded.items()}
    return {"train": (loaded, str(folder))}


def pick_splits(found: dict[str, tuple[Any, str]], where: str) -> dict[str, tuple[Any, str]]:
    """``{"train", "test"?, "val"?}`` out of the dataset's own splits (see the module docstring)."""
    if "train" not in found:
        if len(found) != 1:
            raise KdlabError(f"{where}: no 'train' split (splits: {', '.join(found)}); name the training split "
                             "train")
        found = {"train": next(iter(found.values()))}
    out = {"train": found["train"]}
    if "test" in found:
        out["test"] = found["test"]
    val = next((name for name in VAL_SPLITS if name in found), None)
    if val is not None:
        out["val"] = found[val]
    return out


def require_column(part, column: str, source: str, key: str) -> None:
    if column not in part.column_names:
        raise KdlabError(f"{source}: no column {column!r} ({key}); its columns are {', '.join(part.column_names)}")


# --------------------------------------------------------------------------- labels


def _label_ids(parts: dict[str, tuple[Any, str]], column: str, num_classes: Optional[int]
               ) -> tuple[dict[str, torch.Tensor], int]:
    datasets = library()
    feature = parts["train"][0].features[column]
    raw = {split: list(part[column]) for split, (part, _) in parts.items()}
    if isinstance(feature, datasets.ClassLabel):
        count, names = feature.num_classes, None
    elif all(isinstance(v, str) for values in raw.values() for v in values):
        names = sorted({v.strip() for values in raw.values() for v in values})
        count = len(names)
    else:
        count, names = num_classes, None
    if names is not None:
        lookup = {name: i for i, name in enumerate(names)}
        ids = {split: [lookup[v.strip()] for v in values] for split, values in raw.items()}
    else:
        ids = {}
        for split, values in raw.items():
            source = parts[split][1]
            for row, value in enumerate(values, start=1):
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise KdlabError(f"{source}, row {row}: label {value!r} in column {column!r} is not a class id; "
                                     "use whole numbers or class names")
                if value < 0 or (count is not None and value >= count):
                    bound = f"[0, {count})" if count is not None else "[0, ...)"
                    raise KdlabError(f"{source}, row {row}: label {value} in column {column!r} is outside {bound}; "
                                     "fix the label, drop unlabelled rows (-1), or set data.num_classes")
            ids[split] = [int(v) for v in values]
        if count is None:
            count = 1 + max((max(v) for v in ids.values() if v), default=-1)
    if count < 2:
        raise KdlabError(f"{parts['train'][1]}: column {column!r} holds {count} class(es); a classifier needs at "
                         "least 2")
    return {split: torch.tensor(v, dtype=torch.int64) for split, v in ids.items()}, count


# --------------------------------------------------------------------------- inputs


def _image(value: Any, *, source: str, row: int, mode: str, size: tuple[int, int]) -> np.ndarray:
    Image, UnidentifiedImageError = _pillow()
    try:
        if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            handle = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
            image = Image.open(handle)
        elif isinstance(value, Image.Image):
            image = value
        elif value is not None:
            pixels = np.asarray(value)
            if pixels.dtype == object or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in
                                                                      (1, 3, 4)):
                raise ValueError(f"an array of shape {pixels.shape}, not H x W or H x W x C")
            if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
                raise ValueError("pixel values outside 0..255")
            image = Image.fromarray(pixels.astype(np.uint8).squeeze(2) if pixels.ndim == 3 and pixels.shape[2] == 1
                                    else pixels.astype(np.uint8))
        else:
            raise ValueError("no image")
        with image:
            pixels = np.asarray(image.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR),
                                dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as error:
        raise KdlabError(f"{source}, row {row}: unreadable image ({error}); replace or drop that row") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _images(part, column: str, source: str, *, mode: str, size: tuple[int, int]) -> torch.Tensor:
    datasets = library()
    if isinstance(part.features[column], datasets.Image):
        part = part.cast_column(column, datasets.Image(decode=False))  # kdlab decodes: one error line per bad file
    arrays = [_image(value, source=source, row=row, mode=mode, size=size)
              for row, value in enumerate(part[column], start=1)]
    channels = 3 if mode == "RGB" else 1
    stacked = np.stack(arrays) if arrays else np.zeros((0, channels, *size), np.uint8)
    return torch.from_numpy(stacked).to(torch.float32).div_(255.0)


def _texts(part, column: str, source: str) -> list[str]:
    texts = list(part[column])
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise KdlabError(f"{source}, row {row}: column {column!r} holds {type(text).__name__}, not text; "
                             "fix or drop that row")
    return texts


@register("dataset", "hf_dataset")
def hf_dataset(
    *,
    root: Path | None,
    cache_dir: Path,
    path: Optional[Column] = None,
    data_files: Optional[dict[str, Column]] = None,
    label_column: Column = "label",
    image_column: Optional[Column] = None,
    text_column: Optional[Column] = None,
    num_classes: Optional[Annotated[int, Ge(2), Le(1 << 24)]] = None,
    size: Union[Side, tuple[Side, Side]] = 32,
    channels: Literal[1, 3] = 3,
    tokenizer: Column = "minilm",
    max_length: Annotated[int, Ge(8), Le(4096)] = 64,
    test_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.2,
) -> DatasetArrays:
    """Hugging Face dataset: a save_to_disk folder or local data files, image or text classification.

    ``path`` (a save_to_disk folder, or one csv/json/jsonl/parquet file) or ``data_files`` ({split: file});
    ``label_column`` and one of ``image_column`` (resized to ``size``, ``channels`` 3 or 1) or
    ``text_column`` (WordPiece ids: ``tokenizer`` minilm or a vocab.txt, ``max_length``). The dataset's
    own train/validation/test splits are used; without test, ``test_fraction`` of train is held out.
    """
    if (image_column is None) == (text_column is None):
        raise KdlabError("data.image_column: give exactly one of image_column (image classification) and "
                         "text_column (text classification)")
    found = load_hf(root, cache_dir, path=path, data_files=data_files)
    parts = pick_splits(found, str(resolve(root, path)) if path is not None else "data.data_files")
    column, key = (image_column, "data.image_column") if image_column is not None else (text_column,
                                                                                        "data.text_column")
    for part, source in parts.values():
        require_column(part, label_column, source, "data.label_column")
        require_column(part, column, source, key)
    labels, count = _label_ids(parts, label_column, num_classes)
    text = None
    if image_column is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        mode = "RGB" if channels == 3 else "L"
        inputs = {split: _images(part, column, source, mode=mode, size=hw) for split, (part, source) in parts.items()}
    else:
        wordpiece = WordPiece(vocab_path(tokenizer))
        inputs = {split: wordpiece.encode(_texts(part, column, source), max_length)
                  for split, (part, source) in parts.items()}
        text = TextInfo(tokenizer=tokenizer, vocab_size=len(wordpiece), pad_id=wordpiece.pad_id,
                        max_length=max_length, vocab_sha256=wordpiece.sha256)
    x_train, y_train = inputs["train"], labels["train"]
    if "test" in parts:
        x_test, y_test = inputs["test"], labels["test"]
    else:
        x_train, y_train, x_test, y_test = carve_test(x_train, y_train, test_fraction, source=parts["train"][1])
    return DatasetArrays(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=count,
                         text=text, x_val=inputs.get("val"), y_val=labels.get("val"))


# Images are (C, H, W); token ids are not (data.augment crop_flip is refused for text at config validation).
hf_dataset.image_inputs = lambda options: options.get("image_column") is not None
