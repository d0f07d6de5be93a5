"""Generators for data-free distillation: shapes, [0, 1] range, gradients, and refused shapes."""
from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.models.generators import (ConvGenerator, MLPGenerator, build_generator, check_generator_output,
                                     logit_normal_params)


@pytest.mark.parametrize("shape", [(1, 40), (1, 8, 8), (3, 32, 32), (2, 5), (1, 7, 9), (12,)])
def test_output_shape_and_range_in_train_and_eval_mode(shape):
    torch.manual_seed(0)
    generator = build_generator(shape, latent_dim=16, width=8)
    expected_cls = MLPGenerator if len(shape) == 1 else ConvGenerator
    assert isinstance(generator, expected_cls)
    z = torch.randn(6, 16) * 5  # large noise: the sigmoid must still keep every value in [0, 1]
    for train in (True, False):
        generator.train(train)
        out = generator(z)
        assert out.shape == (6, *shape)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("mean,std", [(0.547, 0.0997), (0.3055, 0.376), (0.5, 0.2), (0.1, 0.05), (0.8, 0.15)])
def test_logit_normal_params_hit_the_requested_moments(mean, std):
    # Independent check: a fine trapezoid rule over ε in [−12, 12] (float64), not the solver's Gauss–Hermite nodes.
    a, b = logit_normal_params(mean, std)
    assert a.shape == b.shape == (1,)
    a, b = float(a[0]), float(b[0])
    eps = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = torch.exp(-eps**2 / 2) / (2 * torch.pi) ** 0.5
    y = torch.sigmoid(a + b * eps)
    m = torch.trapezoid(density * y, eps)
    s = torch.trapezoid(density * (y - m) ** 2, eps).sqrt()
    assert m.item() == pytest.approx(mean, abs=1e-4) and s.item() == pytest.approx(std, abs=1e-4)


def test_logit_normal_params_is_elementwise():
    a, b = logit_normal_params([0.547, 0.3055], [0.0997, 0.376])
    a0, b0 = logit_normal_params(0.3055, 0.376)
    assert a.shape == (2,) and a[1] == pytest.approx(a0[0]) and b[1] == pytest.approx(b0[0])


def test_generated_batches_have_about_the_data_statistics_per_channel():
    # The last non-affine BatchNorm standardises each channel over the batch (train mode), then the
    # matched sigmoid maps it to the data's mean/std: exact for a Gaussian pre-activation, close here.
    torch.manual_seed(0)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)  # CIFAR-10-like
    generator = build_generator((3, 32, 32), latent_dim=32, width=16, mean=mean, std=std)
    out = generator(torch.randn(64, 32))
    per_channel = out.transpose(0, 1).flatten(1)  # (C, N·H·W)
    assert per_channel.mean(1).tolist() == pytest.approx(mean, abs=0.03)
    assert per_channel.std(1).tolist() == pytest.approx(std, abs=0.03)
    # One value is broadcast to every channel; the parameters sit in persistent buffers.
    single = build_generator((2, 8), latent_dim=4, width=4, mean=(0.5,), std=(0.2,))
    assert single.body[-1].scale.flatten().tolist() == pytest.approx([0.9459] * 2, abs=1e-3)
    assert "body.11.shift" in single.state_dict()


@pytest.mark.parametrize("options,match", [({"mean": (0.5,)}, "both mean and std"),
                                           ({"mean": (1.5,), "std": (0.1,)}, "not statistics of inputs in"),
                                           ({"mean": (0.5,), "std": (0.0,)}, "not statistics"),
                                           ({"mean": (0.0,), "std": (1.0,)}, "not statistics"),
                                           ({"mean": (0.5,), "std": (0.5,)}, "not statistics"),
                                           ({"mean": (0.5, 0.5), "std": (0.1, 0.1)}, "per channel")])
def test_bad_statistics_are_refused(options, match):
    with pytest.raises(KdlabError, match=match):
        build_generator((3, 8, 8), **options)


def test_image_generator_follows_dfad_generator_a_layout():
    # Official GeneratorA for 32×32: a 8×8 seed map with 2·ngf channels, two ×2 upsamplings.
    generator = build_generator((3, 32, 32), latent_dim=256, width=64)
    assert generator.seed_size == (8, 8)
    assert generator.project.in_features == 256 and generator.project.out_features == 128 * 8 * 8
    convs = [m for m in generator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (128, 128, (3, 3)), (128, 64, (3, 3)), (64, 3, (3, 3))]
    # MNIST-1D: 40 -> seed 10 -> 20 -> 40.
    assert build_generator((1, 40), latent_dim=8, width=4).seed_size == (10,)


def test_outputs_depend_on_the_noise_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    generator = build_generator((1, 8, 8), latent_dim=8, width=4)
    out = generator(torch.randn(4, 8))
    assert not torch.allclose(out[0], out[1])  # different z, different samples
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())


@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (), (0, 8), (1, -3), (1.5, 8), (True, 4)])
def test_bad_input_shapes_are_refused(shape):
    with pytest.raises(KdlabError, match="generator: input_shape"):
        build_generator(shape)


@pytest.mark.parametrize("key", ["latent_dim", "width"])
def test_bad_sizes_are_refused(key):
    with pytest.raises(KdlabError, match=f"generator: {key}=0"):
        build_generator((1, 8, 8), **{key: 0})


def test_output_shape_mismatch_is_refused_with_both_shapes():
    generator = build_generator((1, 8, 8), latent_dim=8, width=4)
    check_generator_output(generator, (1, 8, 8), latent_dim=8)  # its own shape passes
    with pytest.raises(KdlabError, match=r"generator output \(1, 8, 8\) does not match the teacher's input "
                                         r"shape \(3, 32, 32\)"):
        check_generator_output(generator, (3, 32, 32), latent_dim=8)
    assert generator.training  # the probe restores the mode
