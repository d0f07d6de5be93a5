"""Continuation-KD (Jafari et al. 2022, arXiv 2212.05998, Algorithm 1): schedules at chosen units, the loss
against its formula on hand-worked inputs, its limits (ψ = 1, the hinge), bad input, and a run through fit()."""
from __future__ import annotations

import math

import pytest
import torch

from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy
from kdlab.methods.base import Batch, Outputs
from kdlab.methods.continuation_kd import continuation_hinge, phi, psi_at, temperature_at, unit_index


def _method(**options):
    return build_method(MethodConfig("continuation_kd", options), student=torch.nn.Identity(),
                        teacher=torch.nn.Identity())


@pytest.mark.parametrize(("temperature", "max_temperature", "expected"), [
    (20, 20, 1 / 20),   # the first, most annealed teacher: φ = 1/T_max
    (11, 20, 0.5),      # 1 − 10/20
    (1, 20, 1.0),       # the full teacher
    (6, 10, 0.5),       # 1 − 5/10
])
def test_phi_is_one_minus_t_minus_one_over_t_max(temperature, max_temperature, expected):
    assert phi(temperature, max_temperature) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("i", "n", "max_temperature", "expected"), [
    # Algorithm 1, vision setting: n = 200 epochs, T_max = 20, k = ⌊200/20⌋ = 10; T ← T − 1 when i mod 10 = 0.
    (1, 200, 20, 20), (9, 200, 20, 20),   # before the first drop
    (10, 200, 20, 19), (19, 200, 20, 19),
    (190, 200, 20, 1), (199, 200, 20, 1),
    (200, 200, 20, 1),                    # the algorithm as written would reach T = 0 here: clamped at 1
    # n not a multiple of T_max: n = 25, T_max = 10, k = 2.
    (1, 25, 10, 10), (2, 25, 10, 9), (18, 25, 10, 1), (25, 25, 10, 1),
])
def test_temperature_steps_down_as_algorithm_1(i, n, max_temperature, expected):
    assert temperature_at(i, n, max_temperature) == expected


@pytest.mark.parametrize(("i", "n", "ramp", "jump", "expected"), [
    # vision: ψ(i) = i/150 for i ≤ 150, then 1 (n = 200)
    (1, 200, 0.75, 1.0, 1 / 150), (75, 200, 0.75, 1.0, 0.5), (150, 200, 0.75, 1.0, 1.0), (200, 200, 0.75, 1.0, 1.0),
    # NLU: ψ(i) = i/40 for i ≤ 20, then 1 (n = 30)
    (10, 30, 40 / 30, 20 / 30, 0.25), (20, 30, 40 / 30, 20 / 30, 0.5), (21, 30, 40 / 30, 20 / 30, 1.0),
    (30, 30, 40 / 30, 20 / 30, 1.0),
    (0, 30, 40 / 30, 20 / 30, 0.0),
])
def test_psi_ramps_as_the_paper_settings(i, n, ramp, jump, expected):
    assert psi_at(i, n, ramp=ramp, jump=jump) == pytest.approx(expected, abs=1e-12)


