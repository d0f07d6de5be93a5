"""Miles & Mikolajczyk's recipe (papers.md §3) against an independent float64 computation, and its switches."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.config import MethodConfig
from kdlab.engine.build import build_method
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Batch, Outputs
from kdlab.models import Taps

N, CLASSES, D_S, D_T = 8, 3, 6, 10
INPUT_SHAPE = (1, 5)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mlp(width):
    return registry.get("model", "mlp")(input_shape=INPUT_SHAPE, num_classes=CLASSES, mean=(0.0,), std=(1.0,),
                                        width=width)


def miles(student_width=D_S, teacher_width=D_T, **options):
    torch.manual_seed(0)
    student, teacher = mlp(student_width), mlp(teacher_width)
    method = build_method(MethodConfig("miles", options), student=student, teacher=teacher, input_shape=INPUT_SHAPE)
    return method, student, teacher


def step_inputs(d_s=D_S, d_t=D_T, seed=0, teacher_scale=1.0):
    """A batch with pooled features given directly (the method only reads ``features['pool']`` and logits)."""
    s_logits, t_logits = randn(N, CLASSES, seed=seed), 3.0 * randn(N, CLASSES, seed=seed + 1)
    labels = torch.arange(N) % CLASSES
    z_s = randn(N, d_s, seed=seed + 2).requires_grad_()
    z_t = teacher_scale * randn(N, d_t, seed=seed + 3) + 0.5
    return Batch(torch.zeros(N, *INPUT_SHAPE), labels), Outputs(s_logits, {"pool": z_s}), Outputs(t_logits, {"pool": z_t})


def bn(x, eps=1e-4):
    """BatchNorm1d in training mode without affine parameters, by hand: biased variance over the batch."""
    mean = x.mean(dim=0, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=0, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def project(method, z_s):
    linear = method.projector.body[-1]
    return z_s.double() @ linear.weight.detach().double().T + linear.bias.detach().double()


def logsum_all(d, power=4.0):
    """log Σ_{b,d} |d|^p as written: the log of one sum over the whole batch and every feature."""
    return math.log(d.abs().pow(power).sum().item())


# --------------------------------------------------------------------------- the full recipe


def test_full_recipe_matches_an_independent_float64_computation():
    method, _, _ = miles()
    batch, s_out, t_out = step_inputs(teacher_scale=0.01)  # teacher variance ~1e-4: bn_eps = 1e-4 matters
    terms = method.loss_terms(batch, s_out, t_out)
    assert list(terms) == ["ce", "kl", "feature"]
    z_s, z_t = s_out.features["pool"].detach().double(), t_out.features["pool"].double()
    expected = 2.0 * logsum_all(bn(project(method, z_s)) - bn(z_t))
    assert terms["feature"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl(s_out.logits, t_out.logits, temperature=1.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(cross_entropy(s_out.logits, batch.labels).item(), rel=1e-6)


def test_weights_power_and_eps_are_the_configured_ones():
    method, _, _ = miles(feature_weight=0.5, kl_weight=3.0, ce_weight=0.25, temperature=2.0, power=2.0, bn_eps=1e-2)
    batch, s_out, t_out = step_inputs(seed=10, teacher_scale=0.1)
    terms = method.loss_terms(batch, s_out, t_out)
    z_s, z_t = s_out.features["pool"].detach().double(), t_out.features["pool"].double()
    expected = 0.5 * logsum_all(bn(project(method, z_s), 1e-2) - bn(z_t, 1e-2), power=2.0)
    assert terms["feature"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(3.0 * kl(s_out.logits, t_out.logits, temperature=2.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.25 * cross_entropy(s_out.logits, batch.labels).item(), rel=1e-6)


def test_through_the_taps_of_real_models():
    method, student, teacher = miles()
    assert method.student_taps == ("pool",) and method.teacher_taps == ("pool",)
    inputs = torch.rand(N, *INPUT_SHAPE, generator=torch.Generator().manual_seed(4))
    with Taps(student, method.student_taps) as s_taps:
        s_out = Outputs(student(inputs), dict(s_taps.captured))
    with Taps(teacher, method.teacher_taps, detach=True) as t_taps, torch.no_grad():
        t_out = Outputs(teacher(inputs), dict(t_taps.captured))
    terms = method.loss_terms(Batch(inputs, torch.arange(N) % CLASSES), s_out, t_out)
    z_s, z_t = s_out.features["pool"].detach().double(), t_out.features["pool"].double()
    assert z_s.shape == (N, D_S) and z_t.shape == (N, D_T)
    assert terms["feature"].item() == pytest.approx(2.0 * logsum_all(bn(project(method, z_s)) - bn(z_t)), rel=1e-5)
    sum(terms.values()).backward()
    assert student.layer1[1].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- each switch


def test_projector_off_with_equal_widths_compares_the_features_directly():
    method, _, _ = miles(student_width=D_T, projector=False)
    assert method.projector is None and list(method.parameters()) == []
    batch, s_out, t_out = step_inputs(d_s=D_T, seed=20)
    z_s, z_t = s_out.features["pool"].detach().double(), t_out.features["pool"].double()
    value = method.loss_terms(batch, s_out, t_out)["feature"]
    assert value.item() == pytest.approx(2.0 * logsum_all(bn(z_s) - bn(z_t)), rel=1e-5)


def test_projector_off_with_unequal_widths_is_refused_at_build_time():
    with pytest.raises(KdlabError, match=r"^method\.projector: .*6.*10.*projector: true") as info:
        miles(projector=False)
    assert "\n" not in str(info.value)


def test_normalize_off_skips_batchnorm():
    method, _, _ = miles(normalize=False)
    batch, s_out, t_out = step_inputs(seed=30)
    z_s, z_t = s_out.features["pool"].detach().double(), t_out.features["pool"].double()
    value = method.loss_terms(batch, s_out, t_out)["feature"].item()
    raw = 2.0 * logsum_all(project(method, z_s) - z_t)
    normalized = 2.0 * logsum_all(bn(project(method, z_s)) - bn(z_t))
    assert value == pytest.approx(raw, rel=1e-5)
    assert abs(raw - normalized) > 0.1  # the comparison can tell the two apart


def test_distance_l2_is_the_mean_squared_difference():
    method, _, _ = miles(distance="l2")
    batch, s_out, t_out = step_inputs(seed=40)
    z_s, z_t = s_out.features["pool"].detach().double(), t_out.features["pool"].double()
    value = method.loss_terms(batch, s_out, t_out)["feature"].item()
    assert value == pytest.approx(2.0 * (bn(project(method, z_s)) - bn(z_t)).pow(2).mean().item(), rel=1e-5)


def test_l2_without_projector_or_normalisation_is_plain_mse():
    method, _, _ = miles(student_width=D_T, projector=False, normalize=False, distance="l2", feature_weight=1.0)
    batch, s_out, t_out = step_inputs(d_s=D_T, seed=50)
    value = method.loss_terms(batch, s_out, t_out)["feature"]
    expected = nn.functional.mse_loss(s_out.features["pool"].detach(), t_out.features["pool"])
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------- taps and ownership


@pytest.mark.parametrize(("student_tap", "teacher_tap"), [("block2", "pool"), ("pool", "block2"), ("block2", "block2")])
def test_a_non_pooled_tap_is_refused_naming_it(student_tap, teacher_tap):
    cnn = registry.get("model", "cnn1d")
    student = cnn(input_shape=(1, 40), num_classes=5, mean=(0.0,), std=(1.0,), width=4)
    teacher = cnn(input_shape=(1, 40), num_classes=5, mean=(0.0,), std=(1.0,), width=16)
    with pytest.raises(KdlabError, match=r"block2 \((4|16), 20\).*'pool'") as info:
        build_method(MethodConfig("miles", {"student_tap": student_tap, "teacher_tap": teacher_tap}),
                     student=student, teacher=teacher, input_shape=(1, 40))
    assert "\n" not in str(info.value)


def test_the_projector_is_a_linear_owned_by_the_method():
    method, student, _ = miles()
    linears = [m for m in method.projector.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (D_T, D_S)
    owned = {id(p) for p in method.parameters()}
    assert owned == {id(linears[0].weight), id(linears[0].bias)}
    assert not owned & {id(p) for p in student.parameters()}
    assert set(method.state_dict()) == {"projector.body.0.weight", "projector.body.0.bias"}
    batch, s_out, t_out = step_inputs(seed=60)
    method.loss_terms(batch, s_out, t_out)["feature"].backward()
    assert linears[0].weight.grad.abs().sum() > 0
    assert s_out.features["pool"].grad.abs().sum() > 0  # and the student feature is trained through it
