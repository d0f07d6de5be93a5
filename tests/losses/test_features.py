"""Tests of kdlab.losses.features against independent float64 references.

The references use plain Python / numpy loops over samples, pairs and
triplets with ``math`` arithmetic (distances and cosines formed from explicit
difference vectors, Gram entries as explicit dot products), a different route
from the implementation's batched tensor code. Two losses also have a
hand-worked example with the arithmetic in a comment.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.losses import (
    FEATURE_LOSSES,
    attention_transfer,
    batchnorm_standardize,
    fitnet,
    pkt,
    rkd,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)


def randn(*shape, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


# ---------------------------------------------------------------------------
# Independent float64 references (loops, math)
# ---------------------------------------------------------------------------


def rows(feature):
    array = np.asarray(feature.detach().double().numpy() if isinstance(feature, torch.Tensor) else feature)
    return [list(map(float, row)) for row in array.reshape(array.shape[0], -1)]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(a):
    return math.sqrt(dot(a, a))


def huber(x):
    return 0.5 * x * x if abs(x) <= 1.0 else abs(x) - 0.5


def ref_fitnet(s, t):
    a, b = rows(s), rows(t)
    total = sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return total / (len(a) * len(a[0]))


def ref_attention_transfer(s, t, power=2.0):
    s = s.detach().double().numpy()
    t = t.detach().double().numpy()
    n = s.shape[0]
    total = 0.0
    positions = 0
    for i in range(n):
        maps = []
        for feature in (s[i], t[i]):
            flat = feature.reshape(feature.shape[0], -1)  # (C, S)
            m = [sum(abs(float(flat[c, k])) ** power for c in range(flat.shape[0])) for k in range(flat.shape[1])]
            length = norm(m)
            maps.append([v / length for v in m])
        positions = len(maps[0])
        total += sum((x - y) ** 2 for x, y in zip(*maps))
    return total / (n * positions)


def ref_rkd_distance(s, t):
    values = []
    for feature in (s, t):
        x = rows(feature)
        n = len(x)
        d = [[norm([a - b for a, b in zip(x[i], x[j])]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        values.append([[d[i][j] / mu for j in range(n)] for i in range(n)])
    n = len(values[0])
    return sum(huber(values[0][i][j] - values[1][i][j]) for i in range(n) for j in range(n) if i != j) / n**2


def ref_triplet_cosine(x, i, j, k):
    if i == j or k == j:
        return 0.0
    u = [a - b for a, b in zip(x[i], x[j])]
    v = [a - b for a, b in zip(x[k], x[j])]
    if norm(u) == 0.0 or norm(v) == 0.0:  # duplicate samples: no direction, counted as cosine 0
        return 0.0
    return dot(u, v) / (norm(u) * norm(v))


def ref_rkd_angle(s, t):
    xs, xt = rows(s), rows(t)
    n = len(xs)
    total = 0.0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                total += huber(ref_triplet_cosine(xs, i, j, k) - ref_triplet_cosine(xt, i, j, k))
    return total / n**3


def ref_conditional(x, eps):
    n = len(x)
    unit = [[v / (norm(r) + eps) for v in r] for r in x]
    kernel = [[(dot(unit[i], unit[j]) + 1.0) / 2.0 for j in range(n)] for i in range(n)]
    return [[kernel[i][j] / sum(kernel[i]) for j in range(n)] for i in range(n)]


def ref_pkt(s, t, eps=1e-7):
    q = ref_conditional(rows(s), eps)
    p = ref_conditional(rows(t), eps)
    n = len(p)
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def ref_sp(s, t):
    grams = []
    for feature in (s, t):
        x = rows(feature)
        n = len(x)
        g = [[dot(x[i], x[j]) for j in range(n)] for i in range(n)]
        grams.append([[v / norm(row) for v in row] for row in g])
    n = len(grams[0])
    return sum((grams[1][i][j] - grams[0][i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


# ---------------------------------------------------------------------------
# Values against the references
# ---------------------------------------------------------------------------


def test_fitnet_matches_reference_and_mse():
    s, t = randn(5, 3, 4, 4, seed=1), randn(5, 3, 4, 4, seed=2)
    assert fitnet(s, t).item() == pytest.approx(ref_fitnet(s, t), rel=1e-12)
    assert fitnet(s, t).item() == pytest.approx(torch.nn.functional.mse_loss(s, t).item(), rel=1e-12)


@pytest.mark.parametrize(
    "student_shape, teacher_shape, power",
    [((4, 3, 5, 6), (4, 7, 5, 6), 2.0), ((4, 2, 9), (4, 5, 9), 2.0), ((3, 4, 3, 3), (3, 4, 3, 3), 3.0)],
)
def test_attention_transfer_matches_reference(student_shape, teacher_shape, power):
    s, t = randn(*student_shape, seed=3), randn(*teacher_shape, seed=4)
    got = attention_transfer(s, t, power=power).item()
    assert got == pytest.approx(ref_attention_transfer(s, t, power), rel=1e-10)


def test_attention_transfer_hand_worked():
    # One sample, L = 2. Student channels (1, 2) and (2, 0): F = Σ_c a² = (1+4, 4+0) = (5, 4),
    # ‖F‖ = √41, q_s = (5, 4)/√41. Teacher one channel (1, 0): F = (1, 0), q_t = (1, 0).
    # ‖q_s − q_t‖² = (5/√41 − 1)² + 16/41 = 25/41 − 10/√41 + 1 + 16/41 = 2 − 10/√41;
    # mean over N·S = 2 positions: 1 − 5/√41 = 1 − 0.78086881 = 0.21913119.
    student = torch.tensor([[[1.0, 2.0], [2.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0]]])
    assert attention_transfer(student, teacher).item() == pytest.approx(1 - 5 / math.sqrt(41), abs=1e-7)
    assert attention_transfer(student, teacher).item() == pytest.approx(0.21913119, abs=1e-7)


@pytest.mark.parametrize("student_shape, teacher_shape", [((6, 5), (6, 3)), ((5, 2, 3, 3), (5, 7)), ((4, 8), (4, 8))])
def test_rkd_terms_match_reference(student_shape, teacher_shape):
    s, t = randn(*student_shape, seed=5), randn(*teacher_shape, seed=6)
    d_ref, a_ref = ref_rkd_distance(s, t), ref_rkd_angle(s, t)
    assert rkd_distance(s, t).item() == pytest.approx(d_ref, rel=1e-10)
    assert rkd_angle(s, t).item() == pytest.approx(a_ref, rel=1e-10)
    assert rkd(s, t).item() == pytest.approx(25 * d_ref + 50 * a_ref, rel=1e-10)
    assert rkd(s, t, distance_weight=1.0, angle_weight=2.0).item() == pytest.approx(d_ref + 2 * a_ref, rel=1e-10)


def test_rkd_distance_uses_huber_beyond_one():
    # Large relative differences push |ψ_s − ψ_t| above 1, exercising the linear branch of l_δ.
    s = torch.tensor([[0.0], [1.0], [100.0]], dtype=torch.float64)
    t = torch.tensor([[0.0], [50.0], [100.0]], dtype=torch.float64)
    assert rkd_distance(s, t).item() == pytest.approx(ref_rkd_distance(s, t), rel=1e-12)
    assert rkd_distance(s, t).item() > 0.1


@pytest.mark.parametrize("student_shape, teacher_shape", [((7, 5), (7, 3)), ((5, 2, 3, 3), (5, 11))])
def test_pkt_matches_reference(student_shape, teacher_shape):
    s, t = randn(*student_shape, seed=7), randn(*teacher_shape, seed=8)
    assert pkt(s, t).item() == pytest.approx(ref_pkt(s, t), rel=1e-10)
    assert pkt(s, t, eps=1e-3).item() == pytest.approx(ref_pkt(s, t, eps=1e-3), rel=1e-10)


@pytest.mark.parametrize("student_shape, teacher_shape", [((6, 4), (6, 9)), ((5, 2, 3, 3), (5, 4, 2, 2))])
def test_similarity_preserving_matches_reference(student_shape, teacher_shape):
    s, t = randn(*student_shape, seed=9), randn(*teacher_shape, seed=10)
    assert similarity_preserving(s, t).item() == pytest.approx(ref_sp(s, t), rel=1e-10)


def test_similarity_preserving_hand_worked():
    # Student rows s1 = (1, 0), s2 = (1, 1): G = [[1, 1], [1, 2]]; rows normalised:
    # (1, 1)/√2 and (1, 2)/√5. Teacher rows t1 = (1), t2 = (2): G = [[1, 2], [2, 4]]; both rows -> (1, 2)/√5.
    # Row 2 agrees; row 1 differs by (1/√2 − 1/√5, 1/√2 − 2/√5):
    # (1/2 − 2/√10 + 1/5) + (1/2 − 4/√10 + 4/5) = 2 − 6/√10 = 0.10263340.
    # Divided by b² = 4: 0.5 − 1.5/√10 = 0.02565835.
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[1.0], [2.0]])
    assert similarity_preserving(student, teacher).item() == pytest.approx(0.5 - 1.5 / math.sqrt(10), abs=1e-7)
    assert similarity_preserving(student, teacher).item() == pytest.approx(0.02565835, abs=1e-7)


def test_batchnorm_standardize_matches_batchnorm_modules_and_numpy():
    x = randn(16, 5, seed=11) * 3 + 2
    got = batchnorm_standardize(x, eps=1e-4)
    module = torch.nn.BatchNorm1d(5, eps=1e-4, affine=False, track_running_stats=False).double().train()
    torch.testing.assert_close(got, module(x), rtol=1e-12, atol=1e-12)
    a = x.numpy()
    expected = (a - a.mean(axis=0)) / np.sqrt(a.var(axis=0) + 1e-4)  # numpy var is the biased one
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    maps = randn(4, 3, 5, 5, seed=12)
    module2d = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False).double().train()
    torch.testing.assert_close(batchnorm_standardize(maps), module2d(maps), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Zero, invariances, mismatched shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fitnet", "attention_transfer", "rkd", "pkt", "similarity_preserving"])
def test_zero_for_identical_features(name):
    fn = registry.get("loss", name)
    x = randn(6, 3, 4, 4, seed=13)
    assert fn(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert fn(x, x + 0.5 * randn(*x.shape, seed=113)).item() > 1e-6  # and not zero for different features


def test_attention_transfer_is_zero_for_proportional_maps_with_other_channel_counts():
    # Teacher with 2 channels each equal to the student's single channel times 3: F_t = 18·F_s.
    s = randn(3, 1, 4, 4, seed=14)
    t = torch.cat([3 * s, -3 * s], dim=1)
    assert attention_transfer(s, t).item() == pytest.approx(0.0, abs=1e-12)


def per_sample_scale(x, seed):
    scale = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=x.dtype) * 5 + 0.2
    return x * scale.view(-1, *([1] * (x.ndim - 1)))


def test_invariances_that_hold():
    s, t = randn(6, 3, 4, 4, seed=15), randn(6, 5, 4, 4, seed=16)
    # AT: F is homogeneous of degree p and then L2-normalised per sample.
    base = attention_transfer(s, t).item()
    assert attention_transfer(per_sample_scale(s, 1), per_sample_scale(t, 2)).item() == pytest.approx(base, rel=1e-10)
    # PKT: only cosines enter.
    base = pkt(s, t).item()
    assert pkt(per_sample_scale(s, 3), per_sample_scale(t, 4)).item() == pytest.approx(base, rel=1e-6)
    # SP: a global factor c scales G by c², removed by the row normalisation.
    base = similarity_preserving(s, t).item()
    assert similarity_preserving(3.7 * s, 0.2 * t).item() == pytest.approx(base, rel=1e-10)
    # RKD distance: global scaling divides out through μ; translation leaves distances unchanged.
    base = rkd_distance(s, t).item()
    assert rkd_distance(3.7 * s, 0.2 * t).item() == pytest.approx(base, rel=1e-10)
    assert rkd_distance(s + 4.0, t - 1.0).item() == pytest.approx(base, rel=1e-10)
    # RKD angle: angles are invariant to global scaling and translation.
    base = rkd_angle(s, t).item()
    assert rkd_angle(3.7 * s + 1.0, 0.2 * t).item() == pytest.approx(base, rel=1e-10)


def test_invariances_that_do_not_hold():
    # Checked before asserting invariance: SP and RKD are NOT invariant to per-sample scaling.
    s, t = randn(6, 3, 4, 4, seed=17), randn(6, 5, 4, 4, seed=18)
    assert similarity_preserving(per_sample_scale(s, 5), t).item() != pytest.approx(
        similarity_preserving(s, t).item(), rel=1e-3
    )
    assert rkd_distance(per_sample_scale(s, 6), t).item() != pytest.approx(rkd_distance(s, t).item(), rel=1e-3)
    # FitNets is not scale invariant at all.
    assert fitnet(2 * s, s).item() == pytest.approx(fitnet(s, 0 * s).item(), rel=1e-12)


def test_mismatched_dims_are_accepted():
    s_map, t_map = randn(5, 3, 4, 4, seed=19), randn(5, 8, 4, 4, seed=20)
    assert torch.isfinite(attention_transfer(s_map, t_map))
    s_seq, t_seq = randn(5, 3, 12, seed=21), randn(5, 6, 12, seed=22)
    assert torch.isfinite(attention_transfer(s_seq, t_seq))
    s_vec, t_vec = randn(5, 7, seed=23), randn(5, 13, seed=24)
    for fn in (rkd, rkd_distance, rkd_angle, pkt, similarity_preserving):
        assert torch.isfinite(fn(s_vec, t_vec))
        assert torch.isfinite(fn(s_map, t_vec))  # ranks may differ too: features are flattened


def test_attention_transfer_spatial_mismatch_is_an_error():
    with pytest.raises(KdlabError, match="spatial sizes differ") as caught:
        attention_transfer(randn(2, 3, 4, 4, seed=25), randn(2, 3, 2, 2, seed=26))
    assert "\n" not in str(caught.value)
    with pytest.raises(KdlabError, match="spatial sizes differ"):
        attention_transfer(randn(2, 3, 16, seed=27), randn(2, 3, 4, 4, seed=28))
    with pytest.raises(KdlabError, match=r"\(N, C, L\) or \(N, C, H, W\)"):
        attention_transfer(randn(2, 3, seed=29), randn(2, 3, seed=30))


def test_input_errors():
    s = randn(4, 3, seed=31)
    with pytest.raises(KdlabError, match="batch sizes differ"):
        pkt(s, randn(5, 3, seed=32))
    with pytest.raises(KdlabError, match="adapter"):
        fitnet(s, randn(4, 5, seed=33))
    with pytest.raises(KdlabError, match="must be a tensor"):
        similarity_preserving(s.numpy(), s)
    with pytest.raises(KdlabError, match="floating point"):
        rkd(s, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(KdlabError, match="at least 2 samples"):
        rkd(s[:1], s[:1])
    with pytest.raises(KdlabError, match="both 0"):
        rkd(s, s, distance_weight=0, angle_weight=0)
    with pytest.raises(KdlabError, match="distance_weight"):
        rkd(s, s, distance_weight=-1.0)
    with pytest.raises(KdlabError, match="eps"):
        pkt(s, s, eps=0.0)
    with pytest.raises(KdlabError, match="power"):
        attention_transfer(randn(2, 3, 4, seed=34), randn(2, 3, 4, seed=35), power=float("nan"))
    with pytest.raises(KdlabError, match="batch of at least 2"):
        batchnorm_standardize(randn(1, 4, seed=36))


def test_rkd_handles_duplicate_samples_and_small_batches():
    x = randn(4, 5, seed=37).requires_grad_(True)
    duplicated = torch.cat([x[:1], x], dim=0)  # two identical rows: zero distance, zero difference vector
    teacher = randn(5, 3, seed=38)
    value = rkd(duplicated, teacher)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    expected = 25 * ref_rkd_distance(duplicated, teacher) + 50 * ref_rkd_angle(duplicated, teacher)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    two = randn(2, 3, seed=39)
    assert rkd_angle(two, randn(2, 4, seed=40)).item() == 0.0  # N = 2: every triplet is degenerate


def test_pkt_handles_zero_rows():
    x = randn(4, 5, seed=41).requires_grad_(True)
    value = pkt(torch.cat([torch.zeros(1, 5, dtype=x.dtype), x]), randn(5, 3, seed=42))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------
# Gradients and dtypes
# ---------------------------------------------------------------------------


GRADCHECK_CASES = [
    ("fitnet", (3, 2, 3), (3, 2, 3), {}),
    ("attention_transfer", (3, 2, 3, 3), (3, 4, 3, 3), {}),
    ("attention_transfer", (3, 2, 5), (3, 3, 5), {"power": 3.0}),
    ("rkd_distance", (5, 3), (5, 4), {}),
    ("rkd_angle", (5, 3), (5, 4), {}),
    ("rkd", (4, 2, 2), (4, 3), {}),
    ("pkt", (5, 3), (5, 4), {}),
    ("similarity_preserving", (4, 2, 3), (4, 5), {}),
]


@pytest.mark.parametrize("name, student_shape, teacher_shape, options", GRADCHECK_CASES)
def test_gradcheck_float64(name, student_shape, teacher_shape, options):
    fn = registry.get("loss", name)
    s = randn(*student_shape, seed=43).requires_grad_(True)
    t = randn(*teacher_shape, seed=44).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, **options), (s, t), eps=1e-6, atol=1e-7)


def test_gradcheck_batchnorm_standardize():
    x = randn(6, 3, seed=45).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: batchnorm_standardize(a), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_bf16_input_is_computed_in_float32(name):
    fn = registry.get("loss", name)
    teacher_shape = (6, 3, 4, 4) if name == "fitnet" else (6, 5, 4, 4)
    s = randn(6, 3, 4, 4, seed=46, dtype=torch.float32).bfloat16().requires_grad_(True)
    t = randn(*teacher_shape, seed=47, dtype=torch.float32).bfloat16()
    value = fn(s, t)
    assert value.dtype == torch.float32
    # Same as feeding the bf16-rounded values in float32: nothing is computed in bf16.
    expected = fn(s.detach().float(), t.float())
    assert value.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-9)
    value.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_batchnorm_standardize_bf16_returns_float32():
    x = randn(8, 4, seed=48, dtype=torch.float32).bfloat16()
    out = batchnorm_standardize(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, batchnorm_standardize(x.float()))


def test_float32_close_to_float64():
    s, t = randn(16, 8, 3, 3, seed=49), randn(16, 12, 3, 3, seed=50)
    for name in FEATURE_LOSSES:
        if name == "fitnet":
            continue
        fn = registry.get("loss", name)
        assert fn(s.float(), t.float()).item() == pytest.approx(fn(s, t).item(), rel=1e-4, abs=1e-7)


# ---------------------------------------------------------------------------
# Registry contract
# ---------------------------------------------------------------------------


def registered_feature_losses():
    return [n for n in registry.names("loss") if getattr(registry.get("loss", n), "loss_kind", None) == "feature"]


def test_feature_losses_are_registered_with_their_kind():
    assert set(FEATURE_LOSSES) == set(registered_feature_losses())
    assert registry.get("loss", "rkd") is rkd
    assert registry.summary("loss", "pkt")  # a docstring first line for `kdlab list losses`
    assert "batchnorm_standardize" not in registry.names("loss")  # a transform, not a loss


@pytest.mark.parametrize("name", registered_feature_losses())
def test_feature_loss_contract(name):
    fn = registry.get("loss", name)
    s = randn(4, 3, 5, 5, seed=51, dtype=torch.float32).requires_grad_(True)
    t = randn(4, 3, 5, 5, seed=52, dtype=torch.float32)
    value = fn(s, t)
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
