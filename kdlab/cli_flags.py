"""The numeric flags of kdlab's commands, each declared once and checked by the config's coercer.

A flag that sets a config key takes that key's declaration (``kdlab eval --delta`` is ``robust.delta``,
``--restarts`` is ``robust.attacks[].restarts``; ``kdlab tune --trials`` is ``tune.trials``); the others are
declared here. A value that breaks its declaration (NaN, ±inf, out of range, beyond 64 bits) is one line naming
the flag and its value, exit code 2, before the command does any work. (Text that is not a number at all is
argparse's to refuse, also with exit code 2.)
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Union

from annotated_types import Ge, Le

from kdlab.config.schema import AttackConfig, RobustConfig
from kdlab.config.validate import coerce, hints
from kdlab.errors import ConfigError
from kdlab.study.tune_space import SamplerSeed, Trials

_ATTACK, _ROBUST = hints(AttackConfig), hints(RobustConfig)

# command -> {argparse dest: (flag, declaration)}
FLAGS: dict[str, dict[str, tuple[str, Any]]] = {
    "run": {"workers": ("--workers", Annotated[int, Ge(1), Le(1024)])},  # processes of this machine
    "eval": {
        "steps": ("--steps", _ATTACK["steps"]), "step_size": ("--step-size", _ATTACK["step_size"]),
        "restarts": ("--restarts", _ATTACK["restarts"]), "seed": ("--seed", _ATTACK["seed"]),
        "subset": ("--subset", Annotated[int, Ge(0), Le(1 << 40)]),  # robust.subset, with 0 for the whole split
        "subset_seed": ("--subset-seed", _ROBUST["subset_seed"]),
        "faithfulness_steps": ("--faithfulness-steps", _ROBUST["faithfulness_steps"]),
        "delta": ("--delta", _ROBUST["delta"]),
    },
    "tune": {"trials": ("--trials", Trials), "seed": ("--seed", SamplerSeed)},
    "show": {"samples": ("--samples", Annotated[int, Ge(0), Le(1 << 20)])},  # generations printed
}


def _given(declared: Any) -> Any:
    """``Optional[X]`` → ``X``: a flag that is given has a value (a key's null is the flag left out)."""
    if typing.get_origin(declared) in (Union, types.UnionType) and type(None) in typing.get_args(declared):
        rest = tuple(a for a in typing.get_args(declared) if a is not type(None))
        return rest[0] if len(rest) == 1 else Union[rest]
    return declared


def check_flags(args) -> None:
    """Refuse the numeric flags of ``args.command`` that break their declaration; every problem at once."""
    problems: list[str] = []
    for dest, (flag, declared) in FLAGS.get(getattr(args, "command", None), {}).items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        errors: list[str] = []
        coerce(value, _given(declared), flag, errors)
        problems.extend(f"{flag} {value}{error[len(flag):]}" for error in errors)  # "--subset -3: must be ≥ 0, ..."
    if problems:
        raise ConfigError(problems)
