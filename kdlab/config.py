"""Typed experiment configuration: the schema, every default, and validation.

Resolution order: schema defaults → the YAML file → ``--set key.path=value``
overrides. The whole config (every grid point) is validated before any work,
and every problem is reported at once as ``key.path: what is wrong; the fix``.

Three sections name a registry entry and take that entry's keyword arguments as
their other keys, typed by the entry's signature:

* ``data``     — ``dataset: NAME`` + the dataset factory's options;
* ``student`` / ``teacher`` — ``model: NAME`` + the model factory's options;
* ``method``   — ``name: NAME`` + the method's hyperparameter dataclass.

When a ``grid`` switches the entry (``method.name: [scratch, kd]``), a key is
accepted if *any* entry the experiment can select takes it, and each run keeps
only the keys its own entry takes — so the ``scratch`` runs of such a grid do not
depend on ``method.temperature`` and are shared, not duplicated.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import inspect
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from kdlab import registry
from kdlab.errors import ConfigError, KdlabError

# Factory arguments that kdlab supplies itself; users cannot set them.
RESERVED_MODEL_ARGS = frozenset({"input_shape", "num_classes", "mean", "std"})
RESERVED_DATASET_ARGS = frozenset({"root", "cache_dir"})


# Field metadata of keys added after run ids were in use: left out of the resolved config (and so of the
# run id's content hash) while they hold their default, so configs that do not set them keep their ids.
OMIT_DEFAULT = {"omit_default": True}


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``3E4`` as floats (PyYAML's YAML 1.1 needs ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass
class TrainConfig:
    """Optimisation of one model (the student, or a recipe teacher)."""

    epochs: int = 30  # passes over the train split
    steps: Optional[int] = None  # if set, train for exactly this many optimiser steps instead
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 0.01  # peak learning rate (after warmup)
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "step"] = "cosine"  # per optimiser step
    warmup_epochs: float = 0.0  # linear warmup from 0, in epochs (fractions allowed)
    milestones: tuple[float, ...] = (0.5, 0.75)  # "step" schedule: fractions of training
    gamma: float = 0.1  # "step" schedule: lr factor at each milestone
    grad_clip: Optional[float] = None  # max global gradient norm; None = no clipping
    eval_every: int = 1  # validate every N epochs (and always after the last)
    checkpoint_every: int = 5  # checkpoint every N epochs (and always after the last)
    selection: Literal["last", "best_val"] = "last"  # which epoch's weights give the test metrics
    keep_epochs: tuple[int, ...] = ()  # keep the model's weights after these epochs (early-stopped teachers)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 needs CUDA
    # Speed (kdlab.engine.speed; each off by default, so existing run ids are kept):
    # the teacher's train-split outputs computed once and read from a verified on-disk cache.
    teacher_cache: bool = field(default=False, metadata=OMIT_DEFAULT)
    compile: bool = field(default=False, metadata=OMIT_DEFAULT)  # torch.compile the student and teacher forwards
    channels_last: bool = field(default=False, metadata=OMIT_DEFAULT)  # NHWC memory format (image conv nets)
    fused_optimizer: bool = field(default=False, metadata=OMIT_DEFAULT)  # fused optimiser kernel where available
    # The teacher's weights: "same" as the student (float32; autocast applies), or held in bfloat16.
    teacher_dtype: Literal["same", "bf16"] = field(default="same", metadata=OMIT_DEFAULT)


@dataclass
class DataConfig:
    """The dataset and how it is split; other keys go to the dataset factory."""

    dataset: str = "mnist1d"
    root: Optional[str] = None  # folder holding the files of file-based datasets (cifar10, mnist, ...)
    val_fraction: float = 0.1  # carved from train; the test split is never touched
    split_seed: int = 0  # fixed across run seeds so every run (and the teacher) sees the same splits
    augment: Literal["none", "crop_flip"] = "none"  # train-time augmentation of images
    # Low-label regime: keep this many train labels per class (chosen by split_seed), hide the rest as -1.
    # Val and test keep every label. Only methods that use unlabelled samples (awr_kd) accept -1 labels.
    labels_per_class: Optional[int] = field(default=None, metadata=OMIT_DEFAULT)
    # With labels_per_class: drop the unlabelled train samples instead (supervised training on the labelled ones).
    drop_unlabelled: bool = field(default=False, metadata=OMIT_DEFAULT)
    options: dict = field(default_factory=dict)  # dataset factory keyword arguments


@dataclass
class ModelConfig:
    """A network: a zoo model with its options, optionally initialised from a checkpoint.

    For the teacher, ``checkpoint`` alone is enough when the file was written by
    kdlab (it records the architecture); otherwise ``train`` is its recipe.
    """

    model: Optional[str] = None  # zoo name (or NAME-wW-dD, e.g. cnn1d-w16); may be omitted for a kdlab checkpoint
    checkpoint: Optional[str] = None  # safetensors weights to load
    train: Optional[TrainConfig] = None  # teacher only: its training recipe (defaults: TrainConfig())
    seed: int = 0  # teacher only: the seed of its training run
    epoch: Optional[int] = None  # teacher only: use the recipe's weights after this epoch (in train.keep_epochs)
    trajectory: bool = False  # teacher only: expose the recipe's kept checkpoints, in order (route_constrained)
    assistants: list = field(default_factory=list)  # teacher only: chain teacher → assistants → student (TAKD)
    members: list = field(default_factory=list)  # teacher only: several teachers (multi_teacher)
    # Teacher recipe only: the method that trains it (no teacher of its own), e.g. adversarial_training for a
    # robust teacher; null = scratch.
    method: Optional["MethodConfig"] = field(default=None, metadata=OMIT_DEFAULT)
    # Student only: fake-quantize chosen linear layers for quantization-aware training (keys of
    # kdlab.quant.QuantSpec: weight_bits, per_channel, activation_bits, activation_mode, layers); null = full precision.
    quant: Optional[dict] = field(default=None, metadata=OMIT_DEFAULT)
    # Student only: "teacher" = start from the teacher's weights (same model and options), as QAT of a fine-tuned model.
    init: Optional[Literal["teacher"]] = field(default=None, metadata=OMIT_DEFAULT)
    options: dict = field(default_factory=dict)  # model factory keyword arguments


@dataclass
class MethodConfig:
    """The distillation method; other keys are its hyperparameters."""

    name: str = "kd"
    options: dict = field(default_factory=dict)


ATTACK_NAMES = ("fgsm", "pgd", "apgd", "autoattack")  # autoattack: the standard version, extra "autoattack"


@dataclass
class AttackConfig:
    """One attack run on the test subset after training (``kdlab.robust.protocol.AttackSpec``)."""

    name: Literal["fgsm", "pgd", "apgd", "autoattack"] = "pgd"
    eps: Optional[Union[float, str]] = None  # radius in input units ([0, 1]): 0.1 or "8/255"; null = robust.eps
    norm: Literal["linf", "l2"] = "linf"
    steps: Optional[int] = None  # null: the attack's default (fgsm 1, pgd 10, apgd 100)
    step_size: Optional[float] = None  # null: the attack's default (pgd 2.5·ε/steps; apgd adaptive)
    restarts: int = 1  # random restarts; the per-sample strongest point is kept
    loss: Literal["ce", "cw"] = "ce"  # cross-entropy or Carlini–Wagner margin
    seed: int = 0  # seeds the attack's random start
    label: Optional[str] = None  # metric key (robust/<label>/acc); null: e.g. pgd_linf_0.1000


@dataclass
class RobustConfig:
    """Robust and faithfulness metrics computed on the test split after training (``robust/...`` metrics)."""

    eps: Union[float, str] = "8/255"  # default radius of the attacks and of the faithfulness metrics
    attacks: list[AttackConfig] = field(default_factory=lambda: [AttackConfig(name="pgd", steps=20)])
    eps_curve: list[Union[float, str]] = field(default_factory=list)  # robust accuracy of the first attack at these ε
    subset: Optional[int] = 500  # test samples attacked: a fixed random subset (subset_seed); null = all
    subset_seed: int = 0
    faithfulness: bool = False  # agreement, adversarial disagreement, relative calibration (needs a teacher)
    faithfulness_steps: int = 20  # PGD steps of the disagreement and relative-calibration attacks
    delta: float = 0.1  # relative-calibration tolerance: a confidence gap above δ is a violation
    sanity_checks: bool = True  # gradient-masking checks on the first attack (a few extra attack runs)
    batch_size: int = 500  # samples attacked at once


@dataclass
class MlflowConfig:
    """An MLflow tracking destination (extra ``mlflow``)."""

    uri: Optional[str] = None  # tracking URI; null: a local file store, <workspace>/mlruns
    experiment: Optional[str] = None  # MLflow experiment name; null: the kdlab experiment's name


@dataclass
class TrackingConfig:
    """Where per-epoch and final metrics are also sent (``kdlab.study.tracking``). Never changes results,
    so it is not part of a run's identity: left out of the resolved config and so of run ids."""

    tensorboard: bool = False  # event files in <run folder>/tensorboard (extra ``tensorboard``)
    mlflow: Union[bool, MlflowConfig] = False  # true or {uri: ..., experiment: ...}: log to MLflow


