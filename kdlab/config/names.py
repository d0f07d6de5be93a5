"""The ``-wN``/``-dN`` model-name syntax: ``cnn1d-w16`` is cnn1d with width 16; ``wrn-d40-w2``."""
from __future__ import annotations

from typing import Any

from kdlab.config.entries import entry_parameters
from kdlab.errors import KdlabError

# "w" sets the family's width knob (the first of these it takes), "d" its depth.
WIDTH_KNOBS = ("width", "widen_factor", "width_multiplier", "dim")


def split_sized_name(name: str) -> tuple[str, dict[str, int]]:
    """``"cnn1d-w16"`` → ``("cnn1d", {"w": 16})``; a plain name has no suffixes."""
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
        keys = ("depth",) if code == "d" else WIDTH_KNOBS
        key = next((k for k in keys if k in params), None)
        if key is None:
            errors.append(f"{path}.model: {base!r} has no {'depth' if code == 'd' else 'width'} option for -{code}{value}")
        elif key in section_raw and section_raw[key] != value:
            errors.append(f"{path}.model: {name!r} sets {key}={value} but {path}.{key} is {section_raw[key]!r}")
        else:
            out[key] = value
    return out


def drop_knobs_set_by_sized_name(section: Any, value: Any) -> None:
    """A grid value like ``teacher.model: cnn1d-w16`` overrides the section's own width/depth."""
    if not isinstance(value, str) or not isinstance(section, dict):
        return
    _, knobs = split_sized_name(value)
    for code in knobs:
        for knob in ("depth",) if code == "d" else WIDTH_KNOBS:
            section.pop(knob, None)
