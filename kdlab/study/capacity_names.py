"""Names of the teachers, students and method blocks of a capacity-gap table.

Descriptors name a model by its zoo name plus the options that vary among the
teachers (or students) of the study, e.g. ``cnn1d width=64``,
``cnn1d width=128 epoch=10``, ``cnn1d width=128 → TA cnn1d width=32``; when
no option varies the first size option present (``width``, ...) is shown.
Recipe keys that vary (``train.epochs=3``, ``seed=1``) are appended, and so
are the ``data`` keys that tell apart one teacher section trained on different
data; a descriptor still shared gets ``[2]``, ``[3]``... Teachers are keyed by
(teacher section, data); students by their section.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from kdlab.dotted import dotted_leaves
from kdlab.study.teacher_runs import canonical, model_options

NO_TEACHER = "(no teacher)"
# Shown even when they do not vary, so a lone model still says how big it is (first present wins).
SIZE_OPTIONS = ("width", "widths", "width_multiplier", "widen_factor", "dim", "depth")


def short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(short(v) for v in value)
    if isinstance(value, dict):
        return canonical(value)
    return str(value)


def varying_keys(dicts: Iterable[dict[str, Any]]) -> set[str]:
    """Keys whose canonical values differ (or that are missing somewhere) across ``dicts``."""
    dicts = list(dicts)
    keys = {key for d in dicts for key in d}
    return {key for key in keys if len({canonical(d.get(key, "<absent>")) for d in dicts}) > 1}


def _model_name(section: dict) -> str:
    model = section.get("model")
    checkpoint = section.get("checkpoint")
    if model is None:
        return f"checkpoint {Path(str(checkpoint)).name}" if checkpoint else "?"
    return f"{model} (checkpoint {Path(str(checkpoint)).name})" if checkpoint else str(model)


def describe_models(sections: dict[str, dict]) -> dict[str, str]:
    """Descriptor per section key: model + shown options + varying recipe keys (no extras)."""
    by_model: dict[str, list[dict]] = {}
    for section in sections.values():
        by_model.setdefault(str(section.get("model")), []).append(model_options(section))
    vary_options = {model: varying_keys(options) for model, options in by_model.items()}
    recipes = {key: dotted_leaves({k: section.get(k) for k in ("train", "seed", "checkpoint") if k in section})
               for key, section in sections.items()}
    vary_recipe = varying_keys(recipes.values())
    out = {}
    for key, section in sections.items():
        options = model_options(section)
        shown = [k for k in options if k in vary_options[str(section.get("model"))]]
        if not shown:
            shown = [k for k in SIZE_OPTIONS if options.get(k) is not None][:1]
        parts = [_model_name(section)] + [f"{k}={short(options[k])}" for k in shown]
        parts += [f"{k}={short(v)}" for k, v in recipes[key].items() if k in vary_recipe and k != "checkpoint"]
        out[key] = " ".join(parts)
    return out


def _describe_assistant(assistant: Any) -> str:
    if isinstance(assistant, dict):
        options = model_options(assistant)
        shown = [k for k in SIZE_OPTIONS if options.get(k) is not None][:1]
        return " ".join([_model_name(assistant)] + [f"{k}={short(options[k])}" for k in shown])
    return str(assistant)


def member_sections(section: dict) -> list:
    members = section.get("members") or []
    return list(members) if isinstance(members, (list, tuple)) else [members]


def describe_teachers(sections: dict[str, dict | None]) -> dict[str, str]:
    """Descriptor per teacher key (not yet made unique: see :func:`with_data`)."""
    real = {key: section for key, section in sections.items()
            if isinstance(section, dict) and not (member_sections(section) and section.get("model") is None)}
    base = describe_models(real)
    out = {}
    for key, section in sections.items():
        if not isinstance(section, dict):
            out[key] = NO_TEACHER
        elif key not in real:  # several teachers at once (teacher.members)
            out[key] = "ensemble of " + " + ".join(_describe_assistant(m) for m in member_sections(section))
        else:
            text = base[key]
            if section.get("epoch") is not None:
                text += f" epoch={section['epoch']}"
            if section.get("trajectory"):
                text += " trajectory"
            assistants = section.get("assistants")
            if assistants:
                items = assistants if isinstance(assistants, (list, tuple)) else [assistants]
                text += "".join(f" → TA {_describe_assistant(a)}" for a in items)
            out[key] = text
    return out


def unique_names(names: dict[str, str]) -> dict[str, str]:
    """Suffix ``[2]``, ``[3]``... to descriptors shared by different keys (first-seen order keeps the bare name)."""
    seen: dict[str, int] = {}
    out = {}
    for key, name in names.items():
        seen[name] = seen.get(name, 0) + 1
        out[key] = name if seen[name] == 1 else f"{name} [{seen[name]}]"
    return out


def with_data(names: dict[str, str], data: dict[str, dict]) -> dict[str, str]:
    """One teacher section trained on different data (a grid over ``data.*``) is several teachers:
    their descriptors gain the data keys that tell them apart."""
    by_name: dict[str, list[str]] = {}
    for key, name in names.items():
        by_name.setdefault(name, []).append(key)
    out = dict(names)
    for name, keys in by_name.items():
        if len(keys) > 1 and all(key in data for key in keys):
            leaves = {key: dotted_leaves(data[key], "data") for key in keys}
            varying = varying_keys(leaves.values())
            for key in keys:
                extra = [f"{k}={short(v)}" for k, v in leaves[key].items() if k in varying]
                out[key] = " ".join([name, *extra])
    return unique_names(out)


def block_labels(block_sections: dict[tuple[str, str], tuple[dict, dict]]) -> dict[tuple[str, str], str]:
    by_name: dict[str, list[tuple[str, str]]] = {}
    for block, (method, _) in block_sections.items():
        by_name.setdefault(str(method.get("name")), []).append(block)
    labels = {}
    for name, members in by_name.items():
        leaves = {block: {**{k: v for k, v in dotted_leaves(block_sections[block][0]).items() if k != "name"},
                          **dotted_leaves(block_sections[block][1])} for block in members}
        varying = varying_keys(leaves.values()) if len(members) > 1 else set()
        for block in members:
            extra = [f"{k}={short(v)}" for k, v in leaves[block].items() if k in varying]
            labels[block] = " ".join([name, *extra])
    named = unique_names({canonical(block): label for block, label in labels.items()})
    return {block: named[canonical(block)] for block in labels}
