"""kdlab.distill on real inputs (issue 20): numpy arrays, Datasets and DataLoaders, stated scaling, models
returning dicts or Hugging Face-style outputs, the user's models left as found, run_dir never mixed."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import kdlab
from kdlab import api
from kdlab.distill_inputs import as_splits, materialise
from kdlab.errors import KdlabError


def _pixels(n=120, seed=0):
    """uint8 'images' (N, 4, 4) and labels: class 1 where the left half is brighter."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8)
    y = (x[:, :, :2].mean((1, 2)) > x[:, :, 2:].mean((1, 2))).astype(np.int64)
    return x, y


def _split(data, **kwargs):
    return as_splits(data, val_fraction=0.1, test_fraction=0.2, split_seed=0, **kwargs)


def _net(classes=2, features=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, classes))


def test_numpy_pixels_are_scaled_as_stated_and_refused_otherwise():
    x, y = _pixels()
    splits = _split((x, y), scale=255)
    assert splits.train[0].dtype == torch.float32 and splits.train[0].shape[1:] == (1, 4, 4)
    expected = torch.from_numpy(x).float()[:, None] / 255
    rows = torch.cat([splits.train[0], splits.val[0], splits.test[0]])
    assert torch.equal(rows.sort(0).values, expected.sort(0).values)
    with pytest.raises(KdlabError) as info:
        _split((x, y))
    message = str(info.value)
    assert message == "data: input values span [0, 255], not [0, 1]; pass scale=255 for 8-bit values, or " \
                      "normalize='per_channel'"


def test_normalize_per_channel_uses_the_train_range_of_each_channel():
    rng = np.random.default_rng(1)
    x = np.stack([rng.normal(0, 3, 200), rng.normal(100, 1, 200)], axis=1)  # (N, 2) features, any range
    y = (x[:, 0] > 0).astype(np.int64)
    splits = as_splits({"train": (x, y)}, val_fraction=0.0, test_fraction=0.2, split_seed=0, normalize="per_channel")
    train = splits.train[0].double()
    expected = (x - x.min(0)) / (x.max(0) - x.min(0))
    assert torch.allclose(train, torch.from_numpy(expected), atol=1e-6)
    with pytest.raises(KdlabError, match=r"^distill: normalize='minmax'; choose one of none, per_channel$"):
        _split((x, y), normalize="minmax")


class _Pairs(Dataset):
    def __init__(self, x, y, as_dict=False):
        self.x, self.y, self.as_dict = x, y, as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.as_dict:
            return {"pixel_values": self.x[i], "label": int(self.y[i])}
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("wrap", ["dataset", "dict_dataset", "tensor_dataset", "loader"])
def test_a_dataset_or_loader_gives_the_same_splits_as_its_tensors(wrap):
    x, y = _pixels(90)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    source = {"dataset": _Pairs(x, y), "dict_dataset": _Pairs(tx, ty, as_dict=True),
              "tensor_dataset": TensorDataset(tx, ty),
              "loader": DataLoader(TensorDataset(tx, ty), batch_size=32, shuffle=False)}[wrap]
    direct = _split((x, y), scale=255)
    splits = _split(source, scale=255)
    for a, b in zip(direct.train + direct.val + direct.test, splits.train + splits.val + splits.test):
        assert torch.equal(a, b)


