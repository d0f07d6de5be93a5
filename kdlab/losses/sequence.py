"""Token-level divergences for sequence distillation (GKD and friends).

Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes" (GKD), ICLR 2024, arXiv 2306.13649. For one output
sequence y the divergence is the mean over its L_y response positions of a
token-level divergence between the teacher's and the student's next-token
distributions, both conditioned on the same prefix (the paper's Eq. 2):

    D(p_T ‖ p_S)(y | x) = (1/L_y) Σ_n D( p_T(· | y_<n, x) ‖ p_S(· | y_<n, x) ).

``sequence_divergence`` computes that for a batch of already aligned logits
``(B, T, V)``: position ``t`` of the student and of the teacher predict the same
next token, and ``mask`` ``(B, T)`` marks the response positions that count
(prompt and padding excluded by the caller). For the canonical causal-LM layout
(``labels`` = the tokens with −100 outside the response, logits at position t
predicting token t + 1) use ``shift_logits_and_mask`` / ``response_mask``.

Not registered in ``kdlab.registry`` (the kind "loss" expects the logit-loss
signature with "batchmean"/"sum"/"none" reductions); import this module
directly: ``from kdlab.losses.sequence import sequence_divergence``.

One divergence family: the per-position divergences, the tempered
log-probabilities and the reductions are ``kdlab.losses.divergences``'
``divergence_per_position``, ``tempered_log_probs`` and ``reduce_positions``, the
functions the registered classification losses call. What is specific here: the
(B, T, V) layout and its checks, separate student and teacher temperatures with
no T² factor, the "token"/"sequence" reductions with a micro-batch
``denominator``, and ``chunk_size``. The ``divergence`` names are GKD's config
spellings (``method.divergence``), each one member of the family
(``FAMILY_MEMBERS``): ``forward_kl`` is ``kl``, ``jsd`` is ``generalized_jsd`` with
KL at β = 0 and 1, ``skew_reverse_kl`` is ``skew_kl`` reversed.

Conventions shared with ``kdlab.losses.divergences``: compute in at least
float32 (float64 stays float64), probabilities only as ``exp`` of
``log_softmax`` output, mixtures formed in log space, masked
positions replaced by 0 with ``torch.where`` before any arithmetic (so NaN/inf
logits there reach neither the value nor the gradient). Errors are
``SequenceDivergenceError``, a ``ValueError`` that is also a ``KdlabError``.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
from torch.utils.checkpoint import checkpoint

from kdlab.errors import KdlabError
from kdlab.losses.divergences import _compute_dtype, divergence_per_position, reduce_positions, tempered_log_probs

# GKD's spelling of each divergence -> (the family's name, fixed options). One table, read by the checks below.
FAMILY_MEMBERS = {
    "forward_kl": ("kl", {}),
    "reverse_kl": ("reverse_kl", {}),
    "jsd": ("generalized_jsd", {"kl_at_ends": True}),
    "tvd": ("tvd", {}),
    "skew_kl": ("skew_kl", {"reverse": False}),
    "skew_reverse_kl": ("skew_kl", {"reverse": True}),
}
DIVERGENCES = tuple(FAMILY_MEMBERS)
# The sequence spelling of each reduction -> the family's (``kdlab.losses.divergences.reduce_positions``).
SEQUENCE_REDUCTIONS = {"token": "batchmean", "sequence": "sequence"}
IGNORE_INDEX = -100

__all__ = [
    "DIVERGENCES",
    "FAMILY_MEMBERS",
    "IGNORE_INDEX",
    "SEQUENCE_REDUCTIONS",
    "SequenceDivergenceError",
    "count_denominator",
    "response_mask",
    "response_units",
    "sequence_divergence",
    "shift_logits_and_mask",
]


class SequenceDivergenceError(KdlabError, ValueError):
    """Bad input to a sequence divergence (a ``ValueError``; also a ``KdlabError`` for the CLI)."""


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def _error(message: str) -> SequenceDivergenceError:
    return SequenceDivergenceError(f"sequence_divergence: {message}")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _error(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_beta(beta) -> float:
    beta = _real("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise _error(f"beta must lie in [0, 1], got {beta!r}; 0 is forward KL, 1 reverse KL, 0.5 the symmetric JSD")
    return beta


def _check_skew(skew) -> float:
    skew = _real("skew", skew)
    if not 0.0 <= skew < 1.0:
        raise _error(f"skew must lie in [0, 1), got {skew!r}; 0 is the plain KL, DistiLLM uses 0.1")
    return skew


def _check_temperature(name: str, value) -> float:
    value = _real(name, value)
    if not (math.isfinite(value) and value > 0.0):
        raise _error(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise _error(f"{name}: expected a tensor of shape (B, T, V), got {type(logits).__name__}")
    if logits.ndim != 3:
        raise _error(f"{name}: expected shape (B, T, V), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise _error(f"{name}: expected floating-point logits, got dtype {logits.dtype}")


def _check_pair(student_logits, teacher_logits) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise _error(
            f"student shape {tuple(student_logits.shape)} != teacher shape {tuple(teacher_logits.shape)}; "
            "both must be (B, T, V) with the same batch and aligned positions"
        )
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise _error(
            f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary {student_logits.shape[-1]} "
            f"(teacher shape {tuple(teacher_logits.shape)}, student shape {tuple(student_logits.shape)}); "
            "distil between models that share a tokenizer"
        )


def _check_mask(mask, position_shape) -> torch.Tensor | None:
    """``mask`` as a bool tensor of ``position_shape`` (nonzero = counts), or None (all count)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise _error(f"mask: expected a (B, T) tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(position_shape):
        raise _error(
            f"mask shape {tuple(mask.shape)} does not match the logits' positions {tuple(position_shape)}; "
            "pass a (B, T) mask, True at the response tokens that count"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _check_reduction(reduction) -> None:
    if reduction not in SEQUENCE_REDUCTIONS:
        raise _error(f"unknown reduction {reduction!r}; use one of {', '.join(map(repr, SEQUENCE_REDUCTIONS))}")


def _check_divergence(divergence) -> None:
    if divergence not in DIVERGENCES:
        raise _error(f"unknown divergence {divergence!r}; use one of {', '.join(map(repr, DIVERGENCES))}")


def _check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise _error(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    return int(chunk_size)


def _check_denominator(denominator):
    """None, a scalar tensor (unchecked: a check would sync), or a finite number >= 0."""
    if denominator is None:
        return None
    if isinstance(denominator, torch.Tensor):
        if denominator.numel() != 1:
            raise _error(f"denominator: expected a scalar, got a tensor of shape {tuple(denominator.shape)}")
        return denominator.reshape(())
    value = _real("denominator", denominator)
    if not (math.isfinite(value) and value >= 0.0):
        raise _error(f"denominator must be a finite number >= 0, got {denominator!r}; use count_denominator(mask)")
    return value


def _check_labels(labels) -> None:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise _error("labels: expected an integer tensor of shape (B, L), -100 outside the response")
    if labels.ndim != 2:
        raise _error(f"labels: expected shape (B, L), got {tuple(labels.shape)}")


# ---------------------------------------------------------------------------
# Canonical causal-LM layout
# ---------------------------------------------------------------------------


def response_mask(labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The ``(B, L − 1)`` bool mask ``labels[:, 1:] != ignore_index``.

    ``labels`` ``(B, L)``: the token ids with ``ignore_index`` (−100) at prompt
    and padding positions. The logits at position t predict token t + 1, so the
    mask of ``logits[:, :-1]`` is the label mask shifted by one.
    """
    _check_labels(labels)
    return labels[:, 1:] != ignore_index


def shift_logits_and_mask(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX):
    """``(logits[:, :-1], labels[:, 1:] != ignore_index)`` for ``logits`` ``(B, L, V)``, ``labels`` ``(B, L)``.

    Apply it to the student's and the teacher's logits alike (same labels), then
    pass both and the mask to ``sequence_divergence``.
    """
    _check_logits("logits", logits)
    _check_labels(labels)
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise _error(f"labels shape {tuple(labels.shape)} does not match the logits' positions "
                     f"{tuple(logits.shape[:2])}; pass labels of shape (B, L) for logits (B, L, V)")
    return logits[:, :-1], response_mask(labels, ignore_index=ignore_index)


def count_denominator(mask: torch.Tensor, reduction: str = "token") -> int:
    """The full batch's denominator for ``sequence_divergence(..., denominator=...)``.

    ``"token"``: the number of valid tokens; ``"sequence"``: the number of
    sequences with at least one valid token. Compute it once on the full batch's
    ``(B, T)`` mask and pass it with every micro-batch: the micro-batch losses
    then sum to the full-batch loss. Reads one number back from the device.
    """
    _check_reduction(reduction)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise _error(f"count_denominator: expected a (B, T) mask, got {shape}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    if reduction == "token":
        return int(valid.sum())
    return int(valid.any(dim=1).sum())


def response_units(labels: torch.Tensor, reduction: str = "token", *, ignore_index: int = IGNORE_INDEX):
    """What a sequence loss on ``labels`` (B, L) averages over, as a 0-dim tensor (no device sync).

    ``"token"``: the response tokens (``response_mask``); ``"sequence"`` (and the per-sequence ``"sum"``
    of policy-gradient KD): the rows with at least one. A method's ``loss_count`` under gradient
    accumulation: micro-batch losses weighted by their share of the group's units sum to the loss of
    one batch of the whole group, counted on the responses actually trained on (after generation).
    """
    if reduction not in ("token", "sequence", "sum"):
        raise _error(f"unknown reduction {reduction!r}; use one of 'token', 'sequence', 'sum'")
    valid = response_mask(labels, ignore_index=ignore_index)
    return valid.sum() if reduction == "token" else valid.any(dim=1).sum()


# ---------------------------------------------------------------------------
# Per-position divergences
# ---------------------------------------------------------------------------


def _per_position(student, teacher, valid, *, divergence, beta, scaled, skew, student_temperature,
                  teacher_temperature, dtype):
    """Per-position divergence ``(B, t)`` from logits ``(B, t, V)``; 0 where ``valid`` is False."""
    log_p, log_q = tempered_log_probs(student, teacher, valid, student_temperature=student_temperature,
                                      teacher_temperature=teacher_temperature, dtype=dtype)
    name, fixed = FAMILY_MEMBERS[divergence]
    value = divergence_per_position(name, log_p, log_q, beta=beta, scaled=scaled, skew=skew, **fixed)
    if valid is None:
        return value
    return torch.where(valid, value, torch.zeros((), dtype=value.dtype, device=value.device))


def _chunked_per_position(student, teacher, valid, chunk_size, **options):
    """``_per_position`` over sequence chunks, each under non-reentrant activation checkpointing.

    Only the chunk's inputs (views of the logits) and its ``(B, chunk)`` output
    are kept for backward; the softmaxes and other ``(B, chunk, V)``
    intermediates are recomputed chunk by chunk in the backward pass.
    """
    length = student.shape[1]
    if length == 0:
        return _per_position(student, teacher, valid, **options)
    function = functools.partial(_per_position, **options)
    use_checkpoint = torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad)
    pieces = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        args = (student[:, start:stop], teacher[:, start:stop], None if valid is None else valid[:, start:stop])
        if use_checkpoint:
            pieces.append(checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(function(*args))
    return torch.cat(pieces, dim=1)


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def sequence_divergence(
    student_logits,
    teacher_logits,
    mask=None,
    *,
    divergence="forward_kl",
    beta=0.5,
    scaled=False,
    skew=0.1,
    student_temperature=1.0,
    teacher_temperature=1.0,
    reduction="token",
    denominator=None,
    chunk_size=None,
):
    """Token-level divergence between teacher and student next-token distributions, reduced to a scalar.

    Inputs: ``student_logits`` and ``teacher_logits`` ``(B, T, V)``, aligned
    (position t of both predicts the same next token; see
    ``shift_logits_and_mask``); ``mask`` ``(B, T)`` bool or 0/1, True at the
    response tokens that count (None: all count). P = softmax(teacher_logits /
    teacher_temperature) is the teacher, Q = softmax(student_logits /
    student_temperature) the student distribution at each position.

    ``divergence`` (per position, summed over the vocabulary):

    * ``"forward_kl"``: KL(P ‖ Q); ``"reverse_kl"``: KL(Q ‖ P).
    * ``"jsd"``: GKD's generalized JSD (Eq. 1), β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M)
      with M = β·P + (1 − β)·Q formed over probabilities in log space. β = 0 and
      β = 1 are explicit branches returning KL(P ‖ Q) and KL(Q ‖ P) exactly (as
      TRL's ``generalized_jsd_loss``); note that the unscaled interior formula
      tends to 0 at both ends (≈ β·KL(P‖Q) near 0), so the unscaled family jumps
      at the ends. ``scaled=True`` divides the interior by β(1 − β), which
      makes it approach KL(P ‖ Q) as β → 0 and KL(Q ‖ P) as β → 1 continuously
      (the ``scaled`` option of ``kdlab.losses.divergences.generalized_jsd``,
      whose per-position code is used; that function, unlike this one, returns
      0 at the ends when unscaled).
    * ``"tvd"``: ½·Σ|P − Q|.
    * ``"skew_kl"``: KL(P ‖ α·P + (1 − α)·Q), ``"skew_reverse_kl"``:
      KL(Q ‖ α·Q + (1 − α)·P), α = ``skew`` in [0, 1) (DistiLLM; the
      convention of ``kdlab.losses.logit.skew_kl``).

    Temperatures: separate for teacher and student; there is **no T² factor**
    (unlike ``kdlab.losses.divergences.kl``): callers scale if they want.

    ``reduction``:

    * ``"token"``: sum over valid tokens / number of valid tokens (all
      tokens of the batch weigh the same, as TRL's GKD trainer).
    * ``"sequence"``: the paper's Eq. 2: per sequence, the mean over its valid
      tokens, then the mean over the sequences with at least one valid token.

    ``denominator``: when given (a number, or a scalar tensor), the divisor of
    the final step: (sum of the per-token values) / denominator for "token",
    (sum over sequences of the per-sequence means) / denominator for
    "sequence". Pass ``count_denominator(full_mask, reduction)`` with every
    micro-batch of a batch and the micro-batch losses (and gradients) sum to the
    full-batch loss. 0 is treated as 1 (it can only come from an all-masked
    batch, whose micro-batches all give 0). An all-masked batch gives 0 and a
    zero gradient, never NaN.

    ``chunk_size``: compute over the sequence dimension in chunks of this many
    positions, each under ``torch.utils.checkpoint.checkpoint(use_reentrant=
    False)``, so that the ``(B, T, V)`` float32 intermediates (softmaxes, log
    ratios) are never held for the whole sequence: the backward recomputes them
    one chunk at a time. Same value and gradients as unchunked (up to rounding
    of the final sums); costs one extra forward of the divergence.

    Dtype: at least float32 (bf16/fp16 inputs give a float32 loss, float64
    stays float64). Returns a 0-dim tensor.
    """
    _check_divergence(divergence)
    _check_reduction(reduction)
    _check_pair(student_logits, teacher_logits)
    valid = _check_mask(mask, student_logits.shape[:2])
    options = dict(
        divergence=divergence,
        beta=_check_beta(beta),
        scaled=bool(scaled),
        skew=_check_skew(skew),
        student_temperature=_check_temperature("student_temperature", student_temperature),
        teacher_temperature=_check_temperature("teacher_temperature", teacher_temperature),
        dtype=_compute_dtype(student_logits, teacher_logits),
    )
    chunk_size = _check_chunk_size(chunk_size)
    denominator = _check_denominator(denominator)
    if valid is not None:
        valid = valid.to(student_logits.device)

    if chunk_size is None:
        per_position = _per_position(student_logits, teacher_logits, valid, **options)
    else:
        per_position = _chunked_per_position(student_logits, teacher_logits, valid, chunk_size, **options)

    return reduce_positions(per_position, valid, SEQUENCE_REDUCTIONS[reduction], denominator)