@dataclass
class ExperimentConfig:
    """One experiment: data, teacher, student, method, training, seeds and an optional grid."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: Optional[ModelConfig] = None  # null: no teacher (methods that need one refuse)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(model="cnn1d"))
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: dict[str, Any] = field(default_factory=dict)  # key.path -> [values] or {name: value}; product × seeds
    robust: Optional[RobustConfig] = field(default=None, metadata=OMIT_DEFAULT)  # null: no robust evaluation
    tracking: Optional[TrackingConfig] = field(default=None, metadata=OMIT_DEFAULT)  # null: store only


# Sections whose ``options`` are the keyword arguments of a registry entry.
# (section path, dataclass, key naming the entry, registry kind)
_REGISTRY_SECTIONS = {
    "data": ("dataset", "dataset"),
    "student": ("model", "model"),
    "teacher": ("model", "model"),
    "method": ("name", "method"),
}


# --------------------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (ints to floats, lists to tuples)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:  # Optional[X]: report X's own, more precise errors
            return _coerce(value, non_null[0], path, errors)
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            errors.append(f"{path}: {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return value
        if args and not (origin is tuple and len(args) == 2 and args[1] is Ellipsis) and origin is tuple:
            if len(args) != len(value):
                errors.append(f"{path}: expected {len(args)} values, got {len(value)}")
                return value
            items = [_coerce(v, a, f"{path}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return value
        value_tp = args[1] if args else Any
        return {k: _coerce(v, value_tp, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str or tp is Path:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, path, errors)
    return value  # unannotated exotic types are passed through unchanged


def _unknown_key(path: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown key{hint}; allowed keys: {', '.join(sorted(allowed)) or '(none)'}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse_dataclass(cls: type, raw: Any, path: str, errors: list[str], *, extra_ok: bool = False) -> Any:
    """Build dataclass ``cls`` from a mapping, collecting every problem into ``errors``.

    With ``extra_ok`` unknown keys are gathered into the ``options`` field, to be
    checked against the registry entry by the caller.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{path or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "options"]
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in names:
            before = len(errors)
            coerced = _coerce(value, hints[key], _join(path, key), errors)
            # A wrongly typed value is reported and replaced by the default, so the checks after
            # parsing (ranges, cross-field rules) only ever see the types they were written for.
            if len(errors) == before:
                kwargs[key] = coerced
        elif extra_ok:
            options[key] = value
        else:
            errors.append(_unknown_key(_join(path, key), key, names))
    obj = cls(**kwargs)
    if extra_ok:
        obj.options = options
    return obj


