"""A user's .npz file and image folder, end to end: through kdlab.distill, and through `kdlab run` (integration)."""
import numpy as np
import pytest
import torch
from PIL import Image

import kdlab
from kdlab.cli import main
from kdlab.data.base import build_splits, clear_cache


def _npz(folder):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 128, (60, 3, 4, 4), dtype=np.uint8)
    y = np.arange(60) % 2
    x[y == 1] += 127  # class 1 is brighter: learnable in an epoch or two
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    np.savez(folder / "data.npz", x=x, y=y)


def _images(folder):
    rng = np.random.default_rng(1)
    for name, low in (("dark", 0), ("light", 128)):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(low, low + 128, (6, 6, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()  # build_splits memoises by root path; tmp paths differ, but keep the suite independent
    yield
    clear_cache()


@pytest.mark.parametrize("dataset", ["arrays", "image_folder"])
def test_distill_on_the_users_files(tmp_path, dataset):
    if dataset == "arrays":
        _npz(tmp_path)
        options = {"train": ("x.npy", "y.npy"), "scale": 255.0}
    else:
        _images(tmp_path)
        options = {"size": 4}
    splits = build_splits(dataset, options, root=str(tmp_path), cache_dir=tmp_path / "cache", val_fraction=0.1,
                          split_seed=0)
    assert splits.input_shape == (3, 4, 4) and splits.num_classes == 2

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))

    teacher = net()
    kdlab.distill(teacher, None, splits, method="scratch", epochs=2, device="cpu")
    metrics = kdlab.distill(net(), teacher, splits, method="kd", epochs=1, device="cpu")
    assert "test/acc" in metrics and "val/acc" in metrics


@pytest.mark.integration
@pytest.mark.parametrize("data", [
    "{dataset: arrays, train: data.npz, scale: 255}",
    "{dataset: arrays, train: [x.npy, y.npy], normalize: per_channel}",
    "{dataset: image_folder, size: 8, augment: crop_flip}",
])
def test_kdlab_run_on_the_users_files(tmp_path, data):
    _npz(tmp_path)
    _images(tmp_path / "images")
    root = tmp_path / "images" if "image_folder" in data else tmp_path
    config = tmp_path / "c.yaml"
    config.write_text(f"name: mine\ndata: {data}\nteacher: {{model: mlp, train: {{epochs: 1}}}}\n"
                      "student: {model: mlp}\nmethod: {name: kd}\ntrain: {epochs: 1}\n")
    args = ["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet", "--set", f"data.root={root}"]
    assert main(args) == 0
    assert main(args) == 0  # finished: skipped, same run ids


def test_bad_user_files_exit_2_from_the_cli(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3)), y=np.zeros(5, int))
    config = tmp_path / "c.yaml"
    config.write_text(f"name: bad\ndata: {{dataset: arrays, root: {tmp_path}, train: bad.npz}}\n"
                      "student: {model: mlp}\nmethod: {name: scratch}\ntrain: {epochs: 1}\n")
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"kdlab: error: {tmp_path / 'bad.npz'}: 4 inputs but 5 labels; both must have one row per sample"
