"""Logit-level distillation losses: divergences between teacher and student outputs.

Every logit loss has the signature

    fn(student_logits, teacher_logits, *, temperature=1.0, mask=None,
       reduction="batchmean", <keyword-only hyperparameters>)

and carries ``fn.loss_kind == "logit"``; ``cross_entropy`` (student vs. labels)
carries ``loss_kind == "label"``.

Shapes: logits are ``(N, C)`` or ``(N, L, C)`` (classes last); a *position* is
one row ``n`` or one pair ``(n, l)``. ``mask`` (``None`` or a bool / 0-1 tensor
of shape ``logits.shape[:-1]``, nonzero = valid) selects the positions that count.

The divergence family: every divergence between a teacher's and a student's
categorical distributions is one per-position function of their
log-probabilities, ``divergence_per_position(name, log_p, log_q, ...)`` over
``DIVERGENCE_FAMILY`` (kl, reverse_kl, generalized_jsd, tvd, skew_kl), taken at
temperatures by ``tempered_log_probs`` and reduced by ``reduce_positions``. The
registered losses below and ``kdlab.losses.sequence`` (GKD, token/sequence
reductions, no T², separate student and teacher temperatures, chunking) both
call these three functions; only their conventions differ, as options:
registered losses multiply by T² at one shared temperature (not ``tvd``) and
reduce with "batchmean"/"sum"/"none"; sequences do neither and also reduce per
sequence ("sequence", "sequence_sum").

Reductions of the registered losses (the same for every loss here):

* ``"batchmean"``: per-position value (already summed or averaged over classes),
  averaged over the valid positions: ``N``, ``N·L``, or the number of valid
  positions under a mask (an all-masked batch gives 0, not NaN). Unlike
  ``torch.nn.functional.kl_div(reduction="batchmean")``, which divides by
  ``input.size(0)`` only, a ``(N, L, C)`` input is averaged over all ``N·L``
  positions.
* ``"sum"``: summed over the valid positions.
* ``"none"``: the per-position values, shape ``logits.shape[:-1]``, with 0 at
  masked-out positions.

Numerics: inputs are upcast to at least float32 (bf16/fp16 in, float32 out;
float64 stays float64); probabilities are only ever formed as ``exp`` of
``log_softmax`` output and divergences are written as ``p·(log p − log q)`` on
log-probabilities, so no ``log(0)`` is taken and ``0·log 0`` comes out as 0;
masked-out logits are replaced by 0 (``torch.where``) before any arithmetic, so
NaN/inf there reaches neither the value nor the gradient.
"""
from __future__ import annotations

import math
import numbers
from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval

from kdlab.errors import KdlabError
from kdlab.registry import register

# Bounds of the losses' float options, declared on their signatures: a config's ``distill`` terms are coerced
# against them before any work (kdlab.methods.distill). The runtime checks below stay for Python callers
# (a tensor temperature, e.g. a learned one, is passed in Python only).
Temperature = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
Positive = Annotated[float, Gt(0)]
Unit = Annotated[float, Interval(ge=0, le=1)]

REDUCTIONS = ("batchmean", "sum", "none")


# ---------------------------------------------------------------------------
# Shared checks and plumbing
# ---------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise KdlabError(
            f"loss reduction: unknown value {reduction!r}; use one of {', '.join(repr(r) for r in REDUCTIONS)}"
        )


def _check_temperature(temperature) -> None:
    # A tensor temperature (e.g. a learned one) is accepted unchecked: checking
    # it would force a device sync on every step.
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            shape = tuple(temperature.shape)
            raise KdlabError(f"loss temperature: expected a scalar, got a tensor of shape {shape}; pass a float > 0")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise KdlabError(f"loss temperature: expected a number, got {temperature!r}; pass a float > 0")
    if not (math.isfinite(temperature) and temperature > 0):
        raise KdlabError(f"loss temperature: must be a finite number > 0, got {temperature!r}; pass e.g. 1.0 or 4.0")


