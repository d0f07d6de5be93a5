"""Generators for data-free distillation: shapes, [0, 1] range, gradients, and refused shapes."""
from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.models.generators import ConvGenerator, MLPGenerator, build_generator, check_generator_output


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
