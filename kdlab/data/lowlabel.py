"""The low-label regime: keep a few labels per class, hide the rest as -1.

Semi-supervised robust training (SRST-AWR, method ``awr_kd``) sees the whole
training set but only ``labels_per_class`` labels of each class, as in the
paper's CIFAR-10 setting of 4,000 labels (400 per class). A hidden label is -1
in the training split's label tensor; methods that use labels treat -1 rows as
unlabelled.
"""
from __future__ import annotations

import numbers

import torch

from kdlab.errors import KdlabError

HIDDEN = -1


def keep_labels_per_class(labels: torch.Tensor, labels_per_class: int, seed: int, *,
                          num_classes: int | None = None) -> torch.Tensor:
    """A copy of ``labels`` with all but ``labels_per_class`` labels of each class set to -1.

    labels: integer ``(N,)`` class indices ≥ 0 (any device; the input is not modified).
    Which samples keep their label is uniformly random within each class and a pure
    function of ``seed`` (a CPU ``torch.Generator``; classes are drawn in ascending
    order), so the same seed always hides the same labels. ``num_classes``, when
    given, also checks the classes absent from ``labels`` (they have 0 samples).
    Raises ``KdlabError`` if a class has fewer samples than ``labels_per_class``.
    Returns int64 labels on the input's device.
    """
    if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, numbers.Integral) \
            or labels_per_class < 1:
        raise KdlabError(f"data.labels_per_class: must be an integer >= 1, got {labels_per_class!r}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        raise KdlabError("data.labels_per_class: expected a 1-D integer tensor of class labels")
    cpu = labels.detach().to("cpu", torch.int64)
    if cpu.numel() and int(cpu.min()) < 0:
        raise KdlabError("data.labels_per_class: the labels already contain negative values (hidden labels?); "
                         "apply labels_per_class to fully labelled data")
    classes = torch.unique(cpu).tolist()
    if num_classes is not None:
        classes = sorted(set(classes) | set(range(num_classes)))
    generator = torch.Generator().manual_seed(int(seed))
    keep = torch.zeros(cpu.shape[0], dtype=torch.bool)
    for c in classes:
        members = torch.nonzero(cpu == c).flatten()
        if members.numel() < labels_per_class:
            raise KdlabError(f"data.labels_per_class: class {c} has {members.numel()} training samples, fewer than "
                             f"the {labels_per_class} asked; lower labels_per_class to at most {members.numel()}")
        chosen = members[torch.randperm(members.numel(), generator=generator)[:labels_per_class]]
        keep[chosen] = True
    out = torch.where(keep, cpu, torch.full_like(cpu, HIDDEN))
    return out.to(labels.device)


def low_label_splits(splits, labels_per_class: int | None, seed: int, *, drop_unlabelled: bool = False):
    """``splits`` with only ``labels_per_class`` train labels per class (``data.labels_per_class``).

    The train split's other labels become -1 (:func:`keep_labels_per_class`, chosen by ``seed`` =
    ``data.split_seed``), or, with ``drop_unlabelled``, those samples are removed and the input
    statistics (``mean``/``std``, what the models normalise with) are recomputed on the kept ones.
    Val and test keep every label. ``labels_per_class=None`` returns ``splits`` unchanged.
    """
    import dataclasses

    from kdlab.data.stats import channel_mean_std

    if labels_per_class is None:
        return splits
    if splits.sequence is not None:
        raise KdlabError("data.labels_per_class: applies to classification datasets, not to sequence tasks")
    x_train, y_train = splits.train
    hidden = keep_labels_per_class(y_train, labels_per_class, seed, num_classes=splits.num_classes)
    if not drop_unlabelled:
        return dataclasses.replace(splits, train=(x_train, hidden))
    kept = hidden != HIDDEN
    x_kept, y_kept = x_train[kept], hidden[kept]
    mean, std = channel_mean_std(x_kept)
    return dataclasses.replace(splits, train=(x_kept, y_kept), mean=mean, std=std)