def _check_unit_interval(name: str, value) -> float:
    if isinstance(value, bool):
        raise KdlabError(f"loss {name}: expected a number in [0, 1], got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise KdlabError(f"loss {name}: expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise KdlabError(f"loss {name}: must lie in [0, 1], got {value!r}; pick a value between 0 and 1")
    return value


def _check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise KdlabError(f"loss {name}: expected a tensor, got {type(logits).__name__}")
    if logits.ndim < 2:
        raise KdlabError(
            f"loss {name}: expected shape (N, C) or (N, L, C), got {tuple(logits.shape)}; add a batch dimension"
        )
    if not logits.is_floating_point():
        raise KdlabError(f"loss {name}: expected floating-point logits, got dtype {logits.dtype}")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32: bf16/fp16 are upcast, float64 is kept."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _valid_positions(mask, position_shape: torch.Size) -> torch.Tensor | None:
    """``mask`` as a bool tensor of ``position_shape`` (nonzero = valid), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise KdlabError(f"loss mask: expected a tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(position_shape):
        raise KdlabError(
            f"loss mask: shape {tuple(mask.shape)} does not match the logits' positions {tuple(position_shape)}; "
            "pass a mask of shape logits.shape[:-1]"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _clean(logits: torch.Tensor, valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Upcast and zero the masked-out rows (``where``, so NaN/inf there cannot leak)."""
    logits = logits.to(dtype)
    if valid is None:
        return logits
    return torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=dtype, device=logits.device))