def test_a_dataset_of_pil_images_is_read_channels_first():
    image = pytest.importorskip("PIL.Image")
    x, y = _pixels(40)
    rgb = np.stack([x, x // 2, 255 - x], axis=-1)  # (N, H, W, 3): PIL's layout
    splits = as_splits({"train": _Pairs([image.fromarray(a) for a in rgb], y), "test": _Pairs([image.fromarray(a)
                        for a in rgb[:6]], y[:6])}, val_fraction=0.0, test_fraction=0.2, split_seed=0, scale=255)
    assert torch.equal(splits.train[0] * 255, torch.from_numpy(rgb).permute(0, 3, 1, 2).float())


def test_materialising_is_refused_past_the_memory_limit_and_for_iterable_datasets():
    x, y = torch.rand(100, 3, 8, 8), torch.zeros(100, dtype=torch.long)
    with pytest.raises(KdlabError, match=r"^data: train needs about .* GiB as float32, over kdlab.distill's"):
        materialise(TensorDataset(x, y), "train", max_bytes=100 * 192 * 4 - 1)
    assert materialise(TensorDataset(x, y), "train", max_bytes=100 * 192 * 4)[0].shape == (100, 3, 8, 8)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(x, y)

    with pytest.raises(KdlabError, match="without len\\(\\) and indexing; give a map-style Dataset"):
        _split(Stream())
    assert _split(DataLoader(Stream(), batch_size=10)).num_classes == 2  # a loader is iterated once


@pytest.mark.parametrize("bad, message", [
    ((np.zeros((4, 3)), np.zeros((5,), dtype=np.int64)), "data: data has 4 inputs but 5 labels"),
    ((np.zeros((4, 3)), np.eye(4, 2)), "data: data labels have shape (4, 2); give N class indices"),
    ((np.zeros((4, 3)), np.array([0, 1, -1, 0])), "data: data labels include -1"),
    ((np.array(["a", "b"]), np.array([0, 1])), "data: data inputs are <U1, not numbers"),
    (_Pairs([torch.zeros(3), torch.zeros(4)], [0, 1]), "data: data inputs come in several shapes"),
    ((np.array([[0.5, np.nan], [0.5, 0.5], [0.1, 0.2]]), np.array([0, 1, 0])),
     "data: train inputs hold 1 NaN or infinite value(s); drop or repair those samples"),
])
def test_bad_data_is_one_line(bad, message):
    with pytest.raises(KdlabError) as info:
        _split(bad)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


class _DictOut(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.net = _net(seed=seed)

    def forward(self, x):
        return {"logits": self.net(x), "hidden": x}


@dataclass
class _HFOutput:  # the shape of a transformers ModelOutput: attributes, logits among them
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class _HFStyle(_DictOut):
    def forward(self, x):
        return _HFOutput(logits=self.net(x))


def test_models_returning_a_dict_or_an_hf_output_distil_and_come_back_unchanged():
    x, y = _pixels()
    teacher, student = _HFStyle(seed=1), _DictOut(seed=2)
    before = [p.clone() for p in student.parameters()]
    metrics = kdlab.distill(student, teacher, (x, y), method="kd", scale=255, epochs=2, device="cpu")
    assert {"test/acc", "val/acc"} <= set(metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # trained in place
    assert isinstance(student(torch.zeros(1, 16)), dict)  # the logits hook is gone
    assert not student._forward_hooks and not teacher._forward_hooks


def test_a_model_without_logits_is_one_line():
    class Pair(_DictOut):
        def forward(self, x):
            return self.net(x), x

    x, y = _pixels()
    with pytest.raises(KdlabError, match=r"^student: its forward returns tuple; kdlab needs the logits"):
        kdlab.distill(Pair(), None, (x, y), method="scratch", scale=255, epochs=1, device="cpu")


def _teacher_in_a_mixed_state():
    teacher = _net(seed=3)
    teacher.train()
    teacher[1].eval()  # one submodule in eval mode, the rest training
    teacher[3].weight.requires_grad_(False)  # one parameter frozen, the others trainable
    return teacher


def _state(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_the_teacher_is_left_as_found_after_distill_and_after_an_exception(monkeypatch):
    x, y = _pixels()
    teacher = _teacher_in_a_mixed_state()
    found = _state(teacher)
    weights = [p.clone() for p in teacher.parameters()]
    kdlab.distill(_net(), teacher, (x, y), method="kd", scale=255, epochs=1, device="cpu")
    assert _state(teacher) == found
    assert all(torch.equal(a, b) for a, b in zip(weights, teacher.parameters()))

    def failing_fit(**kwargs):
        kwargs["teacher"].eval().requires_grad_(False)  # as fit does, then something goes wrong
        raise KdlabError("boom")

    monkeypatch.setattr(api, "fit", failing_fit)
    with pytest.raises(KdlabError, match="boom"):
        kdlab.distill(_net(), teacher, (x, y), method="kd", scale=255, epochs=1, device="cpu")
    assert _state(teacher) == found and not teacher._forward_hooks


def test_a_run_dir_resumes_its_own_run_and_refuses_another(tmp_path):
    x, y = _pixels()
    teacher = _net(seed=4)
    run_dir = tmp_path / "run"
    first = kdlab.distill(_net(), teacher, (x, y), method="kd", scale=255, epochs=2, device="cpu", run_dir=run_dir)
    settings = json.loads((run_dir / "distill.json").read_text())
    assert settings["method"] == "kd" and settings["train"]["epochs"] == 2
    again = kdlab.distill(_net(seed=9), teacher, (x, y), method="kd", scale=255, epochs=2, device="cpu", run_dir=run_dir)
    assert again["test/acc"] == first["test/acc"]  # the finished run, resumed from its checkpoint
    listing = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(KdlabError) as info:
        kdlab.distill(_net(), teacher, (x, y), method="kd", scale=255, epochs=3, device="cpu", run_dir=run_dir)
    assert str(info.value) == (f"run_dir {run_dir} holds a distill run of other settings (train.epochs: 2 then, "
                               "3 now); give a new run_dir, or delete that folder to start over")
    other_teacher = _net(seed=5)
    with pytest.raises(KdlabError, match=r"other settings \(teacher.weights_sha256: "):
        kdlab.distill(_net(), other_teacher, (x, y), method="kd", scale=255, epochs=2, device="cpu", run_dir=run_dir)
    with pytest.raises(KdlabError, match=r"other settings \(data_sha256: "):
        kdlab.distill(_net(), teacher, (x[:100], y[:100]), method="kd", scale=255, epochs=2, device="cpu",
                      run_dir=run_dir)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == listing  # nothing written
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(KdlabError, match=r"holds files but no kdlab.distill run \(distill.json\); give a new"):
        kdlab.distill(_net(), teacher, (x, y), method="kd", scale=255, epochs=1, device="cpu", run_dir=foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
