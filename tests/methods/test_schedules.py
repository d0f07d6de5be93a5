"""Loss-term weight schedules: closed forms at hand-picked progress values."""
from __future__ import annotations

import math

import pytest

from kdlab.errors import KdlabError
from kdlab.methods.schedules import SCHEDULES, term_weight


def test_the_schedules_on_offer():
    assert SCHEDULES == ("constant", "linear_warmup", "cosine")


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_constant_is_the_weight_at_any_progress(progress):
    assert term_weight(2.5, progress) == 2.5  # the default schedule
    assert term_weight(2.5, progress, schedule="constant", warmup=0.5, final_weight=7.0) == 2.5


@pytest.mark.parametrize(("progress", "expected"), [
    (0.0, 0.0),     # starts from nothing
    (0.1, 2.0),     # half way through the warm-up: 4 · 0.1/0.2
    (0.2, 4.0),     # end of the warm-up: the full weight
    (0.6, 4.0),     # stays there
    (1.0, 4.0),
])
def test_linear_warmup_ramps_from_zero_over_the_warmup_fraction(progress, expected):
    assert term_weight(4.0, progress, schedule="linear_warmup", warmup=0.2) == pytest.approx(expected, abs=1e-12)


def test_linear_warmup_without_warmup_is_the_weight():
    assert term_weight(4.0, 0.0, schedule="linear_warmup", warmup=0.0) == 4.0


@pytest.mark.parametrize(("progress", "expected"), [
    (0.0, 3.0),                 # cos 0 = 1: the initial weight
    (0.5, 0.5 * (3.0 + 1.0)),   # cos π/2 = 0: the mid-point of weight and final_weight, 2.0
    (1.0, 1.0),                 # cos π = −1: final_weight
    (0.25, 1.0 + 2.0 * 0.5 * (1 + math.sqrt(0.5))),  # cos π/4 = √½
])
def test_cosine_anneals_from_weight_to_final_weight(progress, expected):
    assert term_weight(3.0, progress, schedule="cosine", final_weight=1.0) == pytest.approx(expected, abs=1e-12)


def test_cosine_final_weight_defaults_to_zero():
    assert term_weight(3.0, 1.0, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert term_weight(3.0, 0.5, schedule="cosine") == pytest.approx(1.5, abs=1e-12)


def test_unknown_schedule_is_a_kdlab_error_listing_the_schedules():
    with pytest.raises(KdlabError, match=r"'cosin'.*constant, linear_warmup, cosine"):
        term_weight(1.0, 0.5, schedule="cosin")


def test_linear_warmup_is_the_step_rule_lagging_mdistillers_dkd_warmup_by_half_an_epoch():
    """docs/methods.md (dkd): kdlab ramps per step, mdistiller's DKD uses min(epoch / 20, 1), epochs from 1."""
    epochs, warm, steps_per_epoch = 240, 20, 50
    total = epochs * steps_per_epoch
    for epoch in (1, 2, 10, 20, 21, 240):  # 1-based, as mdistiller
        mdistiller = min(epoch / warm, 1.0)
        weights = [term_weight(1.0, ((epoch - 1) * steps_per_epoch + i) / total, schedule="linear_warmup",
                               warmup=warm / epochs) for i in range(steps_per_epoch + 1)]
        assert weights[-1] == pytest.approx(mdistiller, abs=1e-12)  # equal at the epoch's end
        assert weights[0] == pytest.approx(min((epoch - 1) / warm, 1.0), abs=1e-12)  # one epoch behind at its start
        if epoch <= warm:  # on average half an epoch behind
            mean = sum(weights[:-1]) / steps_per_epoch
            assert mean == pytest.approx((epoch - 0.5 - 0.5 / steps_per_epoch) / warm, abs=1e-12)


def test_losslab_dkd_warmup_is_mdistillers_20_of_240():
    import pathlib

    import yaml

    config = yaml.safe_load((pathlib.Path(__file__).parents[2] / "configs/losslab/mnist1d.yaml").read_text())
    dkd = config["grid"]["method.terms"]["dkd"]["dkd"]
    assert dkd["schedule"] == "linear_warmup"
    assert dkd["warmup"] == pytest.approx(20 / 240, abs=1e-4)
