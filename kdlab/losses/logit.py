"""More logit losses: skew KL, DKD, DIST, logit standardization, hinge, LogSum.

Same conventions as ``kdlab.losses.divergences`` (read its module docstring):
signature ``fn(student_logits, teacher_logits, *, temperature=1.0, mask=None,
reduction="batchmean", <keyword-only hyperparameters>)``, logits ``(N, C)`` or
``(N, L, C)``, a mask over ``logits.shape[:-1]``, reductions
"batchmean"/"sum"/"none", at least float32 compute, masked-out rows replaced by
0 before any arithmetic, ``KdlabError`` for bad input.

Kinds: ``skew_kl``, ``dist``, ``logit_standardization``, ``hinge_logits`` and
``logsum`` carry ``loss_kind == "logit"``. ``dkd`` also needs the class labels
(a required keyword ``labels``) and carries ``loss_kind == "logit_label"``, so
code that calls every "logit" loss as ``fn(student, teacher)`` skips it.

Two losses are not a plain per-position sum: DIST's intra-class term is a
statistic of the whole batch (see ``dist`` for what ``reduction="none"``
returns), and LogSum's official form takes the log of a sum over the whole
batch (see ``logsum`` for how to get it from ``reduction="none"``).
"""
from __future__ import annotations

import math
import numbers

import torch

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.losses.divergences import (
    NonNegative,
    Positive,
    Temperature,
    Unit,
    _check_labels,
    _check_reduction,
    _check_unit_interval,
    _checked_logit_pair,
    _clean_labels,
    _compute_dtype,
    _kl_per_position,
    _reduce,
    logit_divergence,
    _teacher_student_log_probs,
    _valid_positions,
)
from kdlab.registry import register

# ---------------------------------------------------------------------------
# Small checks and numerics
# ---------------------------------------------------------------------------


def _check_number(loss: str, name: str, value, *, minimum: float = 0.0, allow_minimum: bool = True) -> float:
    """A finite real ``value`` ≥ ``minimum`` (> if not ``allow_minimum``), as float."""
    bound = f">= {minimum:g}" if allow_minimum else f"> {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise KdlabError(f"loss {loss}: {name} must be a number {bound}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_minimum):
        raise KdlabError(f"loss {loss}: {name} must be a finite number {bound}, got {value!r}")
    return value


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x ≥ 0 with gradient 0 (not inf/NaN) at x = 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


# ---------------------------------------------------------------------------
# Skew KL (DistiLLM)
# ---------------------------------------------------------------------------


@register("loss", "skew_kl")
def skew_kl(
    student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean",
    skew: Unit = 0.1, reverse=False
):
    """α-skew KL of DistiLLM, times T²: KL(p ‖ α·p + (1−α)·q) (or the reverse skew).

    Ko, Kim, Chen & Yun, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models", ICML 2024, arXiv 2402.03898, §3 (skew KL divergence: the
    definitions of α-SKL and α-SRKL; section/equation numbers not checked
    against the PDF — the formulas are confirmed by the official code), with p
    the teacher and q the student distribution at temperature T and α = ``skew``:

        α-SKL  (reverse=False):  KL(p ‖ α·p + (1−α)·q)
        α-SRKL (reverse=True):   KL(q ‖ α·q + (1−α)·p)

    α = 0 gives exactly ``kl`` (forward) or ``reverse_kl``; α = 1 gives 0. The
    default α = 0.1 is DistiLLM's (official code ``distillm/losses.py``,
    ``skewed_forward_kl`` / ``skewed_reverse_kl``, argument ``lam=0.1``).
    Differences from that code: (1) its forward loss is the cross-entropy
    −Σ p·log m, which is this KL plus the teacher entropy H(p) (same gradient
    with respect to the student, different value); (2) it has no temperature;
    here both distributions are softmaxes at T and the value is multiplied by T²
    as for ``kl`` (T = 1 reproduces the paper). The mixture is formed in log
    space (see ``_skew_kl_per_position``).

    Shapes: logits ``(N, C)`` or ``(N, L, C)``; mask ``logits.shape[:-1]``.
    Dtype: at least float32. Reduction: per-position value summed over classes,
    then ``reduction``. ``skew`` must lie in [0, 1].
    """
    _check_reduction(reduction)
    skew = _check_unit_interval("skew", skew)
    return logit_divergence("skew_kl", student_logits, teacher_logits, temperature=temperature, mask=mask,
                            reduction=reduction, skew=skew, reverse=bool(reverse))


