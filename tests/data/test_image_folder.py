"""image_folder: PNG/JPEG class folders written by the test with Pillow, in torchvision's ImageFolder layout."""
import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.data.base import make_splits
from kdlab.data.image_folder import image_folder
from kdlab.errors import KdlabError


def _write(folder, name, color, *, size=(6, 4), fmt="PNG"):
    """A solid image of ``color`` (RGB) and ``size`` (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(folder / name, format=fmt)


def _flat(root, per_class=5):
    for i in range(per_class):
        _write(root / "cat", f"{i}.png", (255, 0, 0))
        _write(root / "ant", f"{i}.jpg", (0, 0, 255), fmt="JPEG")
        _write(root / "bee", f"{i}.PNG", (0, 255, 0), size=(20, 30))
    return root


def test_flat_layout_sorted_classes_resize_and_carved_test(tmp_path):
    root = _flat(tmp_path / "imgs")
    (root / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    (root / "cat" / ".hidden.txt").write_text("x")
    data = image_folder(root=root, cache_dir=tmp_path, size=8, test_fraction=0.2)
    assert data.num_classes == 3
    assert data.x_train.shape == (12, 3, 8, 8) and data.x_test.shape == (3, 3, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.x_val is None
    assert sorted(data.y_test.tolist()) == [0, 1, 2]  # stratified: one of each
    # Classes sorted by name: ant=0 (blue), bee=1 (green), cat=2 (red); a solid image stays solid when resized.
    for x, y in zip(data.x_train, data.y_train):
        channel = {0: 2, 1: 1, 2: 0}[int(y)]
        assert float(x[channel].mean()) > 0.95 and float(x.sum(0).mean()) < 1.1
    again = image_folder(root=root, cache_dir=tmp_path, size=8, test_fraction=0.2)
    assert torch.equal(again.x_test, data.x_test)  # the carved test split is fixed


def test_split_layout_with_val_and_test_and_grayscale(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        for i in range(count):
            _write(tmp_path / split / "a", f"{i}.png", (10, 10, 10))
            if split != "test" or i == 0:
                _write(tmp_path / split / "b", f"{i}.png", (250, 250, 250))
    data = image_folder(root=tmp_path, cache_dir=tmp_path, size=[5, 7], channels=1)
    assert data.x_train.shape == (8, 1, 5, 7) and data.x_val.shape == (4, 1, 5, 7) and data.x_test.shape == (4, 1, 5, 7)
    assert data.y_test.tolist() == [0, 0, 0, 1]
    splits = make_splits("image_folder", data, val_fraction=0.1, split_seed=0)
    assert len(splits.train[0]) == 8 and torch.equal(splits.val[0], data.x_val)  # its val is kept, none carved


def test_resizing_is_bilinear_from_the_real_pixels(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    data = image_folder(root=tmp_path, cache_dir=tmp_path, size=[4, 6], test_fraction=0.5)
    assert torch.equal(data.x_train[0], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("make, message", [
    (lambda r: (r / "a.png").write_bytes(b""), "no class subfolders; expected .*/<class>/<image>.png"),
    (lambda r: _write(r / "only", "0.png", (0, 0, 0)), "only the class folder 'only'"),
    (lambda r: (_flat(r), (r / "cat" / "notes.txt").write_text("hi")), r"cat/notes.txt: not an image file \(.txt\)"),
    (lambda r: (_flat(r), (r / "ant" / "9.png").write_bytes(b"\x89PNG garbage")), r"ant/9.png: unreadable image"),
    (lambda r: (_flat(r), (r / "empty").mkdir()), "empty: class folder holds no images"),
])
def test_bad_folders_are_one_line_naming_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(KdlabError, match=message) as error:
        image_folder(root=tmp_path, cache_dir=tmp_path)
    assert "\n" not in str(error.value)


def test_test_folder_with_an_unknown_class(tmp_path):
    _flat(tmp_path / "train")
    _write(tmp_path / "test" / "dog", "0.png", (0, 0, 0))
    with pytest.raises(KdlabError, match="test/dog: class folder not in the train classes"):
        image_folder(root=tmp_path, cache_dir=tmp_path)


def test_root_missing_or_unset(tmp_path):
    with pytest.raises(KdlabError, match="data.root: dataset 'image_folder' .* data.root is not set"):
        image_folder(root=None, cache_dir=tmp_path)
    with pytest.raises(KdlabError, match="data.root: folder .*nope does not exist"):
        image_folder(root=tmp_path / "nope", cache_dir=tmp_path)