# --------------------------------------------------------------------------- registry sections


def entry_parameters(kind: str, name: str) -> dict[str, tuple[Any, Any]]:
    """The user-settable keyword arguments of a registry entry: ``{name: (annotation, default)}``.

    Methods declare a ``Hparams`` dataclass; factories (models, datasets) are
    read from their signature, without the arguments kdlab supplies itself.
    """
    obj = registry.get(kind, name)
    hparams = getattr(obj, "Hparams", None)
    if hparams is not None and dataclasses.is_dataclass(hparams):
        hints = typing.get_type_hints(hparams)
        out = {}
        for f in dataclasses.fields(hparams):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = (hints[f.name], default)
        return out
    reserved = RESERVED_MODEL_ARGS if kind == "model" else RESERVED_DATASET_ARGS if kind == "dataset" else set()
    hints = typing.get_type_hints(obj)
    out = {}
    for p in inspect.signature(obj).parameters.values():
        if p.name in reserved or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[p.name] = (hints.get(p.name, Any), p.default)
    return out


def _check_options(section: str, kind: str, name: str, options: dict, also_allowed: set[str],
                   errors: list[str]) -> dict:
    """Type-check ``options`` against entry ``name``; drop keys only other candidates take."""
    params = entry_parameters(kind, name)
    checked = {}
    for key, value in options.items():
        path = f"{section}.{key}"
        if key in params:
            checked[key] = _coerce(value, params[key][0], path, errors)
        elif key in also_allowed:
            continue  # belongs to another entry this experiment's grid can select
        elif kind == "model" and key in RESERVED_MODEL_ARGS:
            errors.append(f"{path}: set by kdlab from the dataset; remove it")
        else:
            errors.append(_unknown_key(path, key, list(params)) + f" (for {kind} {name!r})")
    # Fill the entry's defaults so the resolved config (and the run id) names every value the run uses.
    for key, (tp, default) in params.items():
        if key not in checked and default is not inspect.Parameter.empty:
            checked[key] = _coerce(copy.deepcopy(default), tp, f"{section}.{key}", [])
    return {key: checked[key] for key in params if key in checked}


# --------------------------------------------------------------------------- raw dict helpers


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file; a missing or malformed file is a one-line ``KdlabError``."""
    path = Path(path)
    if not path.is_file():
        raise KdlabError(f"config file {path} does not exist; pass the path of a YAML config (see configs/)")
    documents = load_yaml_documents(path)
    if len(documents) > 1:
        raise KdlabError(f"config file {path} holds {len(documents)} YAML documents; `kdlab run` reads those "
                         "(each later document extends the first)")
    return documents[0]


def load_yaml_documents(path: str | Path) -> list[dict]:
    """All YAML documents of a config file (``---`` separated), each a mapping."""
    path = Path(path)
    if not path.is_file():
        raise KdlabError(f"config file {path} does not exist; pass the path of a YAML config (see configs/)")
    try:
        documents = list(yaml.load_all(path.read_text(), Loader=_YamlLoader))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise KdlabError(f"config file {path} is not valid YAML{line}; fix the syntax") from None
    documents = [{} if doc is None else doc for doc in documents] or [{}]
    for doc in documents:
        if not isinstance(doc, dict):
            raise KdlabError(f"config file {path} must hold a mapping at the top level, got {type(doc).__name__}")
    return documents


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, merging nested mappings (lists and values are replaced)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "grid":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted == "a.b.c"``, creating mappings on the way."""
    keys = dotted.split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise KdlabError(f"{'.'.join(keys[:i + 1])}: is {child!r}, not a section; cannot set {dotted}")
        node = child
    node[keys[-1]] = value


