"""Sections that name a registry entry (dataset, model, method) and take that entry's options as keys."""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

from kdlab import registry
from kdlab.config.validate import coerce, hints, unknown_key

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
        else:
            errors.append(unknown_key(path, key, list(params) + list(own_keys)) + f" (for {kind} {name!r})")
    # Fill the entry's defaults so the resolved config (and the run id) names every value the run uses.
    for key, (tp, default) in params.items():
        if key not in checked and default is not inspect.Parameter.empty:
            checked[key] = coerce(copy.deepcopy(default), tp, f"{section}.{key}", [])
    return {key: checked[key] for key in params if key in checked}
