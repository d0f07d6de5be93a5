import pytest
import torch

from kdlab.data.stratify import holdout_size, stratified_holdout


def _labels(counts):
    return torch.cat([torch.full((count,), label) for label, count in enumerate(counts)])


@pytest.mark.parametrize(
    "num_samples, fraction, expected",
    [(100, 0.1, 10), (100, 0.0, 0), (10, 0.01, 1), (2, 0.9, 1), (0, 0.5, 0), (600, 0.2, 120)],
)
def test_holdout_size(num_samples, fraction, expected):
    assert holdout_size(num_samples, fraction) == expected


def test_partition_is_disjoint_sorted_and_complete():
    labels = _labels([13, 9, 21])[torch.randperm(43, generator=torch.Generator().manual_seed(5))]
    kept, held = stratified_holdout(labels, fraction=0.3, generator=torch.Generator().manual_seed(1))
    assert kept.dtype == held.dtype == torch.int64
    assert torch.equal(kept, kept.sort().values) and torch.equal(held, held.sort().values)
    assert torch.equal(torch.cat([kept, held]).sort().values, torch.arange(43))
    assert len(held) == 13


@pytest.mark.parametrize(
    "counts, fraction, expected_held",
    [
        ([50, 30, 20], 0.1, [5, 3, 2]),
        # total 10; exact shares 3.5, 3.5, 3 -> the tie for the extra one goes to the smaller label
        ([7, 7, 6], 0.5, [4, 3, 3]),
        # total 2; exact shares 1.8, 0.2 -> largest remainder
        ([9, 1], 0.2, [2, 0]),
    ],
)
def test_each_class_gives_its_share(counts, fraction, expected_held):
    labels = _labels(counts)
    _, held = stratified_holdout(labels, fraction=fraction, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(labels[held], minlength=len(counts)).tolist() == expected_held


def test_deterministic_by_generator_seed():
    labels = _labels([40, 40, 40])
    first = stratified_holdout(labels, fraction=0.25, generator=torch.Generator().manual_seed(7))
    again = stratified_holdout(labels, fraction=0.25, generator=torch.Generator().manual_seed(7))
    other = stratified_holdout(labels, fraction=0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    assert not torch.equal(first[1], other[1])


def test_choice_within_a_class_is_uniform():
    # Each of 20 samples should be held out about a quarter of the time over many seeds.
    labels = torch.zeros(20, dtype=torch.int64)
    hits = torch.zeros(20)
    for seed in range(400):
        _, held = stratified_holdout(labels, fraction=0.25, generator=torch.Generator().manual_seed(seed))
        hits[held] += 1
    frequency = hits / 400
    assert frequency.min() > 0.15 and frequency.max() < 0.35
