"""Transformer-encoder distillation losses (Kim et al. 2022, KD for QAT of transformer encoders).

Kim, Lee, Kim, Yoo & Kim, "Understanding and Improving Knowledge Distillation
for Quantization-Aware Training of Large Transformer Encoders", EMNLP 2022:

* ``attention_map``: KL(teacher ‖ student) between the attention probabilities
  of one layer, per query row, averaged over the valid query rows and heads;
* ``attention_output``: MSE between the attention blocks' outputs (after the
  residual connection and LayerNorm);
* ``hidden_mse``: MSE between hidden states (the TernaryBERT baseline, Zhang et
  al. 2020).

Each compares ONE layer; callers (a layer map) average or sum over layers.

Signatures follow the feature losses (``fn(student, teacher, *, mask=None,
...)``, scalar result, batch first, teacher not detached: pass a detached
one). ``mask`` is ``None`` or a ``(B, L)`` bool / 0-1 tensor, nonzero = real
token. Numerics as in ``kdlab.losses.divergences``: inputs upcast to at least
float32 (float64 stays float64); masked-out entries are replaced by 0
(``torch.where``) before any arithmetic, so NaN/inf there reaches neither the
value nor the gradient; an all-padding batch gives 0, not NaN.

They are registered with ``loss_kind == "attention"`` (not ``"feature"``: they
compare token-level tensors of equal shape under a padding mask, which the
``distill`` method's feature terms do not pass); the ``qat_kd`` method calls
them per mapped layer. ``ATTENTION_LOSSES`` names them. (The registered
``attention_map`` is this one; ``kdlab.losses.attention_map`` stays the
spatial attention map of attention transfer, Zagoruyko & Komodakis.)
"""
from __future__ import annotations

import math
import numbers

import torch

from kdlab.errors import KdlabError
from kdlab.losses.divergences import _compute_dtype
from kdlab.registry import register

ATTENTION_LOSSES = ("attention_map", "attention_output", "hidden_mse")

