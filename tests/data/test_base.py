import inspect
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab import registry
from kdlab.data import DatasetArrays, Splits, build_splits, make_splits
from kdlab.data.base import clear_cache
from kdlab.errors import KdlabError

BUILTIN = ["cifar10", "cifar100", "digits", "fashion_mnist", "mnist", "mnist1d", "synthetic"]


def _arrays(counts=(30, 20, 10), num_test=7):
    """Train sample i carries i in pixel [0, 0, 0] (so rows can be traced); channels differ in scale."""
    labels = torch.cat([torch.full((count,), label) for label, count in enumerate(counts)])
    total = len(labels)
    labels = labels[torch.randperm(total, generator=torch.Generator().manual_seed(0))]
    x_train = torch.rand(total, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    x_train[:, 1] *= 0.3
    x_train[:, 0, 0, 0] = torch.arange(total) / total
    x_test = torch.rand(num_test, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    y_test = torch.arange(num_test) % len(counts)
    return DatasetArrays(x_train=x_train, y_train=labels, x_test=x_test, y_test=y_test, num_classes=len(counts))


def _ids(inputs, total):
    return torch.round(inputs[:, 0, 0, 0] * total).long()


def test_val_is_carved_from_train_stratified_and_test_untouched():
    arrays = _arrays()
    splits = make_splits("toy", arrays, val_fraction=0.2, split_seed=3)
    assert isinstance(splits, Splits) and splits.name == "toy"
    train_ids, val_ids = _ids(splits.train[0], 60), _ids(splits.val[0], 60)
    assert len(val_ids) == 12 and len(train_ids) == 48
    assert torch.equal(torch.cat([train_ids, val_ids]).sort().values, torch.arange(60))
    # rows keep their labels and their original order
    assert torch.equal(splits.train[1], arrays.y_train[train_ids])
    assert torch.equal(splits.val[1], arrays.y_train[val_ids])
    assert torch.equal(train_ids, train_ids.sort().values)
    assert torch.bincount(splits.val[1]).tolist() == [6, 4, 2]
    assert splits.test[0] is arrays.x_test and splits.test[1] is arrays.y_test
    assert splits.num_classes == 3 and splits.input_shape == (2, 3, 3)


def test_split_is_deterministic_by_split_seed():
    arrays = _arrays()
    first = make_splits("toy", arrays, val_fraction=0.2, split_seed=3)
    again = make_splits("toy", arrays, val_fraction=0.2, split_seed=3)
    other = make_splits("toy", arrays, val_fraction=0.2, split_seed=4)
    assert torch.equal(first.val[0], again.val[0]) and torch.equal(first.train[0], again.train[0])
    assert not torch.equal(_ids(first.val[0], 60), _ids(other.val[0], 60))


def test_mean_std_are_over_the_train_split_only():
    arrays = _arrays()
    splits = make_splits("toy", arrays, val_fraction=0.3, split_seed=0)
    train = arrays.x_train.numpy().astype(np.float64)[_ids(splits.train[0], 60).numpy()]
    np.testing.assert_allclose(splits.mean, train.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(splits.std, train.std(axis=(0, 2, 3)), rtol=1e-6)
    everything = arrays.x_train.numpy().astype(np.float64)
    assert not np.allclose(splits.mean, everything.mean(axis=(0, 2, 3)), rtol=1e-6)


def test_zero_val_fraction_gives_empty_val():
    arrays = _arrays()
    splits = make_splits("toy", arrays, val_fraction=0.0, split_seed=0)
    assert splits.val[0].shape == (0, 2, 3, 3) and splits.val[1].shape == (0,)
    assert splits.val[0].dtype == torch.float32 and splits.val[1].dtype == torch.int64
    assert torch.equal(splits.train[0], arrays.x_train)


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.1", float("nan")])
def test_bad_val_fraction(bad):
    with pytest.raises(KdlabError, match=r"data.val_fraction: must be a number in \[0, 1\)"):
        make_splits("toy", _arrays(), val_fraction=bad, split_seed=0)


def test_bad_split_seed():
    with pytest.raises(KdlabError, match="data.split_seed"):
        make_splits("toy", _arrays(), val_fraction=0.1, split_seed=1.5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: setattr(a, "x_train", a.x_train.double()), "x_train must be a float32"),
        (lambda a: setattr(a, "y_test", a.y_test.int()), "y_test must be an int64"),
        (lambda a: setattr(a, "x_train", a.x_train * 2), r"not \[0, 1\]"),
        (lambda a: a.x_test.__setitem__((0, 0, 0, 0), float("nan")), "x_test holds 1 NaN or infinite value"),
        (lambda a: setattr(a, "num_classes", 2), r"labels outside \[0, 2\)"),
        (lambda a: setattr(a, "x_test", a.x_test[:, :1]), "train inputs have shape"),
        (lambda a: setattr(a, "y_train", a.y_train[:-1]), "y_train must be an int64 tensor of shape"),
    ],
)
def test_broken_factory_output_is_reported(change, message):
    arrays = _arrays()
    change(arrays)
    with pytest.raises(KdlabError, match=f"dataset 'toy': .*{message}"):
        make_splits("toy", arrays, val_fraction=0.1, split_seed=0)


# --------------------------------------------------------------------------- registry and build_splits


@pytest.fixture
def isolated_registry(monkeypatch):
    """Only kdlab.data's entries: other packages' imports must not affect these tests."""
    import kdlab.data  # noqa: F401  (registers the datasets)

    monkeypatch.setattr(registry, "_loaded", True)
    clear_cache()
    yield
    clear_cache()


def test_builtin_datasets_are_registered_with_introspectable_options(isolated_registry):
    assert set(BUILTIN) <= set(registry.names("dataset"))  # + the sequence tasks once kdlab.seq is imported
    for name in registry.names("dataset"):
        factory = registry.get("dataset", name)
        assert registry.summary("dataset", name)
        hints = typing.get_type_hints(factory)
        for parameter in inspect.signature(factory).parameters.values():
            assert parameter.kind is parameter.KEYWORD_ONLY, (name, parameter.name)
            if parameter.name not in ("root", "cache_dir"):
                assert parameter.name in hints and parameter.default is not parameter.empty, (name, parameter.name)
        assert hints["root"] == typing.Optional[Path]


def test_build_splits_memoises_and_keys_on_every_argument(isolated_registry, monkeypatch, tmp_path):
    calls = []

    def counting(*, root: Path | None, cache_dir: Path, size: int = 40) -> DatasetArrays:
        """Test dataset."""
        calls.append((root, cache_dir, size))
        return _arrays(counts=(size // 2, size - size // 2))

    monkeypatch.setitem(registry._entries["dataset"], "counting", counting)
    first = build_splits("counting", {"size": 40}, root=str(tmp_path), cache_dir=tmp_path, val_fraction=0.25, split_seed=0)
    again = build_splits("counting", {"size": 40}, root=str(tmp_path), cache_dir=tmp_path, val_fraction=0.25, split_seed=0)
    assert calls == [(tmp_path.resolve(), tmp_path.resolve(), 40)]
    assert first is not again and first.train[0] is again.train[0]
    assert len(first.val[0]) == 10

    # Another split of the same data reuses the loaded arrays; other options load again.
    other_seed = build_splits("counting", {"size": 40}, root=str(tmp_path), cache_dir=tmp_path, val_fraction=0.25, split_seed=1)
    assert len(calls) == 1 and not torch.equal(first.val[0], other_seed.val[0])
    build_splits("counting", {"size": 50}, root=str(tmp_path), cache_dir=tmp_path, val_fraction=0.25, split_seed=0)
    build_splits("counting", {}, root=None, cache_dir=tmp_path, val_fraction=0.25, split_seed=0)
    assert calls[1:] == [(tmp_path.resolve(), tmp_path.resolve(), 50), (None, tmp_path.resolve(), 40)]


def test_build_splits_with_a_builtin(isolated_registry, tmp_path):
    splits = build_splits("synthetic", {"input_shape": [3, 4, 4], "num_classes": 3}, root=None, cache_dir=tmp_path,
                          val_fraction=0.1, split_seed=0)
    assert splits.input_shape == (3, 4, 4) and splits.num_classes == 3
    assert len(splits.mean) == len(splits.std) == 3
    assert len(splits.train[0]) + len(splits.val[0]) == 512


def test_build_splits_errors(isolated_registry, tmp_path):
    with pytest.raises(KdlabError, match="data.bogus: unknown option for dataset 'synthetic'"):
        build_splits("synthetic", {"bogus": 1}, root=None, cache_dir=tmp_path, val_fraction=0.1, split_seed=0)
    with pytest.raises(KdlabError, match="data.dataset: unknown dataset 'cifar11'; did you mean cifar10"):
        build_splits("cifar11", {}, root=None, cache_dir=tmp_path, val_fraction=0.1, split_seed=0)
    with pytest.raises(KdlabError, match="data.val_fraction"):
        build_splits("synthetic", {}, root=None, cache_dir=tmp_path, val_fraction=1.5, split_seed=0)
