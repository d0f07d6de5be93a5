"""Feature losses of the mdistiller / torchdistill zoo: NST, CC, AB, FT, KDSVD and VID's likelihood.

Each is a pure function of the (adapted) student and the teacher feature, following its authors'
or the reference zoo's code where it fixes a constant the paper leaves open (each docstring says
which file). ``nst`` and ``correlation_congruence`` compare any two widths and are registered
(``loss_kind == "feature"``, usable in ``distill`` terms, listed in ``FEATURE_LOSSES``). Not registered:
``activation_boundary`` and ``factor_transfer`` compare element by element, so they need the connector or
translator their method owns; ``vid_nll`` needs the method's learned variance; ``kdsvd`` reads several stages.
Inputs are upcast to at least float32, as in ``kdlab.losses.features``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError
from kdlab.losses.features import _check_pair, _check_positive, _flatten
from kdlab.registry import register


FEATURE_LOSSES = ("nst", "correlation_congruence")  # the registered ones


def match_spatial(student_feature: torch.Tensor, teacher_feature: torch.Tensor):
    """Average-pool the larger of two ``(N, C, H, W)`` maps to the other's spatial size.

    As mdistiller's NST and VID do (``F.adaptive_avg_pool2d`` of the larger map); needed where
    stages of different depth are paired. Equal sizes are returned unchanged.
    """
    s_hw, t_hw = tuple(student_feature.shape[2:]), tuple(teacher_feature.shape[2:])
    if s_hw == t_hw:
        return student_feature, teacher_feature
    if all(s >= t for s, t in zip(s_hw, t_hw)):
        return F.adaptive_avg_pool2d(student_feature, t_hw), teacher_feature
    if all(s <= t for s, t in zip(s_hw, t_hw)):
        return student_feature, F.adaptive_avg_pool2d(teacher_feature, s_hw)
    raise KdlabError(f"spatial sizes {s_hw} (student) and {t_hw} (teacher) are larger in one dim and smaller "
                     "in the other; tap stages whose maps nest")


def _check_maps(loss: str, student, teacher) -> torch.dtype:
    dtype = _check_pair(loss, student, teacher)
    if student.ndim != 4 or teacher.ndim != 4:
        raise KdlabError(f"loss {loss}: needs (N, C, H, W) feature maps, got student {tuple(student.shape)} and "
                         f"teacher {tuple(teacher.shape)}; tap convolutional stages (e.g. stage1..stage3)")
    return dtype


# ---------------------------------------------------------------------------
# Neuron selectivity transfer (NST)
# ---------------------------------------------------------------------------


_NST_EPS = 1e-10  # the authors' ``L2Normalization(eps=1e-10, mode='spatial')``, inside the square root


def _unit_channels(feature: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` → ``(N, C, H·W)``, each channel's map divided by ``sqrt(Σ x² + 1e-10)``.

    MXNet's ``L2Normalization`` as the authors call it (not ``F.normalize``'s ``max(‖x‖, 1e-12)``): the two
    differ only for nearly-silent channels (Σ x² ≲ 1e-6), which the authors' form shrinks towards 0.
    """
    flat = feature.flatten(2)
    return flat * torch.rsqrt(flat.square().sum(dim=2, keepdim=True) + _NST_EPS)


