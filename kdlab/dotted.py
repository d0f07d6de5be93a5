"""Dotted key paths into nested mappings (raw and resolved configs): ``train.lr`` → ``raw["train"]["lr"]``."""
from __future__ import annotations

import copy
from typing import Any

from kdlab.errors import KdlabError

MISSING = object()  # ``get_path``'s default when "absent" must differ from "null"


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, merging nested mappings (lists and values are replaced; a grid is replaced whole)."""
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


def dotted_leaves(obj: Any, prefix: str = "", *, keep_empty: bool = False) -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}`` (lists are leaves); ``keep_empty`` keeps an empty
    mapping as a leaf of its own instead of dropping it."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(dotted_leaves(value, f"{prefix}.{key}" if prefix else str(key), keep_empty=keep_empty))
        return out or ({prefix: {}} if keep_empty else {})
    return {prefix: obj}
