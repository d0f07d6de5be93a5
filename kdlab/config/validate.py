"""The one coercer: checks a value against a type annotation and the bounds declared on it.

Bounds are ``annotated_types`` metadata on ``Annotated`` types (Gt, Ge, Lt, Le, Interval, MinLen, MaxLen),
so a field states its range once, where it is declared: ``lr: Annotated[float, Gt(0)]``. The same coercer
validates the schema, every method's ``Hparams``, model and dataset factory options, ``distill`` terms and
``tune.space`` ranges. (annotated_types rather than pydantic: a dozen constraint kinds are all kdlab needs,
messages stay in kdlab's one-line ``key: what; fix`` form, and collecting every problem at once is natural.)

Every number is checked: NaN and ±inf are refused unless the field carries ``NonFinite()``; integers are
refused when they are booleans or do not fit in 64 bits.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import operator
import reprlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types as at

INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class Says:
    """Field metadata: how a bound reads in messages, e.g. ``Says("a positive finite number")``."""

    text: str


@dataclass(frozen=True)
class NonFinite:
    """Field metadata: this float may be NaN or ±inf (the default refuses both)."""


@dataclass(frozen=True)
class NotInRunId:
    """Factory-option metadata: left out of the run's identity (``RunSpec.resolved``) — always, for an option that
    changes how inputs are obtained, never the results (a dataset's ``download``); with ``at_default``, only at its
    default (an option added later: the ids of runs that do not set it stay as they were)."""

    at_default: bool = False


def hints(cls: Any) -> dict[str, Any]:
    """Type hints with their ``Annotated`` metadata kept."""
    return typing.get_type_hints(cls, include_extras=True)


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother = 3, 60, 60


def _show(value: Any) -> str:
    """A value in a message: short, and safe for deeply nested or huge values."""
    return _SHOW.repr(value)


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


_OPS = {"gt": (operator.gt, ">"), "ge": (operator.ge, "≥"), "lt": (operator.lt, "<"), "le": (operator.le, "≤")}


def _limits(m: Any) -> list[tuple[str, Any]]:
    """A numeric bound as (op, value) pairs, lower first: ``Interval(ge=0, lt=1)`` → ``[("ge", 0), ("lt", 1)]``."""
    return [(k, getattr(m, k)) for k in _OPS if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le, at.Interval))
            and getattr(m, k, None) is not None]


def _bound_text(m: Any) -> str:
    """``Interval(ge=0, lt=1)`` → ``"in [0, 1)"``; ``Gt(0)`` → ``"> 0"``."""
    limits = _limits(m)
    if len(limits) == 2:
        (low, a), (high, b) = limits
        return f"in {'[' if low == 'ge' else '('}{_num(a)}, {_num(b)}{']' if high == 'le' else ')'}"
    return f"{_OPS[limits[0][0]][1]} {_num(limits[0][1])}"


def _check_annotated(value: Any, meta: list, path: str, errors: list[str], finite: bool) -> None:
    """The bounds of ``Annotated`` metadata, on a value already of the right type."""
    says = next((m.text for m in meta if isinstance(m, Says)), None)
    numeric = [m for m in meta if _limits(m)]
    if numeric and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value) and not finite:
            return
        if isinstance(value, float) and not math.isfinite(value) and finite:
            shown = says or "a finite number " + _bound_text(numeric[0])
            errors.append(f"{path}: must be {shown}, got {value!r}")
            return
        failed = next((m for m in numeric if not all(_OPS[op][0](value, v) for op, v in _limits(m))), None)
        if failed is not None:
            errors.append(f"{path}: must be {says or _bound_text(failed)}, got {value!r}")
        return
    for m in meta:
        if isinstance(m, (at.MinLen, at.MaxLen)) and hasattr(value, "__len__"):
            n = len(value)
            if isinstance(m, at.MinLen) and n < m.min_length:
                what = "non-empty" if m.min_length == 1 else f"at least {m.min_length} long"
                errors.append(f"{path}: must be {says or what}, got {value!r}")
            if isinstance(m, at.MaxLen) and n > m.max_length:
                errors.append(f"{path}: must be {says or f'at most {m.max_length} long'}, got {n} "
                              f"({str(value)[:24]!r}...)")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str, errors: list[str], *, finite: bool = True) -> Any:
    """Check ``value`` against annotation ``tp`` (and its bounds); return it converted (ints to floats,
    lists to tuples). Each problem is appended to ``errors`` as one line starting with ``path``."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        meta = list(tp.__metadata__)
        base = args[0]
        before = len(errors)
        finite = finite and not any(isinstance(m, NonFinite) for m in meta)
        bounded = any(isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le, at.Interval)) for m in meta)
        # With numeric bounds, a NaN or inf is reported with them ("a finite number > 0"), once.
        out = coerce(value, base, path, errors, finite=finite and not bounded)
        if len(errors) == before and out is not None:
            _check_annotated(out, meta, path, errors, finite=finite)
        return out
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:  # Optional[X]: report X's own, more precise errors
            trial: list[str] = []
            out = coerce(value, non_null[0], path, trial, finite=finite)
            nullable = type(None) in args
            errors.extend(e.replace(", got", " or null, got", 1) if nullable and e.startswith(f"{path}: must be ")
                          and " or null" not in e else e for e in trial)
            return out
        for arg in non_null:
            trial = []
            out = coerce(value, arg, path, trial, finite=finite)
            if not trial:
                return out
        # The first member of the right kind explains best (a number out of range, not "expected ...").
        for arg in non_null:
            trial = []
            coerce(value, arg, path, trial, finite=finite)
            if trial and ": must be " in trial[0]:
                errors.append(trial[0])
                return value
        errors.append(f"{path}: expected {type_name(tp)}, got {_show(value)}")
        return value
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) and a == value for a in args):
            allowed = ", ".join(repr(a) for a in args)
            errors.append(f"{path}: {_show(value)} is not allowed; choose one of {allowed}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected {type_name(tp)}, got {_show(value)}")
            return value
        if args and origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                errors.append(f"{path}: expected {len(args)} values, got {len(value)}")
                return value
            items = [coerce(v, a, f"{path}[{i}]", errors, finite=finite) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [coerce(v, item_tp, f"{path}[{i}]", errors, finite=finite) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {_show(value)}")
            return value
        value_tp = args[1] if args else Any
        return {k: coerce(v, value_tp, f"{path}.{k}", errors, finite=finite) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {_show(value)}")
        elif not INT64[0] <= value <= INT64[1]:
            errors.append(f"{path}: {str(value)[:24]}... does not fit in 64 bits; give a smaller integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {_show(value)}")
            return value
        try:
            out = float(value)
        except OverflowError:
            errors.append(f"{path}: {str(value)[:24]}... is too large for a float; give a smaller number")
            return value
        if finite and not math.isfinite(out):
            errors.append(f"{path}: must be a finite number, got {out!r}")
        return out
    if tp is str or tp is Path:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path, errors)
    return value  # unannotated exotic types are passed through unchanged


def unknown_key(path: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown key{hint}; allowed keys: {', '.join(sorted(allowed)) or '(none)'}"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_dataclass(cls: type, raw: Any, path: str, errors: list[str], *, extra_ok: bool = False) -> Any:
    """Build dataclass ``cls`` from a mapping, collecting every problem into ``errors``.

    With ``extra_ok`` unknown keys are gathered into the ``options`` field, to be
    checked against the registry entry by the caller.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{path or 'config'}: expected a mapping, got {_show(raw)}")
        return cls()
    types_ = hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "options"]
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in names:
            before = len(errors)
            coerced = coerce(value, types_[key], join(path, key), errors)
            # A wrongly typed value is reported and replaced by the default, so the checks after
            # parsing (cross-field rules) only ever see the types they were written for.
            # Sections (and lists of sections) are kept: their bad fields already hold defaults.
            if len(errors) == before or dataclasses.is_dataclass(coerced) or (
                    isinstance(coerced, list) and coerced and all(dataclasses.is_dataclass(c) for c in coerced)):
                kwargs[key] = coerced
        elif extra_ok:
            options[key] = value
        else:
            errors.append(unknown_key(join(path, key), key, names))
    obj = cls(**kwargs)
    if extra_ok:
        obj.options = options
    return obj


def check_fields(obj: Any, path: str, errors: list[str]) -> None:
    """Check an already built dataclass (e.g. a method's ``Hparams`` made in Python) against its bounds."""
    types_ = hints(type(obj))
    for f in dataclasses.fields(obj):
        coerce(getattr(obj, f.name), types_[f.name], join(path, f.name), errors)


# Bounds shared by many hyperparameters (methods declare their fields with these).
Positive = Annotated[float, at.Gt(0), at.Le(1e6)]  # a finite number > 0 (temperatures, learning rates, scales)
Weight = Annotated[float, at.Interval(ge=-1e6, le=1e6)]  # a finite loss weight (may be negative)
NonNegative = Annotated[float, at.Ge(0), at.Le(1e6)]  # a finite weight ≥ 0
UnitInterval = Annotated[float, at.Interval(ge=0, le=1)]  # a probability, a mixing weight, a fraction
Count = Annotated[int, at.Ge(1), at.Le(1 << 20)]  # a number of steps or units: at least one
NonNegativeCount = Annotated[int, at.Ge(0), at.Le(1 << 30)]
Width = Annotated[int, at.Ge(1), at.Le(1 << 16)]  # a layer width: bounded so a typo cannot ask for terabytes
Depth = Annotated[int, at.Ge(0), at.Le(1024)]  # a number of layers
Samples = Annotated[int, at.Ge(1), at.Le(1 << 26)]  # a dataset size
