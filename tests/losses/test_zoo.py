"""The zoo's feature losses (NST, CC, AB, VID, KDSVD, FT, OFD) against float64 loops from the papers' equations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.losses import FEATURE_LOSSES
from kdlab.losses.ctkd import cosine_lambda, kl_at_learned_temperature, reverse_gradient
from kdlab.losses.ofd import ofd_margin, ofd_partial_l2
from kdlab.losses.zoo import (
    activation_boundary,
    canonical_signs,
    cc_gaussian_taylor,
    correlation_congruence,
    factor_transfer,
    kdsvd,
    match_spatial,
    nst,
    vid_nll,
)


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------
# NST: MMD² with k(x, y) = (xᵀy)² between channel distributions (Huang & Wang §3)
# ---------------------------------------------------------------------------


def nst_reference(s, t):
    """Per sample: each channel's map flattened and L2-normalised (ε = 1e-10 under the root, as the authors'
    MXNet ``L2Normalization``); the three kernel means of MMD², by loops."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    total = 0.0
    for n in range(s.shape[0]):
        fs = [c.ravel() / np.sqrt(c.ravel() @ c.ravel() + 1e-10) for c in s[n]]
        ft = [c.ravel() / np.sqrt(c.ravel() @ c.ravel() + 1e-10) for c in t[n]]

        def mean_k(a, b):
            return sum(float(x @ y) ** 2 for x in a for y in b) / (len(a) * len(b))

        total += mean_k(ft, ft) + mean_k(fs, fs) - 2.0 * mean_k(fs, ft)
    return total / s.shape[0]


def test_nst_hand_worked():
    # one channel each, orthogonal spatial patterns: k(t,t) = k(s,s) = 1, k(s,t) = 0 → MMD² = 2
    s = torch.tensor([[[[2.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 3.0]]]])
    assert nst(s, t).item() == pytest.approx(2.0)
    # teacher channels e1, e2; student channel e1: mean k(t,t) = 2/4, k(s,s) = 1, mean k(s,t) = 1/2 → 0.5
    t2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert nst(s, t2).item() == pytest.approx(0.5)
    # the kernel sees only each channel's normalised pattern: rescaling a channel changes nothing
    assert nst(5.0 * s, t).item() == pytest.approx(2.0)


def test_nst_matches_reference_with_different_channel_counts():
    s, t = randn(3, 4, 3, 3, seed=0), randn(3, 6, 3, 3, seed=1)
    assert nst(s, t).item() == pytest.approx(nst_reference(s, t), rel=1e-10)
    assert nst(t, t).item() == pytest.approx(0.0, abs=1e-12)


def test_nst_pools_the_larger_map_first():
    s, t = randn(2, 4, 4, 4, seed=2), randn(2, 5, 2, 2, seed=3)
    pooled = s.reshape(2, 4, 2, 2, 2, 2).mean(dim=(3, 5))  # 2×2 average pooling by hand
    assert nst(s, t).item() == pytest.approx(nst_reference(pooled, t), rel=1e-10)
    assert nst(t, s).item() == pytest.approx(nst_reference(t, pooled), rel=1e-10)


def test_nst_gradcheck():
    s = randn(2, 3, 2, 2, seed=4).requires_grad_()
    t = randn(2, 4, 2, 2, seed=5)
    assert torch.autograd.gradcheck(lambda x: nst(x, t), (s,))


def test_nst_refuses_vectors():
    with pytest.raises(KdlabError, match=r"\(N, C, H, W\)"):
        nst(torch.randn(4, 8), torch.randn(4, 8))


