"""The Python entry points: ``kdlab.distill`` for any module pair, ``kdlab.run`` for a config."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab import registry
from kdlab.config import (ExperimentConfig, TrainConfig, load_experiment, parse_experiment, parse_method,
                          parse_train, to_dict)
from kdlab.data import Splits, make_splits
from kdlab.data.base import DatasetArrays
from kdlab.data.stratify import stratified_holdout
from kdlab.engine.build import build_method, check_class_counts
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError


def _as_splits(data: Any, *, val_fraction: float, test_fraction: float, split_seed: int) -> Splits:
    """Accept ``Splits``, ``{"train": (x, y), "val": ..., "test": ...}`` or ``(x, y)``.

    A tuple gets a stratified test split (``test_fraction``) and then a val split (``val_fraction``)
    carved off, so ``distill`` returns ``test/*`` metrics as for a dataset; a dict keeps exactly the
    splits it names (no test metrics without ``"test"``).
    """
    if isinstance(data, Splits):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if not 0.0 <= test_fraction < 1.0:
            raise KdlabError(f"distill: test_fraction must be in [0, 1), got {test_fraction!r}; use e.g. 0.1")
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) < 2:
            raise KdlabError("data: a tuple (x, y) needs a 1-D label tensor y with at least 2 samples")
        kept, held = stratified_holdout(y.long().cpu(), fraction=test_fraction,
                                        generator=torch.Generator().manual_seed(split_seed + 1))
        data = {"train": (x[kept], y[kept]), "test": (x[held], y[held])}
    if isinstance(data, dict):
        if "train" not in data:
            raise KdlabError("data: a dict must have a 'train' entry (x, y), and optionally 'val' and 'test'")
        x, y = data["train"]
        test = data.get("test", (x[:0], y[:0]))
        arrays = DatasetArrays(x_train=x, y_train=y, x_test=test[0], y_test=test[1],
                               num_classes=int(torch.cat([y, test[1]]).max()) + 1)
        splits = make_splits("tensors", arrays, val_fraction=0.0 if "val" in data else val_fraction,
                             split_seed=split_seed)
        if "val" in data:
            splits.val = tuple(data["val"])
        return splits
    raise KdlabError("data: pass kdlab Splits, a dict {'train': (x, y), 'val': ..., 'test': ...} or a tuple (x, y)")


def distill(student: nn.Module, teacher: nn.Module | None, data: Any, method: str = "kd", *,
            seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
            run_dir: str | Path | None = None, **options) -> dict[str, float]:
    """Distil ``teacher`` into ``student`` (in place) with a registered method; return val/test metrics.

    ``data``: a tuple ``(x, y)`` (a stratified ``test_fraction`` and then ``val_fraction`` of it are held
    out, seeded by ``seed``), a dict ``{"train": (x, y), "val": ..., "test": ...}`` (val carved off
    train when absent; test metrics only with ``"test"``) or kdlab ``Splits``.

    ``options`` are the method's hyperparameters (e.g. ``temperature``, ``alpha``)
    and ``TrainConfig`` fields (``epochs``, ``lr``, ``optimizer``, ...). Inputs
    should be in [0, 1] for kdlab's attacks; any ``nn.Module`` returning logits works.
    """
    method_cls = registry.get("method", method, key="method")
    method_fields = {f.name for f in dataclasses.fields(method_cls.Hparams)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(options) - method_fields - train_fields
    if unknown:
        raise KdlabError(f"distill: unknown option(s) {sorted(unknown)}; method {method!r} takes "
                         f"{sorted(method_fields) or 'no options'}, training takes {sorted(train_fields)}")
    method_cfg = parse_method(method, {k: v for k, v in options.items() if k in method_fields})
    train = parse_train({k: v for k, v in options.items() if k in train_fields})
    splits = _as_splits(data, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=seed)
    torch.manual_seed(seed)
    built = build_method(method_cfg, student=student, teacher=teacher,
                         input_shape=tuple(splits.train[0].shape[1:]), train_size=len(splits.train[0]),
                         sequence=splits.sequence)
    check_class_counts(student, teacher, splits)
    result = fit(student=student, method=built, teacher=teacher, splits=splits, train=train, seed=seed,
                 run_dir=Path(run_dir) if run_dir is not None else None)
    return result.final


def run(config: ExperimentConfig | dict | str | Path | None = None, *, workspace: str | Path = "kdlab-workspace",
        overrides: list[str] | None = None, seeds: list[int] | None = None):
    """Run an experiment from a config object, a dict, a YAML path or (None) the quickstart.

    Returns the store records of its runs (finished, failed or skipped-as-finished).
    """
    from kdlab.study.runner import Runner

    if isinstance(config, ExperimentConfig):
        raw = to_dict(config)
        raw["teacher"] = raw.get("teacher")
        base, specs = parse_experiment(raw)
    elif isinstance(config, dict):
        from kdlab.config import apply_overrides

        raw = apply_overrides(config, overrides or [])
        if seeds is not None:
            raw["seeds"] = list(seeds)
        base, specs = parse_experiment(raw)
    else:
        base, specs = load_experiment(config, overrides, seeds)
    runner = Runner(workspace)
    runner.run(base, specs)
    return [record for spec in specs for record in runner.store.find(spec.run_id)]