def _mean_poly2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and every channel pair of ``k(a_i, b_j) = (a_i · b_j)²``."""
    return torch.bmm(a, b.transpose(1, 2)).square().mean()


@register("loss", "nst")
def nst(student_feature, teacher_feature):
    """NST: squared MMD with the polynomial kernel between the channels' spatial distributions.

    Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
    (arXiv 1707.01219, 2017), §3: each channel's activation map over the H·W positions is one
    sample of a distribution (``f^{k·}``, L2-normalised over positions), and the loss is the
    squared MMD between the teacher's C_T and the student's C_S samples,

        MMD² = 1/C_T² Σ_{i,i'} k(t_i, t_i') + 1/C_S² Σ_{j,j'} k(s_j, s_j') − 2/(C_T C_S) Σ_{i,j} k(s_j, t_i),

    with the polynomial kernel ``k(x, y) = (xᵀy + c)^d``, d = 2, c = 0 (the paper's best kernel).
    Checked against the authors' code (TuSimple/neuron-selectivity-transfer, ``symbol/transfer.py``,
    ``mmd_poly``): each channel L2-normalised over positions with ε = 1e-10 under the root
    (``_unit_channels``), each kernel term averaged over its channel pairs per sample, then over the
    batch (their ``MakeLoss`` sums per-sample losses and MXNet's optimiser rescales by 1/batch).
    They drop the teacher-teacher term (constant in the student: the same gradients); we keep it, so
    the value is the paper's MMD² (≥ 0). As mdistiller (``single_stage_nst_loss``), the larger map is
    average-pooled to the smaller's size first (the authors pair equal 7×7 maps). Channel counts may differ.

    Shapes: ``(N, C_S, H, W)``, ``(N, C_T, H', W')``. Dtype: at least float32.
    """
    dtype = _check_maps("nst", student_feature, teacher_feature)
    s, t = match_spatial(student_feature.to(dtype), teacher_feature.to(dtype))
    s, t = _unit_channels(s), _unit_channels(t)  # each channel: a unit vector over positions
    return _mean_poly2(t, t) + _mean_poly2(s, s) - 2.0 * _mean_poly2(s, t)


nst.loss_kind = "feature"


# ---------------------------------------------------------------------------
# Correlation congruence (CC)
# ---------------------------------------------------------------------------


def cc_gaussian_taylor(embedding: torch.Tensor, *, gamma: float, max_p: int) -> torch.Tensor:
    """``(N, N)`` correlation matrix by the order-``max_p`` Taylor form of the Gaussian RBF.

    Peng et al. (ICCV 2019), eq. 9 (the Taylor expansion of ``exp(−γ‖F_i − F_j‖²)`` for unit
    vectors): ``k(F_i, F_j) ≈ Σ_{p=0}^{P} exp(−2γ) (2γ)^p / p! · (F_i · F_j)^p``.
    """
    dot = embedding @ embedding.T
    out = torch.ones_like(dot)
    for p in range(1, max_p + 1):
        out = out + (2.0 * gamma) ** p / math.factorial(p) * dot.pow(p)
    return math.exp(-2.0 * gamma) * out


@register("loss", "correlation_congruence")
def correlation_congruence(student_feature, teacher_feature, *, gamma: float = 0.4, max_p: int = 2,
                           kernel: str = "gaussian"):
    """CC: distance between the batch correlation matrices of student and teacher embeddings.

    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019: eq. 7
    ``L_CC = 1/n² ‖ψ(F_t) − ψ(F_s)‖`` with the correlation ``ψ`` of eq. 8 by the kernel
    (``kernel="gaussian"``: the Taylor form of eq. 9, order ``max_p``, see
    ``cc_gaussian_taylor``; ``"bilinear"``: ``F·Fᵀ``).

    As in torchdistill (``torchdistill/losses/mid_level.py``, ``CCKDLoss``, reduction
    ``batchmean``): ``torch.dist(C_s, C_t, 2) / n²``, the Frobenius norm (not squared) divided by
    n²; γ = 0.4 and P = 2 from its ILSVRC-2012 sample config
    (``configs/sample/ilsvrc2012/cckd/resnet18_from_resnet50.yaml``). Neither torchdistill nor this
    function normalises the embeddings (the Taylor form assumes unit vectors): pass normalised
    ones for the paper's exact kernel.

    Shapes: ``(N, D)``, flattened; ``D_s`` and ``D_t`` may differ. Dtype: at least float32.
    """
    dtype = _check_pair("correlation_congruence", student_feature, teacher_feature)
    if kernel not in ("gaussian", "bilinear"):
        raise KdlabError(f"loss correlation_congruence: kernel {kernel!r} is not one of gaussian, bilinear")
    gamma = _check_positive("correlation_congruence", "gamma", gamma)
    if isinstance(max_p, bool) or not isinstance(max_p, int) or max_p < 0:
        raise KdlabError(f"loss correlation_congruence: max_p must be an integer >= 0, got {max_p!r}")
    s, t = _flatten(student_feature, dtype), _flatten(teacher_feature, dtype)
    if kernel == "bilinear":
        c_s, c_t = s @ s.T, t @ t.T
    else:
        c_s = cc_gaussian_taylor(s, gamma=gamma, max_p=max_p)
        c_t = cc_gaussian_taylor(t, gamma=gamma, max_p=max_p)
    n = s.shape[0]
    # The norm's gradient at C_s = C_t is undefined; the tiny floor keeps it 0 there, not NaN.
    return torch.sqrt((c_s - c_t).square().sum() + torch.finfo(dtype).tiny) / (n * n)


correlation_congruence.loss_kind = "feature"


# ---------------------------------------------------------------------------
# Activation boundaries (AB)
# ---------------------------------------------------------------------------


def activation_boundary(student_feature, teacher_feature, *, margin: float = 1.0):
    """AB: the hinge-squared activation-transfer loss with a margin, summed, per sample.

    Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI 2019, eq. 5: for every neuron (element) of the student's pre-activation
    ``s`` (after the connector) and the teacher's pre-activation ``t``,

        ‖ρ(t) ⊙ σ(μ1 − s) + (1 − ρ(t)) ⊙ σ(μ1 + s)‖²,   ρ(t) = 1[t > 0],  σ = ReLU,

    i.e. ``(s − μ)²`` where the teacher neuron is active and ``s ≤ μ``, ``(s + μ)²`` where it is
    inactive and ``s > −μ``. As in the authors' code (bhheo/AB_distillation,
    ``criterion_alternative_L2``) and torchdistill's ``AltActTransferLoss``: summed over all elements,
    divided by the batch size; margin μ = 1.0 (the authors' and torchdistill's). Per-stage weights and the
    overall scale are the method's (``kdlab.methods.ab``).

    Shapes: equal, ``(N, ...)`` (map the student with a connector first). Dtype: at least float32.
    """
    dtype = _check_pair("activation_boundary", student_feature, teacher_feature, min_ndim=1)
    if student_feature.shape != teacher_feature.shape:
        raise KdlabError(f"loss activation_boundary: student shape {tuple(student_feature.shape)} != teacher shape "
                         f"{tuple(teacher_feature.shape)}; map the student with a connector first")
    margin = _check_positive("activation_boundary", "margin", margin, allow_zero=True)
    s, t = student_feature.to(dtype), teacher_feature.to(dtype)
    active = (t > 0).to(dtype)
    per_element = active * F.relu(margin - s).square() + (1.0 - active) * F.relu(margin + s).square()
    return per_element.sum() / s.shape[0]



# ---------------------------------------------------------------------------
# Factor transfer (FT)
# ---------------------------------------------------------------------------


def factor_transfer(student_feature, teacher_feature, *, p: int = 1):
    """FT: the p-norm distance between the L2-normalised student factor and teacher factor.

    Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS
    2018, eq. 3: ``‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖_p`` with p = 1, F_T the teacher's paraphraser factor and F_S
    the student's translator factor, each flattened per sample. As the authors' code
    (Jangho-Kim/Factor-Transfer-pytorch ``train_student.py``: ``nn.L1Loss()(utils.FT(s), utils.FT(t))``,
    ``utils.FT`` = ``F.normalize`` of the flattened map) and torchdistill (``FTLoss``, reduction ``mean``):
    for p = 1 the mean absolute difference over all elements; other p (torchdistill only): the per-sample
    p-norm averaged over the batch.

    Shapes: equal ``(N, ...)``. Dtype: at least float32.
    """
    dtype = _check_pair("factor_transfer", student_feature, teacher_feature)
    if student_feature.shape != teacher_feature.shape:
        raise KdlabError(f"loss factor_transfer: student factor {tuple(student_feature.shape)} != teacher factor "
                         f"{tuple(teacher_feature.shape)}; the translator must output the paraphraser's shape")
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise KdlabError(f"loss factor_transfer: p must be an integer >= 1, got {p!r}")
    s = F.normalize(_flatten(student_feature, dtype), dim=1)
    t = F.normalize(_flatten(teacher_feature, dtype), dim=1)
    if p == 1:
        return (s - t).abs().mean()
    return torch.linalg.vector_norm(s - t, ord=p, dim=1).mean()



# ---------------------------------------------------------------------------
# Variational information distillation (VID)
# ---------------------------------------------------------------------------


def vid_variance(log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The per-channel variance ``σ² = softplus(α) + ε`` (Ahn et al. eq. 6's heteroscedastic σ_c)."""
    return F.softplus(log_scale) + eps


