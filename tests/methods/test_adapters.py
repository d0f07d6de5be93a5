"""Adapters: shapes per case, trainability, identity, pooling arithmetic, clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.losses import fitnet
from kdlab.methods import Method, make_adapter
from kdlab.methods.adapters import Adapter, GlobalAvgPool
from kdlab.models import Taps, tap_shapes


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layer_types(adapter: Adapter) -> list[type]:
    body = adapter.body
    return [type(m) for m in body] if isinstance(body, nn.Sequential) else [type(body)]


def assert_trainable(adapter: Adapter, student_shape):
    """Every parameter gets a finite nonzero gradient, and one optimiser step changes the output."""
    params = list(adapter.parameters())
    assert params and all(p.requires_grad for p in params)
    x = randn(4, *student_shape, seed=0)
    out = adapter(x)
    out.square().sum().backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    before = out.detach().clone()
    torch.optim.SGD(params, lr=0.1).step()
    assert not torch.allclose(adapter(x), before)


# ---------------------------------------------------------------------------
# One case per row of the table in the module docstring
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 11), (3, 5, 6)])
def test_identity_when_shapes_match(shape):
    adapter = make_adapter(shape, shape)
    assert adapter.is_identity and list(adapter.parameters()) == []
    x = randn(2, *shape, seed=1)
    assert adapter(x) is x


def test_conv2d_with_matching_spatial_size():
    adapter = make_adapter((8, 4, 4), (16, 4, 4))
    assert layer_types(adapter) == [nn.Conv2d, nn.BatchNorm2d]
    conv = adapter.body[0]
    assert conv.kernel_size == (1, 1) and conv.in_channels == 8 and conv.out_channels == 16 and conv.bias is None
    assert adapter(randn(3, 8, 4, 4, seed=2)).shape == (3, 16, 4, 4)
    assert sum(p.numel() for p in adapter.parameters()) == 8 * 16 + 2 * 16
    assert_trainable(adapter, (8, 4, 4))


def test_conv1d_with_matching_length():
    adapter = make_adapter((8, 20), (4, 20))
    assert layer_types(adapter) == [nn.Conv1d, nn.BatchNorm1d]
    assert adapter.body[0].kernel_size == (1,)
    assert adapter(randn(3, 8, 20, seed=3)).shape == (3, 4, 20)
    assert_trainable(adapter, (8, 20))


def test_linear_for_vectors():
    adapter = make_adapter((32,), (64,))
    assert layer_types(adapter) == [nn.Linear]
    assert adapter(randn(5, 32, seed=4)).shape == (5, 64)
    assert_trainable(adapter, (32,))


@pytest.mark.parametrize("student_shape", [(8, 4, 4), (8, 10)])
def test_feature_map_to_vector_pools_globally_then_linear(student_shape):
    adapter = make_adapter(student_shape, (6,))
    assert layer_types(adapter) == [GlobalAvgPool, nn.Linear]
    x = randn(3, *student_shape, seed=5)
    linear = adapter.body[1]
    expected = linear(x.flatten(2).mean(dim=2))
    torch.testing.assert_close(adapter(x), expected)
    assert adapter(x).shape == (3, 6)
    assert_trainable(adapter, student_shape)


def test_larger_student_map_is_average_pooled_to_the_teacher_size():
    adapter = make_adapter((3, 8, 8), (3, 4, 4), kind="conv")
    assert layer_types(adapter) == [nn.AdaptiveAvgPool2d, nn.Conv2d, nn.BatchNorm2d]
    with torch.no_grad():
        adapter.body[1].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    adapter.eval()  # fresh running stats: mean 0, var 1, so BN divides by sqrt(1 + eps)
    x = randn(2, 3, 8, 8, seed=6)
    # Each output position is the mean of a 2×2 block of the input.
    blocks = x.view(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(adapter(x), blocks / (1 + 1e-5) ** 0.5)


def test_larger_student_sequence_is_average_pooled_and_channels_mapped():
    adapter = make_adapter((4, 40), (8, 20))
    assert layer_types(adapter) == [nn.AdaptiveAvgPool1d, nn.Conv1d, nn.BatchNorm1d]
    assert adapter(randn(3, 4, 40, seed=7)).shape == (3, 8, 20)
    uneven = make_adapter((4, 7, 9), (8, 3, 4))  # non-integer ratios: uneven windows, still the teacher's size
    assert uneven(randn(2, 4, 7, 9, seed=8)).shape == (2, 8, 3, 4)
    assert_trainable(adapter, (4, 40))


def test_kind_linear_forces_a_projector_even_for_equal_dims():
    adapter = make_adapter((16,), (16,), kind="linear")
    assert not adapter.is_identity and layer_types(adapter) == [nn.Linear]
    assert_trainable(adapter, (16,))
    pooled = make_adapter((8, 4, 4), (16,), kind="linear")
    assert layer_types(pooled) == [GlobalAvgPool, nn.Linear]


def test_kind_conv_forces_a_conv_for_equal_shapes():
    adapter = make_adapter((5, 3, 3), (5, 3, 3), kind="conv")
    assert layer_types(adapter) == [nn.Conv2d, nn.BatchNorm2d]
    assert_trainable(adapter, (5, 3, 3))


def test_channels_last_tokens():
    adapter = make_adapter((17, 32), (17, 48), layout="channels_last")
    assert layer_types(adapter) == [nn.Linear]
    assert adapter(randn(2, 17, 32, seed=9)).shape == (2, 17, 48)
    assert make_adapter((17, 32), (17, 32), layout="channels_last").is_identity
    with pytest.raises(KdlabError, match="token"):
        make_adapter((17, 32), (65, 32), layout="channels_last")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "student_shape, teacher_shape, kind, fragment",
    [
        ((8, 2, 2), (16, 4, 4), "auto", "upsampling"),
        ((8, 10), (16, 20), "auto", "upsampling"),
        ((8, 6, 2), (16, 4, 4), "auto", "upsampling"),  # larger in one dim, smaller in the other
        ((32,), (16, 4, 4), "auto", "no spatial layout"),
        ((8, 16), (8, 4, 4), "auto", "spatial ranks differ"),
        ((8, 4, 4), (8, 2, 2), "identity", "equal shapes"),
        ((8, 4, 4), (16, 4, 4), "linear", "maps to a vector"),
        ((8,), (16,), "conv", "channel-first"),
    ],
)
def test_impossible_cases_raise_one_line_errors(student_shape, teacher_shape, kind, fragment):
    with pytest.raises(KdlabError) as caught:
        make_adapter(student_shape, teacher_shape, kind=kind, student_tap="s.tap", teacher_tap="t.tap")
    message = str(caught.value)
    assert message.startswith(f"student tap s.tap has shape {student_shape}, teacher tap t.tap has shape {teacher_shape};")
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize("bad", [(0, 3), (3, -1), "abc", (1, 2, 3, 4), (), (2.0, 3), 5])
def test_bad_shapes_are_rejected(bad):
    with pytest.raises(KdlabError, match="make_adapter"):
        make_adapter(bad, (4,))


def test_unknown_kind_and_layout():
    with pytest.raises(KdlabError, match="unknown kind"):
        make_adapter((4,), (4,), kind="mlp")
    with pytest.raises(KdlabError, match="unknown layout"):
        make_adapter((4,), (4,), layout="nhwc")


def test_wrong_input_shape_at_forward():
    adapter = make_adapter((8, 4, 4), (16, 4, 4), student_tap="layer2")
    with pytest.raises(KdlabError, match="student tap layer2: expected features of shape"):
        adapter(randn(2, 8, 5, 5, seed=10))
    identity = make_adapter((3,), (3,))
    with pytest.raises(KdlabError, match="expected features of shape"):
        identity(randn(2, 4, seed=11))


def test_torch_size_shapes_are_accepted():
    adapter = make_adapter(torch.Size([8, 20]), torch.Size([16, 20]))
    assert adapter.student_shape == (8, 20) and adapter.teacher_shape == (16, 20)


# ---------------------------------------------------------------------------
# End to end: zoo taps -> adapters owned by a method -> a feature loss
# ---------------------------------------------------------------------------


class _HintMethod(Method):
    """A minimal method owning one adapter per tap (what a FitNets method would do)."""

    def __init__(self, shapes_s, shapes_t, taps):
        super().__init__(None, student=None, teacher=None)
        self.adapters = nn.ModuleDict(
            {tap: make_adapter(shapes_s[tap][1:], shapes_t[tap][1:], student_tap=tap, teacher_tap=tap) for tap in taps}
        )


def test_adapters_on_zoo_taps_train_through_a_feature_loss():
    build = registry.get("model", "cnn1d")
    common = dict(input_shape=(1, 40), num_classes=10, mean=(0.0,), std=(1.0,))
    student, teacher = build(**common, widths=(4, 8)), build(**common, widths=(16, 32))
    x = torch.rand(6, 1, 40, generator=torch.Generator().manual_seed(12))
    taps = ["block2", "pool"]
    shapes_s, shapes_t = tap_shapes(student, taps, x), tap_shapes(teacher, taps, x)
    assert shapes_s == {"block2": (6, 8, 20), "pool": (6, 8)} and shapes_t == {"block2": (6, 32, 20), "pool": (6, 32)}
    method = _HintMethod(shapes_s, shapes_t, taps)
    adapter_params = {id(p) for p in method.adapters.parameters()}
    assert adapter_params and adapter_params <= {id(p) for p in method.parameters()}
    assert any(key.startswith("adapters.block2.body.0") for key in method.state_dict())
    with Taps(student, taps) as fs, Taps(teacher, taps, detach=True) as ft:
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = sum(fitnet(method.adapters[tap](fs[tap]), ft[tap]) for tap in taps)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.adapters.parameters())
    assert student.block1[0].weight.grad is not None  # the hint reaches the student's earlier layers
    assert student.head.weight.grad is None  # (the head is not on the path of a feature loss)