def _check_labels(labels, logits: torch.Tensor) -> None:
    """``labels`` must be an integer tensor of shape ``logits.shape[:-1]``."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise KdlabError("loss labels: expected an integer tensor of class indices; pass labels as torch.int64")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise KdlabError(
            f"loss labels: shape {tuple(labels.shape)} does not match the logits' positions "
            f"{tuple(logits.shape[:-1])}; pass one class index per position"
        )


def _clean_labels(labels: torch.Tensor, valid: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """int64 labels with masked-out ones set to 0; ``KdlabError`` if a valid one is out of range.

    The range check reads one bool back from the device (a sync).
    """
    labels = labels.long()
    if valid is not None:
        labels = torch.where(valid, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    if labels.numel() and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise KdlabError(
            f"loss labels: values must lie in [0, {num_classes}) at valid positions; "
            "mask out padding instead of using out-of-range labels"
        )
    return labels


POSITION_REDUCTIONS = REDUCTIONS + ("sequence", "sequence_sum")


def reduce_positions(per_position: torch.Tensor, valid: torch.Tensor | None, reduction: str,
                     denominator=None) -> torch.Tensor:
    """Reduce per-position values (0 is forced at invalid positions) to what ``reduction`` asks.

    * ``"none"``: the values; ``"sum"``: their sum over valid positions;
    * ``"batchmean"`` (sequences call it "token"): sum / number of valid positions;
    * ``"sequence"``: positions ``(B, T)``; per sequence the mean over its valid positions, then the
      mean over the sequences with at least one (GKD's Eq. 2);
    * ``"sequence_sum"``: per sequence the sum, then the mean over the sequences with at least one.

    ``denominator`` (a checked number ≥ 0 or a scalar tensor; the mean reductions only) replaces the
    final divisor, 0 counting as 1: micro-batches given the full batch's count sum to its loss. An
    all-masked input gives 0, never NaN.
    """
    if valid is not None:
        zero = torch.zeros((), dtype=per_position.dtype, device=per_position.device)
        per_position = torch.where(valid, per_position, zero)
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if reduction == "batchmean":
        total = per_position.sum()
        if denominator is None:
            count = max(per_position.numel(), 1) if valid is None else valid.sum().clamp(min=1)
            return total / count
    else:  # "sequence" / "sequence_sum": positions (B, T)
        batch, length = per_position.shape
        counts = torch.full((batch,), length, device=per_position.device) if valid is None else valid.sum(dim=1)
        per_sequence = per_position.sum(dim=1)
        if reduction == "sequence":
            per_sequence = per_sequence / counts.clamp(min=1).to(per_position.dtype)
        total = per_sequence.sum()
        if denominator is None:
            return total / (counts > 0).sum().clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=total.device, dtype=total.dtype)
        return total / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return total / (denominator if denominator > 0 else 1.0)


_reduce = reduce_positions  # the registered losses' spelling


def _checked_logit_pair(student_logits, teacher_logits, temperature, mask):
    """Validated student/teacher logits, upcast and cleaned, and the valid-position mask.

    Checks both are (N, C) or (N, L, C) floating tensors of the same shape, the
    temperature and the mask; returns ``(student, teacher, valid)`` in the
    compute dtype with masked-out rows zeroed (see ``_clean``).
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise KdlabError(
            f"loss logits: student shape {tuple(student_logits.shape)} != teacher shape {tuple(teacher_logits.shape)}; "
            "both must be (N, C) or (N, L, C) over the same classes"
        )
    _check_temperature(temperature)
    valid = _valid_positions(mask, student_logits.shape[:-1])
    dtype = _compute_dtype(student_logits, teacher_logits)
    return _clean(student_logits, valid, dtype), _clean(teacher_logits, valid, dtype), valid


def tempered_log_probs(student, teacher, valid, *, student_temperature=1.0, teacher_temperature=1.0,
                       dtype=None):
    """(log P, log Q): teacher and student log-softmax at their temperatures, in the compute dtype.

    Masked-out rows are zeroed first (``_clean``), so NaN/inf there reaches nothing. A float
    temperature of exactly 1 skips its division (x / 1 is x).
    """
    dtype = dtype or _compute_dtype(student, teacher)
    student, teacher = _clean(student, valid, dtype), _clean(teacher, valid, dtype)
    if isinstance(student_temperature, torch.Tensor) or student_temperature != 1.0:
        student = student / student_temperature
    if isinstance(teacher_temperature, torch.Tensor) or teacher_temperature != 1.0:
        teacher = teacher / teacher_temperature
    return torch.log_softmax(teacher, dim=-1), torch.log_softmax(student, dim=-1)


def _teacher_student_log_probs(student_logits, teacher_logits, temperature, mask):
    """Validated, cleaned log-probabilities at temperature T and the valid-position mask."""
    student, teacher, valid = _checked_logit_pair(student_logits, teacher_logits, temperature, mask)
    log_p, log_q = tempered_log_probs(student, teacher, None, student_temperature=temperature,
                                      teacher_temperature=temperature)
    return log_p, log_q, valid


def _kl_per_position(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_c a_c (log a_c − log b_c) over the last dim, from log-probabilities.

    ``a_c = exp(log a_c)`` may underflow to 0; the product with the finite log
    difference is then exactly 0, which is the 0·log 0 = 0 convention.
    """
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _generalized_jsd_per_position(log_p: torch.Tensor, log_q: torch.Tensor, beta: float, scaled: bool) -> torch.Tensor:
    """β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q, per position (optionally / β(1−β))."""
    if scaled and beta == 0.0:
        return _kl_per_position(log_p, log_q)  # exact β → 0 limit: KL(P‖Q)
    if scaled and beta == 1.0:
        return _kl_per_position(log_q, log_p)  # exact β → 1 limit: KL(Q‖P)
    # log M = logsumexp(log β + log P, log(1−β) + log Q), taken relative to
    # log Q and log P: near β = 0 or 1, log M − log Q is tiny and subtracting
    # two separately computed log-probabilities would lose it to cancellation.
    # β = 0 or 1 give log β or log(1−β) = −inf, which logaddexp handles exactly.
    log_beta = math.log(beta) if beta > 0.0 else -math.inf
    log_rest = math.log1p(-beta) if beta < 1.0 else -math.inf
    log_ratio = log_p - log_q  # log(P/Q)
    log_m_over_q = torch.logaddexp(log_ratio + log_beta, torch.full_like(log_ratio, log_rest))
    log_m_over_p = torch.logaddexp(torch.full_like(log_ratio, log_beta), log_rest - log_ratio)
    kl_p_m = -(log_p.exp() * log_m_over_p).sum(dim=-1)
    kl_q_m = -(log_q.exp() * log_m_over_q).sum(dim=-1)
    value = beta * kl_p_m + (1.0 - beta) * kl_q_m
    return value / (beta * (1.0 - beta)) if scaled else value


def _skew_kl_per_position(log_a: torch.Tensor, log_b: torch.Tensor, skew: float) -> torch.Tensor:
    """KL(A ‖ α·A + (1−α)·B) per position, from log-probabilities, α = ``skew``.

    The mixture M is taken in log space relative to A,
    log(M/A) = logaddexp(log α, log(1−α) + log B − log A), so no probability is
    formed before the log and, near α = 1, the tiny log(M/A) is not lost to the
    cancellation of two separately computed log-probabilities (the same device
    as ``generalized_jsd``). The ends are exact: α = 0 is KL(A ‖ B), α = 1 is 0.
    """
    if skew == 0.0:
        return _kl_per_position(log_a, log_b)
    if skew == 1.0:
        return torch.zeros_like(log_a[..., 0])
    log_ratio = log_a - log_b  # log(A/B)
    log_m_over_a = torch.logaddexp(torch.full_like(log_ratio, math.log(skew)), math.log1p(-skew) - log_ratio)
    return -(log_a.exp() * log_m_over_a).sum(dim=-1)


DIVERGENCE_FAMILY = ("kl", "reverse_kl", "generalized_jsd", "tvd", "skew_kl")


def divergence_per_position(name: str, log_p: torch.Tensor, log_q: torch.Tensor, *, beta: float = 0.5,
                            scaled: bool = False, kl_at_ends: bool = False, skew: float = 0.1,
                            reverse: bool = False) -> torch.Tensor:
    """D(P ‖ Q) per position (summed over the last dim) for P the teacher, Q the student.

    The one switch of the family (options are checked by the callers):

    * ``kl``: KL(P ‖ Q); ``reverse_kl``: KL(Q ‖ P);
    * ``generalized_jsd``: β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q (÷ β(1−β) when ``scaled``).
      Unscaled it is 0 at β = 0 and 1; ``kl_at_ends`` returns KL(P‖Q) at β = 0 and KL(Q‖P) at β = 1
      instead (TRL's and GKD's ``jsd`` branches);
    * ``tvd``: ½·Σ|P − Q|;
    * ``skew_kl``: KL(P ‖ αP + (1−α)Q), or with ``reverse`` KL(Q ‖ αQ + (1−α)P), α = ``skew``.
    """
    if name == "kl" or (name == "generalized_jsd" and kl_at_ends and beta == 0.0):
        return _kl_per_position(log_p, log_q)
    if name == "reverse_kl" or (name == "generalized_jsd" and kl_at_ends and beta == 1.0):
        return _kl_per_position(log_q, log_p)
    if name == "generalized_jsd":
        return _generalized_jsd_per_position(log_p, log_q, beta, scaled)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    if name == "skew_kl":
        return _skew_kl_per_position(log_q, log_p, skew) if reverse else _skew_kl_per_position(log_p, log_q, skew)
    raise KdlabError(f"divergence: unknown name {name!r}; use one of {', '.join(map(repr, DIVERGENCE_FAMILY))}")


def logit_divergence(name, student_logits, teacher_logits, *, temperature, mask, reduction, t_squared=True,
                     **options):
    """A registered loss's convention of the family: one shared T, × T² (when ``t_squared``), reduced."""
    _check_reduction(reduction)
    log_p, log_q, valid = _teacher_student_log_probs(student_logits, teacher_logits, temperature, mask)
    per_position = divergence_per_position(name, log_p, log_q, **options)
    return reduce_positions(temperature**2 * per_position if t_squared else per_position, valid, reduction)


# ---------------------------------------------------------------------------
# Logit losses
# ---------------------------------------------------------------------------


@register("loss", "kl")
def kl(student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean"):
    """Forward KL of Hinton KD: T² · KL(p_T^teacher ‖ p_T^student).

    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
    Network", §2: both distributions are softmaxes at temperature T,
    ``p_T = softmax(z / T)``. The T² factor keeps the gradient magnitude with
    respect to the student logits roughly independent of T (the soft-target
    gradients scale as 1/T², Hinton §2), so the soft term can be weighed against
    a hard-label term without re-tuning when T changes.

    Shapes: logits ``(N, C)`` or ``(N, L, C)``; mask ``logits.shape[:-1]``.
    Dtype: computed in at least float32 (bf16/fp16 are upcast; float32 out).
    Reduction: per-position KL summed over classes, then ``reduction`` (see the
    module docstring: "batchmean" averages over valid positions).
    """
    _check_reduction(reduction)
    log_p, log_q, valid = _teacher_student_log_probs(student_logits, teacher_logits, temperature, mask)
    if valid is None and reduction == "batchmean":
        # The common training case as one fused kernel (the same exp(log p)·(log p − log q) terms summed),
        # instead of ~6 small ops: it is most of a small student's step on a GPU.
        positions = max(1, log_p.numel() // log_p.shape[-1])
        return torch.nn.functional.kl_div(log_q, log_p, reduction="sum", log_target=True) * (temperature**2 / positions)
    return reduce_positions(temperature**2 * divergence_per_position("kl", log_p, log_q), valid, reduction)


kl.loss_kind = "logit"


@register("loss", "reverse_kl")
def reverse_kl(student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean"):
    """Reverse KL: T² · KL(p_T^student ‖ p_T^teacher) (mode-seeking).

    The reverse direction of Hinton et al. (2015) §2's KL, as used for
    sequence-level distillation (e.g. MiniLLM, Gu et al. 2024; GKD, Agarwal et
    al. 2024). Same T² factor, shapes, dtypes and reductions as ``kl``.
    """
    return logit_divergence("reverse_kl", student_logits, teacher_logits, temperature=temperature, mask=mask,
                            reduction=reduction)


reverse_kl.loss_kind = "logit"


@register("loss", "generalized_jsd")
def generalized_jsd(
    student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean",
    beta: Unit = 0.5, scaled=False
):
    """Generalized Jensen–Shannon divergence JSD(β) of GKD, times T².

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), ICLR 2024, arXiv 2306.13649, definition of
    JSD(β) in the Preliminaries section:

        JSD(β)(P ‖ Q) = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M),   M = β·P + (1 − β)·Q,

    with P the teacher and Q the student distribution at temperature T. β = 0.5
    is the symmetric JSD (≤ log 2 at T = 1); β = 0 and β = 1 give exactly 0.

    ``scaled=True`` divides by β(1 − β), which turns the family into an
    interpolation between the two KLs. Taylor expansion for small β
    (M = Q + β(P − Q)): KL(P‖M) = KL(P‖Q) + O(β) and
    KL(Q‖M) = −Σ Q log(1 + β(P−Q)/Q) = β²/2 · χ²(P‖Q) + O(β³) (the first-order
    term β·Σ(P−Q) vanishes), so JSD(β) = β·KL(P‖Q) + O(β²) and

        JSD(β) / (β(1−β)) → KL(P ‖ Q) = KL(teacher ‖ student)   (forward) as β → 0,
        JSD(β) / (β(1−β)) → KL(Q ‖ P) = KL(student ‖ teacher)   (reverse) as β → 1

    (the second by the symmetry β ↔ 1−β, P ↔ Q). At β = 0 and β = 1 the scaled
    loss returns these exact KLs, so there is no jump at the ends.

    Shapes: logits ``(N, C)`` or ``(N, L, C)``; mask ``logits.shape[:-1]``.
    Dtype: at least float32. Reduction: per-position value summed over classes,
    then ``reduction``. ``beta`` must lie in [0, 1].
    """
    _check_reduction(reduction)
    beta = _check_unit_interval("beta", beta)
    return logit_divergence("generalized_jsd", student_logits, teacher_logits, temperature=temperature, mask=mask,
                            reduction=reduction, beta=beta, scaled=bool(scaled))


generalized_jsd.loss_kind = "logit"


@register("loss", "tvd")
def tvd(student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean"):
    """Total variation distance ½·Σ_c |p_T^teacher − p_T^student| (no T² factor).

    Bounded in [0, 1] per position. Why no T²: its gradient with respect to the
    student logits is ½·Σ_c sign(q_c − p_c)·∂q_c/∂z, and the sign factor does
    not shrink with T, so the gradient decays like 1/T (not 1/T² as for KL); a
    T² factor would make it *grow* like T. Leaving it unscaled also keeps the
    value a distance in [0, 1]. Scaling by T (to flatten the 1/T) is left to the
    loss weight — a choice, not a derivation from a paper. The gradient at
    p_c = q_c is the subgradient 0 (``torch.abs``).

    Used as a distillation divergence e.g. in Wen et al. (2023), "f-Divergence
    Minimization for Sequence-Level Knowledge Distillation".

    Shapes: logits ``(N, C)`` or ``(N, L, C)``; mask ``logits.shape[:-1]``.
    Dtype: at least float32. Reduction: per-position value, then ``reduction``.
    """
    return logit_divergence("tvd", student_logits, teacher_logits, temperature=temperature, mask=mask,
                            reduction=reduction, t_squared=False)


tvd.loss_kind = "logit"


@register("loss", "mse_logits")
def mse_logits(student_logits, teacher_logits, *, temperature: Temperature = 1.0, mask=None, reduction="batchmean"):
    """Logit regression: mean over classes of (z_s/T − z_t/T)².

    Ba & Caruana (2014), "Do Deep Nets Really Need to be Deep?", §2.2: the
    student regresses the teacher's logits (pre-softmax) with an L2 loss. Here
    the per-position value is the *mean* over the C classes (the paper uses
    ½·sum), so its scale does not depend on C. ``temperature`` divides both
    logits, so the value and gradient shrink by 1/T² (no T² compensation is
    applied; T = 1 is the paper's setting). Logits are not centred: a constant
    offset between student and teacher logits is penalised.

    Shapes: logits ``(N, C)`` or ``(N, L, C)``; mask ``logits.shape[:-1]``.
    Dtype: at least float32. Reduction: per-position mean over classes, then
    ``reduction``.
    """
    _check_reduction(reduction)
    student, teacher, valid = _checked_logit_pair(student_logits, teacher_logits, temperature, mask)
    difference = (student - teacher) / temperature
    return _reduce(difference.square().mean(dim=-1), valid, reduction)


mse_logits.loss_kind = "logit"


# ---------------------------------------------------------------------------
# Label loss
# ---------------------------------------------------------------------------


@register("loss", "cross_entropy")
def cross_entropy(student_logits, labels, *, label_smoothing: Unit = 0.0, mask=None, reduction="batchmean"):
    """Cross-entropy with hard labels and optional label smoothing.

    Target ``(1 − ε)·onehot(y) + ε/C`` (Szegedy et al. 2016, "Rethinking the
    Inception Architecture for Computer Vision", §7), so the per-position value
    is ``−(1 − ε)·log q_y − (ε/C)·Σ_c log q_c`` with ``q = softmax(z)``. This
    matches ``torch.nn.functional.cross_entropy(label_smoothing=ε)``.

    Shapes: logits ``(N, C)`` or ``(N, L, C)``; labels integer of shape
    ``logits.shape[:-1]`` with values in [0, C) at valid positions (masked-out
    labels may be anything, e.g. −100); mask ``logits.shape[:-1]``. The label
    range check reads one bool back from the device (a sync) so that a bad label
    is a ``KdlabError`` rather than an index error or a CUDA device assert; the
    unmasked "batchmean" path skips it on accelerators (no per-step sync).
    Dtype: at least float32. Reduction: per-position value, then ``reduction``.
    """
    _check_reduction(reduction)
    _check_logits("student_logits", student_logits)
    _check_labels(labels, student_logits)
    epsilon = _check_unit_interval("label_smoothing", label_smoothing)
    valid = _valid_positions(mask, student_logits.shape[:-1])
    num_classes = student_logits.shape[-1]
    if valid is None and reduction == "batchmean":
        # Unmasked training case: torch's fused kernel (same value, see above). The range check runs on
        # the CPU only: on an accelerator it would sync every step, and kdlab's datasets check labels at load.
        if labels.device.type == "cpu":
            _clean_labels(labels, None, num_classes)
        logits = student_logits.to(_compute_dtype(student_logits))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, num_classes), labels.reshape(-1).long(),
                                                 label_smoothing=epsilon)
    labels = _clean_labels(labels, valid, num_classes)
    dtype = _compute_dtype(student_logits)
    log_q = torch.log_softmax(_clean(student_logits, valid, dtype), dim=-1)
    nll = -log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    per_position = nll if epsilon == 0.0 else (1.0 - epsilon) * nll - (epsilon / num_classes) * log_q.sum(dim=-1)
    return _reduce(per_position, valid, reduction)


cross_entropy.loss_kind = "label"