def vid_nll(mean: torch.Tensor, teacher_feature: torch.Tensor, log_scale: torch.Tensor, *, eps: float = 1e-5):
    """VID: the Gaussian negative log-likelihood of the teacher feature under the student's prediction.

    Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019, eq. 6 (without its constant): per element,
    ``log σ_c + (t − μ(s))² / (2σ_c²)``, with μ(s) the regressor's prediction from the student
    feature and one learned variance per channel ``σ_c² = log(1 + e^{α_c}) + ε``.

    As mdistiller (``mdistiller/distillers/VID.py``, ``vid_loss``): ``½ ((μ − t)²/σ² + log σ²)``
    averaged over every element (batch, channels, positions).

    Shapes: ``mean`` and ``teacher_feature`` ``(N, C, *spatial)`` (equal), ``log_scale`` ``(C,)``.
    """
    dtype = _check_pair("vid", mean, teacher_feature)
    if mean.shape != teacher_feature.shape or log_scale.shape != (mean.shape[1],):
        raise KdlabError(f"loss vid: prediction {tuple(mean.shape)}, teacher {tuple(teacher_feature.shape)} and "
                         f"log_scale {tuple(log_scale.shape)} do not fit; give equal maps and one scale per channel")
    var = vid_variance(log_scale.to(dtype), eps).reshape(1, -1, *([1] * (mean.ndim - 2)))
    return 0.5 * ((mean.to(dtype) - teacher_feature.to(dtype)).square() / var + torch.log(var)).mean()


