"""A user's .npz file and an image folder, each written here in its real format, run end to end through the
CLI (`kdlab run`) and through `kdlab.distill` (issue 20, "Must show")."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import kdlab
from kdlab.cli import main
from kdlab.distill_inputs import as_splits
from kdlab.store import Store

PIL = pytest.importorskip("PIL.Image")


def _npz(folder):
    """8×8 RGB uint8 images saved channels-last (as most image arrays are): class 1 is brighter on the left."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 8, 8, 3), dtype=np.uint8)
    y = (x[:, :, :4].mean((1, 2, 3)) > x[:, :, 4:].mean((1, 2, 3))).astype(np.int64)
    path = folder / "mine.npz"
    np.savez(path, images=x, classes=y)
    return path, x, y


def _image_folder(folder):
    """root/<class>/<n>.png: three classes of 10×12 PNGs (red, green, blue-ish with noise), read at 8×8."""
    rng = np.random.default_rng(1)
    for label, name in enumerate(["cat", "dog", "emu"]):
        (folder / name).mkdir(parents=True)
        for n in range(8):
            pixels = rng.integers(0, 90, size=(10, 12, 3), dtype=np.uint8)
            pixels[..., label] += 150
            PIL.fromarray(pixels).save(folder / name / f"{n}.png")
    (folder / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden files are skipped, as a user's folder has them
    return folder


def _net(features, classes, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def _cli(tmp_path, data):
    study = {"name": "mine", "data": data, "teacher": {"model": "mlp", "width": 16, "train": {"epochs": 1}},
             "student": {"model": "mlp", "width": 8}, "method": {"name": "kd"},
             "train": {"epochs": 1, "batch_size": 16, "device": "cpu"}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]) == 0
    store = Store(tmp_path / "ws")
    records = store.runs(experiment="mine")
    store.close()
    assert [r.status for r in records] == ["finished"] and 0.0 <= records[0].final["test/acc"] <= 1.0
    return records[0]


def test_an_npz_file_through_the_cli(tmp_path):
    _npz(tmp_path)
    record = _cli(tmp_path, {"dataset": "arrays", "root": str(tmp_path), "train": "mine.npz", "x_key": "images",
                             "y_key": "classes", "scale": 255, "channels_last": True})
    assert record.config["data"]["train"] == "mine.npz"


def test_an_image_folder_through_the_cli(tmp_path):
    _image_folder(tmp_path / "pictures")
    _cli(tmp_path, {"dataset": "image_folder", "root": str(tmp_path / "pictures"), "size": 8})


def test_an_npz_file_through_distill_by_loader_and_by_numpy(tmp_path):
    path, x, y = _npz(tmp_path)
    teacher = _net(192, 2, seed=0)
    section = {"dataset": "arrays", "train": str(path), "x_key": "images", "y_key": "classes", "scale": 255,
               "channels_last": True}
    by_loader = kdlab.distill(_net(192, 2, seed=1), teacher, section, method="kd", epochs=1, device="cpu")
    assert 0.0 <= by_loader["test/acc"] <= 1.0
    with np.load(path) as arrays:  # the user's own arrays: (N, H, W, C) uint8, moved to channels first by them
        images, classes = np.moveaxis(arrays["images"], -1, 1), arrays["classes"]
    by_numpy = kdlab.distill(_net(192, 2, seed=1), teacher, (images, classes), method="kd", scale=255, epochs=1,
                             device="cpu")
    assert 0.0 <= by_numpy["test/acc"] <= 1.0


def test_an_image_folder_through_distill(tmp_path):
    root = _image_folder(tmp_path / "pictures")
    student = _net(3 * 8 * 8, 3, seed=2)
    metrics = kdlab.distill(student, _net(3 * 8 * 8, 3, seed=3), {"dataset": "image_folder", "root": str(root),
                                                                "size": 8}, method="kd", epochs=3, device="cpu")
    assert {"val/acc", "test/acc"} <= set(metrics)
    splits = as_splits({"dataset": "image_folder", "root": str(root), "size": 8}, val_fraction=0.1,
                       test_fraction=0.2, split_seed=0)
    parts = (splits.train, splits.val, splits.test)
    assert splits.num_classes == 3 and sum(len(p[0]) for p in parts) == 24 and splits.input_shape == (3, 8, 8)
    inputs = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    # Each class is the folder whose colour channel was raised by 150: it is the brightest channel of its images.
    assert torch.equal(inputs.mean((2, 3)).argmax(1), labels)
