"""Feature-level distillation losses: functions of intermediate student/teacher features.

Every feature loss has the signature

    fn(student_feature, teacher_feature, *, <keyword-only hyperparameters>)

carries ``fn.loss_kind == "feature"`` and returns a scalar. Features are
batch-first, ``(N, ...)``; the two batch sizes must match. What else may differ
between student and teacher depends on the loss (see each docstring):

* ``fitnet``: nothing (shapes equal; map the student with an adapter first,
  ``kdlab.methods.adapters.make_adapter``);
* ``attention_transfer``: the channel count (spatial sizes must match);
* ``rkd`` / ``rkd_distance`` / ``rkd_angle``, ``pkt``, ``similarity_preserving``:
  everything but the batch size (they compare sample-to-sample relations, so
  each feature is flattened to ``(N, D)`` and ``D_s != D_t`` is fine).

``batchnorm_standardize`` is not a loss (it maps one feature to a standardised
feature of the same shape) and is therefore not registered.

Numerics: inputs are upcast to at least float32 (bf16/fp16 in, float32 out;
float64 stays float64). The losses do not detach the teacher feature: pass a
detached one (``Taps(teacher, ..., detach=True)``) as the training loop does.

Constants follow the authors' official code where it differs from the paper's
equation (each docstring says which and by how much), so that loss weights
quoted from those code bases (AT β = 1000, RKD 25/50, SP 3000, PKT 30000 in
CRD's RepDistiller) apply unchanged.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError
from kdlab.losses.divergences import _compute_dtype
from kdlab.registry import register

# ---------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------


def _check_feature(loss: str, role: str, feature, *, min_ndim: int = 2) -> None:
    if not isinstance(feature, torch.Tensor):
        raise KdlabError(f"loss {loss}: {role} must be a tensor, got {type(feature).__name__}")
    if not feature.is_floating_point():
        raise KdlabError(f"loss {loss}: {role} must be floating point, got dtype {feature.dtype}")
    if feature.ndim < min_ndim:
        expected = "(N, D) or (N, C, *spatial)" if min_ndim == 2 else "(N, C, L) or (N, C, H, W)"
        raise KdlabError(
            f"loss {loss}: {role} has shape {tuple(feature.shape)}; expected batch-first {expected}"
        )


def _check_pair(loss: str, student, teacher, *, min_ndim: int = 2) -> torch.dtype:
    """Validate both features (same batch size) and return the compute dtype."""
    _check_feature(loss, "student_feature", student, min_ndim=min_ndim)
    _check_feature(loss, "teacher_feature", teacher, min_ndim=min_ndim)
    if student.shape[0] != teacher.shape[0]:
        raise KdlabError(
            f"loss {loss}: batch sizes differ (student {student.shape[0]}, teacher {teacher.shape[0]}); "
            "both features must come from the same batch"
        )
    if student.shape[0] == 0:
        raise KdlabError(f"loss {loss}: empty batch (N = 0)")
    return _compute_dtype(student, teacher)


def _check_positive(loss: str, name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise KdlabError(f"loss {loss}: {name} must be a number, got {value!r}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise KdlabError(f"loss {loss}: {name} must be a finite number {bound}, got {value!r}")
    return value


def _flatten(feature: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return feature.reshape(feature.shape[0], -1).to(dtype)


# ---------------------------------------------------------------------------
# FitNets
# ---------------------------------------------------------------------------


@register("loss", "fitnet")
def fitnet(student_feature, teacher_feature):
    """FitNets hint loss: mean squared error between the (adapted) student and teacher features.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, eq. 3:
    ``L_HT = ½ ‖u_h(x) − r(v_g(x))‖²`` per sample, with ``u_h`` the teacher's
    hint layer and ``r(v_g)`` the student's guided layer after the regressor
    ``r`` (here: the adapter a method owns, ``kdlab.methods.adapters``).

    Constant: this returns ``mean over all N·D elements of (s − t)²``, i.e.
    ``(2 / D) ·`` the paper's per-sample value, averaged over the batch
    (``D`` = elements per sample). It equals ``torch.nn.functional.mse_loss``
    and CRD's RepDistiller ``HintLoss``, so its scale does not grow with the
    feature size.

    Shapes: any batch-first ``(N, ...)``; student and teacher shapes must be
    equal (adapt the student first). Dtype: at least float32.
    """
    dtype = _check_pair("fitnet", student_feature, teacher_feature, min_ndim=1)
    if student_feature.shape != teacher_feature.shape:
        raise KdlabError(
            f"loss fitnet: student feature shape {tuple(student_feature.shape)} != teacher feature shape "
            f"{tuple(teacher_feature.shape)}; map the student feature with an adapter "
            "(kdlab.methods.adapters.make_adapter) first"
        )
    return (student_feature.to(dtype) - teacher_feature.to(dtype)).square().mean()


fitnet.loss_kind = "feature"


# ---------------------------------------------------------------------------
# Attention transfer
# ---------------------------------------------------------------------------


def attention_map(feature: torch.Tensor, *, power: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis's activation-based spatial attention, flattened and L2-normalised.

    ``F(A) = Σ_c |A_c|^p`` over the channel dim 1 of ``(N, C, *spatial)``, flattened
    to ``(N, S)`` and divided by its L2 norm per sample (norm clamped at 1e-12,
    so an all-zero map stays zero). Computed in at least float32.
    """
    dtype = _compute_dtype(feature)
    summed = feature.to(dtype).abs().pow(power).sum(dim=1)
    return F.normalize(summed.reshape(feature.shape[0], -1), p=2.0, dim=1, eps=1e-12)