# ---------------------------------------------------------------------------
# KDSVD
# ---------------------------------------------------------------------------


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _right_singular(feature: torch.Tensor, count: int):
    """The authors' ``SVD`` (``KD_methods_with_TF/nets/SVP.py``): the map viewed as TensorFlow's NHWC reshape
    ``(N, H·W, C)``, its first ``count`` right singular vectors ``(N, C, count)`` (over the channels) and
    singular values ``(N, count)``, each L2-normalised (non-finite entries zeroed)."""
    n, c, h, w = feature.shape
    _, s, vh = torch.linalg.svd(feature.permute(0, 2, 3, 1).reshape(n, h * w, c), full_matrices=False)
    v = _finite(vh.transpose(1, 2))[:, :, :count]
    return F.normalize(v, dim=1), F.normalize(_finite(s)[:, :count], dim=1)


def canonical_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each singular vector (columns of ``(N, W, k)``) so its largest-magnitude entry is positive.

    A singular vector's sign is arbitrary (LAPACK's choice); the official code leaves it so, which makes the
    teacher's inter-stage RBF depend on the platform. Fixing it makes the loss a function of the features.
    """
    index = v.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(v, 1, index))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def align_singular(student_v: torch.Tensor, teacher_v: torch.Tensor) -> torch.Tensor:
    """The authors' ``Align_rsv`` (``SVP.py``; mdistiller's ``align_rsv``): for each teacher vector, the student
    vector of largest |cosine|, its sign matched to the teacher's."""
    cosine = student_v.transpose(1, 2) @ teacher_v  # (N, k_s, k_t)
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return student_v @ mask


def kdsvd(student_features, teacher_features, *, k: int = 1):
    """KDSVD: match the RBF correlations of consecutive stages' SVD-compressed features.

    Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018,
    §3 (SVD compression, eq. 3; the radial-basis correlation between two stages, eqs. 5–6), as the authors'
    ``KD_SVD`` (``sseung0703/KD_methods_with_TF``, ``nets/Shared.py`` + ``nets/SVP.py``): per stage, each map
    viewed as TensorFlow's NHWC reshape ``(N, H·W, C)``; the teacher's first ``k`` right singular vectors
    ``V_t`` (over the channels) and the student's first ``k + 3`` (each L2-normalised, singular values too);
    the student's aligned to the teacher's (``align_singular``); both scaled by the teacher's normalised
    singular values; then for every pair of consecutive stages

        G[a, b, j] = exp(−(V[a, j] − V'[b, j])² / 8),   loss += Σ (G_s − G_t)²  (non-finite terms dropped).

    Student and teacher stages must share their channel count C (the correlations are C_l × C_{l−1}).
    Two changes from the authors' code, both documented in docs/methods.md: the total is divided by the batch
    size (as mdistiller; the authors sum over the batch but clip the distillation gradient to the CE
    gradient's norm, which kdlab's loop does not do), and the teacher's singular vectors get a canonical sign
    (``canonical_signs``), which the authors leave to the SVD routine.

    Shapes: lists of ``(N, C, H, W)`` maps, one per stage (at least two). Not registered: it reads several
    stages at once. Dtype: at least float32.
    """
    if len(student_features) != len(teacher_features) or len(student_features) < 2:
        raise KdlabError(f"loss kdsvd: needs the same number (at least 2) of student and teacher stages, got "
                         f"{len(student_features)} and {len(teacher_features)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise KdlabError(f"loss kdsvd: k must be an integer >= 1, got {k!r}")
    total, previous = None, None
    for i, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        dtype = _check_maps("kdsvd", fs, ft)
        if fs.shape[1] != ft.shape[1]:
            raise KdlabError(f"loss kdsvd: stage {i} channels differ (student {fs.shape[1]}, teacher {ft.shape[1]}); "
                             "the singular vectors run over the channels, so pair stages of equal channel count")
        v_t, s_t = _right_singular(ft.to(dtype), k)
        v_t = canonical_signs(v_t)
        v_s, _ = _right_singular(fs.to(dtype), k + 3)
        v_s = align_singular(v_s, v_t)
        scale = s_t.unsqueeze(1)
        v_t, v_s = v_t * scale, v_s * scale
        if previous is not None:
            v_sb, v_tb = previous
            g_s = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).square() / 8)
            g_t = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).square() / 8)
            term = _finite((g_s - g_t.detach()).square()).sum()
            total = term if total is None else total + term
        previous = (v_s, v_t)
    return total / student_features[0].shape[0]
