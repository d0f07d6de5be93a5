"""Tests of kdlab.robust.attacks: ε-ball properties, closed forms on linear models, modes, strength."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.models.cnn1d import cnn1d
from kdlab.models.mlp import mlp
from kdlab.robust import (
    apgd,
    apgd_checkpoints,
    attack_loss,
    check_model_normalises,
    disagreement,
    fgsm,
    parse_eps,
    pgd,
    transfer,
)


def toy_data(*, seed=0, n=300, features=8, classes=3):
    """Gaussian blobs inside [0, 1]^features, classes in turn."""
    generator = torch.Generator().manual_seed(seed)
    centers = 0.3 + 0.4 * torch.rand(classes, features, generator=generator)
    labels = torch.arange(n) % classes
    inputs = (centers[labels] + 0.05 * torch.randn(n, features, generator=generator)).clamp(0, 1)
    return inputs, labels


def small_mlp(*, features=8, classes=3, seed=0):
    torch.manual_seed(seed)
    return mlp(input_shape=(features,), num_classes=classes, mean=(0.5,), std=(0.25,), width=32, depth=1)


@functools.lru_cache(maxsize=None)
def trained(seed=0):
    """An undefended MLP fit for 100 full-batch Adam steps on the blobs (clean accuracy ~1)."""
    inputs, labels = toy_data()
    model = small_mlp(seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


def robust_accuracy(model, inputs, labels):
    with torch.no_grad():
        return (model(inputs).argmax(dim=1) == labels).double().mean().item()


def run_attack(name, model, inputs, labels, *, eps, norm, generator):
    """Every attack of the module with cheap settings; returns the adversarial inputs."""
    if name == "fgsm":
        return fgsm(model, inputs, labels, eps=eps, norm=norm)
    if name == "pgd":
        return pgd(model, inputs, labels, eps=eps, norm=norm, steps=5, restarts=2, generator=generator)
    if name == "pgd_cw_targeted":
        return pgd(model, inputs, (labels + 1) % 3, eps=eps, norm=norm, steps=5, loss="cw", targeted=True,
                   generator=generator)
    if name == "apgd":
        return apgd(model, inputs, labels, eps=eps, norm=norm, steps=12, restarts=2, generator=generator)
    if name == "transfer":
        source = small_mlp(seed=7).to(inputs.dtype)
        return transfer(source, model, inputs, labels, eps=eps, norm=norm, steps=3, generator=generator)
    if name.startswith("disagreement"):
        return disagreement(model, small_mlp(seed=7).to(inputs.dtype), inputs, eps=eps, norm=norm, steps=5,
                            objective=name.split("_")[1], generator=generator)
    raise AssertionError(name)


ATTACKS = ["fgsm", "pgd", "pgd_cw_targeted", "apgd", "transfer", "disagreement_kl", "disagreement_margin"]


# ---------------------------------------------------------------------------
# Properties: inside the ε-ball and [0, 1], right dtype/device, detached
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_stay_inside_the_ball_and_the_box(name, norm, eps):
    model = small_mlp(seed=1).double()
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.rand(24, 8, generator=generator, dtype=torch.float64)
        inputs[:4] = torch.randint(0, 2, (4, 8), generator=generator).double()  # corners: the box must bind
        labels = torch.randint(0, 3, (24,), generator=generator)
        adversarial = run_attack(name, model, inputs, labels, eps=eps, norm=norm, generator=generator)
        assert adversarial.shape == inputs.shape and adversarial.dtype == torch.float64
        assert not adversarial.requires_grad
        assert adversarial.min() >= 0 and adversarial.max() <= 1
        delta = (adversarial - inputs).flatten(1)
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps * (1 + 1e-12)).all(), size.max()
        assert size.max() > 0.5 * eps  # the attack did move (not a trivial pass)


# ---------------------------------------------------------------------------
# Closed forms on a linear model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("attack", [
    lambda m, x, y, g: fgsm(m, x, y, eps=0.1),
    lambda m, x, y, g: fgsm(m, x, y, eps=0.1, loss="cw"),
    lambda m, x, y, g: pgd(m, x, y, eps=0.1, random_start=False, generator=g),
    lambda m, x, y, g: pgd(m, x, y, eps=0.1, restarts=2, generator=g),
    lambda m, x, y, g: pgd(m, x, y, eps=0.1, loss="cw", generator=g),
    lambda m, x, y, g: apgd(m, x, y, eps=0.1, steps=20, generator=g),
])
def test_linf_optimum_on_a_linear_model_is_the_signed_weight_difference(attack):
    # Two-class linear model z = W x + b: CE and the CW margin both increase with
    # (w_wrong − w_true)·x, so the L∞ maximiser over the cube of radius ε is the corner
    # x + ε·sign(w_wrong − w_true) (Goodfellow et al. 2015: FGSM is exact for a linear model).
    # Inputs in [0.3, 0.7] so that the [0, 1] clamp never binds.
    torch.manual_seed(0)
    model = nn.Linear(6, 2).double()
    generator = torch.Generator().manual_seed(0)
    inputs = 0.3 + 0.4 * torch.rand(16, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (16,), generator=generator)
    weight = model.weight.detach()
    expected = inputs + 0.1 * torch.sign(weight[1 - labels] - weight[labels])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adversarial = attack(model, inputs, labels, generator)
    torch.testing.assert_close(adversarial, expected, rtol=0, atol=1e-12)


def test_pgd_with_more_steps_is_never_weaker():
    # Fixed step size and no random start: the k-step run follows a prefix of the 2k-step
    # trajectory, and pgd keeps the best iterate, so the result can only improve per sample
    # under its (misclassified, loss) order.
    model, (inputs, labels) = trained(), toy_data()
    previous = None
    for steps in (1, 2, 4, 8, 16):
        adversarial = pgd(model, inputs, labels, eps=0.05, step_size=0.01, steps=steps, random_start=False)
        with torch.no_grad():
            logits = model(adversarial)
        loss, fooled = attack_loss(logits, labels), logits.argmax(dim=1) != labels
        if previous is not None:
            previous_loss, previous_fooled = previous
            assert (fooled >= previous_fooled).all()
            same = fooled == previous_fooled
            assert (loss[same] >= previous_loss[same] - 1e-6).all()
        previous = loss, fooled


def test_restarts_keep_the_per_sample_best():
    # A 3-restart run draws its starts from the generator in turn, exactly as three 1-restart
    # runs on the same generator do; it must return, per sample, the best of the three.
    model, (inputs, labels) = trained(), toy_data()
    kwargs = dict(eps=0.05, steps=3, step_size=0.005)
    singles = []
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        singles.append(pgd(model, inputs, labels, generator=generator, **kwargs))
    combined = pgd(model, inputs, labels, restarts=3, generator=torch.Generator().manual_seed(3), **kwargs)
    with torch.no_grad():
        scores = [(attack_loss(model(a), labels), model(a).argmax(dim=1) != labels) for a in singles]
        loss, fooled = attack_loss(model(combined), labels), model(combined).argmax(dim=1) != labels
    any_fooled = torch.stack([f for _, f in scores]).any(dim=0)
    assert torch.equal(fooled, any_fooled)
    best_unfooled = torch.stack([torch.where(f, -torch.inf, l) for l, f in scores]).amax(dim=0)
    torch.testing.assert_close(loss[~fooled], best_unfooled[~fooled])
    assert not all(torch.equal(combined, single) for single in singles)


# ---------------------------------------------------------------------------
# Strength on a trained model
# ---------------------------------------------------------------------------


def test_undefended_mlp_falls_to_zero_at_large_eps():
    model, (inputs, labels) = trained(), toy_data()
    assert robust_accuracy(model, inputs, labels) > 0.95
    for attack in (pgd, apgd):
        adversarial = attack(model, inputs, labels, eps=0.3, steps=20, generator=torch.Generator().manual_seed(0))
        assert robust_accuracy(model, adversarial, labels) <= 0.02


def test_apgd_is_at_least_as_strong_as_pgd20():
    model, (inputs, labels) = trained(), toy_data()
    for eps in (0.04, 0.06):  # robust accuracy ~0.65 and ~0.27: the attacks are not saturated
        pgd_acc = robust_accuracy(model, pgd(model, inputs, labels, eps=eps, steps=20,
                                             generator=torch.Generator().manual_seed(0)), labels)
        apgd_acc = robust_accuracy(model, apgd(model, inputs, labels, eps=eps, steps=50,
                                               generator=torch.Generator().manual_seed(0)), labels)
        assert 0.1 < pgd_acc < 0.9
        assert apgd_acc <= pgd_acc + 0.01


def test_apgd_checkpoints_match_the_paper_for_100_steps():
    # Croce & Hein (2020), checkpoints of Algorithm 1:
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06).
    # Increments 0.22, 0.19, 0.16, 0.13, 0.10, 0.07, 0.06 (0.04 < 0.06), 0.06 (0.03 < 0.06):
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (next 1.05 > 1), so w_j = ⌈100·p_j⌉:
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    # N = 10: ⌈2.2⌉, ⌈4.1⌉, ⌈5.7⌉, 7, 8, ⌈8.7⌉, ⌈9.3⌉ = 10, and ⌈9.9⌉ = 10 again is dropped.
    assert apgd_checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]


def test_targeted_pgd_reaches_the_target():
    model, (inputs, labels) = trained(), toy_data()
    targets = (labels + 1) % 3
    for loss in ("ce", "cw"):
        adversarial = pgd(model, inputs, targets, eps=0.4, steps=20, loss=loss, targeted=True,
                          generator=torch.Generator().manual_seed(0))
        assert robust_accuracy(model, adversarial, targets) >= 0.95


def test_disagreement_increases_kl_student_teacher():
    student, teacher = trained(0), trained(1)
    inputs, _ = toy_data()

    def kl_student_teacher(x):  # KL(p_student ‖ p_teacher) per sample
        with torch.no_grad():
            log_p, log_q = student(x).log_softmax(dim=1), teacher(x).log_softmax(dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)

    adversarial = disagreement(student, teacher, inputs, eps=0.05, steps=10, random_start=False)
    before, after = kl_student_teacher(inputs), kl_student_teacher(adversarial)
    assert (after >= before - 1e-6).all()  # the clean point is iterate 0 and the best is kept
    assert after.mean() > 10 * before.mean()

    with torch.no_grad():
        teacher_class = teacher(inputs).argmax(dim=1)
    adversarial = disagreement(student, teacher, inputs, eps=0.1, steps=10, objective="margin",
                               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (student(adversarial).argmax(dim=1) != teacher_class).double().mean() > 0.9


def test_transfer_crafts_on_the_source():
    source, target = trained(0), trained(1)
    inputs, labels = toy_data()
    adversarial = transfer(source, target, inputs, labels, eps=0.1, steps=10,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(adversarial, pgd(source, inputs, labels, eps=0.1, steps=10,
                                        generator=torch.Generator().manual_seed(0)))
    assert robust_accuracy(target, adversarial, labels) < robust_accuracy(target, inputs, labels)
    adversarial = transfer(source, target, inputs, labels, attack=fgsm, eps=0.1)
    assert torch.equal(adversarial, fgsm(source, inputs, labels, eps=0.1))


# ---------------------------------------------------------------------------
# Modes, BatchNorm, gradients
# ---------------------------------------------------------------------------


def test_modes_restored_and_batchnorm_attacked_in_eval_mode():
    torch.manual_seed(0)
    model = cnn1d(input_shape=(1, 16), num_classes=3, mean=(0.5,), std=(0.25,), width=4, depth=2)
    other = small_mlp(features=16)
    model.train()
    model.block2.eval()  # a mixed state must come back exactly, module by module
    before_modes = {name: m.training for name, m in model.named_modules()}
    before_stats = {k: v.clone() for k, v in model.state_dict().items()}
    seen_training = []
    model.register_forward_pre_hook(lambda module, args: seen_training.append(module.block1[1].training))
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(8, 1, 16, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)

    class Flat(nn.Module):  # the second model of disagreement/transfer, on (N, 1, 16) inputs
        def __init__(self):
            super().__init__()
            self.inner = other

        def forward(self, x):
            return self.inner(x.flatten(1))

    flat = Flat().train()
    fgsm(model, inputs, labels, eps=0.1)
    pgd(model, inputs, labels, eps=0.1, steps=3, generator=generator)
    apgd(model, inputs, labels, eps=0.1, steps=5, generator=generator)
    disagreement(model, flat, inputs, eps=0.1, steps=3, generator=generator)
    transfer(model, flat, inputs, labels, eps=0.1, steps=3, generator=generator)

    assert seen_training and not any(seen_training)  # BatchNorm ran in eval mode
    assert {name: m.training for name, m in model.named_modules()} == before_modes
    assert flat.training and other.training
    for key, value in model.state_dict().items():  # running_mean, running_var, num_batches_tracked
        assert torch.equal(value, before_stats[key]), key
    assert all(p.grad is None for p in list(model.parameters()) + list(flat.parameters()))


def test_modes_restored_after_an_error():
    model = small_mlp().train()

    def broken(x):
        raise RuntimeError("boom")

    model.head.register_forward_hook(lambda *args: broken(None))
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, torch.rand(2, 8), torch.zeros(2, dtype=torch.long), eps=0.1)
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------
# Validation, parsing, registry
# ---------------------------------------------------------------------------


def test_parse_eps():
    assert parse_eps("8/255") == 8 / 255
    assert parse_eps(" 8 / 255 ") == 8 / 255
    assert parse_eps("0.031") == 0.031
    assert parse_eps(0.031) == 0.031
    assert parse_eps(1) == 1.0 and isinstance(parse_eps(1), float)
    for bad in ("abc", "1/0", "-0.1", "8/255/2", "", True, None, float("nan")):
        with pytest.raises(KdlabError, match="eps"):
            parse_eps(bad)


def test_bad_inputs_raise_clear_errors():
    model = small_mlp()
    inputs, labels = torch.rand(4, 8), torch.zeros(4, dtype=torch.long)
    for attack in (fgsm, pgd, apgd):
        with pytest.raises(KdlabError, match="pixel units.*8/255"):
            attack(model, inputs, labels, eps=8)
        with pytest.raises(KdlabError, match="eps"):
            attack(model, inputs, labels, eps=-0.1)
        with pytest.raises(KdlabError, match=r"expect inputs in \[0, 1\]; the model must normalise inside forward"):
            attack(model, (inputs - 0.5) / 0.25, labels, eps=0.1)
        with pytest.raises(KdlabError, match="norm"):
            attack(model, inputs, labels, eps=0.1, norm="l1")
        with pytest.raises(KdlabError, match="loss"):
            attack(model, inputs, labels, eps=0.1, loss="hinge")
        with pytest.raises(KdlabError, match="labels"):
            attack(model, inputs, labels[:3], eps=0.1)
    assert pgd(model, inputs, labels, eps=2.0, norm="l2", steps=1).shape == inputs.shape  # L2 ε > 1 is fine
    with pytest.raises(KdlabError, match="steps"):
        pgd(model, inputs, labels, eps=0.1, steps=0)
    with pytest.raises(KdlabError, match="pixel units"):
        disagreement(model, model, inputs, eps=8)


def test_eps_zero_returns_the_inputs():
    model, (inputs, labels) = trained(), toy_data()
    for attack in (fgsm, pgd, apgd):
        assert torch.equal(attack(model, inputs, labels, eps=0.0), inputs)


def test_check_model_normalises():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_model_normalises(small_mlp())
    with pytest.warns(UserWarning, match="normalises inside forward"):
        assert not check_model_normalises(nn.Linear(8, 3))


def test_attacks_are_registered():
    assert registry.get("attack", "fgsm") is fgsm
    assert registry.get("attack", "pgd") is pgd
    assert registry.get("attack", "apgd") is apgd
