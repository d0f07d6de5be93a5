"""The Python entry points: ``kdlab.distill`` for any module pair, ``kdlab.run`` for a config."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab import registry
from kdlab.config import ConfigError, ExperimentConfig, MethodConfig, TrainConfig, check_options, parse_dataclass
from kdlab.distill_inputs import as_splits, kept_as_found, logits_hooks
from kdlab.data.streaming import LazyImages
from kdlab.engine.build import build_method, check_class_counts
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.runs import content_hash, load_experiment, parse_experiment, to_dict
from kdlab.store.files import atomic_write_text

SETTINGS_FILE = "distill.json"  # in a distill run_dir: the settings it was started with



def parse_train(raw: dict, *, path: str = "train") -> TrainConfig:
    """Validate a ``train`` mapping on its own (used by the Python API)."""
    errors: list[str] = []
    out = parse_dataclass(TrainConfig, raw, path, errors)
    if errors:
        raise ConfigError(errors)
    return out


def parse_method(name: str, options: dict) -> MethodConfig:
    """Validate a method name and its hyperparameters on their own (used by the Python API)."""
    registry.get("method", name, key="method.name")
    errors: list[str] = []
    checked = check_options("method", "method", name, options, set(), errors)
    if errors:
        raise ConfigError(errors)
    return MethodConfig(name=name, options=checked)

def _sha256_tensors(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        if isinstance(tensor, LazyImages):  # a streamed split: its files stand for its pixels
            digest.update(tensor.fingerprint().encode())
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _architecture(model: nn.Module | None) -> dict | None:
    if model is None:
        return None
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    return {"class": type(model).__qualname__, "sha256": content_hash(shapes)}


def _settings(*, method: str, method_options: dict, train: TrainConfig, seed: int, splits, student, teacher,
              scale, normalize) -> dict:
    """What a distill run in ``run_dir`` is: resuming it under other settings would mix two runs."""
    split_tensors = [t for split in (splits.train, splits.val, splits.test) for t in split]
    teacher_id = _architecture(teacher)
    if teacher is not None:
        teacher_id["weights_sha256"] = _sha256_tensors(teacher.state_dict().values())
    return {"method": method, "method_options": to_dict(method_options), "train": to_dict(train), "seed": seed,
            "scale": scale, "normalize": normalize, "data_sha256": _sha256_tensors(split_tensors),
            "student": _architecture(student), "teacher": teacher_id}


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key, "(absent)") != new.get(key, "(absent)"):
                where = f"{path}.{key}".lstrip(".")
                return _first_difference(old.get(key, "(absent)"), new.get(key, "(absent)"), where)
    return f"{path or 'settings'}: {old!r} then, {new!r} now"


def _claim_run_dir(run_dir: Path, settings: dict) -> None:
    """A new or empty ``run_dir`` is claimed (``distill.json``); one of the same settings resumes; else refused."""
    record = run_dir / SETTINGS_FILE
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError):
            old = None
        if old == json.loads(json.dumps(settings)):
            return  # the same run: fit resumes from its latest checkpoint
        what = _first_difference(old, json.loads(json.dumps(settings))) if isinstance(old, dict) else "unreadable"
        raise KdlabError(f"run_dir {run_dir} holds a distill run of other settings ({what}); give a new run_dir, "
                         "or delete that folder to start over")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise KdlabError(f"run_dir {run_dir} holds files but no kdlab.distill run ({SETTINGS_FILE}); give a new or "
                         "empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(settings, indent=1, sort_keys=True))


def distill(student: nn.Module, teacher: nn.Module | None, data: Any, method: str = "kd", *,
            seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1, scale: float | None = None,
            normalize: str = "none", run_dir: str | Path | None = None, **options) -> dict[str, float]:
    """Distil ``teacher`` into ``student`` (in place) with a registered method; return val/test metrics.

    ``data`` (kdlab.distill_inputs): ``(x, y)`` tensors or numpy arrays (a stratified ``test_fraction`` and then
    ``val_fraction`` are held out, seeded by ``seed``); ``{"train": ..., "val": ..., "test": ...}`` of pairs,
    Datasets or DataLoaders (val carved off train when absent; test metrics only with ``"test"``); a map-style
    ``Dataset`` or a ``DataLoader`` (iterated once into memory, up to 4 GiB of float32 inputs); a config's data
    section (``{"dataset": "arrays", "train": "x.npz", "scale": 255}``, ``{"dataset": "image_folder", "root":
    ...}``); or kdlab ``Splits``. Inputs of another range than [0, 1] need ``scale`` (e.g. 255: divided) or
    ``normalize="per_channel"`` (min-max over train); otherwise they are refused. Both models see the scaled
    inputs.

    Models may return logits, a dict with ``"logits"`` or an object with ``.logits``. Both come back as they
    were found (each module's train/eval mode, each parameter's ``requires_grad``, their device), also when
    this raises; the student's weights are the trained ones.

    ``run_dir`` keeps checkpoints and ``distill.json`` (the settings): calling again with the same settings
    resumes; a folder holding a run of other settings, or other files, is refused.

    ``options`` are the method's hyperparameters (e.g. ``temperature``, ``alpha``)
    and ``TrainConfig`` fields (``epochs``, ``lr``, ``optimizer``, ...).
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
    run_dir = Path(run_dir).expanduser() if run_dir is not None else None
    splits = as_splits(data, scale=scale, normalize=normalize, val_fraction=val_fraction, test_fraction=test_fraction,
                       split_seed=seed)
    with kept_as_found(student=student, teacher=teacher), logits_hooks(student=student, teacher=teacher):
        torch.manual_seed(seed)
        built = build_method(method_cfg, student=student, teacher=teacher,
                             input_shape=tuple(splits.train[0].shape[1:]), train_size=len(splits.train[0]),
                             sequence=splits.sequence)
        check_class_counts(student, teacher, splits)
        if run_dir is not None:
            _claim_run_dir(run_dir, _settings(method=method, method_options=method_cfg.options, train=train,
                                              seed=seed, splits=splits, student=student, teacher=teacher,
                                              scale=scale, normalize=normalize))
        result = fit(student=student, method=built, teacher=teacher, splits=splits, train=train, seed=seed,
                     run_dir=run_dir)
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
