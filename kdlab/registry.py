"""One registry for every named thing: models, datasets, losses, methods, ...

    @register("loss", "kl")
    def kl(...): ...

    get("loss", "kl")            # -> the function
    names("model", "resnet*")    # wildcard listing, sorted
    summary("method", "kd")      # first line of the docstring

Registering a name twice is an error (silent overwrites hide bugs). An
unknown name raises ``KdlabError`` listing the closest matches and every name
of that kind. The built-in entries are imported lazily on first lookup, so
importing this module is free and has no dependencies; the installed packages'
``kdlab.plugins`` entry points load right after them (kdlab.plugins).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import re
from typing import Any, Callable

from kdlab.errors import KdlabError

_NAME = re.compile(r"[a-z][a-z0-9_]*")

KINDS = ("dataset", "model", "loss", "method", "metric", "attack", "view")

# Modules whose import registers the built-in entries of each kind.
_BUILTIN_MODULES = ("kdlab.data", "kdlab.models", "kdlab.losses", "kdlab.metrics", "kdlab.methods", "kdlab.seq",
                    "kdlab.robust", "kdlab.engine.placement", "kdlab.engine.fsdp")
# Kinds whose built-ins live apart from the torch-heavy packages above: looking them up (``kdlab plot``'s
# choices) imports only these, so the CLI's start-up does not pay for torch.
_KIND_MODULES = {"view": ("kdlab.study.views",)}

_entries: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_loaded = False
_kinds_loaded: set[str] = set()


def _check_kind(kind: str) -> None:
    if kind not in _entries:
        raise KdlabError(f"unknown registry kind {kind!r}; kinds are: {', '.join(KINDS)}")


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator registering ``obj`` under ``kind``/``name``; returns ``obj`` unchanged."""
    _check_kind(kind)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"registry names are lower snake case: {name!r}")

    def decorator(obj: Any) -> Any:
        if name in _entries[kind]:
            raise ValueError(f"{kind} {name!r} is registered twice ({_entries[kind][name]!r} and {obj!r})")
        _entries[kind][name] = obj
        return obj

    return decorator


def _load_builtins(kind: str | None = None) -> None:
    global _loaded
    if kind in _KIND_MODULES:
        if kind not in _kinds_loaded:
            for module in _KIND_MODULES[kind]:
                importlib.import_module(module)
            _kinds_loaded.add(kind)
        return
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True  # only once every import succeeded: a failed import is retried, not half-registered
        from kdlab.plugins import load_entry_points

        load_entry_points()  # installed packages' ``kdlab.plugins`` entry points, once, after the built-ins


def get(kind: str, name: str, *, key: str | None = None) -> Any:
    """Return the entry ``name`` of ``kind``; ``key`` (a config path) prefixes the error."""
    _check_kind(kind)
    _load_builtins(kind)
    try:
        return _entries[kind][name]
    except (KeyError, TypeError):
        known = sorted(_entries[kind])
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        where = f"{key}: " if key else ""
        plural = "losses" if kind == "loss" else f"{kind}s"
        listing = "kdlab plot --help" if kind == "view" else f"kdlab list {plural}"
        raise KdlabError(
            f"{where}unknown {kind} {name!r}; {hint}known {plural}: {', '.join(known)} (see `{listing}`)"
        ) from None


def names(kind: str, pattern: str = "*") -> list[str]:
    """Sorted names of ``kind`` matching the shell-style ``pattern``."""
    _check_kind(kind)
    _load_builtins(kind)
    return sorted(n for n in _entries[kind] if fnmatch.fnmatchcase(n, pattern))


def summary(kind: str, name: str) -> str:
    """First line of the entry's docstring (empty if it has none)."""
    doc = getattr(get(kind, name), "__doc__", None) or ""
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines else ""