def get_path(raw: dict, dotted: str, default: Any = None) -> Any:
    node: Any = raw
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` → ``("train.lr", 0.1)``; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise KdlabError(f"--set {text!r}: expected key.path=value, e.g. --set train.lr=0.05")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key:
        raise KdlabError(f"--set {text!r}: missing key before '='")
    try:
        value = yaml.load(value_text, Loader=_YamlLoader) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    return key, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_path(raw, key, value)
    return raw


# --------------------------------------------------------------------------- experiment parsing


@dataclass
class RunSpec:
    """One run: a fully resolved config (no grid), its seed and the grid point it came from."""

    config: ExperimentConfig
    seed: int
    point: dict[str, Any]
    point_names: dict[str, str] = field(default_factory=dict)  # key -> name, for grids given as name: value

    @property
    def label(self) -> str:
        parts = [f"{k}={self.point_names.get(k) or _short(v)}" for k, v in self.point.items()]
        return " ".join(parts + [f"seed={self.seed}"])

    def resolved(self) -> dict:
        """The config as saved with the run: every default filled in, one seed, no grid."""
        out = to_dict(self.config)
        out.pop("grid")
        out.pop("seeds")
        out.pop("tracking", None)  # where metrics are also sent: neither identity nor results of the run
        out["seed"] = self.seed
        return out

    @property
    def group_key(self) -> str:
        """Identical for runs that differ only by seed."""
        out = self.resolved()
        out.pop("seed")
        return content_hash(out)[:16]

    @property
    def run_id(self) -> str:
        return f"{_slug(self.config.name)}-{content_hash(self.resolved())[:10]}"


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower())
    return keep.strip("-")[:40] or "run"


def content_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys): the identity of a config."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def dotted_leaves(obj: Any, prefix: str = "", *, keep_empty: bool = False) -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}`` (lists are leaves); ``keep_empty`` keeps an empty
    mapping as a leaf of its own instead of dropping it."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(dotted_leaves(value, f"{prefix}.{key}" if prefix else str(key), keep_empty=keep_empty))
        return out or ({prefix: {}} if keep_empty else {})
    return {prefix: obj}


def to_dict(cfg: Any) -> Any:
    """Dataclass → plain dict, with each section's ``options`` flattened back into the section."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.metadata.get("omit_default") and value == f.default:
                continue  # a later-added key at its default: not part of the resolved config (run ids unchanged)
            if f.name == "options":
                out.update({k: to_dict(v) for k, v in value.items()})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# Size suffixes of model names: cnn1d-w16 = cnn1d with width 16; resnet_cifar-d32-w4; wrn-d40-w2.
# "w" sets the family's width knob (the first of these it takes), "d" its depth.
_WIDTH_KNOBS = ("width", "widen_factor", "width_multiplier", "dim")


def split_sized_name(name: str) -> tuple[str, dict[str, int]]:
    """``"cnn1d-w16"`` → ``("cnn1d", {"w": 16})``; a plain name has no suffixes."""
    if not isinstance(name, str) or "-" not in name:
        return name, {}
    base, *parts = name.split("-")
    knobs = {}
    for part in parts:
        if len(part) < 2 or part[0] not in "wd" or not part[1:].isdigit():
            raise KdlabError(f"model name {name!r}: size suffixes are -wN (width) and -dN (depth), e.g. cnn1d-w16")
        knobs[part[0]] = int(part[1:])
    return base, knobs


def _expand_sized_name(section_raw: dict, path: str, errors: list[str]) -> dict:
    """Rewrite ``model: cnn1d-w16`` as ``model: cnn1d, width: 16`` (refusing a clash with an explicit key)."""
    name = section_raw.get("model")
    try:
        base, knobs = split_sized_name(name)
    except KdlabError as exc:
        errors.append(f"{path}.model: {exc}")
        return section_raw
    if not knobs:
        return section_raw
    out = dict(section_raw, model=base)
    try:
        params = entry_parameters("model", base)
    except KdlabError as exc:
        errors.append(f"{path}.model: {exc}")
        return out
    for code, value in knobs.items():
        keys = ("depth",) if code == "d" else _WIDTH_KNOBS
        key = next((k for k in keys if k in params), None)
        if key is None:
            errors.append(f"{path}.model: {base!r} has no {'depth' if code == 'd' else 'width'} option for -{code}{value}")
        elif key in section_raw and section_raw[key] != value:
            errors.append(f"{path}.model: {name!r} sets {key}={value} but {path}.{key} is {section_raw[key]!r}")
        else:
            out[key] = value
    return out


def _drop_knobs_set_by_sized_name(raw: dict, key: str, value: Any) -> None:
    """A grid value like ``teacher.model: cnn1d-w16`` overrides the section's own width/depth."""
    if not key.endswith(".model") or not isinstance(value, str):
        return
    section = get_path(raw, key.rsplit(".", 1)[0])
    _, knobs = split_sized_name(value)
    if isinstance(section, dict):
        for code in knobs:
            for knob in ("depth",) if code == "d" else _WIDTH_KNOBS:
                section.pop(knob, None)


def _candidates(raw: dict, grid: dict, section: str, name_key: str, default: Any) -> set:
    """Every entry name section ``section`` can take in this experiment (base value + grid values)."""
    # A list: the values may be anything (a wrongly typed name is reported elsewhere), hashable or not.
    names = [get_path(raw, f"{section}.{name_key}", default)]
    grid_names = grid.get(f"{section}.{name_key}", [])
    if isinstance(grid_names, dict):
        names.extend(grid_names.values())
    elif isinstance(grid_names, (list, tuple)):
        names.extend(grid_names)
    out = set()
    for n in names:
        if isinstance(n, str):
            try:
                out.add(split_sized_name(n)[0])
            except KdlabError:
                pass  # reported where the name is parsed
    return out


def _parse_model_list(items: Any, path: str, errors: list[str]) -> list:
    """``teacher.assistants`` / ``teacher.members``: each item a model section of its own."""
    if not isinstance(items, list):
        errors.append(f"{path}: expected a list of model sections, got {items!r}")
        return []
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{where}: expected a mapping like {{model: cnn1d, width: 32}}, got {item!r}")
            continue
        item = dict(_expand_sized_name(item, where, errors))
        recipe_method = item.pop("method", None)
        obj = _parse_dataclass(ModelConfig, item, where, errors, extra_ok=True)
        obj.method = _parse_recipe_method(recipe_method, f"{where}.method", errors)
        if obj.method is not None and (obj.checkpoint is not None or obj.model is None):
            errors.append(f"{where}.method: only a recipe teacher (model + train) is trained by a method")
        if obj.model is None and obj.checkpoint is None:
            errors.append(f"{where}: give a model (and its options) or a checkpoint")
        elif obj.model is not None:
            try:
                registry.get("model", obj.model, key=f"{where}.model")
                obj.options = _check_options(where, "model", obj.model, obj.options, set(), errors)
            except KdlabError as exc:
                errors.append(str(exc))
        for nested in ("assistants", "members"):
            if getattr(obj, nested):
                errors.append(f"{where}.{nested}: nesting is not supported; declare one flat list")
        if obj.checkpoint is None and obj.train is None:
            obj.train = TrainConfig()
        out.append(obj)
    return out


def _parse_recipe_method(raw: Any, path: str, errors: list[str]) -> Optional[MethodConfig]:
    """``teacher.method`` (or a member's): the method that trains a recipe teacher, checked like ``method``."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a method section like {{name: adversarial_training, epsilon: 0.1}}, "
                      f"got {raw!r}")
        return None
    obj = _parse_dataclass(MethodConfig, raw, path, errors, extra_ok=True)
    if "name" not in raw:
        errors.append(f"{path}.name: name the method that trains the teacher, e.g. adversarial_training")
        return None
    try:
        method_cls = registry.get("method", obj.name, key=f"{path}.name")
    except KdlabError as exc:
        errors.append(str(exc))
        return None
    if getattr(method_cls, "needs_teacher", False):
        errors.append(f"{path}.name: method {obj.name!r} needs a teacher of its own; a recipe teacher trains "
                      "without one (e.g. scratch, adversarial_training, trades)")
        return None
    obj.options = _check_options(path, "method", obj.name, obj.options, set(), errors)
    return obj


def _parse_point(raw: dict, grid: dict, errors: list[str]) -> ExperimentConfig:
    top_raw = {k: v for k, v in raw.items() if k not in _REGISTRY_SECTIONS}
    cfg: ExperimentConfig = _parse_dataclass(ExperimentConfig, top_raw, "", errors)
    # Registry sections: parse their own fields, then check options against the entry.
    sections = {
        "data": (cfg.data, DataConfig),
        "student": (cfg.student, ModelConfig),
        "teacher": (cfg.teacher, ModelConfig),
        "method": (cfg.method, MethodConfig),
    }
    for section, (obj, cls) in sections.items():
        section_raw = raw.get(section)
        if section == "teacher" and section_raw is None:
            cfg.teacher = None
            continue
        if section == "student" and section_raw is not None and not isinstance(section_raw, dict):
            errors.append(f"student: expected a mapping, got {section_raw!r}")
            continue
        recipe_method = None
        if cls is ModelConfig and isinstance(section_raw, dict):
            section_raw = _expand_sized_name(section_raw, section, errors)
            section_raw = dict(section_raw)
            recipe_method = section_raw.pop("method", None)
            if recipe_method is not None and section == "student":
                errors.append("student.method: the student trains with the top-level method section; move it there")
                recipe_method = None
        obj = _parse_dataclass(cls, section_raw, section, errors, extra_ok=True)
        if section == "teacher":
            obj.method = _parse_recipe_method(recipe_method, "teacher.method", errors)
            obj.assistants = _parse_model_list(obj.assistants, "teacher.assistants", errors)
            obj.members = _parse_model_list(obj.members, "teacher.members", errors)
        if section == "student" and obj.model is None:
            obj.model = "cnn1d"
        setattr(cfg, section, obj)
        name_key, kind = _REGISTRY_SECTIONS[section]
        name = getattr(obj, name_key)
        if name is None:  # a teacher given only as a kdlab checkpoint (or as members): options come from the file
            if obj.options:
                errors.append(f"{section}: options {sorted(obj.options)} need {section}.model to be set")
            if section == "teacher" and obj.checkpoint is None and not obj.members:
                errors.append("teacher: give teacher.model (a training recipe), teacher.checkpoint (a file) "
                              "or teacher.members (several teachers)")
            continue
        try:
            registry.get(kind, name, key=f"{section}.{name_key}")
        except KdlabError as exc:
            errors.append(str(exc))
            continue
        others: set[str] = set()
        default_name = getattr(cls(), name_key)
        for cand in _candidates(raw, grid, section, name_key, default_name) - {name}:
            try:
                others.update(entry_parameters(kind, cand))
            except KdlabError:
                pass  # reported when that grid point is parsed
        obj.options = _check_options(section, kind, name, obj.options, others, errors)
        if section == "student" and obj.train is not None:
            errors.append("student.train: the student trains with the top-level train section; move it there")
    if cfg.teacher is not None and cfg.teacher.checkpoint is None and cfg.teacher.model is not None \
            and cfg.teacher.train is None:
        cfg.teacher.train = TrainConfig()
    if isinstance(cfg.student, ModelConfig):
        for key in ("epoch", "trajectory", "assistants", "members"):
            if getattr(cfg.student, key) not in (None, False, []):
                errors.append(f"student.{key}: only the teacher section takes {key}")
        _check_quant(cfg.student.quant, errors)
        if cfg.student.init == "teacher" and cfg.teacher is None:
            errors.append("student.init: 'teacher' copies the teacher's weights; add a teacher section")
        if cfg.student.init == "teacher" and cfg.student.checkpoint is not None:
            errors.append("student.init: 'teacher' and student.checkpoint both set the starting weights; keep one")
    if cfg.teacher is not None:
        for key in ("quant", "init"):
            if getattr(cfg.teacher, key) is not None:
                errors.append(f"teacher.{key}: only the student section takes {key}")
    if cfg.teacher is not None:
        _check_teacher(cfg.teacher, errors)
    _check_values(cfg, errors)
    return cfg


def _check_quant(quant: Any, errors: list[str]) -> None:
    """student.quant must build a kdlab.quant.QuantSpec (bit widths, modes, layer patterns)."""
    if quant is None:
        return
    from kdlab.quant.model import quant_spec

    try:
        quant_spec(quant)
    except KdlabError as exc:
        errors.append(str(exc))


def _check_teacher(t: ModelConfig, errors: list[str]) -> None:
    """Teacher options that depend on each other: kept epochs, trajectories, members."""
    kept = tuple(t.train.keep_epochs) if t.train is not None else ()
    if t.epoch is not None:
        if t.checkpoint is not None or t.model is None:
            errors.append("teacher.epoch: only a recipe teacher (teacher.model + teacher.train) has epochs to pick")
        elif t.epoch not in kept:
            errors.append(f"teacher.epoch: epoch {t.epoch} is not kept by the teacher's recipe; add it to "
                          f"teacher.train.keep_epochs (now {list(kept)})")
    if t.trajectory and (t.model is None or t.checkpoint is not None or not kept):
        errors.append("teacher.trajectory: needs a recipe teacher with teacher.train.keep_epochs, e.g. [5, 10, 20]")
    if t.method is not None and (t.checkpoint is not None or t.model is None):
        errors.append("teacher.method: only a recipe teacher (teacher.model + teacher.train) is trained by a method")
    if t.members and (t.model is not None or t.checkpoint is not None or t.assistants):
        errors.append("teacher.members: a multi-teacher section holds only members (each a model section)")
    if t.assistants and (t.checkpoint is not None or t.model is None) and not t.members:
        errors.append("teacher.assistants: the chain starts from a recipe teacher (teacher.model + teacher.train)")
    if t.train is not None and t.train.keep_epochs:
        bad = [e for e in t.train.keep_epochs if not (isinstance(e, int) and 1 <= e <= t.train.epochs)]
        if bad:
            errors.append(f"teacher.train.keep_epochs: {bad} outside 1..{t.train.epochs} (teacher.train.epochs)")


def name_problem(value: Any, key: str) -> str | None:
    """Why ``value`` cannot be a name (of an experiment or a study), else None.

    Names become parts of run ids and folder names in the workspace; they are
    slugged there, but a name that looks like a path is refused outright, so
    nobody believes ``name: ../elsewhere`` writes elsewhere.
    """
    if not isinstance(value, str):
        return None  # the type check reports it
    if not value.strip():
        return f"{key}: give a non-empty name, e.g. {key}: my-study"
    if ("/" in value or "\\" in value or ".." in value or value.startswith(("~", "."))
            or not value.isprintable()):
        return (f"{key}: {value!r} looks like a path; names may not contain '/', '\\' or '..', start with '.' or "
                f"'~', or hold control characters; results always go under the workspace (--workspace DIR)")
    return None


def _check_values(cfg: ExperimentConfig, errors: list[str]) -> None:
    """Range checks the types cannot express."""
    problem = name_problem(cfg.name, "name")
    if problem:
        errors.append(problem)
    trains = [("train", cfg.train)]
    if cfg.teacher is not None and cfg.teacher.train is not None:
        trains.append(("teacher.train", cfg.teacher.train))
    for path, t in trains:
        if isinstance(t.epochs, int) and t.epochs < 1:
            errors.append(f"{path}.epochs: must be ≥ 1, got {t.epochs}")
        if t.steps is not None and isinstance(t.steps, int) and t.steps < 1:
            errors.append(f"{path}.steps: must be ≥ 1 or null, got {t.steps}")
        if isinstance(t.batch_size, int) and t.batch_size < 1:
            errors.append(f"{path}.batch_size: must be ≥ 1, got {t.batch_size}")
        if isinstance(t.lr, float) and not (0 < t.lr < float("inf")):
            errors.append(f"{path}.lr: must be a positive finite number, got {t.lr}")
        for key in ("eval_every", "checkpoint_every"):
            value = getattr(t, key)
            if isinstance(value, int) and value < 1:
                errors.append(f"{path}.{key}: must be ≥ 1, got {value}")
    if isinstance(cfg.data.val_fraction, float) and not 0.0 <= cfg.data.val_fraction < 1.0:
        errors.append(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.train.selection == "best_val" and cfg.data.val_fraction == 0.0:
        errors.append("train.selection: best_val needs a validation split; set data.val_fraction > 0")
    if isinstance(cfg.seeds, list) and not cfg.seeds:
        errors.append("seeds: give at least one seed, e.g. seeds: [0, 1, 2]")
    lpc = cfg.data.labels_per_class
    if lpc is not None and isinstance(lpc, int) and lpc < 1:
        errors.append(f"data.labels_per_class: must be an integer >= 1 or null, got {lpc}")
    if cfg.data.drop_unlabelled is True and lpc is None:
        errors.append("data.drop_unlabelled: only applies with data.labels_per_class; set both or neither")
    if isinstance(cfg.robust, RobustConfig):
        _check_robust(cfg.robust, errors)
    if not isinstance(cfg.method.name, str):
        return
    try:
        method_cls = registry.get("method", cfg.method.name)
    except KdlabError:
        return  # reported where the method section is parsed
    if lpc is not None and cfg.data.drop_unlabelled is False and not getattr(method_cls, "uses_unlabelled", False):
        errors.append(f"data.labels_per_class: method {cfg.method.name!r} cannot use unlabelled samples (their "
                      "labels are -1); set data.drop_unlabelled: true to train on the labelled ones only, or use "
                      "a method that uses them (awr_kd)")
    if cfg.teacher is None and getattr(method_cls, "needs_teacher", False):
        errors.append(f"teacher: method {cfg.method.name!r} needs a teacher; add a teacher section "
                      "(teacher.model + teacher.train, or teacher.checkpoint)")
    if cfg.train.teacher_cache is True and hasattr(method_cls, "can_cache_teacher") and \
            not method_cls.can_cache_teacher():
        from kdlab.methods.base import teacher_cache_refusal

        errors.append(teacher_cache_refusal(repr(cfg.method.name)))
    if cfg.teacher is not None and getattr(method_cls, "refuses_teacher", False):
        errors.append(f"teacher: method {cfg.method.name!r} distils the student from itself; "
                      "set teacher: null (e.g. in its own YAML document)")


def _check_eps(value: Any, norm: str, path: str, errors: list[str]) -> None:
    """An attack radius: a number or text like "8/255"; L∞ radii lie in [0, 1] (inputs are in [0, 1])."""
    from kdlab.robust.attacks import parse_eps  # deferred: robust imports torch

    try:
        eps = parse_eps(value)
    except KdlabError as exc:
        errors.append(f"{path}: {str(exc).removeprefix('eps: ')}")
        return
    if norm == "linf" and eps > 1:
        shown = f"{value:g}" if isinstance(value, float) else value
        if eps <= 255 and "/" not in str(value):
            errors.append(f"{path}: {shown} is outside [0, 1] for norm linf; inputs are in [0, 1], so this looks "
                          f"like pixel units (0-255): write {eps:g}/255")
        else:
            errors.append(f"{path}: {shown} is outside [0, 1] for norm linf (inputs are in [0, 1]); "
                          "give e.g. 8/255 or 0.031")


def _check_robust(r: RobustConfig, errors: list[str]) -> None:
    """The robust section: radii in range, attack settings the attacks accept, distinct metric labels."""
    from kdlab.robust.protocol import AttackSpec  # deferred: robust imports torch

    before = len(errors)
    _check_eps(r.eps, "linf" if not r.attacks else r.attacks[0].norm, "robust.eps", errors)
    section_eps_bad = len(errors) > before
    for key in ("subset", "faithfulness_steps", "batch_size"):
        value = getattr(r, key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            errors.append(f"robust.{key}: must be an integer >= 1{' or null (the whole test split)' if key == 'subset' else ''}, got {value}")
    if isinstance(r.delta, float) and not 0.0 <= r.delta <= 1.0:
        errors.append(f"robust.delta: a probability gap in [0, 1], got {r.delta}")
    if not r.attacks and (r.eps_curve or r.sanity_checks):
        errors.append("robust.attacks: eps_curve and sanity_checks need an attack; add one, e.g. "
                      "{name: pgd, steps: 20}")
    labels: dict[str, int] = {}
    for i, a in enumerate(r.attacks):
        if not isinstance(a, AttackConfig):
            continue
        path = f"robust.attacks[{i}]"
        eps = a.eps if a.eps is not None else r.eps
        before = len(errors)
        if a.eps is not None:
            _check_eps(a.eps, a.norm, f"{path}.eps", errors)
        eps_bad = len(errors) > before if a.eps is not None else section_eps_bad
        if a.name == "autoattack":
            from kdlab.robust.autoattack import INSTALL_HINT, available

            if not available():
                errors.append(f"{path}: autoattack needs the pyautoattack package; {INSTALL_HINT}")
        if a.label is not None and (not a.label or "/" in a.label or a.label in ("clean", "worst", "faith", "curve")):
            errors.append(f"{path}.label: {a.label!r} cannot name metrics; use letters, digits, '_' or '-', "
                          "not clean/worst/faith/curve")
        try:
            spec = AttackSpec(a.name, eps=eps, norm=a.norm, steps=a.steps, step_size=a.step_size,
                              restarts=a.restarts, loss=a.loss, seed=a.seed)
        except KdlabError as exc:
            if not eps_bad:
                errors.append(f"{path}: {str(exc).split(': ', 1)[-1]}")
            continue
        label = a.label or spec.label
        if label in labels:
            errors.append(f"{path}: same metric label {label!r} as robust.attacks[{labels[label]}]; set "
                          f"robust.attacks[{i}].label to tell them apart")
        labels.setdefault(label, i)
    norm = r.attacks[0].norm if r.attacks and isinstance(r.attacks[0], AttackConfig) else "linf"
    for i, value in enumerate(r.eps_curve):
        _check_eps(value, norm, f"robust.eps_curve[{i}]", errors)


def parse_experiment(raw: dict) -> tuple[ExperimentConfig, list[RunSpec]]:
    """Validate an experiment (every grid point) and expand it into runs (grid product × seeds).

    Raises ``ConfigError`` listing every problem. Returns the base config and
    the run specs in a stable order: grid points in the order written, then seeds.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"config: expected a mapping, got {raw!r}"])
    errors: list[str] = []
    grid_raw = raw.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise ConfigError([f"grid: expected a mapping of key.path to a list of values, got {grid_raw!r}"])
    # A grid entry is a list of values, or a mapping name -> value whose names label the runs.
    named: dict[str, list[tuple[str | None, Any]]] = {}
    for key, values in grid_raw.items():
        if isinstance(values, dict) and values:
            named[key] = [(str(name), value) for name, value in values.items()]
        elif isinstance(values, list) and values:
            named[key] = [(None, value) for value in values]
        else:
            errors.append(f"grid.{key}: expected a non-empty list of values (or a mapping name: value), "
                          f"got {values!r}")
        if str(key).split(".")[0] in ("grid", "seeds", "name"):
            errors.append(f"grid.{key}: cannot be swept; sweep seeds with seeds: [...]")
    if errors:
        raise ConfigError(errors)
    base_raw = {k: v for k, v in raw.items() if k != "grid"}
    grid_values = {key: [value for _, value in items] for key, items in named.items()}
    base = _parse_point(base_raw, grid_values, errors)
    base.grid = dict(grid_raw)
    specs: list[RunSpec] = []
    keys = list(named)
    seen_errors = set(errors)
    for combo in itertools.product(*(named[k] for k in keys)):
        point = {key: value for key, (_, value) in zip(keys, combo)}
        point_names = {key: name for key, (name, _) in zip(keys, combo) if name is not None}
        point_raw = copy.deepcopy(base_raw)
        point_errors: list[str] = []
        for key, value in point.items():
            try:
                set_path(point_raw, key, copy.deepcopy(value))
                _drop_knobs_set_by_sized_name(point_raw, key, value)
            except KdlabError as exc:
                point_errors.append(f"grid.{key}: {exc}")
        cfg = _parse_point(point_raw, grid_values, point_errors)
        for e in point_errors:
            if e not in seen_errors:
                seen_errors.add(e)
                errors.append(e + (f" (grid point {point})" if point else ""))
        for seed in (cfg.seeds if isinstance(cfg.seeds, list) else []):
            specs.append(RunSpec(config=cfg, seed=seed, point=point, point_names=point_names))
    if errors:
        raise ConfigError(errors)
    # Runs that resolve to the same config (e.g. scratch under a temperature grid) run once.
    unique: dict[str, RunSpec] = {}
    for spec in specs:
        unique.setdefault(spec.run_id, spec)
    return base, list(unique.values())


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None,
                    seeds: list[int] | None = None) -> tuple[ExperimentConfig, list[RunSpec]]:
    """YAML file (or the built-in quickstart when ``path`` is None) + overrides → validated runs.

    A file may hold several YAML documents: the first is the study, each later
    one extends it (deep-merged over the first, with a grid of its own or none),
    so arms that are not a full grid product (e.g. remedies for one teacher–student
    pair) join the same experiment; ``variant: NAME`` in a later document labels its
    runs. Overrides and ``seeds`` apply to every document.
    """
    documents = load_yaml_documents(path) if path is not None else [quickstart_raw()]
    first = documents[0]
    base, specs = None, []
    for index, doc in enumerate(documents):
        doc = dict(doc)
        variant = doc.pop("variant", None)  # a later document's name, shown in its runs' labels
        raw = first if index == 0 else deep_merge({k: v for k, v in first.items() if k not in ("grid", "variant")}, doc)
        raw = apply_overrides(raw, overrides or [])
        if seeds is not None:
            raw["seeds"] = list(seeds)
        try:
            doc_base, doc_specs = parse_experiment(raw)
        except ConfigError as exc:
            if len(documents) == 1:
                raise
            raise ConfigError([f"(document {index + 1}) {problem}" for problem in exc.problems]) from None
        base = base or doc_base
        if variant is not None:
            for spec in doc_specs:
                spec.point = {"variant": variant, **spec.point}
                spec.point_names = {"variant": str(variant), **spec.point_names}
        known = {spec.run_id for spec in specs}
        specs.extend(spec for spec in doc_specs if spec.run_id not in known)
    return base, specs


QUICKSTART_PATH = Path(__file__).parent / "configs" / "quickstart.yaml"


def quickstart_raw() -> dict:
    """The embedded default experiment run by a bare ``kdlab run``."""
    return load_yaml(QUICKSTART_PATH)


def recipe_run_spec(t: ModelConfig, data: DataConfig) -> RunSpec | None:
    """A recipe teacher (or assistant-chain base) as a run of its own, or None.

    Trained by ``t.method`` (default ``scratch``; e.g. ``adversarial_training`` for
    a robust teacher). With ``data.labels_per_class`` the teacher trains on the
    labelled samples only (``drop_unlabelled``), unless its method uses unlabelled ones.
    Its identity depends only on what shapes the network — its model, recipe,
    method, seed and the data — so every student of a study shares one teacher run.
    (``epoch``/``trajectory`` pick files of this run; they do not change it.)
    """
    if t is None or t.checkpoint is not None or t.model is None:
        return None
    method = copy.deepcopy(t.method) if t.method is not None else MethodConfig(name="scratch")
    data = copy.deepcopy(data)
    if data.labels_per_class is not None and not data.drop_unlabelled and \
            not getattr(registry.get("method", method.name), "uses_unlabelled", False):
        data.drop_unlabelled = True  # the teacher sees the student's labels only: the labelled samples
    teacher_cfg = ExperimentConfig(
        name="teacher",
        data=data,
        teacher=None,
        student=ModelConfig(model=t.model, options=dict(t.options)),
        method=method,
        train=copy.deepcopy(t.train) if t.train is not None else TrainConfig(),
        seeds=[t.seed],
    )
    return RunSpec(config=teacher_cfg, seed=t.seed, point={})


def assistant_run_spec(t: ModelConfig, data: DataConfig, method: MethodConfig) -> RunSpec:
    """The last assistant of ``t``'s chain as a run: distilled (KD) from the chain before it.

    Mirzadeh et al. (2020) train every stage with the same KD objective: each
    assistant uses the experiment's ``kd`` hyperparameters when its method is
    ``kd``/``takd``, KD defaults otherwise. Recursion through ``teacher`` gives the chain.
    """
    last = t.assistants[-1]
    previous = copy.deepcopy(t)
    previous.assistants = list(t.assistants[:-1])
    options = dict(method.options) if method.name in ("kd", "takd") else {}
    options = {k: v for k, v in options.items() if k in ("temperature", "alpha")}
    stage_cfg = ExperimentConfig(
        name="assistant",
        data=copy.deepcopy(data),
        teacher=previous,
        student=ModelConfig(model=last.model, checkpoint=last.checkpoint, options=dict(last.options)),
        method=MethodConfig(name="kd", options=options),
        train=copy.deepcopy(last.train) if last.train is not None else TrainConfig(),
        seeds=[last.seed],
    )
    return RunSpec(config=stage_cfg, seed=last.seed, point={})


def teacher_run_spec(cfg: ExperimentConfig) -> RunSpec | None:
    """The run that produces ``cfg``'s teacher network: the recipe run, or the last assistant's run."""
    t = cfg.teacher
    if t is None:
        return None
    if t.assistants:
        return assistant_run_spec(t, cfg.data, cfg.method)
    return recipe_run_spec(t, cfg.data)


def parse_train(raw: dict, *, path: str = "train") -> TrainConfig:
    """Validate a ``train`` mapping on its own (used by the Python API)."""
    errors: list[str] = []
    out = _parse_dataclass(TrainConfig, raw, path, errors)
    if errors:
        raise ConfigError(errors)
    return out


def parse_method(name: str, options: dict) -> MethodConfig:
    """Validate a method name and its hyperparameters on their own (used by the Python API)."""
    registry.get("method", name, key="method.name")
    errors: list[str] = []
    checked = _check_options("method", "method", name, options, set(), errors)
    if errors:
        raise ConfigError(errors)
    return MethodConfig(name=name, options=checked)