skew_kl.loss_kind = "logit"


# ---------------------------------------------------------------------------
# Decoupled KD
# ---------------------------------------------------------------------------


def _non_target_index(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Indices of the C − 1 non-target classes of each position, in order: shape (..., C − 1)."""
    j = torch.arange(num_classes - 1, device=labels.device)
    return j + (j >= labels.unsqueeze(-1)).long()


def dkd_parts(student_logits, teacher_logits, *, labels=None, temperature=1.0, mask=None):
    """DKD's two terms per position, each times T²: ``(tckd, nckd)``.

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022,
    arXiv 2203.08679, §3.1 "Reformulation" (eqs. 1–5; numbering from our
    reading, not checked against the PDF). With t the label, p = softmax(z/T):

    * binary distributions b = [p_t, p_\\t], p_\\t = Σ_{i≠t} p_i = 1 − p_t (eq. 1);
    * non-target distribution p̂_i = exp(z_i/T) / Σ_{j≠t} exp(z_j/T), i ≠ t (eq. 2);
    * TCKD = KL(b^T ‖ b^S), NCKD = KL(p̂^T ‖ p̂^S), and (eqs. 3–5)

          KL(p^T ‖ p^S) = TCKD + (1 − p_t^T)·NCKD.

    Both terms are multiplied by T² (official code ``mdistiller/distillers/DKD.py``),
    so ``kl(..., reduction="none") == tckd + (1 − p_t^T)·nckd`` with p_t^T at T.

    Numerics: log b comes from the full log-softmax (log p_t, and
    log p_\\t = logsumexp of the non-target log-probabilities — never log(1 − p_t));
    log p̂ is the log-softmax over the C − 1 non-target entries, gathered out, so
    the target class is excluded exactly (the official code instead subtracts
    1000 from the target logit) and no ``log 0`` appears.

    Returns two tensors of shape ``logits.shape[:-1]``, 0 at masked-out positions.
    ``labels``: integer class indices of shape ``logits.shape[:-1]`` (required;
    masked-out labels may be anything). Needs C ≥ 2.
    """
    if labels is None:
        raise KdlabError("loss dkd: labels are required; pass labels=<int64 tensor of shape logits.shape[:-1]>")
    log_p, log_q, valid = _teacher_student_log_probs(student_logits, teacher_logits, temperature, mask)
    _check_labels(labels, student_logits)
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise KdlabError(f"loss dkd: needs at least 2 classes, got logits with C = {num_classes}")
    labels = _clean_labels(labels, valid, num_classes).to(log_p.device)
    target = labels.unsqueeze(-1)
    others = _non_target_index(labels, num_classes)

    def binary_and_non_target(log_probs):
        rest = log_probs.gather(-1, others)  # log p_i, i ≠ t
        log_binary = torch.cat([log_probs.gather(-1, target), torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1)
        return log_binary, torch.log_softmax(rest, dim=-1)  # log-softmax is shift-invariant: = log p̂

    log_b_teacher, log_hat_teacher = binary_and_non_target(log_p)
    log_b_student, log_hat_student = binary_and_non_target(log_q)
    scale = temperature**2
    tckd = _reduce(scale * _kl_per_position(log_b_teacher, log_b_student), valid, "none")
    nckd = _reduce(scale * _kl_per_position(log_hat_teacher, log_hat_student), valid, "none")
    return tckd, nckd


@register("loss", "dkd")
def dkd(
    student_logits,
    teacher_logits,
    *,
    temperature: Temperature = 1.0,
    mask=None,
    reduction="batchmean",
    labels=None,
    alpha: NonNegative = 1.0,
    beta: NonNegative = 8.0,
):
    """Decoupled KD: α·TCKD + β·NCKD, both at temperature T and times T².

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, §3 ("Decoupled
    Knowledge Distillation"), eq. 7: DKD = α·TCKD + β·NCKD; TCKD and NCKD as in
    ``dkd_parts`` (eqs. 1–5; equation numbers not checked against the PDF). α = 1,
    β = 8 are the CIFAR-100 defaults of the official code (mdistiller
    ``configs/cifar100/dkd``, T = 4); ImageNet uses β = 0.5, T = 1. α = 1, β = 1
    is *not* plain KD: KD weighs NCKD by (1 − p_t^T) (eq. 5).

    ``loss_kind == "logit_label"``: ``labels`` (int class indices, shape
    ``logits.shape[:-1]``) is required — ``KdlabError`` if missing — so the
    generic "logit" contract ``fn(student, teacher)`` does not apply.
    The official code's CE term and warm-up factor are method-level, not here.

    Shapes: logits ``(N, C)`` or ``(N, L, C)`` with C ≥ 2; labels and mask
    ``logits.shape[:-1]``. Dtype: at least float32. Reduction: per-position
    α·tckd + β·nckd, then ``reduction``. ``alpha``, ``beta``: finite, ≥ 0.
    """
    _check_reduction(reduction)
    alpha = _check_number("dkd", "alpha", alpha)
    beta = _check_number("dkd", "beta", beta)
    tckd, nckd = dkd_parts(student_logits, teacher_logits, labels=labels, temperature=temperature, mask=mask)
    valid = _valid_positions(mask, student_logits.shape[:-1])  # already checked by dkd_parts
    return _reduce(alpha * tckd + beta * nckd, valid, reduction)


dkd.loss_kind = "logit_label"


# ---------------------------------------------------------------------------
# DIST
# ---------------------------------------------------------------------------


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float, weight=None) -> torch.Tensor:
    """1 − Σ a'b' / (‖a'‖·‖b'‖ + eps) along ``dim``, a' = a − mean(a) (weighted by 0/1 ``weight``)."""
    if weight is None:
        a_c = a - a.mean(dim=dim, keepdim=True)
        b_c = b - b.mean(dim=dim, keepdim=True)
    else:
        count = weight.sum(dim=dim, keepdim=True).clamp(min=1)
        a_c = (a - (weight * a).sum(dim=dim, keepdim=True) / count) * weight
        b_c = (b - (weight * b).sum(dim=dim, keepdim=True) / count) * weight
    dot = (a_c * b_c).sum(dim=dim)
    norms = _safe_sqrt(a_c.square().sum(dim=dim)) * _safe_sqrt(b_c.square().sum(dim=dim))
    return 1.0 - dot / (norms + eps)


def pearson_distance(a, b, *, dim=-1, eps=1e-8):
    """Pearson distance d_p(a, b) = 1 − ρ(a, b) along ``dim`` (DIST's relation metric).

    ρ(a, b) = Σ a'·b' / (‖a'‖·‖b'‖ + ε), a' = a − mean(a), b' = b − mean(b): the
    Pearson correlation with ε *added to the product of the norms*, exactly as
    the official DIST code (hunto/DIST_KD ``segmentation/losses/dist_kd.py`` and
    hunto/image_classification_sota ``lib/models/losses/dist_kd.py``, both
    defining their own ``cosine_similarity(a, b, eps=1e-8) = (a·b).sum(1) /
    (a.norm(1)·b.norm(1) + eps)``) and mmrazor's port. It is *not*
    ``torch.nn.functional.cosine_similarity`` (a·b / (max(‖a‖, ε)·max(‖b‖, ε)),
    torchdistill's choice): the two differ when ‖a'‖·‖b'‖ is not ≫ ε, e.g. for
    u = (1e-5, −1e-5) d_p(u, u) is ε/(2e-10 + ε) ≈ 0.980 here (official) and 0
    under torch's form. ``eps=0`` gives the exact Pearson distance (both forms
    agree). In [0, 2] (up to ε).

    Invariance (the property DIST chooses ρ for, Huang et al. 2022): for ε = 0, d_p(m₁·a + n₁, m₂·b + n₂) =
    d_p(a, b) for any *positive* scales m₁, m₂ and any shifts n₁, n₂ (a negative
    scale flips ρ's sign); with ε > 0 this holds up to O(ε / (‖a'‖·‖b'‖)).
    A constant vector gives ρ = 0 (distance 1) and finite gradients, never NaN:
    with respect to the constant a it is the ε-regularised −b'/ε (large, as in
    the official formula); if both are constant it is 0.

    ``a``, ``b``: tensors of the same shape; computed in at least float32.
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise KdlabError(f"pearson_distance: {name} must be a floating-point tensor, got {type(x).__name__}")
    if a.shape != b.shape:
        raise KdlabError(f"pearson_distance: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    eps = _check_number("pearson_distance", "eps", eps)
    dtype = _compute_dtype(a, b)
    return _pearson_distance(a.to(dtype), b.to(dtype), dim, eps)


@register("loss", "dist")
def dist(
    student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean",
    beta: NonNegative = 1.0, gamma: NonNegative = 1.0
):
    """DIST: T²·(β·inter-class + γ·intra-class Pearson distance) of the softmax outputs.

    Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022, arXiv 2205.10536, §3 (method): the relations are taken
    on the *probabilities* Y = softmax(Z/T) (not on the raw logits), with the
    Pearson distance d_p = 1 − ρ (``pearson_distance``):

        L_inter = 1/B · Σ_i d_p(Y^s_{i,:}, Y^t_{i,:})     (each sample's class profile)
        L_intra = 1/C · Σ_j d_p(Y^s_{:,j}, Y^t_{:,j})     (each class over the batch)
        L_DIST  = β·L_inter + γ·L_intra

    (the KD part of the paper's total loss α·L_cls + β·L_inter + γ·L_intra; the
    equations are numbered 7–10 in our reading — the numbering was not checked
    against the PDF). β = γ = 1 are the official code's defaults. ε = 1e-8 in ρ
    (official code).

    Temperature: the official code we could read has none — the classification
    loss (hunto/image_classification_sota, ``lib/models/losses/dist_kd.py``)
    and the segmentation loss (hunto/DIST_KD, ``segmentation/losses/dist_kd.py``)
    take plain ``softmax(z)``, i.e. T = 1. OpenMMLab's port (mmrazor
    ``models/losses/dist_loss.py``, ``DISTLoss``) and many copies divide the
    logits by τ (default 1) and multiply both terms by τ², like ``kl``. We
    follow the port: at the default T = 1 all agree. Which T the paper used for
    each dataset was not verified here.

    Invariance: d_p is invariant to positive affine maps of the *probability*
    vectors (see ``pearson_distance``), not of the logits — softmax(a·z + b) is
    not an affine image of softmax(z) for a ≠ 1, so DIST changes when the
    logits are rescaled (a per-row logit shift b does cancel in the softmax).

    Batch: the valid positions form the batch — for (N, L, C) all valid (n, l)
    rows together (as the official segmentation code flattens pixels). With a
    single valid position the intra-class term is 1 with zero gradient (each
    one-sample column is constant, ρ = 0), as in the official code.

    Reductions (the intra term is a statistic of the whole batch and has no
    per-position value): "none" returns T²·(β·d_p(row) + γ·L_intra) at each
    valid position — the row's own inter-class distance plus the batch's
    intra-class term, replicated — and 0 at masked positions; so "batchmean"
    (their mean over valid positions) is exactly L_DIST and "sum" is
    K·L_DIST for K valid positions. "none" entries are therefore *not*
    independent per-sample losses.

    Shapes: logits ``(N, C)`` or ``(N, L, C)``; mask ``logits.shape[:-1]``.
    Dtype: at least float32. ``beta``, ``gamma``: finite, ≥ 0.
    """
    _check_reduction(reduction)
    beta = _check_number("dist", "beta", beta)
    gamma = _check_number("dist", "gamma", gamma)
    log_p, log_q, valid = _teacher_student_log_probs(student_logits, teacher_logits, temperature, mask)
    y_t, y_s = log_p.exp(), log_q.exp()
    eps = 1e-8
    inter = _pearson_distance(y_s, y_t, -1, eps)  # per position
    num_classes = y_s.shape[-1]
    rows_s, rows_t = y_s.reshape(-1, num_classes), y_t.reshape(-1, num_classes)
    weight = None if valid is None else valid.reshape(-1, 1).to(rows_s.dtype)
    intra = _pearson_distance(rows_s, rows_t, 0, eps, weight).mean()  # over classes
    per_position = temperature**2 * (beta * inter + gamma * intra)
    return _reduce(per_position, valid, reduction)


dist.loss_kind = "logit"


# ---------------------------------------------------------------------------
# Logit standardization
# ---------------------------------------------------------------------------


def standardize_logits(logits, eps=1e-7):
    """Z-score over the last dim: (z − mean(z)) / (std(z) + eps).

    Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation",
    CVPR 2024, arXiv 2403.01427, Algorithm 1 (the Z-score pre-process). std
    is the Bessel-corrected (1/(C−1)) standard deviation with ε = 1e-7 added to
    it, exactly as the official ``normalize`` (``torch.std`` default,
    ``(logit - mean) / (1e-7 + stdv)``); the paper's σ may be the 1/C form
    (not verified) — the two differ by the constant √(C/(C−1)), which the base
    temperature absorbs. A constant row maps to 0 with gradient 0 (not NaN).

    Invariant (up to ε) to a per-row shift and a per-row positive scale of z.
    ``logits``: a floating tensor with classes last and C ≥ 2; computed in at
    least float32 (bf16/fp16 in, float32 out). ``eps``: finite, > 0.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise KdlabError(f"standardize_logits: expected a floating-point tensor, got {type(logits).__name__}")
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise KdlabError(
            f"standardize_logits: need at least 2 classes in the last dim, got shape {tuple(logits.shape)}"
        )
    eps = _check_number("standardize_logits", "eps", eps, allow_minimum=False)
    logits = logits.to(_compute_dtype(logits))
    centred = logits - logits.mean(dim=-1, keepdim=True)
    std = _safe_sqrt(centred.square().sum(dim=-1, keepdim=True) / (logits.shape[-1] - 1))
    return centred / (std + eps)


def _standardization_base(base):
    if not isinstance(base, str):
        raise KdlabError(f"loss logit_standardization: base must be a loss name (str), got {base!r}")
    if base == "logit_standardization":
        raise KdlabError("loss logit_standardization: base cannot be logit_standardization itself; use e.g. 'kl'")
    fn = registry.get("loss", base, key="loss logit_standardization base")
    kind = getattr(fn, "loss_kind", None)
    if kind not in ("logit", "logit_label"):
        raise KdlabError(
            f"loss logit_standardization: base {base!r} has loss_kind {kind!r}; "
            "it must be a teacher-student logit loss (loss_kind 'logit' or 'logit_label')"
        )
    return fn


@register("loss", "logit_standardization")
def logit_standardization(
    student_logits,
    teacher_logits,
    *,
    temperature: Temperature = 1.0,
    mask=None,
    reduction="batchmean",
    base="kl",
    eps: Positive = 1e-7,
    **base_options,
):
    """Z-score both logit vectors, then apply the registered logit loss ``base``.

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024,
    Algorithm 1: each logit vector is standardized,
    Z(z; τ) = (z − mean z) / (τ·σ(z)), before the temperature softmax, so the
    student must match the teacher's logit *relations*, not their range or
    variance. Here ``temperature`` is the paper's base temperature τ and is
    handed to ``base``, which divides by it (and, for ``kl``, multiplies by τ²,
    as the official ``kd_loss`` does): with ``base="kl"`` this is exactly
    ``kl(standardize_logits(z_s), standardize_logits(z_t), temperature=τ)``.
    The official CIFAR-100 runs use τ = 2 (sometimes 3) with a KD weight of 9
    (README of sunshangquan/logit-standardization-KD); the default T = 1 here
    is only the library-wide default. The paper applies the same pre-process to
    DKD etc.: ``base="dkd", labels=...`` works (``base_options`` go to ``base``).

    ``eps``: the ε added to the standard deviation (``standardize_logits``).
    ``base``: name of a registered loss with ``loss_kind`` "logit" or
    "logit_label". Masked-out rows are zeroed before standardizing (so NaN there
    cannot leak) and the mask is passed on. Shapes, dtype and reductions are
    those of ``base``. Invariant (up to ε) to a per-position shift and positive
    scale of either model's logits.
    """
    _check_reduction(reduction)
    fn = _standardization_base(base)
    student, teacher, _ = _checked_logit_pair(student_logits, teacher_logits, temperature, mask)
    return fn(
        standardize_logits(student, eps=eps),
        standardize_logits(teacher, eps=eps),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        **base_options,
    )


logit_standardization.loss_kind = "logit"


# ---------------------------------------------------------------------------
# Hinge on logits
# ---------------------------------------------------------------------------


@register("loss", "hinge_logits")
def hinge_logits(
    student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean",
    margin: NonNegative = 0.0, squared=True
):
    """Margin (hinge) regression on logits: mean_c max(0, |z_s − z_t|/T − m)^k, k = 2 or 1.

    A plain elementwise dead-zone regression: differences smaller than the
    margin m are ignored. ``squared=True`` (default) squares the hinge; with
    m = 0 it is then exactly ``mse_logits``. ``temperature`` divides both logits
    (no T² compensation), as in ``mse_logits``; the margin is in units of z/T.
    The gradient at |z_s − z_t|/T = m (and at 0 for m = 0, unsquared) is the
    subgradient 0.

    Not Continuation-KD's loss: Jafari et al. (EMNLP 2022 Findings, arXiv
    2212.05998) hinge the whole squared distance per sample,
    max{0, ‖z_S − φ·z_T‖² − m·φ}, with an annealed teacher scale φ — that
    form, with its schedules, belongs to a method, not to this loss.

    Shapes: logits ``(N, C)`` or ``(N, L, C)``; mask ``logits.shape[:-1]``.
    Dtype: at least float32. Reduction: per-position mean over classes, then
    ``reduction``. ``margin``: finite, ≥ 0.
    """
    _check_reduction(reduction)
    margin = _check_number("hinge_logits", "margin", margin)
    student, teacher, valid = _checked_logit_pair(student_logits, teacher_logits, temperature, mask)
    hinge = torch.relu(((student - teacher) / temperature).abs() - margin)
    per_position = (hinge.square() if squared else hinge).mean(dim=-1)
    return _reduce(per_position, valid, reduction)


hinge_logits.loss_kind = "logit"


# ---------------------------------------------------------------------------
# LogSum
# ---------------------------------------------------------------------------

# |d| below this counts as this: log|d| stays finite and the gradient is bounded by power / 1e-12.
_LOGSUM_FLOOR = 1e-12


@register("loss", "logsum")
def logsum(
    student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean",
    power: Positive = 4.0, eps: NonNegative = 0.0
):
    """LogSum soft-maximum distance: log Σ_c |s_c/T − t_c/T|^p over the last dim.

    Miles & Mikolajczyk, "A closer look at the training dynamics of knowledge
    distillation" / "Understanding the Role of the Projector in Knowledge
    Distillation" (AAAI 2024), arXiv 2303.11098: the log of the sum (not
    (1/p)·log, not a mean), p = α = 4 (official ImageNet code
    ``imagenet/torchdistill/losses/single.py``, ``OurDistillationLoss``:
    ``torch.log((f_s - f_t).abs().pow(4).sum())``, no ε; see the project paper
    notes, papers.md §3). Because log Σ|d|^p = p·log ‖d‖_p, it grows only
    logarithmically in the largest differences — a soft maximum over
    coordinates, with gradient p·|d_c|^{p−1}·sign(d_c) / Σ|d|^p. It can be
    negative.

    Per position vs. whole batch: the official loss sums over the batch *and*
    the feature dim inside one log, log Σ_{b,d} |·|^p. Per-position values v_b
    (``reduction="none"``) give it as ``torch.logsumexp(v[valid], dim=0)``
    (log Σ_b e^{v_b}); "batchmean" instead averages the per-position logs.

    Inputs: in the paper the vectors are BatchNorm-standardized (no affine)
    projected *features* (B×D), not logits; the function works on any
    ``(N, D)`` / ``(N, L, D)`` pair (it carries ``loss_kind == "logit"`` and
    the logit signature). ``temperature`` divides both, which only shifts the
    value by −p·log T (no gradient change with respect to the inputs).

    Numerics: computed as logsumexp(p·log max(|d|, 1e-12)), so there is no
    overflow for large |d|, and at d = 0 the value is finite and the gradient
    is 0 (differences below 1e-12 count as 1e-12). ``eps`` > 0 gives
    log(Σ|d|^p + eps) — the DeiT variant of the official code uses 1e-5 (on
    its cross-correlation, papers.md §3) — which bounds the value below by
    log eps.

    Shapes: ``(N, D)`` or ``(N, L, D)``; mask ``shape[:-1]``. Dtype: at least
    float32. Reduction: per-position value, then ``reduction``. ``power``:
    finite, > 0; ``eps``: finite, ≥ 0.
    """
    _check_reduction(reduction)
    power = _check_number("logsum", "power", power, allow_minimum=False)
    eps = _check_number("logsum", "eps", eps)
    student, teacher, valid = _checked_logit_pair(student_logits, teacher_logits, temperature, mask)
    log_abs = ((student - teacher) / temperature).abs().clamp_min(_LOGSUM_FLOOR).log()
    per_position = torch.logsumexp(power * log_abs, dim=-1)
    if eps > 0.0:
        per_position = torch.logaddexp(per_position, torch.full_like(per_position, math.log(eps)))
    return _reduce(per_position, valid, reduction)


logsum.loss_kind = "logit"
