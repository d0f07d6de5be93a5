"""Images in class folders, as torchvision's ImageFolder reads them: ``root/<class>/<image>.png``.

``root`` holds either the class folders themselves, or ``train/`` (required then) beside optional
``val/`` and ``test/``, each with the same class folders. Classes are the train class folders sorted
by name (label i = the i-th name). Without ``test/`` a stratified ``test_fraction`` of train is held
out (fixed seed); without ``val/`` data.val_fraction is carved as for every dataset. Every image is
decoded with Pillow, converted to RGB (or grayscale with ``channels: 1``) and resized to ``size``,
so the whole set is held in memory as float32 (N, C, H, W) in [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import torch
from annotated_types import Ge, Interval, Le

from kdlab.data.base import DatasetArrays
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


def _read_split(folder: Path, classes: list[str], *, mode: str, size: tuple[int, int]):
    found = [p.name for p in class_folders(folder)]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise KdlabError(f"{folder / unknown[0]}: class folder not in the train classes ({', '.join(classes[:8])}"
                         f"{', ...' if len(classes) > 8 else ''}); rename it or add it to train")
    images, labels = [], []
    for label, name in enumerate(classes):
        if name not in found:
            continue  # an evaluation split may miss a class
        for path in _image_files(folder / name):
            images.append(_read(path, mode=mode, size=size))
            labels.append(label)
    if not images:
        raise KdlabError(f"{folder}: no class folders with images; put images in {folder}/<class>/")
    x = torch.from_numpy(np.stack(images)).to(torch.float32).div_(255.0)
    return x, torch.tensor(labels, dtype=torch.int64)


@register("dataset", "image_folder")
def image_folder(
    *,
    root: Path | None,
    cache_dir: Path,
    size: Union[Side, tuple[Side, Side]] = 32,
    channels: Literal[1, 3] = 3,
    test_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.2,
) -> DatasetArrays:
    """Image folder: your images in class folders (root/<class>/x.png, or root/train|val|test/<class>/...).

    Every image becomes RGB (``channels: 3``) or grayscale (``channels: 1``), resized to ``size``
    (an int for square images, or [height, width]); classes are the folder names, sorted. Without a
    test/ folder ``test_fraction`` of train is held out, stratified.
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
    x_train, y_train = _read_split(train_dir, classes, mode=mode, size=hw)
    val = _read_split(root / "val", classes, mode=mode, size=hw) if split_layout and (root / "val").is_dir() else None
    if split_layout and (root / "test").is_dir():
        x_test, y_test = _read_split(root / "test", classes, mode=mode, size=hw)
    else:
        x_train, y_train, x_test, y_test = carve_test(x_train, y_train, test_fraction, source=str(train_dir))
    return DatasetArrays(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=len(classes),
                         x_val=None if val is None else val[0], y_val=None if val is None else val[1])
