"""The one coercer (kdlab.config.validate): each bound kind, non-finite floats, 64-bit integers, declarations."""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Optional

import pytest
from annotated_types import Ge, Gt, Interval, Le, Lt, MaxLen, MinLen

from kdlab import registry
from kdlab.api import parse_method
from kdlab.config import ConfigError, KdlabError, entry_parameters, parse_experiment
from kdlab.config.validate import NonFinite, Says, check_fields, coerce


def problems(value, tp) -> list[str]:
    errors: list[str] = []
    coerce(value, tp, "key", errors)
    return errors


@pytest.mark.parametrize(("tp", "good", "bad", "text"), [
    (Annotated[float, Gt(0)], 1e-9, 0.0, "key: must be > 0, got 0.0"),
    (Annotated[float, Ge(0)], 0.0, -1e-9, "key: must be ≥ 0, got -1e-09"),
    (Annotated[int, Lt(10)], 9, 10, "key: must be < 10, got 10"),
    (Annotated[int, Le(10)], 10, 11, "key: must be ≤ 10, got 11"),
    (Annotated[float, Interval(ge=0, lt=1)], 0.0, 1.0, "key: must be in [0, 1), got 1.0"),
    (Annotated[str, MinLen(1)], "a", "", "key: must be non-empty, got ''"),
    (Annotated[str, MaxLen(3)], "abc", "abcd", "key: must be at most 3 long, got 4"),
    (Annotated[float, Gt(0), Says("a positive finite number")], 2.0, -1.0, "key: must be a positive finite number"),
    (Optional[Annotated[int, Ge(1)]], None, 0, "key: must be ≥ 1 or null, got 0"),
])
def test_each_bound_kind_accepts_its_edge_and_refuses_beyond_it(tp, good, bad, text):
    assert problems(good, tp) == []
    found = problems(bad, tp)
    assert len(found) == 1 and found[0].startswith(text), found


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_unless_the_field_opts_in(value):
    assert problems(value, float) == [f"key: must be a finite number, got {value!r}"]
    assert problems(value, Annotated[float, Gt(0)])[0].startswith("key: must be a finite number > 0")
    assert problems(value, Annotated[float, NonFinite()]) == []


def test_integers_refuse_booleans_floats_and_more_than_64_bits():
    assert problems(True, int) == ["key: expected an integer, got True"]
    assert problems(1.0, int) == ["key: expected an integer, got 1.0"]
    assert problems(2 ** 63 - 1, int) == [] and problems(-(2 ** 63), int) == []
    assert "does not fit in 64 bits" in problems(2 ** 63, int)[0]
    assert "too large for a float" in problems(10 ** 400, float)[0]


def test_bounds_apply_inside_lists_with_the_item_path():
    assert problems([0.5, 2.0], list[Annotated[float, Interval(ge=0, le=1)]]) == ["key[1]: must be in [0, 1], got 2.0"]


def test_check_fields_validates_a_dataclass_built_in_python():
    @dataclasses.dataclass
    class H:
        rate: Annotated[float, Gt(0)] = 1.0

    errors: list[str] = []
    check_fields(H(rate=-1.0), "method", errors)
    assert errors == ["method.rate: must be > 0, got -1.0"]


# ----------------------------------------------------------------------------- method Hparams declarations


@pytest.mark.parametrize(("method", "key", "value"), [
    ("kd", "temperature", 0.0), ("kd", "temperature", math.nan), ("kd", "alpha", 2.0), ("kd", "alpha", -0.1),
    ("multi_teacher", "temperature", -1.0), ("ard", "steps", -1), ("adversarial_kd", "discriminator_width", 10 ** 9),
    ("gkd", "sft_steps", -1), ("gkd", "on_policy_fraction", 1.5), ("mtard", "weight_lr", 2.0),
    ("policy_gradient_kd", "baseline_decay", 1.0), ("faithful_kd", "pgd_steps", 0), ("rl_schedule", "alphas", [1.5]),
])
def test_method_hyperparameters_are_bounded_at_config_validation(method, key, value):
    with pytest.raises(ConfigError) as info:
        parse_method(method, {key: value})
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"method.{key}"), info.value.problems


def test_every_numeric_hyperparameter_of_every_method_declares_a_bound_or_is_unbounded_on_purpose():
    """A new float/int hyperparameter without a declaration is seen here (NaN is still refused for all)."""
    unbounded = []
    for name in registry.names("method"):
        for key, (tp, _) in entry_parameters("method", name).items():
            if tp in (int, float):
                unbounded.append(f"{name}.{key}")
    assert unbounded == [], unbounded


def test_a_method_built_in_python_meets_the_same_declarations():
    kd = registry.get("method", "kd")
    with pytest.raises(KdlabError, match=r"^method.alpha: must be in \[0, 1\], got 2.0"):
        kd(kd.Hparams(alpha=2.0), student=None, teacher=None)


def test_mtard_cross_field_rules_run_at_config_validation():
    raw = {"teacher": {"members": [{"model": "cnn1d"}, {"model": "cnn1d", "width": 8}]},
           "method": {"name": "mtard", "temperature_min": 5.0, "temperature_max": 2.0}}
    with pytest.raises(ConfigError) as info:
        parse_experiment(raw)
    assert info.value.problems == ["method.temperature_min: 5.0 exceeds temperature_max 2.0"]


def test_tune_reads_integer_keys_from_the_declarations():
    from kdlab.study.tune_space import takes_integers

    raw = {"student": {"model": "cnn1d"}, "teacher": {"model": "mlp"}, "method": {"name": "scratch"}}
    grid = {"method.name": ["scratch", "kd"]}
    assert takes_integers(raw, "train.epochs") and takes_integers(raw, "teacher.train.epochs")
    assert takes_integers(raw, "student.width") and takes_integers(raw, "teacher.depth")
    assert takes_integers(raw, "train.steps")  # Optional[Count]
    assert not takes_integers(raw, "train.lr") and not takes_integers(raw, "method.temperature", grid)
    assert not takes_integers(raw, "nothing.here") and not takes_integers(raw, "student.bogus")