def test_the_method_maps_steps_to_epochs_or_steps():
    assert unit_index(0, 40, 4, "epoch") == (1, 10)
    assert unit_index(7, 40, 4, "epoch") == (2, 10)
    assert unit_index(7, 40, 4, "step") == (8, 40)
    method = _method(max_temperature=5, psi_ramp=0.5)
    method.steps_per_epoch = 4
    expected = {0: 5, 3: 5, 4: 4, 11: 4, 12: 3, 39: 1}  # epoch i = step//4 + 1, k = ⌊10/5⌋ = 2: T = 5 − ⌊i/2⌋
    for step, temperature in expected.items():
        method.set_progress(step, 40)
        T, scale, psi = method.schedule()
        assert (T, scale) == (temperature, pytest.approx(1 - (temperature - 1) / 5))
        assert psi == pytest.approx(min(1.0, (step // 4 + 1) / 5))
    stepwise = _method(max_temperature=5, unit="step")
    stepwise.set_progress(7, 40)  # i = 8 of 40, k = 8
    assert stepwise.schedule()[0] == 4


def test_loss_equals_the_formula_on_a_hand_worked_batch():
    # unit: step, n = 100, T_max = 10 (k = 10); step 39 → i = 40: T = 10 − 4 = 6, φ = 1 − 5/10 = 0.5;
    # ψ = 40/(1.6·100) = 0.25; m = 2 → m·φ = 1.
    method = _method(max_temperature=10, margin=2.0, psi_ramp=1.6, unit="step")
    method.set_progress(39, 100)
    assert method.schedule() == (6, 0.5, pytest.approx(0.25))
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    t = torch.tensor([[4.0, 0.0, -2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # row 1: z_S − φ z_T = (−1, 0, 1), ‖·‖² = 2, hinge max(0, 2 − 1) = 1
    # row 2: (0, 0.5, 0), ‖·‖² = 0.25 < m·φ: hinge 0           → per-sample mean 0.5
    # CE row 1: log(e + 2) − 1;  row 2: log(2 + e^0.5) − 0.5
    ce = ((math.log(math.e + 2) - 1) + (math.log(2 + math.exp(0.5)) - 0.5)) / 2
    terms = method.loss_terms(Batch(s, y), Outputs(s), Outputs(t))
    assert list(terms) == ["kd", "ce"]
    assert terms["kd"].item() == pytest.approx(0.75 * 0.5, rel=1e-12)
    assert terms["ce"].item() == pytest.approx(0.25 * ce, rel=1e-12)
    # the batch form: the hinge of the mean squared norm, max(0, (2 + 0.25)/2 − 1) = 0.125
    batch_form = continuation_hinge(s, t, phi=0.5, margin=2.0, hinge="batch")
    assert batch_form.item() == pytest.approx(0.125, rel=1e-12)


def test_at_psi_one_it_is_cross_entropy_and_the_teacher_is_not_run():
    method = _method(max_temperature=2, psi_ramp=0.5)
    method.steps_per_epoch = 1
    method.set_progress(5, 10)  # epoch 6 of 10 ≥ 0.5·10: ψ = 1
    assert method.schedule()[2] == 1.0 and not method.teacher_needed()
    torch.manual_seed(0)
    s, y = torch.randn(5, 4, requires_grad=True), torch.randint(0, 4, (5,))
    terms = method.loss_terms(Batch(s, y), Outputs(s), None)  # the loop passes no teacher output
    assert terms["kd"].item() == 0.0
    assert terms["ce"].item() == pytest.approx(cross_entropy(s, y).item(), rel=1e-7)
    method.set_progress(0, 10)
    assert method.teacher_needed()


def test_hinge_is_zero_below_the_annealed_margin():
    torch.manual_seed(0)
    t = torch.randn(6, 5, dtype=torch.float64)
    s = (0.25 * t + 0.01 * torch.randn(6, 5, dtype=torch.float64)).requires_grad_()
    squared = (s.detach() - 0.25 * t).square().sum(-1)
    margin = float(squared.max()) / 0.25 + 1e-3  # m·φ just above every sample's squared distance
    loss = continuation_hinge(s, t, phi=0.25, margin=margin)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(s.grad) == 0  # nothing pulls the student while inside the margin
    above = continuation_hinge(s.detach(), t, phi=0.25, margin=float(squared.min()) / 0.25 - 1e-3)
    assert above.item() > 0.0


@pytest.mark.parametrize(("options", "match"), [
    ({"max_temperature": 0}, r"max_temperature \(continuation_kd\).*>= 1"),
    ({"margin": -1.0}, r"margin \(continuation_kd\).*>= 0"),
    ({"psi_ramp": 0.0}, r"psi_ramp \(continuation_kd\)"),
    ({"psi_jump": 1.5}, r"psi_jump \(continuation_kd\)"),
    ({"hinge": "per_class"}, r"hinge \(continuation_kd\)"),
])
def test_bad_hyperparameters_are_kdlab_errors_naming_the_method(options, match):
    with pytest.raises(KdlabError, match=match):
        _method(**options)


def test_schedules_outside_their_range_are_kdlab_errors():
    with pytest.raises(KdlabError, match=r"continuation_kd.*temperature 0 left its range"):
        phi(0, 10)
    with pytest.raises(KdlabError, match=r"continuation_kd.*temperature 11 left its range"):
        phi(11, 10)
    with pytest.raises(KdlabError, match=r"continuation_kd.*outside"):
        psi_at(11, 10, ramp=0.5)
    method = _method(max_temperature=20)  # 20 temperatures in a 5-epoch run
    method.steps_per_epoch = 2
    method.set_progress(0, 10)
    with pytest.raises(KdlabError, match=r"max_temperature \(continuation_kd\): 20 .* 5 units.*unit: step"):
        method.schedule()


def test_a_run_through_fit_follows_the_schedule(tmp_path):
    splits = build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 120, "num_test": 30,
                                        "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                          val_fraction=0.2, split_seed=0)  # 96 train samples: 3 steps of 32 per epoch
    torch.manual_seed(0)
    teacher = build_model("mlp", {"width": 16}, splits)
    student = build_model("mlp", {"width": 8}, splits)
    method = build_method(MethodConfig("continuation_kd", {"max_temperature": 2, "psi_ramp": 0.5, "margin": 0.5}),
                          student=student, teacher=teacher, input_shape=tuple(splits.input_shape),
                          train_size=len(splits.train[0]))
    logged = []
    result = fit(student=student, method=method, teacher=teacher, splits=splits, seed=0,
                 train=TrainConfig(epochs=4, batch_size=32, lr=0.01, eval_every=1, device="cpu"),
                 on_epoch=lambda epoch, metrics: logged.append(metrics))
    assert math.isfinite(result.final["test/acc"])
    # n = 4, k = 2: T = 2, 1, 1, 1 (epoch 4 clamped); ψ = i/2: 0.5 then 1 from epoch 2 on (kd term 0).
    assert [m["method/temperature"] for m in logged] == [2.0, 1.0, 1.0, 1.0]
    assert [m["method/psi"] for m in logged] == [0.5, 1.0, 1.0, 1.0]
    assert logged[0]["train/loss/kd"] > 0.0 and all(m["train/loss/kd"] == 0.0 for m in logged[1:])


@pytest.mark.parametrize(("options", "key", "fragment"), [
    ({"method": {"max_temperature": 20}, "train": {"epochs": 5}}, "method.max_temperature (continuation_kd)",
     "do not fit in 5 units"),
    ({"method": {"max_temperature": 20, "unit": "step"}, "train": {"steps": 10}},
     "method.max_temperature (continuation_kd)", "do not fit in 10 units"),
    ({"method": {"margin": -1.0}}, "method.margin", "≥ 0"),
])
def test_the_config_refuses_continuation_kd_before_any_work(refuses_before_work, options, key, fragment):
    """``kdlab run --dry-run``: exit 2, one line naming the key, nothing written (no teacher trained first)."""
    refuses_before_work("continuation_kd", options, key, fragment)
