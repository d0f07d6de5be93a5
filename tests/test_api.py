"""kdlab.distill's data forms (issue 17 item 14: a tuple (x, y) gets a val and a test split)."""
from __future__ import annotations

import pytest
import torch

import kdlab
from kdlab.distill_inputs import as_splits as _as_splits
from kdlab.errors import KdlabError


def _data(n=200):
    x = torch.rand(n, 6)
    return x, (x[:, 0] > x[:, 1]).long()


def test_a_tuple_gets_stratified_val_and_test_splits_that_partition_it():
    x, y = _data()
    splits = _as_splits((x, y), val_fraction=0.1, test_fraction=0.2, split_seed=3)
    sizes = [len(part[0]) for part in (splits.train, splits.val, splits.test)]
    assert sizes == [144, 16, 40]
    rows = torch.cat([splits.train[0], splits.val[0], splits.test[0]])
    assert torch.equal(rows.sort(dim=0).values, x.sort(dim=0).values)  # every sample once
    again = _as_splits((x, y), val_fraction=0.1, test_fraction=0.2, split_seed=3)
    assert torch.equal(again.test[0], splits.test[0])  # seeded
    assert not torch.equal(_as_splits((x, y), val_fraction=0.1, test_fraction=0.2, split_seed=4).test[0],
                           splits.test[0])


def test_distill_on_a_tuple_reports_test_metrics():
    x, y = _data()
    metrics = kdlab.distill(torch.nn.Linear(6, 2), None, (x, y), method="scratch", epochs=1, device="cpu")
    assert "test/acc" in metrics and "val/acc" in metrics


def test_a_dict_keeps_exactly_its_splits():
    x, y = _data()
    splits = _as_splits({"train": (x, y)}, val_fraction=0.1, test_fraction=0.2, split_seed=0)
    assert len(splits.test[0]) == 0 and len(splits.val[0]) == 20


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_a_bad_test_fraction_is_one_line(fraction):
    with pytest.raises(KdlabError, match="test_fraction"):
        _as_splits(_data(), val_fraction=0.1, test_fraction=fraction, split_seed=0)
