"""The Discriminator toolkit and adversarial_kd: loss terms against their formulas, and training through fit."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.losses import discriminator_accuracy, discriminator_loss, gradient_penalty
from kdlab.methods.adversarial import Discriminator
from kdlab.methods.base import Batch, Outputs

N, CLASSES, INPUT_SHAPE = 10, 4, (1, 5)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mlp(width, num_classes=CLASSES):
    return registry.get("model", "mlp")(input_shape=INPUT_SHAPE, num_classes=num_classes, mean=(0.0,), std=(1.0,),
                                        width=width)


def method(**options):
    torch.manual_seed(0)
    return build_method(MethodConfig("adversarial_kd", options), student=mlp(6), teacher=mlp(12),
                        input_shape=INPUT_SHAPE)


# --------------------------------------------------------------------------- the Discriminator


def test_discriminator_shapes_depth_and_input_check():
    d = Discriminator(CLASSES, width=7, depth=3)
    assert d(torch.rand(5, CLASSES)).shape == (5,)
    assert sum(isinstance(m, torch.nn.Linear) for m in d.modules()) == 4  # 3 hidden + output
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in d.modules()) == 3
    linear = Discriminator(CLASSES, depth=0)  # logistic regression on the inputs
    x = torch.rand(3, CLASSES)
    layer = linear.net[0]
    torch.testing.assert_close(linear(x), x @ layer.weight[0] + layer.bias[0])
    with pytest.raises(KdlabError, match=r"\(N, 4\)"):
        d(torch.rand(5, 3))
    with pytest.raises(KdlabError, match="width"):
        Discriminator(CLASSES, width=0)


def test_spectral_norm_bounds_every_layer_by_one():
    torch.manual_seed(0)
    d = Discriminator(CLASSES, width=16, depth=2, spectral_norm=True)
    with torch.no_grad():
        for layer in [m for m in d.modules() if isinstance(m, torch.nn.Linear)]:
            layer.parametrizations.weight.original.mul_(5.0)  # raw weights far from norm 1
        for _ in range(50):  # power iterations (one per training-mode forward)
            d(torch.rand(2, CLASSES))
    layers = [m for m in d.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 3
    for layer in layers:
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() == pytest.approx(1.0, abs=1e-3)
    plain = Discriminator(CLASSES, width=16, depth=2)
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())


@pytest.mark.parametrize("kind", ["bce", "lsgan", "hinge"])
def test_discriminator_learns_to_separate_fixed_distributions(kind):
    # "real": probability vectors peaked on class 0; "fake": peaked on class 1 (fixed, separable by p_0 − p_1).
    real = torch.softmax(randn(64, CLASSES, seed=1) + 3.0 * F.one_hot(torch.zeros(64).long(), CLASSES), dim=1)
    fake = torch.softmax(randn(64, CLASSES, seed=2) + 3.0 * F.one_hot(torch.ones(64).long(), CLASSES), dim=1)
    torch.manual_seed(0)
    d = Discriminator(CLASSES, width=16, depth=2)
    optimizer = torch.optim.Adam(d.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        discriminator_loss(d(real), d(fake), kind=kind).backward()
        optimizer.step()
    with torch.no_grad():
        assert discriminator_accuracy(d(real), d(fake), kind=kind) > 0.9


# --------------------------------------------------------------------------- loss terms against their formulas


def hand_batch(seed=0):
    s, t = randn(N, CLASSES, seed=seed), 2.0 * randn(N, CLASSES, seed=seed + 1)
    labels = torch.arange(N) % CLASSES
    return Batch(torch.zeros(N, *INPUT_SHAPE), labels), s, t


def kd_by_hand(s, t, temperature):
    """α-free T²·KL(p_T^t ‖ p_T^s), batch mean, from softmaxes (Hinton et al. 2015 §2)."""
    p, q = F.softmax(t / temperature, dim=1), F.softmax(s / temperature, dim=1)
    return temperature**2 * (p * (p.log() - q.log())).sum(dim=1).mean()


GENERATOR = {  # the student's fooling loss, written out per kind
    "bce": lambda d: -torch.log(torch.sigmoid(d)).mean(),
    "lsgan": lambda d: 0.5 * ((d - 1.0) ** 2).mean(),
    "hinge": lambda d: -d.mean(),
}
DISCRIMINATOR = {
    "bce": lambda r, f: -torch.log(torch.sigmoid(r)).mean() - torch.log(1.0 - torch.sigmoid(f)).mean(),
    "lsgan": lambda r, f: 0.5 * ((r - 1.0) ** 2).mean() + 0.5 * (f**2).mean(),
    "hinge": lambda r, f: torch.clamp(1.0 - r, min=0).mean() + torch.clamp(1.0 + f, min=0).mean(),
}


@pytest.mark.parametrize("kind", ["bce", "lsgan", "hinge"])
@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_loss_terms_match_their_formulas(kind, inputs):
    T, alpha, weight, T_D = 2.0, 0.7, 0.3, 1.5
    m = method(temperature=T, alpha=alpha, adversarial_weight=weight, discriminator_temperature=T_D,
               discriminator_inputs=inputs, gan_loss=kind)
    batch, s, t = hand_batch()
    s = s.requires_grad_()
    terms = m.loss_terms(batch, Outputs(s), Outputs(t))
    assert list(terms) == ["kd", "ce", "adv"]

    def seen(z):  # what the discriminator is fed
        return F.softmax(z / T_D, dim=1) if inputs == "probs" else z / T_D

    with torch.no_grad():
        d_fake, d_real = m.discriminator(seen(s)), m.discriminator(seen(t))
    assert terms["kd"].item() == pytest.approx(alpha * kd_by_hand(s.detach(), t, T).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx((1 - alpha) * F.cross_entropy(s.detach(), batch.labels).item(), rel=1e-6)
    assert terms["adv"].item() == pytest.approx(weight * GENERATOR[kind](d_fake).item(), rel=1e-5, abs=1e-7)

    adversary = m.adversary_loss(batch, Outputs(s.detach()), Outputs(t))
    assert list(adversary) == ["disc"]
    assert adversary["disc"].item() == pytest.approx(DISCRIMINATOR[kind](d_real, d_fake).item(), rel=1e-5)
    threshold = 0.5 if kind == "lsgan" else 0.0
    expected_acc = ((d_real >= threshold).sum() + (d_fake < threshold).sum()).item() / (2 * N)
    assert m.adversary_metrics == {"disc_acc": pytest.approx(expected_acc)}


def test_arms_kd_off_and_adversary_off():
    batch, s, t = hand_batch(seed=3)
    only_disc = method(kd=False, alpha=0.9).loss_terms(batch, Outputs(s), Outputs(t))
    assert list(only_disc) == ["ce", "adv"]
    # without the KL term CE is weighed by 1, not by 1 − α
    assert only_disc["ce"].item() == pytest.approx(F.cross_entropy(s, batch.labels).item(), rel=1e-6)
    only_kd = method(adversarial_weight=0.0).loss_terms(batch, Outputs(s), Outputs(t))
    assert list(only_kd) == ["kd", "ce"]
    assert only_kd["kd"].item() == pytest.approx(0.9 * kd_by_hand(s, t, 4.0).item(), rel=1e-5)


def test_gradient_penalty_term_and_discriminator_optimiser_settings():
    m = method(gradient_penalty=5.0, discriminator_lr=3e-4, discriminator_steps=3)
    assert (m.adversary_lr, m.adversary_steps) == (3e-4, 3)
    batch, s, t = hand_batch(seed=5)
    torch.manual_seed(11)
    terms = m.adversary_loss(batch, Outputs(s), Outputs(t))
    assert list(terms) == ["disc", "gp"]
    torch.manual_seed(11)
    expected = gradient_penalty(m.discriminator, F.softmax(t, dim=1), F.softmax(s, dim=1), weight=5.0)
    assert terms["gp"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["gp"].item() > 0


def test_gradients_flow_where_they_should():
    m = method()
    batch, s, t = hand_batch(seed=7)
    s = s.requires_grad_()
    # the student's fooling term reaches the student's logits, but builds no gradient into D
    m.loss_terms(batch, Outputs(s), Outputs(t))["adv"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.discriminator.parameters())
    assert all(p.requires_grad for p in m.discriminator.parameters())  # restored afterwards
    # D's loss reaches D only, even when handed non-detached student logits
    s.grad = None
    m.adversary_loss(batch, Outputs(s), Outputs(t))["disc"].backward()
    assert s.grad is None
    assert all(p.grad is not None for p in m.discriminator.parameters())


def test_the_fooling_term_moves_the_student_towards_what_d_calls_real():
    m = method(adversarial_weight=1.0, kd=False)
    batch, s, t = hand_batch(seed=9)
    d_optimizer = torch.optim.Adam(m.discriminator.parameters(), lr=1e-2)
    for _ in range(50):  # a discriminator that separates these teacher and student outputs
        d_optimizer.zero_grad()
        sum(m.adversary_loss(batch, Outputs(s), Outputs(t)).values()).backward()
        d_optimizer.step()
    logits = s.clone().requires_grad_()
    with torch.no_grad():
        before = m.discriminator(F.softmax(logits, dim=1)).mean().item()
    student_optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(20):
        student_optimizer.zero_grad()
        m.loss_terms(batch, Outputs(logits), Outputs(t))["adv"].backward()
        student_optimizer.step()
    with torch.no_grad():
        after = m.discriminator(F.softmax(logits, dim=1)).mean().item()
    assert after > before + 0.1


def test_bad_hyperparameters_are_refused():
    for options, key in [({"gan_loss": "wgan"}, "gan_loss"), ({"alpha": 1.5}, "alpha"),
                         ({"discriminator_steps": 0}, "discriminator_steps"),
                         ({"discriminator_temperature": 0.0}, "discriminator_temperature"),
                         ({"adversarial_weight": -1.0}, "adversarial_weight"),
                         ({"discriminator_inputs": "features"}, "discriminator_inputs")]:
        with pytest.raises(KdlabError, match=key):
            method(**options)


def test_class_count_comes_from_a_probe_without_a_num_classes_attribute():
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 7))
    m = build_method(MethodConfig("adversarial_kd", {}), student=student, teacher=student, input_shape=INPUT_SHAPE)
    assert m.discriminator.num_classes == 7
    with pytest.raises(KdlabError, match="input_shape"):
        build_method(MethodConfig("adversarial_kd", {}), student=student, teacher=student)


# --------------------------------------------------------------------------- through the training loop


def splits_for(tmp_path):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 240, "num_test": 90,
                                      "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                        val_fraction=0.2, split_seed=0)


def models_for(splits):
    torch.manual_seed(123)
    teacher = build_model("mlp", {"width": 32}, splits)
    torch.manual_seed(0)
    student = build_model("mlp", {"width": 8, "dropout": 0.1}, splits)  # dropout: uses the global RNG
    return teacher, student


def train(**overrides):
    return TrainConfig(**{**dict(epochs=2, batch_size=32, lr=0.01, device="cpu"), **overrides})


def test_fit_trains_student_and_discriminator_with_separate_optimisers(tmp_path, monkeypatch):
    splits = splits_for(tmp_path)
    teacher, student = models_for(splits)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = build_method(MethodConfig("adversarial_kd", {"discriminator_lr": 2e-3}), student=student, teacher=teacher,
                     input_shape=tuple(splits.input_shape))
    moved = []
    original_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):  # which parameters each optimiser step changed (as in test_loop)
        ids = {id(p) for group in self.param_groups for p in group["params"]}
        everything = {id(p): p for p in [*student.parameters(), *m.parameters(), *teacher.parameters()]}
        before = {pid: p.detach().clone() for pid, p in everything.items()}
        out = original_step(self, *args, **kwargs)
        changed = {pid for pid, old in before.items() if not torch.equal(old, everything[pid])}
        moved.append((ids, changed, self.param_groups[0]["lr"]))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    epochs = {}
    fit(student=student, method=m, teacher=teacher, splits=splits, train=train(), seed=0,
        on_epoch=lambda e, metrics: epochs.__setitem__(e, metrics))

    disc_ids = {id(p) for p in m.discriminator.parameters()}
    student_ids = {id(p) for p in student.parameters()}
    disc_steps = [(changed, lr) for ids, changed, lr in moved if ids == disc_ids]
    student_steps = [changed for ids, changed, _ in moved if ids == student_ids]
    assert len(moved) == len(disc_steps) + len(student_steps)  # no third optimiser
    assert disc_steps and len(disc_steps) == len(student_steps) == 2 * 6  # 192 train samples / 32, two epochs
    assert all(changed and changed <= disc_ids for changed, _ in disc_steps)  # D's step moves only D
    assert all(lr == 2e-3 for _, lr in disc_steps)  # discriminator_lr reaches its optimiser
    assert all(changed and changed <= student_ids for changed in student_steps)  # the student step never moves D
    for name, tensor in teacher.state_dict().items():  # the teacher is frozen
        assert torch.equal(tensor, teacher_before[name]), name
    for metrics in epochs.values():
        assert 0.0 <= metrics["adv/disc_acc"] <= 1.0 and math.isfinite(metrics["adv/disc"])
        assert {"train/loss/kd", "train/loss/ce", "train/loss/adv"} <= set(metrics)


def test_fit_with_hinge_spectral_norm_penalty_and_several_discriminator_steps(tmp_path):
    splits = splits_for(tmp_path)
    teacher, student = models_for(splits)
    options = {"gan_loss": "hinge", "spectral_norm": True, "gradient_penalty": 1.0, "discriminator_steps": 2,
               "discriminator_inputs": "logits", "discriminator_temperature": 4.0, "kd": False}
    m = build_method(MethodConfig("adversarial_kd", options), student=student, teacher=teacher,
                     input_shape=tuple(splits.input_shape))
    calls = []
    original = m.adversary_loss
    m.adversary_loss = lambda *args: calls.append(1) or original(*args)
    epochs = {}
    result = fit(student=student, method=m, teacher=teacher, splits=splits, train=train(epochs=1), seed=0,
                 run_dir=tmp_path / "run", on_epoch=lambda e, metrics: epochs.__setitem__(e, metrics))
    assert len(calls) == 2 * 6  # two discriminator steps before each of the 6 student steps
    assert {"adv/disc", "adv/gp", "adv/disc_acc", "train/loss/ce", "train/loss/adv"} <= set(epochs[1])
    assert "train/loss/kd" not in epochs[1]
    assert math.isfinite(result.final["test/acc"])


def test_zero_adversarial_weight_trains_the_student_exactly_as_kd(tmp_path):
    # The discriminator still trains (disc_acc is logged) but draws no random numbers during training and
    # adds no term, so from the same global RNG state the student's weights are bit-identical to plain KD's.
    # (Building D does draw its initial weights: the RNG is reseeded before each fit, for the dropout masks.)
    splits = splits_for(tmp_path)
    teacher, student = models_for(splits)
    kd = build_method(MethodConfig("kd", {"temperature": 3.0, "alpha": 0.8}), student=student, teacher=teacher)
    torch.manual_seed(99)
    fit(student=student, method=kd, teacher=teacher, splits=splits, train=train(), seed=4)
    kd_weights = {k: v.clone() for k, v in student.state_dict().items()}

    teacher, student = models_for(splits)
    m = build_method(MethodConfig("adversarial_kd", {"temperature": 3.0, "alpha": 0.8, "adversarial_weight": 0.0}),
                     student=student, teacher=teacher, input_shape=tuple(splits.input_shape))
    disc_before = {k: v.clone() for k, v in m.discriminator.state_dict().items()}
    epochs = {}
    torch.manual_seed(99)
    fit(student=student, method=m, teacher=teacher, splits=splits, train=train(), seed=4,
        on_epoch=lambda e, metrics: epochs.__setitem__(e, metrics))
    for name, tensor in kd_weights.items():
        assert torch.equal(student.state_dict()[name], tensor), name
    assert "adv/disc_acc" in epochs[2] and "train/loss/adv" not in epochs[2]
    assert any(not torch.equal(v, disc_before[k]) for k, v in m.discriminator.state_dict().items())
