"""Stratified hold-out of a labelled set: the validation split and digits' test split."""
from __future__ import annotations

import torch


def holdout_size(num_samples: int, fraction: float) -> int:
    """How many of ``num_samples`` a hold-out of ``fraction`` takes.

    ``round(num_samples * fraction)``, but at least 1 when ``fraction > 0`` (a
    requested split is never silently empty) and at most ``num_samples - 1``
    (the kept part is never empty). 0 when ``fraction == 0``.
    """
    if fraction <= 0 or num_samples == 0:
        return 0
    return min(max(round(num_samples * fraction), 1), num_samples - 1)


def stratified_holdout(
    labels: torch.Tensor, *, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into ``(kept, held_out)``, holding out ``fraction`` of every class.

    labels: int64 (N,) on the CPU; generator: a CPU ``torch.Generator`` (the only
    source of randomness, so the split is a pure function of its seed).
    The total held out is ``holdout_size(N, fraction)``; it is shared among the
    classes in proportion to their counts, rounding by largest remainder (ties
    to the smaller label) so the class proportions of both parts match the
    whole as closely as integers allow. Which samples of a class are held out
    is uniformly random. Returns two sorted int64 index tensors that partition
    ``0..N-1``.
    """
    num_samples = labels.shape[0]
    total = holdout_size(num_samples, fraction)
    everything = torch.arange(num_samples)
    if total == 0:
        return everything, everything[:0]
    classes, counts = torch.unique(labels, return_counts=True)
    # Largest-remainder apportionment: quotas sum exactly to ``total``.
    exact = counts.double() * total / num_samples
    quota = exact.floor().long()
    short = total - int(quota.sum())
    by_remainder = torch.argsort(quota.double() - exact, stable=True)  # largest remainder first
    quota[by_remainder[:short]] += 1

    # A random permutation, then a stable sort by label: each class's block is
    # in random order, so its first ``quota`` members are a uniform sample.
    permutation = torch.randperm(num_samples, generator=generator)
    order = torch.argsort(labels[permutation], stable=True)
    shuffled = permutation[order]
    class_index = torch.searchsorted(classes, labels[shuffled])
    block_start = torch.cumsum(counts, 0) - counts
    rank_in_class = everything - block_start[class_index]
    held = rank_in_class < quota[class_index]
    return shuffled[~held].sort().values, shuffled[held].sort().values