@register("loss", "attention_transfer")
def attention_transfer(student_feature, teacher_feature, *, power: float = 2.0):
    """Attention transfer (AT): squared distance between L2-normalised spatial attention maps.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017,
    eq. 2: ``Q = vec(F(A))`` with ``F(A) = Σ_c |A_c|^p`` (the channel-summed
    p-th power of the activations, §3.1), and the loss term
    ``‖Q_s/‖Q_s‖₂ − Q_t/‖Q_t‖₂‖_p`` with ``p = 2``.

    Which form: this follows the authors' official code
    (szagoruyko/attention-transfer, ``at_loss``), not the un-squared norm of
    eq. 2: ``(at(s) − at(t)).pow(2).mean()``, i.e.

        (1 / (N·S)) · Σ_n ‖q_s,n − q_t,n‖₂²,    q = F(A) / ‖F(A)‖₂,

    with ``S`` the number of spatial positions (H·W or L). The official code
    averages over channels instead of summing (``x.pow(2).mean(1)``); after the
    normalisation that makes no difference. It then weighs each tapped group
    by β = 1000 (the weight is the caller's). ``power`` is the exponent ``p``
    of ``F``; the official code fixes it at 2. With ``power < 1`` the gradient
    at a zero activation is infinite; use ``power >= 1``.

    Properties: zero for identical maps; invariant to any per-sample nonzero
    rescaling of either feature (``F`` is homogeneous, then normalised).

    Shapes: ``(N, C, L)`` or ``(N, C, H, W)`` (channels first; for token
    features ``(N, T, D)`` transpose to ``(N, D, T)`` first). The channel counts
    may differ (no adapter needed); the spatial sizes must be equal
    (``KdlabError`` otherwise: resample in the method, deliberately).
    Dtype: at least float32.
    """
    dtype = _check_pair("attention_transfer", student_feature, teacher_feature, min_ndim=3)
    power = _check_positive("attention_transfer", "power", power)
    if student_feature.ndim != teacher_feature.ndim or student_feature.shape[2:] != teacher_feature.shape[2:]:
        raise KdlabError(
            f"loss attention_transfer: spatial sizes differ (student {tuple(student_feature.shape)}, teacher "
            f"{tuple(teacher_feature.shape)}); AT compares maps position by position, so tap layers with equal "
            "spatial size (channel counts may differ) or pool the larger feature first"
        )
    q_s = attention_map(student_feature.to(dtype), power=power)
    q_t = attention_map(teacher_feature.to(dtype), power=power)
    return (q_s - q_t).square().mean()


attention_transfer.loss_kind = "feature"


