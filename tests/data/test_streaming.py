"""Streamed data (kdlab.data.streaming): the same batches as resident data, exact resume, image folders
decoded per item, random-resized-crop against a float64 reference of torchvision's rule, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdlab.cli import main
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data.augment import apply_params, augment_batch, draw_params, rrc_params
from kdlab.data.base import build_splits, clear_cache
from kdlab.data.resident import ResidentData
from kdlab.data.streaming import LazyImages, StreamingData, should_stream, train_data
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.engine.seed import epoch_generator
from kdlab.errors import KdlabError


def _folder(root, *, per_class=10, side=(9, 7)):
    rng = np.random.default_rng(3)
    for name, low in (("ants", 0), ("bees", 100), ("cats", 150)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(low, low + 100, (*side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _splits(root, streaming, workers=0, size=(8, 6)):
    return build_splits("image_folder", {"size": list(size), "streaming": streaming, "workers": workers},
                        root=str(root), cache_dir=root.parent / "cache", val_fraction=0.2, split_seed=0)


# ------------------------------------------------------------------ random-resized-crop against torchvision's rule

def _reference_boxes(count, height, width, seed):
    """torchvision's RandomResizedCrop.get_params, one sample at a time, on the same uniforms (float64)."""
    g = torch.Generator().manual_seed(seed)
    u_area = torch.rand(count, 10, generator=g, dtype=torch.float64)
    u_ratio = torch.rand(count, 10, generator=g, dtype=torch.float64)
    u_top = torch.rand(count, generator=g, dtype=torch.float64)
    u_left = torch.rand(count, generator=g, dtype=torch.float64)
    boxes = []
    for n in range(count):
        for t in range(10):
            area = height * width * (0.08 + 0.92 * float(u_area[n, t]))
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(u_ratio[n, t]))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                boxes.append((int(float(u_top[n]) * (height - h + 1)), int(float(u_left[n]) * (width - w + 1)), h, w))
                break
        else:
            if width / height < 3 / 4:
                w, h = width, round(width / (3 / 4))
            elif width / height > 4 / 3:
                w, h = round(height * 4 / 3), height
            else:
                w, h = width, height
            boxes.append(((height - h) // 2, (width - w) // 2, h, w))
    return boxes


@pytest.mark.parametrize("height,width", [(20, 28), (3, 40), (32, 32)])  # (3, 40): most samples fall back
def test_rrc_boxes_follow_torchvisions_rule(height, width):
    got = rrc_params(200, height=height, width=width, generator=torch.Generator().manual_seed(7))
    assert list(zip(*(t.tolist() for t in got))) == _reference_boxes(200, height, width, 7)


def test_rrc_resamples_like_interpolate_on_the_crop_then_flips():
    x = torch.rand(32, 3, 20, 28, dtype=torch.float64)
    top, left, h, w, flip = draw_params("rrc_flip", 32, shape=(3, 20, 28), generator=torch.Generator().manual_seed(1))
    assert flip.any() and (~flip).any() and (h < 20).any()
    out = apply_params("rrc_flip", x, (top, left, h, w, flip))
    for n in range(32):
        crop = x[n:n + 1, :, top[n]:top[n] + h[n], left[n]:left[n] + w[n]]
        ref = F.interpolate(crop, size=(20, 28), mode="bilinear", align_corners=False)[0]
        ref = ref.flip(-1) if flip[n] else ref
        torch.testing.assert_close(out[n], ref, rtol=0, atol=1e-12)


def test_flip_flips_half_and_augment_batch_checks_images():
    x = torch.rand(400, 1, 2, 3)
    out = augment_batch(x, kind="flip", generator=torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | flipped).all() and 150 < int(flipped.sum()) < 250
    with pytest.raises(KdlabError, match="rrc_flip needs image inputs"):
        augment_batch(torch.rand(4, 5), kind="rrc_flip", generator=torch.Generator())


# ------------------------------------------------------------------ the image folder, lazily

def test_image_folder_streams_without_decoding_and_matches_memory(tmp_path):
    root = _folder(tmp_path / "images")
    held, streamed = _splits(root, False), _splits(root, True)
    assert isinstance(streamed.train[0], LazyImages) and isinstance(held.train[0], torch.Tensor)
    assert streamed.input_shape == held.input_shape == (3, 8, 6)
    for name in ("train", "val", "test"):
        lazy, tensor = getattr(streamed, name), getattr(held, name)
        assert torch.equal(lazy[1], tensor[1])
        assert torch.equal(lazy[0][:], tensor[0])  # a slice decodes
    assert streamed.mean == pytest.approx(held.mean, abs=1e-6) and streamed.std == pytest.approx(held.std, abs=1e-6)
    assert not should_stream("auto", images=30, sample_shape=(3, 8, 6))
    assert should_stream("auto", images=2_000_000, sample_shape=(3, 224, 224))


def test_lazy_indexing_subsets_without_decoding_and_decodes_ints_and_slices(tmp_path):
    lazy = _splits(_folder(tmp_path / "images"), True).train[0]
    calls = []
    reader = lazy.reader
    lazy.reader = lambda path: calls.append(path) or reader(path)
    subset = lazy[torch.tensor([3, 0])]
    masked = lazy[torch.arange(len(lazy)) % 2 == 0]
    assert isinstance(subset, LazyImages) and isinstance(masked, LazyImages) and not calls
    assert subset.files == [lazy.files[3], lazy.files[0]] and len(masked) == math.ceil(len(lazy) / 2)
    assert torch.equal(lazy[np.int64(3)], subset[0]) and torch.equal(lazy[torch.tensor(3)], lazy[-len(lazy) + 3])
    assert lazy[2:5].shape == (3, 3, 8, 6) and lazy[:0].shape == (0, 3, 8, 6)


# ------------------------------------------------------------------ the same batches, streamed or resident

@pytest.mark.parametrize("augment,workers,per_sample", [("none", 0, False), ("crop_flip", 0, False),
                                                        ("rrc_flip", 2, False), ("flip", 1, False),
                                                        ("crop_flip", 1, True), ("rrc_flip", 0, True)])
def test_streamed_epoch_equals_resident_epoch(tmp_path, augment, workers, per_sample):
    splits = _splits(_folder(tmp_path / "images"), True, workers=workers)
    lazy, labels = splits.train
    options = dict(device="cpu", batch_size=5, augment=augment, seed=11, per_sample=per_sample)
    streamed = train_data(lazy, labels, **options)
    assert isinstance(streamed, StreamingData) and streamed.workers == workers
    resident = ResidentData(lazy[:], labels, **options)
    for epoch in (0, 3):
        streamed.start_epoch(epoch, epoch_generator(11, epoch))
        resident.start_epoch(epoch, epoch_generator(11, epoch))
        seen = []
        for i in range(math.ceil(len(labels) / 5)):
            got, want = streamed.batch(i), resident.batch(i)  # (indices, augmented inputs, labels)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            seen += got[0].tolist()
            if per_sample:  # the teacher cache's renders: the same view of the same rows
                assert torch.equal(streamed.render(got[0], streamed.view_seed), resident.render(got[0], resident.view_seed))
        assert sorted(seen) == list(range(len(labels)))


def test_streamed_batches_come_in_order(tmp_path):
    lazy, labels = _splits(_folder(tmp_path / "images"), True).train
    data = train_data(lazy, labels, device="cpu", batch_size=4)
    data.start_epoch(0, epoch_generator(0, 0))
    with pytest.raises(RuntimeError, match="in order"):
        data.batch(1)


# ------------------------------------------------------------------ kill and resume

class _Crash(Exception):
    pass


def _fit(splits, run_dir, **kwargs):
    torch.manual_seed(0)
    teacher = build_model("mlp", {"width": 16}, splits)
    student = build_model("mlp", {"width": 8, "dropout": 0.1}, splits)
    method = build_method(MethodConfig("kd", {"temperature": 2.0}), student=student, teacher=teacher)
    train = TrainConfig(epochs=3, batch_size=4, lr=0.01, checkpoint_every=1, device="cpu")
    result = fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=2,
                 run_dir=run_dir, augment="rrc_flip", **kwargs)
    return result, student


def test_teacher_cache_on_a_streamed_folder_builds_then_hits(tmp_path):
    splits = _splits(_folder(tmp_path / "images"), True)
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        teacher = build_model("mlp", {"width": 16}, splits)
        student = build_model("mlp", {"width": 8}, splits)
        method = build_method(MethodConfig("kd", {"temperature": 2.0}), student=student, teacher=teacher)
        train = TrainConfig(epochs=2, batch_size=4, lr=0.01, device="cpu", teacher_cache=True)
        runs.append(fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=2,
                        augment="rrc_flip", teacher_cache_dir=tmp_path / "cache").final)
    views = sorted(p.name for p in (tmp_path / "cache").glob("*/*") if p.is_dir())
    assert len(views) == 2 and all(v.startswith("aug-") for v in views)  # one view per epoch, built once
    assert runs[0] == runs[1]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_streamed_run_resumes_exactly_after_a_kill(tmp_path, workers):
    splits = _splits(_folder(tmp_path / "images"), True, workers=workers)
    straight, student = _fit(splits, tmp_path / "straight")

    def crash(epoch, metrics):
        if epoch == 2:
            raise _Crash

    with pytest.raises(_Crash):
        _fit(splits, tmp_path / "killed", on_epoch=crash)
    assert json.loads((tmp_path / "killed/checkpoints/latest.json").read_text())["epoch"] == 1
    resumed, student2 = _fit(splits, tmp_path / "killed")
    assert resumed.epochs_run == 2 and resumed.final == straight.final
    for (name, a), b in zip(student.state_dict().items(), student2.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ bad input, one line, exit 2

@pytest.mark.parametrize("data,message", [
    ("{dataset: mnist1d, streaming: true}", "data.streaming: dataset 'mnist1d' cannot stream"),
    ("{dataset: image_folder, root: ROOT, workers: -1}", "data.workers"),
])
def test_bad_streaming_options_exit_2(tmp_path, capsys, data, message):
    root = _folder(tmp_path / "images")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: bad\ndata: {data.replace('ROOT', str(root))}\n"
                      "student: {model: mlp}\nmethod: {name: scratch}\ntrain: {epochs: 1}\n")
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_streaming_keys_leave_run_ids_unchanged(tmp_path):
    from kdlab.runs import parse_experiment

    def run_id(**data):
        raw = {"name": "x", "data": {"dataset": "image_folder", "root": str(tmp_path), **data},
               "student": {"model": "mlp"}, "method": {"name": "scratch"}}
        return parse_experiment(raw)[1][0].run_id

    assert run_id() == run_id(streaming=True, workers=5) == run_id(streaming="auto")
    assert run_id() != run_id(size=16)


