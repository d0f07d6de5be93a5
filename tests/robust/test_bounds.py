"""IBP (kdlab.robust.bounds): soundness on sampled points, exactness at ε = 0, monotonicity, clear refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.robust.bounds import check_supported, interval_bounds, margin_bounds, probability_bounds

SHAPE, CLASSES = (1, 12), 3


def zoo(name, **options):
    return registry.get("model", name)(input_shape=SHAPE, num_classes=CLASSES, mean=(0.4,), std=(0.3,), **options)


def randomise_batchnorm(model, seed):
    """Non-trivial eval statistics and affine parameters, some γ < 0 (the sign-aware case)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=g))
    return model


def conv2d_chain():
    """Every other supported layer kind: Conv2d, BatchNorm2d, LeakyReLU, max/avg pooling, Flatten, Dropout."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                         nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=1), nn.Tanh()), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, CLASSES))


def models():
    torch.manual_seed(0)
    return {
        "mlp": zoo("mlp", width=8, depth=2, dropout=0.2),
        "mlp_logistic": zoo("mlp", depth=0),
        "cnn1d_bn": randomise_batchnorm(zoo("cnn1d", width=4, depth=3, kernel_size=3), seed=1),
        "conv2d_chain": randomise_batchnorm(conv2d_chain(), seed=2),
    }


def inputs_for(name, n, seed):
    shape = (1, 4, 4) if name == "conv2d_chain" else SHAPE
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def points_in_ball(x, eps, samples, seed):
    """Uniform points and random vertices of B_ε(x) ∩ [0, 1]: (N·samples, ...) grouped by sample."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    repeated = x.repeat_interleave(samples, dim=0)
    noise = 2 * torch.rand(repeated.shape, generator=g, dtype=x.dtype) - 1
    noise[: n * samples // 2] = noise[: n * samples // 2].sign()  # half at vertices (where IBP's extremes sit)
    return (repeated + eps * noise).clamp(0, 1)


@pytest.mark.parametrize("name", ["mlp", "mlp_logistic", "cnn1d_bn", "conv2d_chain"])
def test_bounds_contain_the_outputs_of_sampled_points_in_the_ball(name):
    model = models()[name].double().eval()
    x = inputs_for(name, 4, seed=3)
    for eps in (0.02, 0.1, 0.3):
        lower, upper = interval_bounds(model, x, eps)
        samples = 250
        with torch.no_grad():
            out = model(points_in_ball(x, eps, samples, seed=4)).view(len(x), samples, CLASSES)
        assert (out >= lower.unsqueeze(1) - 1e-10).all() and (out <= upper.unsqueeze(1) + 1e-10).all()
        assert (upper - lower).min() > 0  # and not degenerate


@pytest.mark.parametrize("name", ["mlp", "mlp_logistic", "cnn1d_bn", "conv2d_chain"])
def test_zero_radius_gives_the_forward_output(name):
    model = models()[name].eval()  # float32, as trained
    x = inputs_for(name, 5, seed=5).float()
    lower, upper = interval_bounds(model, x, 0.0)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(lower, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(upper, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mlp", "cnn1d_bn", "conv2d_chain"])
def test_bounds_tighten_monotonically_as_eps_shrinks(name):
    model = models()[name].double().eval()
    x = inputs_for(name, 4, seed=6)
    boxes = [interval_bounds(model, x, eps) for eps in (0.4, 0.2, 0.1, 0.05, 0.01, 0.0)]
    for (wide_lo, wide_hi), (narrow_lo, narrow_hi) in zip(boxes, boxes[1:]):
        assert (narrow_lo >= wide_lo - 1e-12).all() and (narrow_hi <= wide_hi + 1e-12).all()
    widths = [(hi - lo).mean().item() for lo, hi in boxes]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 1e-12


def test_input_box_is_clipped_to_the_valid_range():
    # A linear model w·x (w = 1): its IBP bounds are the box's sums, so the clamp to [0, 1] is visible.
    model = nn.Linear(3, 1, bias=False).double()
    model.weight.data.fill_(1.0)
    x = torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64)
    lower, upper = interval_bounds(model, x, 0.2)
    assert lower.item() == pytest.approx(0.0 + 0.3 + 0.8) and upper.item() == pytest.approx(0.2 + 0.7 + 1.0)
    lower, upper = interval_bounds(model, x, 0.2, lower=None, upper=None)  # unclamped
    assert lower.item() == pytest.approx(1.5 - 0.6) and upper.item() == pytest.approx(1.5 + 0.6)


def test_training_mode_batchnorm_uses_the_clean_batch_statistics_and_changes_nothing():
    model = randomise_batchnorm(zoo("cnn1d", width=4, depth=2, kernel_size=3), seed=7).train()
    x = inputs_for("cnn1d_bn", 6, seed=8).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lower, upper = interval_bounds(model, x, 0.0)
    for key, value in model.state_dict().items():  # pure: running statistics (and everything else) untouched
        assert torch.equal(value, before[key]), key
    assert model.training
    with torch.no_grad():
        expected = model(x)  # the training-mode forward normalises with this batch's statistics
    torch.testing.assert_close(lower, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(upper, expected, atol=1e-5, rtol=0)
    # ε > 0: sound for the network whose BatchNorm statistics are frozen at the clean batch's.
    model, x = model.double(), x.double()
    lower, upper = interval_bounds(model, x, 0.1)
    frozen = copy.deepcopy(model)
    captured = {}
    hooks = [m.register_forward_hook(lambda m, args, out: captured.__setitem__(m, args[0]))
             for m in frozen.modules() if isinstance(m, nn.BatchNorm1d)]
    with torch.no_grad():
        frozen(x)  # training mode: record each BatchNorm's input on the clean batch
    for h in hooks:
        h.remove()
    for bn, pre in captured.items():
        bn.running_mean.copy_(pre.mean((0, 2)))
        bn.running_var.copy_(pre.var((0, 2), unbiased=False))
    frozen.eval()
    with torch.no_grad():
        out = frozen(points_in_ball(x, 0.1, 100, seed=9)).view(len(x), 100, CLASSES)
    assert (out >= lower.unsqueeze(1) - 1e-9).all() and (out <= upper.unsqueeze(1) + 1e-9).all()


def test_gradients_reach_every_parameter():
    model = randomise_batchnorm(zoo("cnn1d", width=4, depth=2, kernel_size=3), seed=10).train()
    lower, upper = interval_bounds(model, inputs_for("cnn1d_bn", 4, seed=11).float(), 0.05)
    (upper - 2 * lower).sum().backward()  # the width alone would not depend on the biases
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.linear(x)


class ScaledLinear(nn.Linear):
    def forward(self, x):  # overrides forward: must not be bounded as a plain Linear
        return 2 * super().forward(x)


@pytest.mark.parametrize("model, layer", [
    (nn.Sequential(nn.Linear(4, 4), nn.GELU()), "GELU"),
    (nn.Sequential(Residual(), nn.Linear(4, 2)), "Residual"),
    (nn.Sequential(ScaledLinear(4, 2)), "ScaledLinear"),
    (nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(-0.5)), "LeakyReLU"),
    (nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3, padding=1, padding_mode="circular")), "Conv1d"),
])
def test_unsupported_layers_are_refused_by_name(model, layer):
    with pytest.raises(KdlabError, match=rf"unsupported layer {layer}"):
        interval_bounds(model, torch.rand(2, 4), 0.1)
    with pytest.raises(KdlabError, match=layer):
        check_supported(model)


