"""faithful_kd: loss terms against a hand-worked batch, the ε/κ ramp, gradients, and training through fit."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdlab.methods.faithful_kd  # noqa: F401  (registers "faithful_kd" until kdlab.methods imports it)
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.methods.base import Batch, Outputs


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def hand_pair():
    """Student z_S = x (the identity); teacher z_T = (3·x₀, 1 − x₁) (a fixed linear layer)."""
    teacher = nn.Linear(2, 2).double()
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -1.0]]))
        teacher.bias.copy_(torch.tensor([0.0, 1.0]))
    return nn.Sequential(nn.Identity()), teacher


def method(student, teacher, **options):
    return build_method(MethodConfig("faithful_kd", options), student=student, teacher=teacher)


@pytest.mark.parametrize("bound", ["ibp", "pgd"])
def test_loss_terms_on_a_hand_worked_batch(bound):
    # x = (0.3, 0.6), ε = 0.1, so x' ∈ [0.2, 0.4] × [0.5, 0.7]; label 0; T = 1, α = 0.5, κ = 2, no ramp.
    # Clean: z_S = (0.3, 0.6), z_T = (0.9, 0.4): the teacher's class is k = 0. Two classes: p_0 = σ(z_0 − z_1),
    #   q = (σ(−0.3), σ(0.3)) = (0.42555748, 0.57444252), p = (σ(0.5), σ(−0.5)) = (0.62245933, 0.37754067).
    # kd = α·T²·KL(p‖q) = 0.5·[0.62245933·ln(0.62245933/0.42555748) + 0.37754067·ln(0.37754067/0.57444252)]
    #    = 0.5·0.07824573 = 0.03912286;  ce = (1 − α)·ln(1 + e^0.3) = 0.5·0.85435524 = 0.42717762.
    # IBP: z_S box [0.2, 0.4] × [0.5, 0.7]; z_T box [0.6, 1.2] × [0.3, 0.5] (Linear, centre/radius form).
    #   p_S,0 ∈ [σ(0.2 − 0.7), σ(0.4 − 0.5)] = [σ(−0.5), σ(−0.1)]
    #   p_T,0 ∈ [σ(0.6 − 0.5), σ(1.2 − 0.3)] = [σ(0.1), σ(0.9)]
    #   bound = max(σ(−0.1) − σ(0.1), σ(0.9) − σ(−0.5)) = 0.71094950 − 0.37754067 = 0.33340883.
    # PGD: both networks see the same x'; c_T − c_S = σ(3x₀ + x₁ − 1) − σ(x₀ − x₁) > 0 on the box and
    #   grows with x₀ and x₁ there, so the maximum is the corner (0.4, 0.7):
    #   σ(0.9) − σ(−0.3) = 0.28539202 (below the IBP bound, as it must be).
    student, teacher = hand_pair()
    m = method(student, teacher, temperature=1.0, alpha=0.5, eps=0.1, kappa=2.0, ramp=0.0, bound=bound)
    x = torch.tensor([[0.3, 0.6]], dtype=torch.float64)
    batch = m.make_batch(Batch(x, torch.tensor([0])))
    with torch.no_grad():
        teacher_out = Outputs(teacher(batch.inputs))
    terms = m.loss_terms(batch, Outputs(student(batch.inputs)), teacher_out)
    assert list(terms) == ["kd", "ce", "faithful"]
    assert terms["kd"].item() == pytest.approx(0.03912286, abs=1e-7)
    assert terms["ce"].item() == pytest.approx(0.42717762, abs=1e-7)
    expected = sigmoid(0.9) - sigmoid(-0.5) if bound == "ibp" else sigmoid(0.9) - sigmoid(-0.3)
    assert terms["faithful"].item() == pytest.approx(2.0 * expected, abs=1e-7)


def test_vector_confidence_takes_the_largest_class():
    # Two classes: |p_S,0 − p_T,0| = |p_S,1 − p_T,1|, so the vector variant equals the class-0 one here.
    student, teacher = hand_pair()
    x = torch.tensor([[0.3, 0.6]], dtype=torch.float64)
    values = []
    for confidence in ("teacher_class", "vector"):
        m = method(student, teacher, eps=0.1, kappa=1.0, ramp=0.0, confidence=confidence)
        with torch.no_grad():
            values.append(m.loss_terms(Batch(x, torch.tensor([0])), Outputs(student(x)),
                                       Outputs(teacher(x)))["faithful"].item())
    assert values[0] == pytest.approx(values[1])


def test_ramp_schedule():
    student, teacher = hand_pair()
    m = method(student, teacher, eps=0.2, kappa=3.0, ramp=0.8)
    expected = {0: (0.0, 0.0), 40: (0.2 * 0.5, 3.0 * 0.5), 80: (0.2, 3.0), 100: (0.2, 3.0)}
    for step, (eps, kappa) in expected.items():  # progress = step / 100: 0, 0.4, 0.8, 1
        m.set_progress(step, 100)
        assert m.schedule() == pytest.approx((eps, kappa))
    m.set_progress(50, 100)  # progress 0.5 of a 0.8 ramp
    assert m.schedule() == pytest.approx((0.2 * 0.625, 3.0 * 0.625))
    instant = method(student, teacher, eps=0.2, kappa=3.0, ramp=0.0)
    instant.set_progress(0, 100)
    assert instant.schedule() == pytest.approx((0.2, 3.0))
    # At progress 0 the term is 0 (κ(0) = 0) and no bound is computed.
    m.set_progress(0, 100)
    x = torch.tensor([[0.3, 0.6]], dtype=torch.float64)
    terms = m.loss_terms(Batch(x, torch.tensor([0])), Outputs(student(x)), Outputs(teacher(x).detach()))
    assert terms["faithful"].item() == 0.0


def mlp(width, **options):
    return kdlab_model("mlp", width=width, **options)


def kdlab_model(name, **options):
    from kdlab import registry
    return registry.get("model", name)(input_shape=(1, 8), num_classes=3, mean=(0.5,), std=(0.3,), **options)


@pytest.mark.parametrize("bound", ["ibp", "pgd"])
def test_the_bound_term_trains_the_student_only_and_shrinks_its_gap(bound):
    torch.manual_seed(0)
    teacher, student = mlp(16).eval(), mlp(8)
    teacher.requires_grad_(False)
    m = method(student, teacher, eps=0.05, kappa=1.0, ramp=0.0, bound=bound, pgd_steps=3)
    x = torch.rand(32, 1, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    values = []
    for _ in range(30):  # the faithfulness term alone
        batch = m.make_batch(Batch(x, y))
        with torch.no_grad():
            teacher_out = Outputs(teacher(batch.inputs))
        loss = m.loss_terms(batch, Outputs(student(batch.inputs)), teacher_out)["faithful"]
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
        optimizer.step()
        values.append(loss.item())
    assert all(p.grad is None for p in teacher.parameters())
    # The IBP bound cannot fall below what the teacher's own box allows (0.21 -> 0.15 here); PGD's gap can.
    assert values[-1] < 0.8 * values[0]


def test_bad_hyperparameters_and_unboundable_networks_are_refused():
    student, teacher = hand_pair()
    for options, key in [({"eps": -0.1}, "eps"), ({"kappa": float("nan")}, "kappa"), ({"ramp": 1.5}, "ramp"),
                         ({"bound": "crown"}, "bound"), ({"pgd_steps": 0}, "pgd_steps"),
                         ({"confidence": "max"}, "confidence"), ({"alpha": 2.0}, "alpha")]:
        with pytest.raises(KdlabError, match=rf"method\.{key}"):
            method(student, teacher, **options)
    with pytest.raises(KdlabError, match="unsupported layer GELU"):
        method(nn.Sequential(nn.Linear(2, 2), nn.GELU()), teacher)
    method(nn.Sequential(nn.Linear(2, 2), nn.GELU()), teacher, bound="pgd")  # PGD needs no bound propagation


# --------------------------------------------------------------------------- through the training loop


def splits_for(tmp_path):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 120, "num_test": 30,
                                      "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                        val_fraction=0.2, split_seed=0)


@pytest.mark.parametrize("student_model, options, bound", [
    ("mlp", {"width": 8, "dropout": 0.1}, "ibp"),
    ("cnn1d", {"width": 4, "depth": 2, "kernel_size": 3}, "ibp"),  # BatchNorm in training mode
    ("mlp", {"width": 8}, "pgd"),
])
def test_fit_runs_with_the_faithfulness_term(tmp_path, student_model, options, bound):
    splits = splits_for(tmp_path)
    torch.manual_seed(123)
    teacher = build_model("mlp", {"width": 16}, splits)
    torch.manual_seed(0)
    student = build_model(student_model, options, splits)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = build_method(MethodConfig("faithful_kd", {"eps": 0.05, "kappa": 1.0, "ramp": 0.5, "bound": bound,
                                                  "pgd_steps": 2}),
                     student=student, teacher=teacher, input_shape=tuple(splits.input_shape))
    epochs = {}
    result = fit(student=student, method=m, teacher=teacher, splits=splits,
                 train=TrainConfig(epochs=2, batch_size=32, lr=0.01, device="cpu"), seed=0,
                 on_epoch=lambda e, metrics: epochs.__setitem__(e, metrics))
    assert {"train/loss/kd", "train/loss/ce", "train/loss/faithful"} <= set(epochs[2])
    assert all(math.isfinite(v) for metrics in epochs.values() for v in metrics.values())
    assert epochs[2]["train/loss/faithful"] > 0  # the ramp has switched the term on by the second epoch
    assert math.isfinite(result.final["test/acc"])
    for name, tensor in teacher.state_dict().items():  # the teacher is frozen
        assert torch.equal(tensor, teacher_before[name]), name
