"""Sections that name a registry entry (dataset, model, method) and take that entry's options as keys;
the ``-wN``/``-dN`` and ``LIB:NAME`` model-name syntax (``cnn1d-w16`` = cnn1d with width 16)."""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

from kdlab import registry
from kdlab.config.validate import coerce, hints, unknown_key
from kdlab.errors import KdlabError

# Factory arguments that kdlab supplies itself; users cannot set them.
RESERVED_MODEL_ARGS = frozenset({"input_shape", "num_classes", "mean", "std"})
RESERVED_DATASET_ARGS = frozenset({"root", "cache_dir"})


def entry_parameters(kind: str, name: str) -> dict[str, tuple[Any, Any]]:
    """The user-settable keyword arguments of a registry entry: ``{name: (annotation, default)}``.

    Methods declare a ``Hparams`` dataclass; factories (models, datasets) are
    read from their signature, without the arguments kdlab supplies itself.
    Annotations keep their ``Annotated`` bounds.
    """
    obj = registry.get(kind, name)
    hparams = getattr(obj, "Hparams", None)
    if hparams is not None and dataclasses.is_dataclass(hparams):
        types_ = hints(hparams)
        out = {}
        for f in dataclasses.fields(hparams):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = (types_[f.name], default)
        return out
    reserved = RESERVED_MODEL_ARGS if kind == "model" else RESERVED_DATASET_ARGS if kind == "dataset" else set()
    types_ = hints(obj)
    out = {}
    for p in inspect.signature(obj).parameters.values():
        if p.name in reserved or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[p.name] = (types_.get(p.name, Any), p.default)
    return out


def pretrained_teacher(t: Any) -> bool:
    """Whether teacher section ``t`` names a pretrained model used as it is, with no recipe run of its own: its
    model entry says so through a ``pretrained(options)`` attribute (``hf_causal_lm`` with ``path:``/``bundled:``)."""
    if getattr(t, "checkpoint", None) is not None or not isinstance(getattr(t, "model", None), str):
        return False
    try:
        used_as_is = getattr(registry.get("model", t.model), "pretrained", None)
    except KdlabError:
        return False
    return used_as_is is not None and bool(used_as_is(getattr(t, "options", None) or {}))


def check_options(section: str, kind: str, name: str, options: dict, also_allowed: set[str],
                  errors: list[str], *, own_keys: tuple[str, ...] = ()) -> dict:
    """Type- and bound-check ``options`` against entry ``name``; drop keys only other candidates take.

    ``own_keys`` are the section's own fields, offered too when a key is misspelt
    (``data.val_fractoin`` → ``val_fraction``, not a factory option).
    """
    params = entry_parameters(kind, name)
    checked = {}
    for key, value in options.items():
        path = f"{section}.{key}"
        if key in params:
            checked[key] = coerce(value, params[key][0], path, errors)
        elif key in also_allowed:
            continue  # belongs to another entry this experiment's grid can select
        elif kind == "model" and key in RESERVED_MODEL_ARGS:
            errors.append(f"{path}: set by kdlab from the dataset; remove it")
        elif kind == "dataset" and key in ("streaming", "workers"):  # kdlab.data.streaming
            errors.append(f"{path}: dataset {name!r} cannot stream (held in memory; image_folder streams); remove it")
        else:
            errors.append(unknown_key(path, key, list(params) + list(own_keys)) + f" (for {kind} {name!r})")
    # Fill the entry's defaults so the resolved config (and the run id) names every value the run uses.
    for key, (tp, default) in params.items():
        if key not in checked and default is not inspect.Parameter.empty:
            checked[key] = coerce(copy.deepcopy(default), tp, f"{section}.{key}", [])
    return {key: checked[key] for key in params if key in checked}


# --------------------------------------------------------------------------- the -wN/-dN and LIB:NAME model names
# cnn1d-w16 is cnn1d with width 16; wrn-d40-w2; timm:resnet18 is model timm with name resnet18 (the library's own
# name, hyphens and all; kdlab.models.vision_zoo). Each code sets the first of its knobs the entry takes.
KNOBS = {"w": ("width", "widen_factor", "width_multiplier", "dim"), "d": ("depth",), "name": ("name",)}


def split_sized_name(name: str) -> tuple[str, dict]:
    """``"cnn1d-w16"`` → ``("cnn1d", {"w": 16})``, ``"timm:resnet18"`` → ``("timm", {"name": "resnet18"})``."""
    if isinstance(name, str) and ":" in name:
        return name.split(":", 1)[0], {"name": name.split(":", 1)[1]}
    if not isinstance(name, str) or "-" not in name:
        return name, {}
    base, *parts = name.split("-")
    knobs = {}
    for part in parts:
        if len(part) < 2 or part[0] not in "wd" or not part[1:].isdigit() or len(part) > 10:
            raise KdlabError(f"model name {name!r}: size suffixes are -wN (width) and -dN (depth), e.g. cnn1d-w16")
        knobs[part[0]] = int(part[1:])
    return base, knobs


def expand_sized_name(section_raw: dict, path: str, errors: list[str]) -> dict:
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
        key = next((k for k in KNOBS[code] if k in params), None)
        if key is None:
            what, suffix = {"d": ("depth", f"-d{value}"), "w": ("width", f"-w{value}")}.get(code, (code, f":{value}"))
            errors.append(f"{path}.model: {base!r} has no {what} option for {suffix}")
        elif key in section_raw and section_raw[key] != value:
            errors.append(f"{path}.model: {name!r} sets {key}={value} but {path}.{key} is {section_raw[key]!r}")
        else:
            out[key] = value
    return out


def drop_knobs_set_by_sized_name(section: Any, value: Any) -> None:
    """A grid value like ``teacher.model: cnn1d-w16`` overrides the section's own width/depth (or name)."""
    if isinstance(value, str) and isinstance(section, dict):
        for code in split_sized_name(value)[1]:
            for knob in KNOBS[code]:
                section.pop(knob, None)
