"""Teacher-output cache: hits equal the live teacher, changes invalidate, augmented views by seed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.data.resident import ResidentData, augment_seed
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.engine.teacher_cache import TeacherCache, topk_compress, topk_probabilities, view_name
from kdlab.errors import KdlabError


def _splits(tmp_path, shape=(1, 12)):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": shape, "num_train": 120, "num_test": 30,
                                      "separation": 2.0}, root=None, cache_dir=tmp_path / "data",
                        val_fraction=0.2, split_seed=0)


def _teacher(splits, seed=1, name="mlp", options=None):
    torch.manual_seed(seed)
    return build_model(name, options or {"width": 16}, splits).eval()


def _live(teacher):
    def run(inputs):
        with torch.no_grad():
            return teacher(inputs), {}
    return run


def _open(tmp_path, teacher, inputs, transform="none"):
    return TeacherCache(tmp_path / "tc", teacher=teacher, inputs=inputs, transform=transform, precision="fp32/same")


def test_hit_equals_live_teacher_within_float16(tmp_path):
    splits = _splits(tmp_path)
    x = splits.train[0]
    teacher = _teacher(splits)
    cache = _open(tmp_path, teacher, x)
    render = lambda index: x[index]
    built, hit = cache.get("plain", rows=len(x), render=render, run_teacher=_live(teacher), batch_size=32)
    assert not hit and built.logits.dtype == torch.float16
    again, hit = _open(tmp_path, teacher, x).get("plain", rows=len(x), render=render, run_teacher=_live(teacher))
    assert hit
    with torch.no_grad():
        live = teacher(x)
    # float16 rounding: relative error at most 2^-11 per value (plus subnormal slack near 0)
    assert torch.allclose(again.logits.float(), live, rtol=2 ** -11, atol=1e-4)
    assert np.load(cache.path / "plain" / "logits.npy", mmap_mode="r").dtype == np.float16  # on disk as float16


def test_changed_teacher_data_or_transform_gets_another_key(tmp_path):
    splits = _splits(tmp_path)
    x = splits.train[0]
    teacher = _teacher(splits)
    base = _open(tmp_path, teacher, x).key
    other_teacher = _teacher(splits, seed=2)
    assert _open(tmp_path, other_teacher, x).key != base
    assert _open(tmp_path, teacher, x + 0.0 * x).key == base  # same content, same key
    changed = x.clone()
    changed[0, 0, 0] += 0.01
    assert _open(tmp_path, teacher, changed).key != base
    assert _open(tmp_path, teacher, x, transform="crop_flip/per_sample").key != base


def test_folder_of_another_teacher_is_refused(tmp_path):
    import json

    splits = _splits(tmp_path)
    x = splits.train[0]
    cache = _open(tmp_path, _teacher(splits), x)
    meta = json.loads((cache.path / "meta.json").read_text())
    meta["teacher"] = "0" * 32  # the folder now claims another teacher's weights (e.g. copied by hand)
    (cache.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KdlabError, match="built for other teacher weights"):
        _open(tmp_path, _teacher(splits), x)


def test_stale_cache_is_refused_by_verification(tmp_path):
    splits = _splits(tmp_path)
    x = splits.train[0]
    teacher = _teacher(splits)
    cache = _open(tmp_path, teacher, x)
    render = lambda index: x[index]
    cache.get("plain", rows=len(x), render=render, run_teacher=_live(teacher))
    stored = np.load(cache.path / "plain" / "logits.npy", mmap_mode="r+")
    stored[:] += np.float16(0.5)  # the file no longer holds this teacher's outputs
    stored.flush()
    del stored
    with pytest.raises(KdlabError, match="stale"):
        _open(tmp_path, teacher, x).get("plain", rows=len(x), render=render, run_teacher=_live(teacher))


def test_augmented_views_are_keyed_by_seed(tmp_path):
    splits = _splits(tmp_path, shape=(1, 8, 8))
    x, y = splits.train
    teacher = _teacher(splits, name="mlp")
    data = ResidentData(x, y, device=torch.device("cpu"), batch_size=16, augment="crop_flip", per_sample=True, seed=3)
    cache = _open(tmp_path, teacher, x, transform="crop_flip/per_sample")
    views = {}
    for epoch in (0, 1):
        data.start_epoch(epoch, torch.Generator().manual_seed(epoch))
        seed = data.view_seed
        assert seed == augment_seed(3, epoch)
        views[seed], _ = cache.get(view_name(seed), rows=len(x), render=lambda i, s=seed: data.render(i, s),
                                   run_teacher=_live(teacher))
        # The training batches of this epoch are exactly the rows of this view.
        index, inputs, _ = data.batch(0)
        assert torch.equal(inputs, data.render(index, seed))
        with torch.no_grad():
            expected = teacher(inputs)
        assert torch.allclose(views[seed].logits[index].float(), expected, rtol=2 ** -11, atol=1e-4)
    first, second = (views[augment_seed(3, e)] for e in (0, 1))
    assert not torch.allclose(first.logits.float(), second.logits.float(), atol=1e-3)  # different views differ
    reopened = _open(tmp_path, teacher, x, transform="crop_flip/per_sample").load(view_name(augment_seed(3, 0)))
    assert torch.equal(reopened.logits, first.logits)


def test_topk_keeps_top_probabilities_and_rest_mass():
    torch.manual_seed(0)
    logits = torch.randn(5, 50, dtype=torch.float64) * 3
    values, indices, rest = topk_compress(logits, 8)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32 and values.shape == (5, 8)
    reference = torch.softmax(logits, -1)  # float64
    top = reference.topk(8, -1)
    assert torch.allclose(rest.double(), 1 - top.values.sum(-1), atol=1e-6)
    probs = topk_probabilities(values, indices, rest, 50)
    assert torch.allclose(probs.sum(-1), torch.ones(5, dtype=torch.float32), atol=1e-5)
    kept = probs.gather(-1, top.indices)
    assert torch.allclose(kept.double(), top.values, atol=2e-3)  # float16 logits
    others = torch.ones_like(probs, dtype=torch.bool).scatter(-1, top.indices, False)
    assert torch.allclose(probs[others].view(5, 42), (rest / 42)[:, None].expand(5, 42))
    full = topk_probabilities(*topk_compress(logits, 50), 50)  # k = V: the softmax itself
    assert torch.allclose(full.double(), reference, atol=2e-3)
    with pytest.raises(KdlabError, match="k must be"):
        topk_compress(logits, 51)


def _kd(student, teacher):
    return build_method(MethodConfig("kd", {"temperature": 3.0, "alpha": 0.7}), student=student, teacher=teacher)


def test_fit_with_cache_matches_live_teacher_and_hits_second_time(tmp_path):
    splits = _splits(tmp_path)
    teacher = _teacher(splits)
    train = TrainConfig(epochs=2, batch_size=32, lr=0.01, device="cpu", eval_every=5)
    results, weights = {}, {}
    for arm, cached in (("live", False), ("cached", True), ("hit", True)):
        torch.manual_seed(0)
        student = build_model("mlp", {"width": 8}, splits)
        losses = []
        results[arm] = fit(student=student, method=_kd(student, teacher), teacher=teacher, splits=splits,
                           train=TrainConfig(**{**train.__dict__, "teacher_cache": cached}), seed=0,
                           teacher_cache_dir=tmp_path / "tc", on_epoch=lambda e, m: losses.append(m["train/loss"]))
        weights[arm] = torch.cat([p.flatten() for p in student.parameters()])
        results[arm] = losses
    assert len(list((tmp_path / "tc").iterdir())) == 1  # one teacher, one data set, one transform: one key
    assert results["cached"] == pytest.approx(results["live"], rel=1e-3)  # float16 teacher logits
    assert torch.allclose(weights["cached"], weights["live"], atol=1e-3)
    assert torch.equal(weights["hit"], weights["cached"])  # the hit serves the very same values


@pytest.mark.parametrize("name", ["ard", "dfad", "gkd"])
def test_methods_that_make_teacher_inputs_refuse_the_cache(tmp_path, name):
    from kdlab import registry

    assert not registry.get("method", name).can_cache_teacher()
    assert registry.get("method", "kd").can_cache_teacher() and registry.get("method", "distill").can_cache_teacher()
    assert not registry.get("method", "route_constrained").can_cache_teacher()


def test_fit_refuses_cache_for_adversarial_method(tmp_path):
    splits = _splits(tmp_path)
    teacher = _teacher(splits)
    torch.manual_seed(0)
    student = build_model("mlp", {"width": 8}, splits)
    method = build_method(MethodConfig("ard", {}), student=student, teacher=teacher,
                          input_shape=tuple(splits.input_shape))
    with pytest.raises(KdlabError, match="train.teacher_cache: method ARD"):
        fit(student=student, method=method, teacher=teacher, splits=splits,
            train=TrainConfig(epochs=1, device="cpu", teacher_cache=True), seed=0, teacher_cache_dir=tmp_path)


def test_second_builder_of_a_view_keeps_the_first(tmp_path):
    splits = _splits(tmp_path)
    x = splits.train[0]
    teacher = _teacher(splits)
    first = _open(tmp_path, teacher, x).build("plain", rows=len(x), render=lambda i: x[i], run_teacher=_live(teacher))
    # Another process that missed the view meanwhile builds it too: its copy is dropped, the view stays whole.
    second = _open(tmp_path, teacher, x).build("plain", rows=len(x), render=lambda i: x[i], run_teacher=_live(teacher))
    assert torch.equal(first.logits, second.logits)
    assert sorted(p.name for p in (_open(tmp_path, teacher, x).path).iterdir()) == ["meta.json", "plain"]


# --------------------------------------------------------------------------- integrity (issue 17 item 1)


def _built(tmp_path, num_train=900):
    """A plain view of 720 train rows (900 × (1 − 0.2 validation)), built once."""
    splits = build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": num_train,
                                        "num_test": 30, "separation": 2.0}, root=None, cache_dir=tmp_path / "data",
                          val_fraction=0.2, split_seed=0)
    x = splits.train[0]
    teacher = _teacher(splits)
    cache = _open(tmp_path, teacher, x)
    cache.get("plain", rows=len(x), render=lambda i: x[i], run_teacher=_live(teacher))
    reuse = lambda: _open(tmp_path, teacher, x).get("plain", rows=len(x), render=lambda i: x[i],  # noqa: E731
                                                   run_teacher=_live(teacher),
                                                   generator=torch.Generator().manual_seed(0))
    return cache, x, teacher, reuse


def test_changing_every_row_but_the_checked_ones_is_refused(tmp_path):
    cache, x, teacher, reuse = _built(tmp_path)
    assert len(x) == 720
    checked = torch.randperm(720, generator=torch.Generator().manual_seed(0))[:16]  # the rows verify re-runs
    stored = np.load(cache.path / "plain" / "logits.npy", mmap_mode="r+")
    others = np.ones(720, dtype=bool)
    others[checked.numpy()] = False
    assert others.sum() == 704
    stored[others] = stored[others][:, ::-1]  # 704 rows now rank the classes backwards
    stored.flush()
    del stored
    from kdlab.engine.teacher_cache import verify

    # The live spot-check alone passes (the reproduction: accepted, agreement 0.07 instead of 0.59) ...
    verify(cache.load("plain"), render=lambda i: x[i], run_teacher=_live(teacher), taps=(), path=cache.path,
           generator=torch.Generator().manual_seed(0))
    # ... the content hash recorded at build time does not.
    with pytest.raises(KdlabError, match=r"logits.npy: changed since it was built \(its SHA-256 differs"):
        reuse()


def _damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "object dtype":
        np.save(path, np.array([{"a": 1}] * 720, dtype=object), allow_pickle=True)
    elif how == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" + b"\x00" * (path.stat().st_size - 14))
    elif how == "float32":
        np.save(path, np.load(path).astype(np.float32)[:, : np.load(path).shape[1] // 2])
    elif how == "unreadable":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize("how", ["truncated", "object dtype", "garbage", "float32", "unreadable"])
def test_a_damaged_array_is_refused_in_one_line(tmp_path, how):
    cache, _, _, reuse = _built(tmp_path, num_train=150)
    _damage(cache.path / "plain" / "logits.npy", how)
    with pytest.raises(KdlabError) as error:
        reuse()
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "logits.npy" in message
    assert "delete the folder" in message and "train.teacher_cache: false" in message


GARBAGE = [("meta.json", "{not json"), ("meta.json", "[1, 2]"), ("meta.json", "\udcff"), ("plain/done.json", "{"),
           ("plain/done.json", "[]"), ("plain/done.json", '{"rows": 120, "files": {"logits.npy": 3}}'),
           ("plain/done.json", '{"rows": 120}')]


@pytest.mark.parametrize("file, text", GARBAGE)
def test_a_garbage_meta_or_done_file_is_refused_in_one_line(tmp_path, file, text):
    # '{"rows": 120}' is what format 1 wrote (no hashes): refused rather than trusted unchecked.
    cache, _, _, reuse = _built(tmp_path, num_train=150)
    (cache.path / file).write_text(text, errors="surrogateescape")
    with pytest.raises(KdlabError) as error:
        reuse()
    message = str(error.value)
    assert len(message.splitlines()) == 1 and file.split("/")[-1] in message and "delete the folder" in message
