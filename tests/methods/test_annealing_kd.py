"""Annealing-KD (Jafari et al. 2021): the schedule against the official code's counter, both phases' losses
against their formulas in float64, bad input, and a run through fit()."""
from __future__ import annotations

import math

import pytest
import torch

from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.methods.annealing_kd import annealing_schedule
from kdlab.methods.base import Batch, Outputs


def _method(**options):
    return build_method(MethodConfig("annealing_kd", options), student=torch.nn.Identity(),
                        teacher=torch.nn.Identity())


def _official_scales(epochs_phase1: int, max_temperature: int) -> list[float]:
    """The teacher scale per phase-1 epoch, re-derived from the official ``annealing_kd_train.py`` loop:
    T = 1; each 0-based epoch > 0 with epoch % int(epochs / max_T) == 0 does T += 1; target T/max_T · z_T."""
    scales, counter = [], 1
    for epoch in range(epochs_phase1):
        if epoch % int(epochs_phase1 / max_temperature) == 0 and epoch > 0:
            counter += 1
        scales.append(counter / max_temperature)
    return scales


@pytest.mark.parametrize(("phase1", "max_temperature"), [(20, 10), (200, 10), (14, 7), (25, 10)])
def test_phase_one_scales_match_the_official_code(phase1, max_temperature):
    n = phase1 + 5  # 5 more units of phase 2
    ours = [annealing_schedule(e, n, max_temperature=max_temperature, phase1_fraction=phase1 / n)
            for e in range(n)]
    assert all(phase == 1 for phase, _, _ in ours[:phase1]) and all(phase == 2 for phase, _, _ in ours[phase1:])
    # The official counter overshoots max_T (φ > 1) when max_T does not divide the phase-1 epochs (25/10);
    # kdlab clamps T at 1, i.e. φ at 1.
    expected = [min(1.0, s) for s in _official_scales(phase1, max_temperature)]
    assert [scale for _, _, scale in ours[:phase1]] == pytest.approx(expected, abs=1e-12)


def test_the_schedule_at_chosen_units():
    # n = 30, phase1_fraction 2/3 → 20 units of phase 1; τ_max = 10, k = 2: T = 10 − ⌊e/2⌋, φ = 1 − (T−1)/10.
    at = {e: annealing_schedule(e, 30, max_temperature=10, phase1_fraction=2 / 3) for e in (0, 1, 2, 19, 20, 29)}
    assert at[0] == (1, 10, pytest.approx(0.1)) and at[1] == (1, 10, pytest.approx(0.1))
    assert at[2] == (1, 9, pytest.approx(0.2))
    assert at[19] == (1, 1, pytest.approx(1.0))
    assert at[20] == (2, 1, 1.0) and at[29] == (2, 1, 1.0)


