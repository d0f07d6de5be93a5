"""GAN losses (kdlab.losses.adversarial): closed forms on hand values, the gradient penalty, accuracy."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.losses import (
    GAN_LOSSES,
    discriminator_accuracy,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------- closed forms


def test_bce_at_zero_scores_is_log2_per_side():
    # σ(0) = ½: −log ½ for the real side and −log(1 − ½) for the fake side (Goodfellow et al. 2014, eq. 1, negated).
    assert discriminator_loss(t(0.0, 0.0), t(0.0), kind="bce").item() == pytest.approx(2 * math.log(2), abs=1e-7)
    assert generator_loss(t(0.0, 0.0, 0.0), kind="bce").item() == pytest.approx(math.log(2), abs=1e-7)


def test_bce_on_hand_values():
    # real 2: −log σ(2) = log(1 + e^−2); fake −1: −log(1 − σ(−1)) = log(1 + e^−1).
    expected_d = math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))
    assert discriminator_loss(t(2.0), t(-1.0), kind="bce").item() == pytest.approx(expected_d, abs=1e-7)
    # Non-saturating generator loss (Goodfellow §3): −log σ(−1) = log(1 + e).
    assert generator_loss(t(-1.0), kind="bce").item() == pytest.approx(math.log1p(math.e), abs=1e-7)
    # and against torch's BCE with logits (an independent implementation), on random scores of unequal sizes
    real, fake = torch.randn(7, generator=torch.Generator().manual_seed(0)), torch.randn(5) * 3
    bce = F.binary_cross_entropy_with_logits
    assert discriminator_loss(real, fake).item() == pytest.approx(
        (bce(real, torch.ones(7)) + bce(fake, torch.zeros(5))).item(), abs=1e-6)
    assert generator_loss(fake).item() == pytest.approx(bce(fake, torch.ones(5)).item(), abs=1e-6)


def test_lsgan_on_hand_values():
    # Mao et al. 2017, eq. 2 with a = 0, b = 1, c = 1:
    # D: ½·mean((3−1)², (1−1)²) + ½·mean(0.5², (−1)²) = ½·2 + ½·0.625 = 1.3125
    # G: ½·mean((0.5−1)², (−1−1)²) = ½·(0.25 + 4)/2 = 1.0625
    assert discriminator_loss(t(3.0, 1.0), t(0.5, -1.0), kind="lsgan").item() == pytest.approx(1.3125, abs=1e-7)
    assert generator_loss(t(0.5, -1.0), kind="lsgan").item() == pytest.approx(1.0625, abs=1e-7)


def test_hinge_on_hand_values():
    # D: mean(max(0, 1−0.5), max(0, 1−2)) + mean(max(0, 1−0.5), max(0, 1−3)) = 0.25 + 0.25
    # G: −mean(−0.5, −3) = 1.75
    assert discriminator_loss(t(0.5, 2.0), t(-0.5, -3.0), kind="hinge").item() == pytest.approx(0.5, abs=1e-7)
    assert generator_loss(t(-0.5, -3.0), kind="hinge").item() == pytest.approx(1.75, abs=1e-7)


def test_perfect_discriminator_has_zero_hinge_and_lsgan_loss():
    assert discriminator_loss(t(1.0, 4.0), t(-1.0, -2.0), kind="hinge").item() == 0.0
    assert discriminator_loss(t(1.0, 1.0), t(0.0, 0.0), kind="lsgan").item() == 0.0


def test_non_saturating_generator_loss_keeps_its_gradient_when_the_discriminator_wins():
    # Goodfellow §3: log(1 − D(G(z))) saturates when D rejects the fakes confidently; −log D(G(z)) does not.
    fake = t(-12.0).requires_grad_()
    generator_loss(fake, kind="bce").backward()
    assert fake.grad.item() == pytest.approx(-1.0, abs=1e-4)  # d/ds softplus(−s) = −σ(−s) → −1
    saturating = t(-12.0).requires_grad_()
    torch.log1p(-torch.sigmoid(saturating)).sum().backward()
    assert abs(saturating.grad.item()) < 1e-4


@pytest.mark.parametrize("kind", GAN_LOSSES)
def test_losses_pass_gradcheck_and_accept_column_scores(kind):
    g = torch.Generator().manual_seed(1)
    real = torch.randn(6, 1, generator=g, dtype=torch.float64).requires_grad_()
    fake = torch.randn(4, 1, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda r, f: discriminator_loss(r, f, kind=kind), (real, fake))
    assert torch.autograd.gradcheck(lambda f: generator_loss(f, kind=kind), (fake,))
    assert discriminator_loss(real, fake, kind=kind).dtype == torch.float64
    assert discriminator_loss(real.half().detach(), fake.half().detach(), kind=kind).dtype == torch.float32
    assert discriminator_loss(real, fake, kind=kind).item() == pytest.approx(
        discriminator_loss(real.reshape(-1), fake.reshape(-1), kind=kind).item())


def test_unknown_kind_and_bad_inputs_are_refused():
    with pytest.raises(KdlabError, match="'wgan'"):
        discriminator_loss(t(0.0), t(0.0), kind="wgan")
    with pytest.raises(KdlabError, match="GAN loss kind"):
        generator_loss(t(0.0), kind="BCE")
    with pytest.raises(KdlabError, match="empty"):
        generator_loss(torch.zeros(0))
    with pytest.raises(KdlabError, match="floating-point"):
        discriminator_loss(torch.tensor([1]), t(0.0))


def test_gan_losses_are_not_registered_as_distillation_losses():
    assert not {"discriminator_loss", "generator_loss", "gradient_penalty"} & set(registry.names("loss"))


# --------------------------------------------------------------------------- gradient penalty (Gulrajani et al. 2017)


def linear(weight):
    layer = torch.nn.Linear(len(weight), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(0.3)
    return layer


def test_gradient_penalty_is_zero_for_a_linear_discriminator_with_unit_norm_weight():
    # ∇_x (w·x + b) = w everywhere: (‖w‖ − 1)² = 0 for ‖w‖ = 1 (w = (0.6, 0.8)), = 1 for ‖w‖ = 2.
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(8, 2, generator=g), torch.rand(8, 2, generator=g)
    assert gradient_penalty(linear([0.6, 0.8]), real, fake, weight=10.0).item() == pytest.approx(0.0, abs=1e-10)
    assert gradient_penalty(linear([1.2, 1.6]), real, fake, weight=10.0).item() == pytest.approx(10.0, abs=1e-5)
    assert gradient_penalty(linear([1.2, 1.6]), real, fake, weight=2.5).item() == pytest.approx(2.5, abs=1e-5)


def test_gradient_penalty_interpolates_with_one_uniform_draw_per_sample():
    # D(x) = ½‖x‖² has ∇ = x̂ = ε·real + (1 − ε)·fake; with fake = 0, ‖∇‖ = ε_n·‖real_n‖ per sample.
    # ε comes from torch.rand on the global RNG (documented), so reseeding reproduces it.
    def half_square(x):
        return 0.5 * x.square().sum(dim=1)

    real, fake = t(3.0, 4.0).repeat(4, 1) * torch.arange(1.0, 5.0).unsqueeze(1), torch.zeros(4, 2)  # norms 5..20
    torch.manual_seed(7)
    value = gradient_penalty(half_square, real, fake, weight=1.0)
    torch.manual_seed(7)
    epsilon = torch.rand(4, 1).squeeze(1)
    expected = ((epsilon * real.norm(dim=1) - 1.0) ** 2).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    # real == fake: x̂ = x for any ε, ‖x‖ = 5 → (5 − 1)² = 16
    assert gradient_penalty(half_square, real[:1], real[:1], weight=1.0).item() == pytest.approx(16.0, rel=1e-6)


def test_gradient_penalty_trains_the_discriminator_only():
    layer = linear([1.2, 1.6])
    real, fake = torch.rand(5, 2).requires_grad_(), torch.rand(5, 2).requires_grad_()
    gradient_penalty(layer, real, fake).backward()
    assert real.grad is None and fake.grad is None  # inputs are detached
    # d/dw 10·(‖w‖ − 1)² = 20·(‖w‖ − 1)·w/‖w‖ = 20·1·(0.6, 0.8)
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[12.0, 16.0]]), rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is None or layer.bias.grad.abs().max().item() == 0.0  # ∇_x does not involve b
    with pytest.raises(KdlabError, match="shape"):
        gradient_penalty(layer, torch.zeros(3, 2), torch.zeros(4, 2))


# --------------------------------------------------------------------------- accuracy


def test_discriminator_accuracy_counts_real_above_and_fake_below_the_threshold():
    # real 1 ✓, −1 ✗, 0.2 ✓; fake −2 ✓, 3 ✗ → 3 of 5
    assert discriminator_accuracy(t(1.0, -1.0, 0.2), t(-2.0, 3.0)) == pytest.approx(0.6)
    # LSGAN's targets are 0 and 1: the threshold is ½. real 0.6 ✓ 0.4 ✗, fake 0.3 ✓ 0.45 ✓ → 0.75 (0.5 at threshold 0)
    assert discriminator_accuracy(t(0.6, 0.4), t(0.3, 0.45), kind="lsgan") == pytest.approx(0.75)
    assert discriminator_accuracy(t(0.6, 0.4), t(0.3, 0.45), kind="hinge") == pytest.approx(0.5)
    # a constant discriminator sitting on the threshold is at chance
    assert discriminator_accuracy(torch.zeros(4), torch.zeros(4)) == 0.5
    assert isinstance(discriminator_accuracy(t(1.0), t(-1.0)), float)