def test_per_sample_rrc_views_render_as_trained(tmp_path):
    """The teacher cache's rule: with per-sample draws a view is a function of (seed, epoch, row), so the cache
    can re-render exactly what a batch trained on (rrc_flip as crop_flip)."""
    x = torch.rand(12, 3, 10, 8)
    data = ResidentData(x, torch.zeros(12, dtype=torch.long), device="cpu", batch_size=5, augment="rrc_flip",
                        per_sample=True, seed=4)
    data.start_epoch(2, epoch_generator(4, 2))
    index, inputs, _ = data.batch(1)
    assert torch.equal(data.render(index, data.view_seed), inputs)
    other = ResidentData(x, torch.zeros(12, dtype=torch.long), device="cpu", batch_size=3, augment="rrc_flip",
                         per_sample=True, seed=4)
    other.start_epoch(2, epoch_generator(4, 2))
    assert torch.equal(other.render(index, data.view_seed), inputs)  # whatever batch the row lands in
    assert not torch.equal(data.render(index, data.view_seed + 1), inputs)


@pytest.mark.integration
def test_kdlab_run_streams_an_image_folder(tmp_path):
    root = _folder(tmp_path / "images")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: mine\ndata: {{dataset: image_folder, root: {root}, size: 8, streaming: true, "
                      "workers: 2, augment: rrc_flip}\nteacher: {model: mlp, train: {epochs: 1}}\n"
                      "student: {model: mlp}\nmethod: {name: crd, nce_k: 8}\ntrain: {epochs: 2, batch_size: 8}\n")
    args = ["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]
    assert main(args) == 0
    assert main(args) == 0  # finished: skipped, same run ids


def test_distill_resumes_a_streamed_folder_and_refuses_changed_files(tmp_path):
    import kdlab

    root = _folder(tmp_path / "images")
    splits = _splits(root, True)

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3))

    teacher = net()
    first = kdlab.distill(net(), teacher, splits, method="kd", epochs=1, device="cpu", run_dir=tmp_path / "run")
    assert kdlab.distill(net(), teacher, splits, method="kd", epochs=1, device="cpu", run_dir=tmp_path / "run") == first
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(root / "ants" / "0.png")  # same path, new pixels
    clear_cache()
    with pytest.raises(KdlabError, match="run_dir"):
        kdlab.distill(net(), teacher, _splits(root, True), method="kd", epochs=1, device="cpu", run_dir=tmp_path / "run")


def test_the_robust_subset_of_a_streamed_test_split_is_the_resident_ones(tmp_path):
    from kdlab.study.robust_eval import attack_subset

    root = _folder(tmp_path / "images")
    held, streamed = _splits(root, False), _splits(root, True)
    for subset in (3, None):
        x, y, index = attack_subset(streamed, subset, seed=1)
        x_held, y_held, index_held = attack_subset(held, subset, seed=1)
        assert isinstance(x, torch.Tensor) and torch.equal(index, index_held)
        assert torch.equal(x, x_held) and torch.equal(y, y_held)
