"""Numerical faults: NaN/inf inputs, an exploding loss, empty splits, a batch of one, a single class.

Each ends in a one-line error or a documented, finite result (docs/reliability.md); no run is ever
finished with a NaN metric.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from kdlab import registry
from kdlab.cli import main
from kdlab.data import DatasetArrays
from kdlab.store import Store

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from reliability_helpers import TINY, write_config  # noqa: E402

FAULTY = {}  # dataset name -> DatasetArrays, served by the factory registered below


def _faulty(*, root: Optional[Path], cache_dir: Path, case: str = "clean") -> DatasetArrays:
    """Test dataset: one of the broken arrays of FAULTY."""
    return FAULTY[case]()


@pytest.fixture(autouse=True)
def faulty_dataset(monkeypatch):
    """Registered for each test only: the registry seen by other test modules stays the built-in one."""
    registry.names("dataset")  # loads the built-ins first
    monkeypatch.setitem(registry._entries["dataset"], "reliability_faulty", _faulty)


def _arrays(n_train=40, n_test=20, classes=3, poison=None) -> DatasetArrays:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n_train + n_test, 1, 8, generator=generator)
    y = torch.randint(0, classes, (n_train + n_test,), generator=generator)
    if poison is not None:
        x[3, 0, 2] = poison
    return DatasetArrays(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:],
                         num_classes=classes)


FAULTY.update({
    "nan": lambda: _arrays(poison=math.nan),
    "inf": lambda: _arrays(poison=math.inf),
    "empty_train": lambda: _arrays(n_train=0),
    "empty_test": lambda: _arrays(n_test=0),
    "one_class": lambda: _arrays(classes=1),
})


def _cli(tmp_path, cfg, *extra) -> int:
    return main(["--workspace", str(tmp_path / "ws"), "run", str(write_config(tmp_path, cfg)), "--quiet", *extra])


def _faulty_cfg(case: str, **train) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["data"] = {"dataset": "reliability_faulty", "case": case, "val_fraction": 0.0}
    cfg["train"].update(epochs=1, **train)
    return cfg


@pytest.mark.parametrize("case, message", [
    ("nan", "x_train holds 1 NaN or infinite value(s)"),
    ("inf", "x_train holds 1 NaN or infinite value(s)"),
    ("empty_train", "the train split is empty"),
    ("one_class", "num_classes must be an integer >= 2, got 1"),
])
def test_bad_data_is_a_one_line_error_before_any_run(tmp_path, capsys, case, message):
    assert _cli(tmp_path, _faulty_cfg(case)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "reliability_faulty" in err[0]
    assert Store(tmp_path / "ws").runs() == []


def test_a_single_class_synthetic_dataset_is_refused(tmp_path, capsys):
    cfg = copy.deepcopy(TINY)
    cfg["data"]["num_classes"] = 1
    assert _cli(tmp_path, cfg) == 2
    assert "data.num_classes: must be at least 2" in capsys.readouterr().err


def test_an_empty_test_split_gives_no_test_metrics_not_nan_ones(tmp_path):
    # Documented: a split with no samples is not evaluated, so its metrics are absent ("-" in tables), not NaN.
    assert _cli(tmp_path, _faulty_cfg("empty_test")) == 0
    (record,) = Store(tmp_path / "ws").runs()
    assert record.status == "finished" and not any(key.startswith("test/") for key in record.final)
    assert all(math.isfinite(value) for value in record.final.values()), record.final


def test_an_exploding_loss_fails_the_run_with_its_reason_and_no_metrics(tmp_path, capsys):
    cfg = copy.deepcopy(TINY)
    cfg["train"].update(lr=1e30, epochs=2)  # the first step sends the weights to ±inf, the next loss is NaN
    assert _cli(tmp_path, cfg) == 1  # a failed run; the study goes on with the others
    (record,) = Store(tmp_path / "ws").runs()
    assert record.status == "failed" and record.final == {}
    assert record.error.startswith("loss term 'ce' became non-finite in epoch 1")
    assert "lower train.lr" in record.error
    capsys.readouterr()
    assert main(["--workspace", str(tmp_path / "ws"), "show", record.run_id]) == 0
    assert f"error: {record.error}" in capsys.readouterr().out


def test_an_exploding_loss_in_the_python_api_raises(tmp_path):
    import kdlab
    from kdlab.errors import NonFiniteLossError

    x, y = torch.rand(40, 6), torch.randint(0, 2, (40,))
    with pytest.raises(NonFiniteLossError, match="became non-finite"):
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        # Two layers of weights near 1e30 overflow float32 logits: inf - inf = NaN in the loss.
        kdlab.distill(net, None, (x, y), method="scratch", epochs=2, lr=1e30, device="cpu")


def test_nan_inputs_in_the_python_api_are_refused(tmp_path):
    import kdlab
    from kdlab.errors import KdlabError

    x, y = torch.rand(40, 6), torch.randint(0, 2, (40,))
    x[5, 1] = math.nan
    with pytest.raises(KdlabError, match="NaN or infinite"):
        kdlab.distill(torch.nn.Linear(6, 2), None, (x, y), method="scratch", epochs=1, device="cpu")


@pytest.mark.parametrize("batch_size, num_train", [(1, 12), (4, 13)], ids=["batch-of-one", "last-batch-of-one"])
def test_a_batch_of_one_trains_through_batchnorm_to_finite_metrics(tmp_path, batch_size, num_train):
    cfg = copy.deepcopy(TINY)
    cfg["student"] = {"model": "cnn1d", "width": 4}  # BatchNorm1d over (N, C, L): L > 1 values per channel
    cfg["data"].update(num_train=num_train, val_fraction=0.0)
    cfg["train"].update(batch_size=batch_size, epochs=1)
    assert _cli(tmp_path, cfg) == 0
    (record,) = Store(tmp_path / "ws").runs()
    assert record.status == "finished"
    assert all(math.isfinite(value) for value in record.final.values()), record.final


def test_a_nan_final_metric_fails_the_run_instead_of_finishing_it(tmp_path, monkeypatch, capsys):
    from kdlab.study import runner

    real_fit = runner.fit

    def fit_whose_test_outputs_overflow(**kwargs):
        result = real_fit(**kwargs)
        result.final["test/nll"] = math.nan  # as if the student's test logits were inf
        return result

    monkeypatch.setattr(runner, "fit", fit_whose_test_outputs_overflow)
    cfg = copy.deepcopy(TINY)
    cfg["train"]["epochs"] = 1
    assert _cli(tmp_path, cfg) == 1
    (record,) = Store(tmp_path / "ws").runs()
    assert record.status == "failed" and record.final == {}
    assert record.error.startswith("final metric(s) test/nll are NaN")