def test_a_residual_zoo_model_is_refused_naming_its_block():
    model = registry.get("model", "resnet8")(input_shape=(3, 8, 8), num_classes=3, mean=(0.5,), std=(0.25,))
    with pytest.raises(KdlabError, match=r"BasicBlock at 'stage1\.0'"):
        check_supported(model)


def test_probability_bounds_contain_sampled_softmax_values_and_are_attained():
    g = torch.Generator().manual_seed(12)
    lower = 3 * torch.randn(16, 5, generator=g, dtype=torch.float64)
    upper = lower + 2 * torch.rand(16, 5, generator=g, dtype=torch.float64)
    p_lo, p_hi = probability_bounds(lower, upper)
    z = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.rand(16, 400, 5, generator=g, dtype=torch.float64)
    corners = torch.where(torch.rand(16, 400, 5, generator=g) < 0.5, lower.unsqueeze(1), upper.unsqueeze(1))
    for points in (z, corners):
        p = points.softmax(-1)
        assert (p >= p_lo.unsqueeze(1) - 1e-12).all() and (p <= p_hi.unsqueeze(1) + 1e-12).all()
    # Attained: p_i is smallest with z_i = l_i and every other z_j = u_j (and the reverse for the largest).
    for i in range(5):
        at_min = upper.clone()
        at_min[:, i] = lower[:, i]
        at_max = lower.clone()
        at_max[:, i] = upper[:, i]
        torch.testing.assert_close(p_lo[:, i], at_min.softmax(-1)[:, i])
        torch.testing.assert_close(p_hi[:, i], at_max.softmax(-1)[:, i])
    # A point box gives the softmax itself; huge logits do not overflow.
    torch.testing.assert_close(probability_bounds(lower, lower)[0], lower.softmax(-1))
    big = torch.tensor([[1000.0, -1000.0, 0.0]])
    lo, hi = probability_bounds(big, big + 1)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and lo[0, 0] == pytest.approx(1.0)


def test_margin_bounds_contain_sampled_margins():
    g = torch.Generator().manual_seed(13)
    lower = torch.randn(8, 4, generator=g, dtype=torch.float64)
    upper = lower + torch.rand(8, 4, generator=g, dtype=torch.float64)
    classes = torch.randint(0, 4, (8,), generator=g)
    m_lo, m_hi = margin_bounds(lower, upper, classes)
    z = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.rand(8, 300, 4, generator=g, dtype=torch.float64)
    own = z.gather(2, classes.view(8, 1, 1).expand(8, 300, 1)).squeeze(2)
    others = z.scatter(2, classes.view(8, 1, 1).expand(8, 300, 1), float("-inf")).amax(2)
    margin = own - others
    assert (margin >= m_lo.unsqueeze(1)).all() and (margin <= m_hi.unsqueeze(1)).all()
    # Hand-worked: l = (1, 0, 0.2), u = (2, 0.5, 0.4), class 0: m ∈ [1 − 0.5, 2 − 0.2] = [0.5, 1.8].
    m_lo, m_hi = margin_bounds(torch.tensor([[1.0, 0.0, 0.2]]), torch.tensor([[2.0, 0.5, 0.4]]), torch.tensor([0]))
    assert m_lo.item() == pytest.approx(0.5) and m_hi.item() == pytest.approx(1.8)


def test_bad_radius_is_refused():
    with pytest.raises(KdlabError, match="eps"):
        interval_bounds(nn.Linear(4, 2), torch.rand(2, 4), -0.1)