_DEFAULT_EPS = 1e-12


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def _check_tensor(loss: str, role: str, x, *, ndim: int, expected: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise KdlabError(f"loss {loss}: {role} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise KdlabError(f"loss {loss}: {role} must be floating point, got dtype {x.dtype}")
    if x.ndim < ndim:
        raise KdlabError(f"loss {loss}: {role} has shape {tuple(x.shape)}; expected {expected}")


def _valid_tokens(loss: str, mask, batch: int, length: int, device) -> torch.Tensor | None:
    """``mask`` as a ``(B, L)`` bool tensor on ``device`` (nonzero = real token), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise KdlabError(f"loss {loss}: mask must be a tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, length):
        raise KdlabError(
            f"loss {loss}: mask shape {tuple(mask.shape)} != (batch, sequence length) {(batch, length)}; "
            "pass the (B, L) attention mask with 1 = real token"
        )
    valid = mask if mask.dtype == torch.bool else mask != 0
    return valid.to(device)


def _check_eps(loss: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and 0 < eps < 1):
        raise KdlabError(f"loss {loss}: eps must be a number in (0, 1), got {eps!r}")
    return float(eps)


# ---------------------------------------------------------------------------
# Attention-map KL
# ---------------------------------------------------------------------------


def _attention_log_probs(attn, valid, dtype, *, log_inputs: bool, eps: float) -> torch.Tensor:
    """Log attention probabilities renormalised over the valid keys; exactly 0 at masked-out entries.

    ``valid`` is None or a bool ``(B, 1, Lq, Lk)``: real query row AND real key.
    Masked-out entries are replaced before any arithmetic, so garbage there
    (NaN/inf included) reaches neither the value nor the gradient.
    """
    x = attn.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    if valid is not None:
        x = torch.where(valid, x, zero if log_inputs else torch.ones((), dtype=dtype, device=x.device))
    log_p = x if log_inputs else x.clamp_min(eps).log()
    if valid is None:
        return log_p
    # Renormalise each row over its valid keys: log p − logsumexp_{valid k} log p. Rows without any
    # valid entry (padded queries) take a finite dummy input (0s), so neither value nor gradient is NaN.
    row_has_valid = valid.any(dim=-1, keepdim=True)
    fill = torch.where(row_has_valid, torch.full((), -math.inf, dtype=dtype, device=x.device), zero)
    log_norm = torch.logsumexp(torch.where(valid, log_p, fill), dim=-1, keepdim=True)
    return torch.where(valid, log_p - log_norm, zero)


@register("loss", "attention_map")
def attention_map(student_attn, teacher_attn, *, mask=None, log_inputs: bool = False, eps: float = _DEFAULT_EPS,
                  reduction: str = "token"):
    """Attention-map KD: KL(teacher ‖ student) per attention row, mean over valid query rows and heads.

    Kim et al., EMNLP 2022 (attention-map loss, after TinyBERT/MiniLM): for one
    layer with attention probabilities ``s, t`` of shape ``(B, H, Lq, Lk)``
    (rows sum to 1, e.g. HF ``output_attentions=True``),

        L = (1 / (H · #valid rows)) Σ_{b, h, q valid} Σ_{k valid} t_bhqk (log t_bhqk − log s_bhqk),

    i.e. the mean over the valid ``(b, q)`` query positions of the whole batch
    and the heads (``reduction="token"``). ``reduction="sequence"`` is the
    official code's (``MarsJacobs/kd-qat-large-enc``, ``attnmap_distill``):
    per (b, h) the mean over that sequence's valid rows, then the mean over
    batch and heads; the two agree when every sequence has the same length.
    Sum or average over the mapped layers outside.

    Padding: ``mask`` ``(B, L)`` (1 = real token; self-attention, so
    ``Lq == Lk == L``). Padded query rows contribute nothing and are not
    counted; padded key columns are excluded and each row of both maps is
    RENORMALISED over the valid keys, so the value does not depend on what the
    model put at padded keys (0 from an additive mask, or anything else:
    NaN/inf there is cleaned with ``torch.where``). For maps that already put 0
    at padded keys the renormalisation changes nothing.

    Logs: with ``log_inputs=False`` (default) the inputs are probabilities and
    ``log(clamp_min(p, eps))`` is taken (default ``eps = 1e-12``; an exact 0 in
    the student map then costs ``t·(log t − log eps)``, finite; the gradient is
    0 below ``eps``). With ``log_inputs=True`` the inputs are log-probabilities
    (e.g. ``log_softmax`` of the attention scores), used as they are, and
    ``eps`` is ignored. The teacher weight is ``exp`` of its (renormalised)
    log-probabilities.

    Properties: 0 for identical maps, > 0 otherwise. Shapes must be equal
    (``KdlabError`` naming both head counts if the heads differ: map heads
    first). Dtype: at least float32. Teacher not detached.
    """
    loss = "attention_map"
    expected = "(B, H, Lq, Lk) attention probabilities"
    _check_tensor(loss, "student_attn", student_attn, ndim=4, expected=expected)
    _check_tensor(loss, "teacher_attn", teacher_attn, ndim=4, expected=expected)
    if student_attn.ndim != 4 or teacher_attn.ndim != 4:
        raise KdlabError(
            f"loss {loss}: expected 4-D {expected}, got student {tuple(student_attn.shape)} and teacher "
            f"{tuple(teacher_attn.shape)}; pass one layer at a time"
        )
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise KdlabError(
            f"loss {loss}: head counts differ (student {student_attn.shape[1]} heads, teacher "
            f"{teacher_attn.shape[1]} heads); attention maps are compared head by head, so pair models with "
            "equal head counts or average/select the teacher's heads first"
        )
    if student_attn.shape != teacher_attn.shape:
        raise KdlabError(
            f"loss {loss}: student shape {tuple(student_attn.shape)} != teacher shape "
            f"{tuple(teacher_attn.shape)}; both maps must come from the same batch and sequence length"
        )
    if not isinstance(log_inputs, bool):
        raise KdlabError(f"loss {loss}: log_inputs must be True or False, got {log_inputs!r}")
    if reduction not in ("token", "sequence"):
        raise KdlabError(f"loss {loss}: reduction must be 'token' or 'sequence', got {reduction!r}")
    eps = _check_eps(loss, eps)
    batch, heads, len_q, len_k = student_attn.shape
    dtype = _compute_dtype(student_attn, teacher_attn)
    valid = None
    if mask is not None:
        if len_q != len_k:
            raise KdlabError(
                f"loss {loss}: a (B, L) mask needs self-attention maps with Lq == Lk, got Lq {len_q}, Lk {len_k}"
            )
        valid = _valid_tokens(loss, mask, batch, len_q, student_attn.device)
    valid_entries = None if valid is None else (valid[:, None, :, None] & valid[:, None, None, :])
    log_s = _attention_log_probs(student_attn, valid_entries, dtype, log_inputs=log_inputs, eps=eps)
    log_t = _attention_log_probs(teacher_attn, valid_entries, dtype, log_inputs=log_inputs, eps=eps)
    # (B, H, Lq); masked-out entries have both logs 0, so t·(log t − log s) = 1·0 = 0 there.
    per_row = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    if valid is None:
        return per_row.mean()
    valid_rows = valid[:, None, :].expand(batch, heads, len_q)
    per_row = torch.where(valid_rows, per_row, torch.zeros((), dtype=dtype, device=per_row.device))
    if reduction == "sequence":
        lengths = valid.sum(dim=1)  # (B,)
        per_sequence = per_row.sum(dim=-1) / lengths.clamp(min=1)[:, None]  # (B, H)
        kept = lengths > 0  # an all-padding sequence has no rows to average
        return per_sequence[kept].sum() / (kept.sum().clamp(min=1) * heads)
    count = valid_rows.sum().clamp(min=1)
    return per_row.sum() / count


# ---------------------------------------------------------------------------
# Token-level MSE (attention output, hidden states)
# ---------------------------------------------------------------------------


def _masked_token_mse(loss: str, student, teacher, mask) -> torch.Tensor:
    expected = "(B, L, D) token features"
    _check_tensor(loss, "student", student, ndim=3, expected=expected)
    _check_tensor(loss, "teacher", teacher, ndim=3, expected=expected)
    if student.shape != teacher.shape:
        raise KdlabError(
            f"loss {loss}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}; "
            "map the student's hidden size to the teacher's first (an adapter) and compare equal lengths"
        )
    dtype = _compute_dtype(student, teacher)
    s = student.to(dtype).reshape(student.shape[0], student.shape[1], -1)
    t = teacher.to(dtype).reshape(s.shape)
    valid = _valid_tokens(loss, mask, s.shape[0], s.shape[1], s.device)
    if valid is None:
        return (s - t).square().mean()
    zero = torch.zeros((), dtype=dtype, device=s.device)
    keep = valid.unsqueeze(-1)
    s, t = torch.where(keep, s, zero), torch.where(keep, t, zero)
    count = valid.sum().clamp(min=1) * s.shape[-1]
    return (s - t).square().sum() / count


@register("loss", "attention_output")
def attention_output(student_out, teacher_out, *, mask=None):
    """Attention-output KD: MSE between the attention blocks' outputs after residual + LayerNorm.

    Kim et al., EMNLP 2022 (the attention-output loss, their best for large
    encoders): for one layer, ``mean over valid tokens and features of
    (s − t)²``, ``s, t`` of shape ``(B, L, D)`` (trailing dims beyond the
    third are flattened into the features). ``mask`` ``(B, L)``, 1 = real
    token: padded tokens are excluded from the sum and the count. Shapes must
    be equal. Dtype: at least float32. Teacher not detached.
    """
    return _masked_token_mse("attention_output", student_out, teacher_out, mask)


@register("loss", "hidden_mse")
def hidden_mse(student_hidden, teacher_hidden, *, mask=None):
    """Hidden-state KD (TernaryBERT baseline): MSE between transformer-layer outputs.

    Zhang et al., "TernaryBERT", EMNLP 2020 (the hidden-state term, as used by
    Kim et al. 2022): for one layer, ``mean over valid tokens and features of
    (s − t)²`` on ``(B, L, D)`` hidden states. Masking, shapes and dtype as in
    ``attention_output``.
    """
    return _masked_token_mse("hidden_mse", student_hidden, teacher_hidden, mask)


for _fn in (attention_map, attention_output, hidden_mse):
    _fn.loss_kind = "attention"