def nst_authors(s, t):
    """TuSimple/neuron-selectivity-transfer ``symbol/transfer.py`` ``mmd_poly`` (c = 0), by loops, as their
    trainer optimises it: per sample, ``L2Normalization(mode='spatial', eps=1e-10)`` (x / sqrt(Σx² + eps)
    per channel), mean (s·s')² − 2 mean (s·t)² (no teacher-teacher term), summed by ``MakeLoss`` over the
    batch and rescaled by 1/batch by MXNet's optimiser; returned with the dropped term, mean (t·t')²."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    theirs, dropped = 0.0, 0.0
    for n in range(s.shape[0]):
        fs = [c.ravel() / math.sqrt(float(c.ravel() @ c.ravel()) + 1e-10) for c in s[n]]
        ft = [c.ravel() / math.sqrt(float(c.ravel() @ c.ravel()) + 1e-10) for c in t[n]]

        def mean_k(a, b):
            return sum((float(x @ y) + 0.0) ** 2 for x in a for y in b) / (len(a) * len(b))

        theirs += mean_k(fs, fs) - 2.0 * mean_k(fs, ft)
        dropped += mean_k(ft, ft)
    return theirs / s.shape[0], dropped / s.shape[0]


def test_nst_equals_the_authors_mmd_poly_up_to_their_dropped_constant():
    # a nearly silent student channel (Σx² = 4e-10, comparable to their ε) tells their normaliser from
    # F.normalize's; the teacher has other channel counts; 7×7 maps as their last-stage pair
    s, t = randn(3, 4, 7, 7, seed=20), randn(3, 6, 7, 7, seed=21)
    s[1, 2] = 0.0
    s[1, 2, 0, 0] = 2e-5
    theirs, dropped = nst_authors(s, t)
    assert nst(s, t).item() == pytest.approx(theirs + dropped, rel=1e-12)
    # gradient to the student: theirs by central differences of their formula (the dropped term has none)
    s_req = s.clone().requires_grad_()
    nst(s_req, t).backward()
    for index, h in [((0, 0, 0, 0), 1e-6), ((2, 3, 6, 1), 1e-6), ((1, 2, 0, 0), 1e-11), ((1, 2, 3, 3), 1e-11)]:
        up, down = s.clone(), s.clone()
        up[index] += h
        down[index] -= h
        numeric = (nst_authors(up, t)[0] - nst_authors(down, t)[0]) / (2 * h)
        assert s_req.grad[index].item() == pytest.approx(numeric, rel=1e-5)


def test_nst_normalises_like_mxnet_not_like_f_normalize():
    # one student channel with Σx² = ε = 1e-10: theirs is scaled by 1/sqrt(2), not made a unit vector
    s = torch.tensor([[[[1e-5, 0.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    # s becomes (1/√2, 0): k(s,s) = 1/4, k(s,t) = 1/2, k(t,t) = 1 → MMD² = 1 + 1/4 − 2·1/2 = 1/4 (F.normalize: 0)
    assert nst(s, t).item() == pytest.approx(0.25, rel=1e-9)


def test_match_spatial_refuses_crossed_sizes():
    with pytest.raises(KdlabError, match="nest"):
        match_spatial(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 2, 4))


# ---------------------------------------------------------------------------
# CC: ‖ψ(F_t) − ψ(F_s)‖ / n², ψ by the Taylor form of the Gaussian RBF (Peng et al. eqs. 7–9)
# ---------------------------------------------------------------------------


def cc_reference(s, t, gamma, max_p):
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    n = s.shape[0]

    def psi(f):
        out = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                dot = float(f[i] @ f[j])
                out[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot ** p
                                for p in range(max_p + 1))
        return out

    return math.sqrt(((psi(s) - psi(t)) ** 2).sum()) / n ** 2


def test_cc_matches_reference():
    s, t = randn(5, 3, seed=6), randn(5, 7, seed=7)
    for gamma, max_p in [(0.4, 2), (1.3, 4), (0.2, 0)]:
        got = correlation_congruence(s, t, gamma=gamma, max_p=max_p).item()
        assert got == pytest.approx(cc_reference(s, t, gamma, max_p), rel=1e-10)


def test_cc_hand_worked_bilinear():
    # C_s = I, C_t = all ones: the difference has two off-diagonal −1s → √2 / 2²
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert correlation_congruence(s, t, kernel="bilinear").item() == pytest.approx(math.sqrt(2) / 4)


def test_cc_taylor_kernel_tends_to_the_gaussian_rbf_on_unit_vectors():
    f = torch.nn.functional.normalize(randn(4, 3, seed=8), dim=1)
    rbf = torch.exp(-0.7 * torch.cdist(f, f).square())
    assert torch.allclose(cc_gaussian_taylor(f, gamma=0.7, max_p=25), rbf, atol=1e-12)
    assert not torch.allclose(cc_gaussian_taylor(f, gamma=0.7, max_p=1), rbf, atol=1e-3)


def test_cc_gradcheck_and_zero_at_equality():
    s = randn(4, 3, seed=9).requires_grad_()
    t = randn(4, 5, seed=10)
    assert torch.autograd.gradcheck(lambda x: correlation_congruence(x, t), (s,))
    same = randn(4, 3, seed=11).requires_grad_()
    value = correlation_congruence(same, same.detach())
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(same.grad).all()


def test_cc_refuses_bad_options():
    with pytest.raises(KdlabError, match="kernel"):
        correlation_congruence(torch.randn(2, 3), torch.randn(2, 3), kernel="rbf")
    with pytest.raises(KdlabError, match="max_p"):
        correlation_congruence(torch.randn(2, 3), torch.randn(2, 3), max_p=-1)


# ---------------------------------------------------------------------------
# AB: per neuron, (s − μ)² where the teacher is active and s ≤ μ, (s + μ)² where inactive and s > −μ
# ---------------------------------------------------------------------------


def ab_reference(s, t, margin):
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    total = 0.0
    for sv, tv in zip(s.ravel(), t.ravel()):
        if tv > 0:
            total += max(margin - sv, 0.0) ** 2
        else:
            total += max(margin + sv, 0.0) ** 2
    return total / s.shape[0]


def test_ab_hand_worked():
    s = torch.tensor([[0.5, -2.0], [2.0, -0.5]])
    t = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    # (0.5−1)² + (−2−1)² + (2+1)² + (−0.5+1)² = 0.25 + 9 + 9 + 0.25, over 2 samples
    assert activation_boundary(s, t).item() == pytest.approx(18.5 / 2)
    # beyond the margin on the right side: nothing to learn
    assert activation_boundary(torch.tensor([[1.5, -1.5]]), torch.tensor([[2.0, -3.0]])).item() == 0.0


def test_ab_matches_reference_and_gradcheck():
    s, t = randn(3, 2, 4, 4, seed=12), randn(3, 2, 4, 4, seed=13)
    for margin in (1.0, 0.3, 0.0):
        assert activation_boundary(s, t, margin=margin).item() == pytest.approx(ab_reference(s, t, margin), rel=1e-10)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: activation_boundary(v, t), (x,))


def authors_ab(source, target, margin, batch_size):
    """bhheo/AB_distillation ``criterion_alternative_L2`` transcribed in float64, then ``/ batch_size``."""
    loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).double()
            + (source - margin) ** 2 * ((source <= margin) & (target > 0)).double())
    return loss.abs().sum() / batch_size


def test_ab_equals_the_authors_criterion_in_value_and_gradient():
    s = randn(4, 3, 5, 5, seed=21).double()
    t = randn(4, 3, 5, 5, seed=22).double()
    s[0, 0, 0, :3] = torch.tensor([1.0, -1.0, 0.0])  # on the margins and at zero
    t[0, 0, 0, :3] = torch.tensor([0.0, 0.0, 0.0])  # a teacher at exactly 0 counts as inactive
    for margin in (1.0, 0.5, 0.0):
        a = s.clone().requires_grad_()
        b = s.clone().requires_grad_()
        ours, theirs = activation_boundary(a, t, margin=margin), authors_ab(b, t, margin, 4)
        assert ours.dtype == torch.float64 and ours.item() == pytest.approx(theirs.item(), rel=1e-12)
        ours.backward()
        theirs.backward()
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_ab_needs_equal_shapes():
    with pytest.raises(KdlabError, match="connector"):
        activation_boundary(torch.randn(2, 3), torch.randn(2, 4))


# ---------------------------------------------------------------------------
# VID: ½((μ − t)²/σ² + log σ²), σ² = softplus(α) + ε per channel (Ahn et al. eq. 6)
# ---------------------------------------------------------------------------


def vid_reference(mean, t, alpha, eps):
    mean, t, alpha = (np.asarray(x, dtype=np.float64) for x in (mean, t, alpha))
    values = []
    for n in range(mean.shape[0]):
        for c in range(mean.shape[1]):
            var = math.log(1.0 + math.exp(alpha[c])) + eps
            for m, tv in zip(mean[n, c].ravel(), t[n, c].ravel()):
                values.append(0.5 * ((m - tv) ** 2 / var + math.log(var)))
    return sum(values) / len(values)


def test_vid_hand_worked():
    alpha = torch.tensor([math.log(math.e - 1.0)])  # softplus(α) = 1, so with ε = 0 the variance is 1
    mean = torch.tensor([[[1.0, 3.0]]])
    t = torch.zeros(1, 1, 2)
    assert vid_nll(mean, t, alpha, eps=0.0).item() == pytest.approx(0.5 * (1 + 9) / 2)


def test_vid_matches_reference_and_gradcheck():
    mean, t, alpha = randn(2, 3, 2, 2, seed=14), randn(2, 3, 2, 2, seed=15), randn(3, seed=16)
    assert vid_nll(mean, t, alpha).item() == pytest.approx(vid_reference(mean, t, alpha, 1e-5), rel=1e-10)
    m, a = mean.clone().requires_grad_(), alpha.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: vid_nll(x, t, y), (m, a))


def test_vid_refuses_a_scale_per_wrong_channel_count():
    with pytest.raises(KdlabError, match="one scale per channel"):
        vid_nll(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.zeros(4))


# ---------------------------------------------------------------------------
# KDSVD (the authors' form): RBF of consecutive stages' aligned right singular vectors
# ---------------------------------------------------------------------------


def _svd_parts(f, count, teacher):
    """Per sample: right singular vectors of the (H·W, C) view (numpy), first ``count``, normalised values."""
    out = []
    for x in f:
        _, sv, vt = np.linalg.svd(x.transpose(1, 2, 0).reshape(-1, x.shape[0]), full_matrices=False)
        v = vt.T[:, :count].copy()
        if teacher:  # the canonical sign: largest-magnitude entry positive
            for j in range(v.shape[1]):
                if v[np.argmax(np.abs(v[:, j])), j] < 0:
                    v[:, j] *= -1
        out.append((v, sv[:count] / np.linalg.norm(sv[:count])))
    return out


def kdsvd_reference(student, teacher, k):
    student = [np.asarray(f, dtype=np.float64) for f in student]
    teacher = [np.asarray(f, dtype=np.float64) for f in teacher]
    n = student[0].shape[0]
    total = 0.0
    for b in range(n):
        previous = None
        for fs, ft in zip(student, teacher):
            v_t, s_t = _svd_parts(ft[b:b + 1], k, True)[0]
            v_s, _ = _svd_parts(fs[b:b + 1], k + 3, False)[0]
            aligned = np.zeros_like(v_t)
            for j in range(v_t.shape[1]):  # the student vector of largest |cos| with teacher vector j, sign-matched
                cos = v_s.T @ v_t[:, j]
                i = int(np.argmax(np.abs(cos)))
                aligned[:, j] = np.sign(cos[i]) * v_s[:, i]
            v_t, aligned = v_t * s_t, aligned * s_t
            if previous is not None:
                ps, pt = previous
                for a in range(v_t.shape[0]):
                    for c in range(pt.shape[0]):
                        for j in range(v_t.shape[1]):
                            g_s = math.exp(-(aligned[a, j] - ps[c, j]) ** 2 / 8)
                            g_t = math.exp(-(v_t[a, j] - pt[c, j]) ** 2 / 8)
                            total += (g_s - g_t) ** 2
            previous = (aligned, v_t)
    return total / n


def test_kdsvd_hand_worked():
    # 2-channel 1×1 maps: one singular vector each, the normalised channel vector; singular values normalise to 1.
    t1, t2 = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1), torch.tensor([-4.0, 3.0]).reshape(1, 2, 1, 1)
    s1, s2 = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1), torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    # v_t: (.6, .8), (.8, −.6) (sign fixed); v_s: (0, 1), (1, 0) (aligned: cos > 0)
    e = math.exp
    expected = ((e(-1 / 8) - e(-0.04 / 8)) ** 2 + (e(-0 / 8) - e(-0 / 8)) ** 2
                + (e(-0 / 8) - e(-1.44 / 8)) ** 2 + (e(-1 / 8) - e(-1.96 / 8)) ** 2)
    assert kdsvd([s1, s2], [t1, t2]).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_reference(k):
    student = [randn(3, 5, 2, 3, seed=20), randn(3, 4, 3, 2, seed=21), randn(3, 6, 2, 2, seed=22)]
    teacher = [randn(3, 5, 3, 3, seed=23), randn(3, 4, 2, 2, seed=24), randn(3, 6, 1, 3, seed=25)]
    assert kdsvd(student, teacher, k=k).item() == pytest.approx(kdsvd_reference(student, teacher, k), rel=1e-8)


def kdsvd_authors(student, teacher, k, fix_teacher_sign=None):
    """Our float64 transcription of the authors' ``KD_SVD`` (sseung0703/KD_methods_with_TF, ``nets/Shared.py`` with
    ``nets/SVP.py``: ``SVD``, ``Align_rsv``), batched as there, on NHWC maps: the sum over the batch, no 1/N."""
    def svd(x_nchw, n):  # SVP.SVD: reshape [-1, H*W, C], svd, removenan, slice, l2_normalize
        x = np.transpose(x_nchw, (0, 2, 3, 1))
        b, h, w, c = x.shape
        _, s, vt = np.linalg.svd(x.reshape(b, h * w, c), full_matrices=False)
        v = np.where(np.isfinite(vt), vt, 0.0).transpose(0, 2, 1)[:, :, :n]
        s = np.where(np.isfinite(s), s, 0.0)[:, :n]
        return s / np.linalg.norm(s, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)

    losses, previous = [], None
    for sfm, tfm in zip(student, teacher):
        sigma_t, v_t = svd(np.asarray(tfm, dtype=np.float64), k)
        if fix_teacher_sign is not None:
            v_t = fix_teacher_sign(v_t)
        _, v_s = svd(np.asarray(sfm, dtype=np.float64), k + 3)
        cosine = np.swapaxes(v_s, 1, 2) @ v_t  # Align_rsv
        mask = np.where(np.abs(cosine).max(axis=1, keepdims=True) == np.abs(cosine), np.sign(cosine), 0.0)
        v_s = v_s @ mask
        v_t, v_s = v_t * sigma_t[:, None, :], v_s * sigma_t[:, None, :]
        if previous is not None:
            v_sb, v_tb = previous
            s_rbf = np.exp(-np.square(v_s[:, :, None] - v_sb[:, None]) / 8)
            t_rbf = np.exp(-np.square(v_t[:, :, None] - v_tb[:, None]) / 8)
            l2 = (s_rbf - t_rbf) ** 2
            losses.append(np.where(np.isfinite(l2), l2, 0.0).sum())
        previous = (v_s, v_t)
    return sum(losses)


def _canonical_np(v):
    peak = np.take_along_axis(v, np.abs(v).argmax(axis=1)[:, None, :], axis=1)
    return v * np.where(peak < 0, -1.0, 1.0)


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_equals_the_authors_code_over_the_batch_size(k):
    """kdlab = the authors' KD_SVD / N, the teacher's singular vectors given the canonical sign (our addition)."""
    student = [randn(4, 6, 3, 3, seed=40), randn(4, 5, 2, 3, seed=41), randn(4, 7, 2, 2, seed=42)]
    teacher = [randn(4, 6, 2, 3, seed=43), randn(4, 5, 3, 2, seed=44), randn(4, 7, 2, 3, seed=45)]
    authors = kdsvd_authors(student, teacher, k, fix_teacher_sign=_canonical_np)
    assert kdsvd(student, teacher, k=k).item() == pytest.approx(authors / 4, rel=1e-10)


def test_kdsvd_gradient_equals_finite_differences():
    student = [randn(2, 4, 3, 2, seed=46).requires_grad_(), randn(2, 3, 2, 3, seed=47).requires_grad_()]
    teacher = [randn(2, 4, 2, 2, seed=48), randn(2, 3, 3, 2, seed=49)]
    assert torch.autograd.gradcheck(lambda a, b: kdsvd([a, b], teacher, k=1), tuple(student), eps=1e-6, atol=1e-6)


def test_canonical_signs_remove_the_svd_routine_s_choice():
    v = randn(3, 5, 2, seed=26)
    fixed = canonical_signs(v)
    assert torch.equal(canonical_signs(-v), fixed) and torch.equal(canonical_signs(fixed), fixed)
    peak = fixed.gather(1, fixed.abs().argmax(dim=1, keepdim=True))
    assert (peak > 0).all()


def test_kdsvd_gradient_reaches_the_student():
    student = [randn(2, 4, 3, 4, seed=30).requires_grad_(), randn(2, 3, 3, 2, seed=31).requires_grad_()]
    teacher = [randn(2, 4, 2, 4, seed=32), randn(2, 3, 3, 3, seed=33)]
    kdsvd(student, teacher).backward()
    assert all(torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in student)


def test_kdsvd_refuses_bad_stages():
    maps = [torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 2)]
    with pytest.raises(KdlabError, match="at least 2"):
        kdsvd(maps[:1], maps[:1])
    with pytest.raises(KdlabError, match="channels differ"):
        kdsvd(maps, [torch.randn(2, 3, 2, 4), maps[1]])


# ---------------------------------------------------------------------------
# FT: ‖F_T/‖F_T‖ − F_S/‖F_S‖‖_p (Kim et al. eq. 3), torchdistill's reduction
# ---------------------------------------------------------------------------


def ft_reference(s, t, p):
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    rows = []
    for a, b in zip(s.reshape(len(s), -1), t.reshape(len(t), -1)):
        d = a / math.sqrt(sum(x * x for x in a)) - b / math.sqrt(sum(x * x for x in b))
        rows.append(d)
    if p == 1:  # l1_loss, mean over every element
        return sum(abs(x) for d in rows for x in d) / sum(len(d) for d in rows)
    return sum(sum(abs(x) ** p for x in d) ** (1 / p) for d in rows) / len(rows)


def test_ft_hand_worked():
    s = torch.tensor([[3.0, 4.0]])  # → (.6, .8)
    t = torch.tensor([[0.0, 2.0]])  # → (0, 1)
    assert factor_transfer(s, t).item() == pytest.approx((0.6 + 0.2) / 2)
    assert factor_transfer(s, t, p=2).item() == pytest.approx(math.sqrt(0.36 + 0.04))


@pytest.mark.parametrize("p", [1, 2, 3])
def test_ft_matches_reference_and_gradcheck(p):
    s, t = randn(3, 2, 2, 2, seed=40), randn(3, 2, 2, 2, seed=41)
    assert factor_transfer(s, t, p=p).item() == pytest.approx(ft_reference(s, t, p), rel=1e-10)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: factor_transfer(v, t, p=p), (x,))


def authors_ft(s, t):
    """The authors' train_student.py, transcribed: ``nn.L1Loss()(utils.FT(s), utils.FT(t))``, ``utils.FT`` =
    ``F.normalize(x.view(N, -1))`` (x / max(‖x‖₂, 1e-12) per sample), L1Loss = mean |·| over every element."""
    def unit(x):
        x = x.reshape(len(x), -1)
        return x / x.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    return (unit(s) - unit(t)).abs().sum() / s.numel()


def test_ft_equals_the_authors_l1loss_of_normalised_factors():
    s = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)  # a zero factor
    t = torch.tensor([[[[2.0, 1.0], [-1.0, 0.0]]], [[[0.3, -0.4], [1.2, 0.1]]]], dtype=torch.float64)
    assert factor_transfer(s, t).item() == pytest.approx(authors_ft(s, t).item(), rel=1e-12)
    s, t = randn(4, 3, 2, 2, seed=42), randn(4, 3, 2, 2, seed=43)
    mine, theirs = s.clone().requires_grad_(), s.clone().requires_grad_()
    factor_transfer(mine, t).backward()
    authors_ft(theirs, t).backward()
    assert torch.allclose(mine.grad, theirs.grad, rtol=1e-10, atol=1e-14)


def test_ft_refuses_unequal_factors():
    with pytest.raises(KdlabError, match="translator"):
        factor_transfer(torch.randn(2, 3), torch.randn(2, 4))


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nst", "correlation_congruence"])
def test_registered_as_feature_losses(name):
    assert registry.get("loss", name).loss_kind == "feature"
    assert name in FEATURE_LOSSES


def test_elementwise_losses_are_left_to_their_methods():  # they need the method's connector or translator
    names = registry.names("loss")
    assert "activation_boundary" not in names and "factor_transfer" not in names


def test_vid_nll_is_not_a_registered_loss():  # it needs the method's variance, not just two features
    assert "vid" not in registry.names("loss") and "vid_nll" not in registry.names("loss")


def test_float32_inputs_are_computed_in_float32():
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)
    assert nst(s, t).dtype == torch.float32
    assert nst(s.half(), t.half()).dtype == torch.float32


# ---------------------------------------------------------------------------
# OFD: the BN-derived margin E[x | x < 0] (eq. 3) and the partial L2 (eq. 4)
# ---------------------------------------------------------------------------


def test_ofd_margin_is_the_mean_of_the_negative_part_of_the_bn_gaussian():
    gamma, beta = torch.tensor([1.0, 2.0, -0.5, 0.1]), torch.tensor([0.0, 1.0, -0.3, 1.0])
    got = ofd_margin(gamma, beta)
    grid = np.linspace(-40, 0, 400001)
    for i, (g, b) in enumerate(zip(gamma.tolist(), beta.tolist())):
        s = abs(g)
        if 0.5 * math.erfc(b / s / math.sqrt(2)) <= 0.001:  # almost no negative mass: mdistiller's −3σ
            assert got[i].item() == pytest.approx(-3 * s)
            continue
        density = np.exp(-((grid - b) / s) ** 2 / 2)  # E[x | x < 0] by the trapezoid rule over x < 0
        density[[0, -1]] *= 0.5
        assert got[i].item() == pytest.approx(float((grid * density).sum() / density.sum()), rel=1e-5)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi))  # the half-normal mean, by hand


def ofd_reference(s, t, m):
    s, t, m = (np.asarray(x, dtype=np.float64) for x in (s, t, m))
    total = 0.0
    for n, c, h, w in np.ndindex(*s.shape):
        sv, tv, mv = s[n, c, h, w], t[n, c, h, w], m[c]
        if tv > 0 or (mv < tv <= 0 and sv > tv):
            total += (sv - tv) ** 2
        elif tv <= mv and sv > mv:
            total += (sv - mv) ** 2
    return total / s.shape[0]


def test_ofd_partial_l2_hand_worked_and_reference():
    m = torch.tensor([-1.0])
    s = torch.tensor([[[[2.0, -3.0, 0.5, -2.0, 0.0]]]])
    t = torch.tensor([[[[1.0, 1.0, -0.5, -0.5, -2.0]]]])
    # t > 0: (2−1)², (−3−1)²; −1 < t ≤ 0 and s > t: (0.5+0.5)²; s < t: 0; t ≤ m and s > m: (0+1)²
    assert ofd_partial_l2(s, t, m).item() == pytest.approx(1 + 16 + 1 + 0 + 1)
    s, t, m = randn(2, 3, 2, 2, seed=50), randn(2, 3, 2, 2, seed=51), -randn(3, seed=52).abs()
    assert ofd_partial_l2(s, t, m).item() == pytest.approx(ofd_reference(s, t, m), rel=1e-10)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ofd_partial_l2(v, t, m), (x,))
    with pytest.raises(KdlabError, match="one margin"):
        ofd_partial_l2(s, t, torch.zeros(2))


def authors_distillation_loss(source, target, margin):
    """clovaai/overhaul-distillation CIFAR-100/distiller.py ``distillation_loss``, our float64 transcription:
    the target raised to the margin, squared error where the student is above it or it is positive, summed;
    train_with_distillation.py then divides the sum by the batch size."""
    out = 0.0
    for n, c, h, w in np.ndindex(*source.shape):
        sv, tv = float(source[n, c, h, w]), max(float(target[n, c, h, w]), float(margin[c]))
        if sv > tv or tv > 0:
            out += (sv - tv) ** 2
    return out / source.shape[0]


def test_ofd_partial_l2_equals_the_authors_distillation_loss_value_and_gradient():
    s, t = randn(3, 4, 2, 3, seed=53), randn(3, 4, 2, 3, seed=54)
    t[0, 0, 0, :] = torch.tensor([-0.7, -0.7, 0.0])  # ties with the margin and with zero
    s[0, 0, 0, :] = torch.tensor([-0.7, 0.1, 0.0])
    # the BN margins are ≤ 0; the authors' form also covers a positive one (the first kdlab form counted
    # (s − m)² + (s − t)² there for 0 < t ≤ m)
    for m in (torch.tensor([-0.7, -1.5, -0.2, 0.0], dtype=torch.float64),
              torch.tensor([0.5, -0.3, 1.0, -2.0], dtype=torch.float64)):
        assert ofd_partial_l2(s, t, m).item() == pytest.approx(authors_distillation_loss(s, t, m), rel=1e-12)
        x = s.clone().requires_grad_()
        ofd_partial_l2(x, t, m).backward()
        target = torch.maximum(t, m.reshape(1, -1, 1, 1))  # d/ds of the sum: 2(s − target) where counted
        expected = [2 * (sv - tv) / s.shape[0] if (sv > tv or tv > 0) else 0.0
                    for sv, tv in zip(s.flatten().tolist(), target.flatten().tolist())]
        assert x.grad.flatten().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------------------
# CTKD: KD at a learned temperature, the gradient reversal, the cosine λ
# ---------------------------------------------------------------------------


def kd_reference(s, t, temp):
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    total = 0.0
    for zs, zt in zip(s, t):
        p = np.exp(zt / temp) / np.exp(zt / temp).sum()
        q = np.exp(zs / temp) / np.exp(zs / temp).sum()
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(s) * temp * temp


def test_kl_at_learned_temperature_matches_reference_and_gradcheck():
    s, t = randn(4, 5, seed=60), 3 * randn(4, 5, seed=61)
    temp = torch.tensor([2.5], dtype=torch.float64)
    assert kl_at_learned_temperature(s, t, temp).item() == pytest.approx(kd_reference(s, t, 2.5), rel=1e-6)
    # hand-worked: uniform teacher, student logits (log 3, 0) at T = 1: KL(½,½ ‖ ¾,¼) = ½ log(⅔) + ½ log 2
    got = kl_at_learned_temperature(torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2), torch.ones(1))
    assert got.item() == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    x, tt = s.clone().requires_grad_(), temp.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_at_learned_temperature(a, t, b), (x, tt))


def test_reverse_gradient_is_identity_forward_and_negated_scaled_backward():
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.6, -1.5]))


@pytest.mark.parametrize("epoch", [0, 1, 3, 5, 9, 10, 11, 240])
def test_cosine_lambda_is_the_official_cosine_decay_with_the_sign_moved(epoch):
    # train_student.py CosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(epoch), transcribed
    i = min(max(epoch, 0), 10)
    official = (math.cos(i * math.pi / 10) + 1.0) * 0.5 * (0 - (-1)) + (-1)
    assert cosine_lambda(epoch, lambda_max=1.0, epochs=10) == pytest.approx(-official, abs=1e-15)