def test_phase_one_is_the_mse_to_the_annealed_teacher_and_phase_two_cross_entropy():
    method = _method(max_temperature=4, phase1_fraction=0.5, unit="step")
    s = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[4.0, 0.0, -2.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([2, 1])
    # 16 steps, 8 in phase 1, k = 2: step 2 → e = 2, T = 4 − 1 = 3, φ = 1 − 2/4 = 0.5.
    method.set_progress(2, 16)
    assert method.schedule() == (1, 3, 0.5) and method.teacher_needed()
    # z_S − φ·z_T: row 1 (1 − 2, −1, 0.5 + 1) = (−1, −1, 1.5) → Σ² = 4.25; row 2 (−1, 1, 0) → 2
    terms = method.loss_terms(Batch(s, y), Outputs(s), Outputs(t))
    assert list(terms) == ["kd", "ce"] and terms["ce"].item() == 0.0
    assert terms["kd"].item() == pytest.approx((4.25 + 2.0) / 6, rel=1e-12)  # F.mse_loss: mean over 2 × 3
    assert terms["kd"].item() == pytest.approx(torch.nn.functional.mse_loss(s, 0.5 * t).item(), rel=1e-12)
    summed = _method(max_temperature=4, phase1_fraction=0.5, unit="step", reduction="sum")
    summed.set_progress(2, 16)
    assert summed.loss_terms(Batch(s, y), Outputs(s), Outputs(t))["kd"].item() == pytest.approx((4.25 + 2.0) / 2)
    method.set_progress(8, 16)  # phase 2: cross-entropy, no teacher
    assert method.schedule()[0] == 2 and not method.teacher_needed()
    terms = method.loss_terms(Batch(s, y), Outputs(s), None)
    # CE row 1: log(e + e^−1 + e^0.5) − 0.5; row 2: log(1 + e² + e) − 2
    ce = ((math.log(math.e + math.exp(-1) + math.exp(0.5)) - 0.5) + (math.log(1 + math.exp(2) + math.e) - 2)) / 2
    assert terms["kd"].item() == 0.0 and terms["ce"].item() == pytest.approx(ce, rel=1e-12)


@pytest.mark.parametrize(("options", "match"), [
    ({"max_temperature": 0}, r"max_temperature \(annealing_kd\)"),
    ({"max_temperature": 2.5}, r"max_temperature \(annealing_kd\)"),
    ({"phase1_fraction": 0.0}, r"phase1_fraction \(annealing_kd\)"),
    ({"phase1_fraction": 1.5}, r"phase1_fraction \(annealing_kd\)"),
    ({"reduction": "batchmean"}, r"reduction \(annealing_kd\)"),
])
def test_bad_hyperparameters_are_kdlab_errors_naming_the_method(options, match):
    with pytest.raises(KdlabError, match=match):
        _method(**options)


def test_a_phase_one_shorter_than_max_temperature_is_a_kdlab_error():
    method = _method(max_temperature=10, phase1_fraction=0.5)
    method.steps_per_epoch = 1
    method.set_progress(0, 10)  # 5 epochs of phase 1 for 10 temperatures
    with pytest.raises(KdlabError, match=r"max_temperature \(annealing_kd\): 10 .* 5 units"):
        method.schedule()


def test_a_run_through_fit_switches_phase(tmp_path):
    splits = build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 120, "num_test": 30,
                                        "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                          val_fraction=0.2, split_seed=0)
    torch.manual_seed(0)
    teacher = build_model("mlp", {"width": 16}, splits)
    student = build_model("mlp", {"width": 8}, splits)
    method = build_method(MethodConfig("annealing_kd", {"max_temperature": 2, "phase1_fraction": 0.5}),
                          student=student, teacher=teacher, input_shape=tuple(splits.input_shape))
    logged = []
    result = fit(student=student, method=method, teacher=teacher, splits=splits, seed=0,
                 train=TrainConfig(epochs=4, batch_size=32, lr=0.01, eval_every=1, device="cpu"),
                 on_epoch=lambda epoch, metrics: logged.append(metrics))
    assert math.isfinite(result.final["test/acc"])
    assert [m["method/phase"] for m in logged] == [1.0, 1.0, 2.0, 2.0]
    assert [m["method/phi"] for m in logged] == [0.5, 1.0, 1.0, 1.0]
    assert [m["train/loss/ce"] == 0.0 for m in logged] == [True, True, False, False]
    assert [m["train/loss/kd"] == 0.0 for m in logged] == [False, False, True, True]


@pytest.mark.parametrize(("options", "key", "fragment"), [
    ({"method": {"max_temperature": 10}, "train": {"epochs": 12}}, "method.max_temperature (annealing_kd)",
     "do not fit in 8 units"),  # phase 1 = round(2/3 · 12) = 8 epochs for 10 temperatures
    ({"method": {"max_temperature": 5, "unit": "step"}, "train": {"steps": 6}},
     "method.max_temperature (annealing_kd)", "do not fit in 4 units"),
    ({"method": {"phase1_fraction": 0.0}}, "method.phase1_fraction", "in (0, 1]"),
])
def test_the_config_refuses_annealing_kd_before_any_work(refuses_before_work, options, key, fragment):
    """``kdlab run --dry-run``: exit 2, one line naming the key, nothing written (no teacher trained first)."""
    refuses_before_work("annealing_kd", options, key, fragment)
