"""Images in class folders, as torchvision's ImageFolder reads them: ``root/<class>/<image>.png``.

``root`` holds either the class folders themselves, or ``train/`` (required then) beside optional
``val/`` and ``test/``, each with the same class folders. Classes are the train class folders sorted
by name (label i = the i-th name). Without ``test/`` a stratified ``test_fraction`` of train is held
out (fixed seed); without ``val/`` data.val_fraction is carved as for every dataset. Every image is
decoded with Pillow, converted to RGB (or grayscale with ``channels: 1``) and resized to ``size``,
so the whole set is held in memory as float32 (N, C, H, W) in [0, 1] — or, streamed (``streaming``:
true, or auto above ``streaming.STREAM_ABOVE_BYTES`` decoded), kept as the file list and decoded per item by
``workers`` loader processes (``kdlab.data.streaming``); only the image headers are read up front.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import torch
from annotated_types import Ge, Interval, Le

from kdlab.config.validate import NotInRunId
from kdlab.data.base import DatasetArrays
from kdlab.data.streaming import LazyImages, should_stream
from kdlab.data.user_files import carve_test
from kdlab.errors import KdlabError
from kdlab.registry import register

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
Side = Annotated[int, Ge(1), Le(4096)]


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib, a kdlab dependency
        raise KdlabError("data.dataset: image_folder decodes images with Pillow, which is not installed; "
                         "pip install pillow") from None
    return Image, UnidentifiedImageError


def class_folders(folder: Path) -> list[Path]:
    """The class subfolders of ``folder``, sorted by name (hidden ones skipped)."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue  # .DS_Store, editor files, hidden folders
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise KdlabError(f"{path}: not an image file ({path.suffix or 'no extension'}); move it out of the class "
                             f"folders (images are {', '.join(sorted(IMAGE_SUFFIXES))})")
        files.append(path)
    if not files:
        raise KdlabError(f"{folder}: class folder holds no images; add images or remove the folder")
    return files


def _read(path: Path, *, mode: str, size: tuple[int, int]) -> np.ndarray:
    Image, UnidentifiedImageError = _pillow()
    try:
        with Image.open(path) as image:
            image = image.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise KdlabError(f"{path}: unreadable image ({error}); replace or remove the file") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _check_header(path: Path) -> None:
    """An unreadable image named before any work, without decoding it (a streamed split's check)."""
    Image, UnidentifiedImageError = _pillow()
    try:
        with Image.open(path) as image:
            image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise KdlabError(f"{path}: unreadable image ({error}); replace or remove the file") from None


def _list_split(folder: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    found = [p.name for p in class_folders(folder)]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise KdlabError(f"{folder / unknown[0]}: class folder not in the train classes ({', '.join(classes[:8])}"
                         f"{', ...' if len(classes) > 8 else ''}); rename it or add it to train")
    files, labels = [], []
    for label, name in enumerate(classes):
        if name not in found:
            continue  # an evaluation split may miss a class
        for path in _image_files(folder / name):
            files.append(path)
            labels.append(label)
    if not files:
        raise KdlabError(f"{folder}: no class folders with images; put images in {folder}/<class>/")
    return files, torch.tensor(labels, dtype=torch.int64)


def _load(files: list[Path], *, mode: str, size: tuple[int, int], lazy: bool, workers: int):
    """Decoded images (N, C, H, W) float32 in [0, 1], or a ``LazyImages`` that decodes them per item."""
    if lazy:
        for path in files:
            _check_header(path)
        return LazyImages(files, reader=functools.partial(_read, mode=mode, size=size),
                          sample_shape=(3 if mode == "RGB" else 1, *size), workers=workers)
    return torch.from_numpy(np.stack([_read(p, mode=mode, size=size) for p in files])).to(torch.float32).div_(255.0)


@register("dataset", "image_folder")
def image_folder(
    *,
    root: Path | None,
    cache_dir: Path,
    size: Union[Side, tuple[Side, Side]] = 32,
    channels: Literal[1, 3] = 3,
    test_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.2,
    streaming: Annotated[Literal["auto", True, False], NotInRunId()] = "auto",  # how the data is served, not what
    workers: Annotated[int, Ge(0), Le(256), NotInRunId()] = 2,
) -> DatasetArrays:
    """Image folder: your images in class folders (root/<class>/x.png, or root/train|val|test/<class>/...).

    Every image becomes RGB (``channels: 3``) or grayscale (``channels: 1``), resized to ``size``
    (an int for square images, or [height, width]); classes are the folder names, sorted. Without a
    test/ folder ``test_fraction`` of train is held out, stratified. ``streaming``: decode images per
    batch in ``workers`` processes instead of holding them all in memory (auto: above 2 GiB decoded).
    """
    if root is None:
        raise KdlabError("data.root: dataset 'image_folder' reads root/<class>/<image> but data.root is not set; "
                         "set data.root to the folder holding the class folders")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KdlabError(f"data.root: folder {root} does not exist; point data.root at the folder of class folders")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    split_layout = (root / "train").is_dir()
    train_dir = root / "train" if split_layout else root
    classes = [p.name for p in class_folders(train_dir)]
    if len(classes) < 2:
        what = f"only the class folder {classes[0]!r}" if classes else "no class subfolders"
        raise KdlabError(f"{train_dir}: {what}; expected {train_dir}/<class>/<image>.png with at least 2 classes "
                         "(as torchvision's ImageFolder)")
    mode = "RGB" if channels == 3 else "L"
    listed = {"train": _list_split(train_dir, classes)}
    for split in ("val", "test"):
        if split_layout and (root / split).is_dir():
            listed[split] = _list_split(root / split, classes)
    images = sum(len(files) for files, _ in listed.values())
    lazy = should_stream(streaming, images=images, sample_shape=(channels, *hw))
    arrays = {split: (_load(files, mode=mode, size=hw, lazy=lazy, workers=workers), labels)
              for split, (files, labels) in listed.items()}
    x_train, y_train = arrays["train"]
    val = arrays.get("val")
    if "test" in arrays:
        x_test, y_test = arrays["test"]
    else:
        x_train, y_train, x_test, y_test = carve_test(x_train, y_train, test_fraction, source=str(train_dir))
    return DatasetArrays(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=len(classes),
                         x_val=None if val is None else val[0], y_val=None if val is None else val[1])