# ---------------------------------------------------------------------------
# Relational KD (RKD)
# ---------------------------------------------------------------------------


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` Euclidean distances, computed per pair (not via the Gram matrix: no cancellation).

    ``torch.cdist``'s backward gives a zero (sub)gradient at zero distance, so the
    diagonal and duplicate samples produce no NaN.
    """
    return torch.cdist(x.unsqueeze(0), x.unsqueeze(0), p=2.0, compute_mode="donot_use_mm_for_euclid_dist")[0]


def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """Distances divided by their mean over the N(N−1) pairs i ≠ j (Park et al. eq. 4, μ)."""
    n = x.shape[0]
    d = _pairwise_distances(x)
    mu = d.sum() / (n * (n - 1))  # the diagonal is exactly 0
    return d / mu.clamp_min(torch.finfo(d.dtype).tiny)


def _triplet_cosines(x: torch.Tensor) -> torch.Tensor:
    """``(N, N, N)`` tensor ``c[j, i, k] = cos ∠(x_i − x_j, x_k − x_j)``, 0 where i = j or k = j.

    Direct differences (O(N²·D) memory, as in the official code); a zero
    difference vector is normalised to 0 (``F.normalize``), so degenerate
    triplets (and duplicate samples) contribute cosine 0 on both sides.
    """
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[j, i] = x_i − x_j
    unit = F.normalize(diff, p=2.0, dim=2, eps=1e-12)
    return torch.bmm(unit, unit.transpose(1, 2))


def _check_relational_batch(loss: str, student, minimum: int) -> None:
    if student.shape[0] < minimum:
        raise KdlabError(
            f"loss {loss}: needs at least {minimum} samples in the batch, got {student.shape[0]}; "
            "relational losses compare samples with each other"
        )


@register("loss", "rkd_distance")
def rkd_distance(student_feature, teacher_feature):
    """RKD distance-wise loss: Huber loss between mean-normalised pairwise distances.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019,
    eqs. 3–5: ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ`` with ``μ`` the mean distance
    over the pairs i ≠ j of the batch, and the Huber loss ``l_δ`` (δ = 1:
    ``½x²`` for ``|x| ≤ 1``, ``|x| − ½`` otherwise; ``F.smooth_l1_loss``).

    Reduction, as in the official code (lenscloth/RKD ``RkdDistance``):
    ``smooth_l1_loss(ψ_s, ψ_t)`` averaged over all N² entries of the distance
    matrix, i.e. ``(1/N²) Σ_{i≠j} l_δ`` (the diagonal is 0 on both sides).
    The paper writes a sum over pairs; the official mean is used here.

    Properties: zero for identical features; invariant to global rescaling,
    translation and rotation of either feature.

    Shapes: ``(N, ...)``, flattened to ``(N, D_s)`` and ``(N, D_t)``; ``D_s`` and
    ``D_t`` may differ. ``N >= 2``. Dtype: at least float32.
    """
    dtype = _check_pair("rkd_distance", student_feature, teacher_feature)
    _check_relational_batch("rkd_distance", student_feature, 2)
    d_s = _normalised_distances(_flatten(student_feature, dtype))
    d_t = _normalised_distances(_flatten(teacher_feature, dtype))
    return F.smooth_l1_loss(d_s, d_t, reduction="mean", beta=1.0)


rkd_distance.loss_kind = "feature"


@register("loss", "rkd_angle")
def rkd_angle(student_feature, teacher_feature):
    """RKD angle-wise loss: Huber loss between the cosines of the angles of all triplets.

    Park et al., CVPR 2019, eqs. 6–7: ``ψ_A(t_i, t_j, t_k) = cos ∠t_i t_j t_k =
    ⟨e_ij, e_kj⟩`` with ``e_ij = (t_i − t_j) / ‖t_i − t_j‖₂``, and the Huber loss
    ``l_δ`` (δ = 1).

    Reduction, as in the official code (lenscloth/RKD ``RKdAngle``):
    ``smooth_l1_loss`` averaged over all N³ ordered triplets (i, j, k),
    degenerate ones (i = j or k = j) counting as cosine 0 on both sides, i.e.
    ``(1/N³) Σ_{i≠j, k≠j} l_δ``. With N = 2 every triplet is degenerate and the
    loss is 0. Memory is O(N²·(D_s + D_t)): use it on pooled / embedding
    features, not on large feature maps.

    Properties: zero for identical features; invariant to global rescaling,
    translation and rotation of either feature.

    Shapes: ``(N, ...)``, flattened; ``D_s`` and ``D_t`` may differ. ``N >= 2``.
    Dtype: at least float32.
    """
    dtype = _check_pair("rkd_angle", student_feature, teacher_feature)
    _check_relational_batch("rkd_angle", student_feature, 2)
    a_s = _triplet_cosines(_flatten(student_feature, dtype))
    a_t = _triplet_cosines(_flatten(teacher_feature, dtype))
    return F.smooth_l1_loss(a_s, a_t, reduction="mean", beta=1.0)


rkd_angle.loss_kind = "feature"


@register("loss", "rkd")
def rkd(student_feature, teacher_feature, *, distance_weight: float = 25.0, angle_weight: float = 50.0):
    """Relational KD: ``distance_weight · rkd_distance + angle_weight · rkd_angle``.

    Park et al., CVPR 2019, eq. 2 with the distance- and angle-wise potentials
    (eqs. 3–7; see ``rkd_distance`` and ``rkd_angle``). Default weights 25 and
    50 are those of CRD's RepDistiller ``RKDLoss`` (used for CIFAR-100
    classification); the paper's metric-learning runs use λ_D = 1, λ_A = 2.

    Shapes: ``(N, ...)``, flattened; dims may differ. ``N >= 2``.
    Dtype: at least float32.
    """
    distance_weight = _check_positive("rkd", "distance_weight", distance_weight, allow_zero=True)
    angle_weight = _check_positive("rkd", "angle_weight", angle_weight, allow_zero=True)
    if distance_weight == 0.0 and angle_weight == 0.0:
        raise KdlabError("loss rkd: distance_weight and angle_weight are both 0; set at least one > 0")
    terms = []
    if distance_weight:
        terms.append(distance_weight * rkd_distance(student_feature, teacher_feature))
    if angle_weight:  # skipped at weight 0: it is the O(N²·D)-memory term
        terms.append(angle_weight * rkd_angle(student_feature, teacher_feature))
    return sum(terms[1:], terms[0])


rkd.loss_kind = "feature"


# ---------------------------------------------------------------------------
# Probabilistic knowledge transfer (PKT)
# ---------------------------------------------------------------------------


def _cosine_conditional(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of ``K = (cos + 1) / 2`` normalised to sum to 1 (the diagonal, K = 1, included)."""
    norm = torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True)
    unit = x / (norm + eps)  # a zero row stays zero (cos 0 with everything)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)  # every row sum >= K_ii >= 1/2


@register("loss", "pkt")
def pkt(student_feature, teacher_feature, *, eps: float = 1e-7):
    """PKT: KL(teacher ‖ student) between cosine-kernel conditional distributions over the batch.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic
    Knowledge Transfer", ECCV 2018: the cosine-similarity kernel
    ``K(a, b) = (cos(a, b) + 1) / 2`` in [0, 1] on each network's features,
    conditional probabilities ``p_{j|i} = K(t_i, t_j) / Σ_k K(t_i, t_k)``
    (teacher; ``q`` likewise for the student), and the loss
    ``Σ_i Σ_j p_{j|i} log(p_{j|i} / q_{j|i})``.

    As in the official code (passalis/probabilistic_kt ``nn/pkt.py``,
    ``cosine_similarity_loss``), followed exactly: features are divided by
    ``‖x‖ + eps``; the row sums include ``k = i`` (the self-similarity K = 1);
    the KL is ``mean over all N² entries of p·log((p + eps)/(q + eps))``, so the
    value is ``(1/N) ·`` the batch mean of the per-row KL (up to ``eps``). The
    paper's exact treatment of ``k = i`` and of the normalisation constant was
    not checked against the PDF.

    Properties: zero for identical features; invariant to per-sample positive
    rescaling of either feature (only cosines enter).

    Shapes: ``(N, ...)``, flattened; ``D_s`` and ``D_t`` may differ.
    Dtype: at least float32.
    """
    dtype = _check_pair("pkt", student_feature, teacher_feature)
    eps = _check_positive("pkt", "eps", eps)
    q = _cosine_conditional(_flatten(student_feature, dtype), eps)
    p = _cosine_conditional(_flatten(teacher_feature, dtype), eps)
    return (p * torch.log((p + eps) / (q + eps))).mean()


pkt.loss_kind = "feature"


# ---------------------------------------------------------------------------
# Similarity-preserving KD (SP)
# ---------------------------------------------------------------------------


def _normalised_gram(x: torch.Tensor) -> torch.Tensor:
    """``G = Q·Qᵀ`` with each row L2-normalised (norm clamped at 1e-12; Tung & Mori eqs. 2–3)."""
    return F.normalize(x @ x.T, p=2.0, dim=1, eps=1e-12)


@register("loss", "similarity_preserving")
def similarity_preserving(student_feature, teacher_feature):
    """Similarity-preserving KD: ``‖G̃_t − G̃_s‖_F² / N²`` between row-normalised batch Gram matrices.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
    eqs. 2–4: ``Q`` = the feature reshaped to ``(b, c·h·w)``, ``G̃ = Q·Qᵀ``,
    ``G = G̃_[i,:] / ‖G̃_[i,:]‖₂`` (row-wise L2 normalisation) and
    ``L_SP = (1/b²) ‖G_t − G_s‖_F²`` (summed over tapped layer pairs by the
    caller; the paper's weight γ, 3000 in CRD's RepDistiller, is the
    caller's). Matches the code verified by the authors in RepDistiller
    (``distiller_zoo/SP.py``).

    Properties: zero for identical features; invariant to a global positive
    rescaling of either feature. NOT invariant to per-sample rescaling: row i
    of G̃ is scaled by ``c_i·c_j`` entry-wise, and the row normalisation only
    removes ``c_i``.

    Shapes: ``(N, ...)``, flattened; ``D_s`` and ``D_t`` may differ.
    Dtype: at least float32.
    """
    dtype = _check_pair("similarity_preserving", student_feature, teacher_feature)
    g_s = _normalised_gram(_flatten(student_feature, dtype))
    g_t = _normalised_gram(_flatten(teacher_feature, dtype))
    n = student_feature.shape[0]
    return (g_t - g_s).square().sum() / (n * n)


similarity_preserving.loss_kind = "feature"


# ---------------------------------------------------------------------------
# Normalisation (part of a recipe, not a loss)
# ---------------------------------------------------------------------------


def batchnorm_standardize(feature, *, eps: float = 1e-5):
    """Standardise each feature over the batch: functional BatchNorm, training mode, no affine.

    ``(x − mean) / sqrt(var + eps)`` with the mean and the *biased* variance
    taken over the batch (and the spatial positions for ``(N, C, *spatial)``,
    per channel, as ``nn.BatchNorm{1,2}d`` does in training mode). No running
    statistics, no learnable scale or shift.

    Part of the Miles & Mikolajczyk recipe ("Understanding the Role of the
    Projector in Knowledge Distillation", AAAI 2024; arXiv 2303.11098), which
    normalises both the projected student and the teacher feature with
    ``BatchNorm1d(d, eps=1e-4, affine=False)`` before its LogSum loss — pass
    ``eps=1e-4`` to reproduce it (the default 1e-5 is PyTorch's). The
    recipe's modules also track running statistics, which only matter in
    eval mode; a training loss never reads them, so none are kept here.

    Shapes: ``(N, D)`` or ``(N, C, *spatial)``; output has the input's shape.
    At least two values per feature are needed (``KdlabError`` otherwise).
    Dtype: computed and returned in at least float32.
    """
    _check_feature("batchnorm_standardize", "feature", feature)
    eps = _check_positive("batchnorm_standardize", "eps", eps)
    values_per_feature = feature.numel() // max(feature.shape[1], 1)
    if values_per_feature < 2:
        raise KdlabError(
            f"batchnorm_standardize: feature of shape {tuple(feature.shape)} has one value per feature; "
            "standardising over the batch needs a batch of at least 2"
        )
    x = feature.to(_compute_dtype(feature))
    dims = [0] + list(range(2, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


FEATURE_LOSSES = ("fitnet", "attention_transfer", "rkd", "rkd_distance", "rkd_angle", "pkt", "similarity_preserving")
