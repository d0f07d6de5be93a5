"""The sequence divergence fused with the student's output layer: no (B, T, V) student tensor, ever.

``fused_sequence_divergence(hidden, weight, ...)`` takes the student's last hidden states
``(B, T, H)`` (the output layer's input) and that layer's weight ``(V, H)`` (+ bias ``(V,)``) instead
of its logits, and the teacher's logits ``(B, T, V)`` or its hidden states + output layer, and
returns the same loss as ``kdlab.losses.sequence.sequence_divergence`` on ``hidden @ weight.T + bias``
(every divergence of the family, both temperatures, the mask, the "token"/"sequence" reductions
and the micro-batch ``denominator``), plus ``"ce"`` (next-token cross-entropy against ``labels``,
as ``kdlab.methods.scratch.sequence_cross_entropy``; no temperature).

How (the approach of Liger-Kernel's fused linear JSD, ``liger_kernel/ops/fused_linear_jsd.py``,
in plain PyTorch so it runs on the CPU and on GPUs): the B·T token rows are taken ``chunk_size``
at a time; per chunk the forward projects the logits, takes the per-position divergence (the
family's own ``divergence_per_position``, so the values are those of the unfused path) and its
gradient with respect to the student logits in closed form (``_grad_log_q`` below: dD/d log q,
then through the log-softmax), and immediately turns that into the chunk's gradient with respect
to the hidden states and accumulates the one with respect to the weight (and bias). Only those
gradients (the size of the inputs) outlive the chunk; the backward multiplies them by the
incoming scalar gradient. The reduction's per-position weights are known from the mask before
any logit is formed (``_position_weights``: the derivative of ``reduce_positions``, linear in the
per-position values), which is what lets the forward compute the gradient.

Why not recompute the projection per chunk in the backward instead: that costs a fourth matmul
with the (V, H) weight and a second pass over the divergence (about 1.3× the work of the
unfused step) for no memory gain: both designs hold one (V, H) weight gradient, which any
training step must produce anyway. The price of computing the gradient in the forward: it is
spent even if no backward follows (skipped when no input requires grad or grad mode is off);
a second backward through a retained graph recomputes them.

The teacher is a constant: no gradient reaches its logits, hidden states or weight. Masked-out
positions get weight 0, their hidden states and teacher logits are replaced by 0 (``where``)
first, so NaN/inf there reaches neither the value nor any gradient (as in the unfused path).
Dtypes: logits are formed in the matmul dtype (the autocast dtype under autocast, else the
promoted dtype of hidden states and weight), the divergence in at least float32 (float64 stays
float64), the weight gradient is accumulated in that compute dtype and returned in the weight's.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kdlab.losses.divergences import divergence_per_position, reduce_positions
from kdlab.losses.sequence import (DIVERGENCES, FAMILY_MEMBERS, SEQUENCE_REDUCTIONS, SequenceDivergenceError,
                                   _check_denominator)
from kdlab.losses import sequence as _sequence

FUSED_DIVERGENCES = DIVERGENCES + ("ce",)
# Default chunk: this many bytes of float32 logits per chunk (16 MiB: 32 tokens at V = 131,072). A chunk
# holds a handful of such (chunk, V) temporaries; bigger chunks add memory, smaller ones add passes over
# the (V, H) weight gradient (one rank-chunk update each).
CHUNK_BYTES = 16 * 2**20

__all__ = ["CHUNK_BYTES", "FUSED_DIVERGENCES", "default_chunk_rows", "fused_sequence_divergence"]


def _error(message: str) -> SequenceDivergenceError:
    return SequenceDivergenceError(f"fused_sequence_divergence: {message}")


def default_chunk_rows(vocab_size: int, rows: int) -> int:
    """Token rows per chunk when ``chunk_size`` is None: ``CHUNK_BYTES`` of float32 logits, at least 1."""
    return max(1, min(rows, CHUNK_BYTES // (4 * max(vocab_size, 1))))


# ---------------------------------------------------------------------------
# Closed-form gradients: dD/d(log q) per family member, q the student distribution
# ---------------------------------------------------------------------------


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor that broadcasts (a full (chunk, V) tensor of one value would cost a pass to fill)."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _grad_log_q(name: str, log_p: torch.Tensor, log_q: torch.Tensor, *, beta: float = 0.5, scaled: bool = False,
                kl_at_ends: bool = False, skew: float = 0.1, reverse: bool = False) -> torch.Tensor:
    """∂D/∂(log q_c) of ``divergence_per_position(name, log_p, log_q, ...)`` (same options), shape of log_q.

    With q = exp(log q) and the mixtures in log space as in the values:

    * KL(P‖Q) = Σ p (log p − log q):            −p
    * KL(Q‖P) = Σ q (log q − log p):            q (log q − log p + 1)
    * JSD(β) = β KL(P‖M) + (1−β) KL(Q‖M):        (1−β) q (log q − log M)   (÷ β(1−β) when scaled)
    * TVD = ½ Σ |p − q|:                         ½ q sign(q − p)   (0 where p = q, as autograd's abs)
    * KL(P ‖ αP + (1−α)Q):                       −(1−α) p · q / M
    * KL(Q ‖ αQ + (1−α)P):                       q (log q − log M + 1 − α q / M)
    """
    if name == "kl" or (name == "generalized_jsd" and (kl_at_ends or scaled) and beta == 0.0):
        return -log_p.exp()
    if name == "reverse_kl" or (name == "generalized_jsd" and (kl_at_ends or scaled) and beta == 1.0):
        return log_q.exp() * (log_q - log_p + 1.0)
    if name == "generalized_jsd":
        if beta in (0.0, 1.0):  # unscaled ends: the value is identically 0
            return torch.zeros_like(log_q)
        # log(M/Q) = logaddexp(log β + log P − log Q, log(1 − β)), as the value computes it
        log_m_over_q = torch.logaddexp(log_p - log_q + math.log(beta), _scalar(math.log1p(-beta), log_q))
        factor = 1.0 / beta if scaled else 1.0 - beta
        return log_q.exp() * log_m_over_q * (-factor)
    if name == "tvd":
        q = log_q.exp()
        return 0.5 * q * torch.sign(q - log_p.exp())
    if name == "skew_kl":
        if skew == 0.0:
            return _grad_log_q("reverse_kl" if reverse else "kl", log_p, log_q)
        if skew == 1.0:
            return torch.zeros_like(log_q)
        if not reverse:  # M = αP + (1−α)Q; log(M/Q) = logaddexp(log α + log P − log Q, log(1 − α))
            log_m_over_q = torch.logaddexp(log_p - log_q + math.log(skew), _scalar(math.log1p(-skew), log_q))
            return -(1.0 - skew) * log_p.exp() * torch.exp(-log_m_over_q)
        # M = αQ + (1−α)P; log(M/Q) = logaddexp(log α, log(1 − α) + log P − log Q)
        log_m_over_q = torch.logaddexp(_scalar(math.log(skew), log_q), log_p - log_q + math.log1p(-skew))
        return log_q.exp() * (1.0 - log_m_over_q - skew * torch.exp(-log_m_over_q))
    raise _error(f"no gradient for divergence {name!r}")


# ---------------------------------------------------------------------------
# The chunked computation
# ---------------------------------------------------------------------------


def _position_weights(valid, shape, reduction, denominator, dtype, device) -> torch.Tensor:
    """d loss / d (per-position value): the reduction is linear, so these weights are its gradient."""
    probe = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
    with torch.enable_grad():
        total = reduce_positions(probe, valid, SEQUENCE_REDUCTIONS[reduction], denominator)
        (weights,) = torch.autograd.grad(total, probe)
    return weights


class _Plan:
    """What one call computes, besides the student's tensors (those are the Function's inputs)."""

    def __init__(self, *, divergence, options, student_temperature, teacher_temperature, valid, labels, weights,
                 teacher_logits, teacher_hidden, teacher_weight, teacher_bias, chunk_rows, compute_dtype):
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def teacher_rows(self, start: int, stop: int) -> torch.Tensor:
        """The teacher's logits of token rows [start, stop), in the compute dtype (no grad)."""
        if self.teacher_logits is not None:
            rows = self.teacher_logits.reshape(-1, self.teacher_logits.shape[-1])[start:stop]
        else:
            hidden = self.teacher_hidden.reshape(-1, self.teacher_hidden.shape[-1])[start:stop]
            if self.valid is not None:
                hidden = torch.where(self.valid[start:stop, None], hidden, torch.zeros((), dtype=hidden.dtype,
                                                                                        device=hidden.device))
            rows = F.linear(hidden, self.teacher_weight, self.teacher_bias)
        rows = rows.detach().to(self.compute_dtype)
        if self.valid is not None:
            rows = torch.where(self.valid[start:stop, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        return rows

    def run(self, hidden: torch.Tensor, weight: torch.Tensor, bias, need):
        """(per-position values (B·T,), grad hidden, grad weight, grad bias); gradients only where ``need``."""
        rows, width = hidden.shape[0], hidden.shape[-1]
        dtype, valid = self.compute_dtype, self.valid
        autocast = torch.is_autocast_enabled(hidden.device.type)
        mm_dtype = (torch.get_autocast_dtype(hidden.device.type) if autocast
                    else torch.promote_types(hidden.dtype, weight.dtype))
        w_mm = weight.detach().to(mm_dtype)  # one (V, H) cast at most, never per chunk
        b_mm = None if bias is None else bias.detach().to(mm_dtype)
        values = torch.zeros(rows, dtype=dtype, device=hidden.device)
        grad_hidden = torch.zeros(rows, width, dtype=hidden.dtype, device=hidden.device) if need[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need[2] else None
        any_grad = need[0] or need[1] or need[2]
        zero = torch.zeros((), dtype=mm_dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            for start in range(0, rows, self.chunk_rows):
                stop = min(start + self.chunk_rows, rows)
                h = hidden[start:stop].detach().to(mm_dtype)
                if valid is not None:
                    h = torch.where(valid[start:stop, None], h, zero)
                logits = F.linear(h, w_mm, b_mm).to(dtype)
                if self.divergence == "ce":
                    log_q = torch.log_softmax(logits, dim=-1)
                    del logits
                    targets = self.labels[start:stop, None]
                    values[start:stop] = -log_q.gather(-1, targets).squeeze(-1)
                    if not any_grad:
                        continue
                    grad = log_q.exp_()  # softmax − onehot
                    grad.scatter_add_(-1, targets, torch.full_like(targets, -1, dtype=dtype))
                else:
                    if self.student_temperature != 1.0:
                        logits = logits.div_(self.student_temperature)
                    log_q = torch.log_softmax(logits, dim=-1)
                    del logits
                    teacher = self.teacher_rows(start, stop)
                    if self.teacher_temperature != 1.0:
                        teacher = teacher / self.teacher_temperature  # may be a view of the caller's logits
                    log_p = torch.log_softmax(teacher, dim=-1)
                    del teacher
                    name, options = self.options
                    values[start:stop] = divergence_per_position(name, log_p, log_q, **options)
                    if not any_grad:
                        continue
                    grad = _grad_log_q(name, log_p, log_q, **options)  # dD / d log q
                    del log_p
                    # through log-softmax: dD/dz = G − q·ΣG, then ÷ τ_s (z = logits / τ_s)
                    grad.addcmul_(log_q.exp_(), grad.sum(dim=-1, keepdim=True), value=-1.0)
                del log_q
                scale = self.weights[start:stop]
                if self.divergence != "ce" and self.student_temperature != 1.0:
                    scale = scale / self.student_temperature
                grad.mul_(scale[:, None])
                if need[2]:
                    grad_bias += grad.sum(dim=0)
                grad = grad.to(mm_dtype)
                if need[0]:
                    grad_hidden[start:stop] = (grad @ w_mm).to(hidden.dtype)
                if need[1]:
                    grad_weight.addmm_(grad.t().to(dtype), h.to(dtype))  # .to: a no-op unless autocast
                del grad, h
        if valid is not None:  # the unfused path forces 0 at masked positions
            values = torch.where(valid, values, torch.zeros((), dtype=dtype, device=values.device))
        return values, grad_hidden, grad_weight, grad_bias


class _FusedDivergence(torch.autograd.Function):
    """loss = reduction(D(hidden @ weight.T + bias)); the gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan, reduce):
        need = tuple(ctx.needs_input_grad[:3])
        values, grad_hidden, grad_weight, grad_bias = plan.run(hidden, weight, bias, need)
        ctx.grads, ctx.plan, ctx.need = (grad_hidden, grad_weight, grad_bias), plan, need
        ctx.save_for_backward(hidden, weight, bias)  # references only: for a second backward (rare)
        return reduce(values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None  # handed over once: scaled in place, no second (V, H) buffer
        if grads is None:  # a second backward through a retained graph: recompute them
            hidden, weight, bias = ctx.saved_tensors
            grads = ctx.plan.run(hidden, weight, bias, ctx.need)[1:]
        hidden, weight, bias = ctx.saved_tensors
        out = []
        for grad, like in zip(grads, (hidden, weight, bias)):
            if grad is not None:
                grad = grad.mul_(grad_output.to(grad.dtype)).to(like.dtype)
            out.append(grad)
        return (*out, None, None)


# ---------------------------------------------------------------------------
# Checks and the entry point
# ---------------------------------------------------------------------------


def _check_float(name: str, tensor, ndim: int):
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim or not tensor.is_floating_point():
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise _error(f"{name}: expected a floating-point tensor with {ndim} dimensions, got {shape}")


def _check_layer(prefix: str, hidden, weight, bias) -> int:
    _check_float(f"{prefix}_hidden", hidden, 3)
    _check_float(f"{prefix}_weight", weight, 2)
    if weight.shape[1] != hidden.shape[-1]:
        raise _error(f"{prefix}_weight shape {tuple(weight.shape)} does not match the hidden width "
                     f"{hidden.shape[-1]}; pass the output layer's (V, H) weight")
    if bias is not None:
        _check_float(f"{prefix}_bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise _error(f"{prefix}_bias has {bias.shape[0]} entries for a vocabulary of {weight.shape[0]}")
    return weight.shape[0]


def fused_sequence_divergence(student_hidden, student_weight, teacher_logits=None, mask=None, *, student_bias=None,
                              teacher_hidden=None, teacher_weight=None, teacher_bias=None, labels=None,
                              divergence="forward_kl", beta=0.5, scaled=False, skew=0.1, student_temperature=1.0,
                              teacher_temperature=1.0, reduction="token", denominator=None, chunk_size=None):
    """``sequence_divergence(student_hidden @ student_weight.T + student_bias, teacher logits, mask, ...)``,
    computed ``chunk_size`` token rows at a time (None: ``default_chunk_rows``), never holding (B, T, V).

    ``student_hidden`` ``(B, T, H)`` aligned with the teacher's positions (position t predicts the
    same next token for both); ``student_weight`` ``(V, H)``, ``student_bias`` ``(V,)`` or None. The
    teacher: ``teacher_logits`` ``(B, T, V)``, or ``teacher_hidden`` ``(B, T, H_t)`` + ``teacher_weight``
    ``(V, H_t)`` (+ ``teacher_bias``), a constant either way. ``divergence="ce"`` needs ``labels``
    ``(B, T)`` (the next token at each position; masked-out ones may be anything) and no teacher.
    Every other argument is ``sequence_divergence``'s, with the same meaning and checks.
    """
    _sequence._check_reduction(reduction)
    if divergence not in FUSED_DIVERGENCES:
        raise _error(f"unknown divergence {divergence!r}; use one of {', '.join(map(repr, FUSED_DIVERGENCES))}")
    vocab = _check_layer("student", student_hidden, student_weight, student_bias)
    batch, length = student_hidden.shape[:2]
    if divergence == "ce":
        if labels is None or not isinstance(labels, torch.Tensor) or labels.is_floating_point() \
                or tuple(labels.shape) != (batch, length):
            raise _error(f"divergence 'ce' needs labels: an integer (B, T) = {(batch, length)} tensor of next tokens")
    elif teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise _error("give the teacher's logits or its hidden states + weight, not both")
        _check_float("teacher_logits", teacher_logits, 3)
        if tuple(teacher_logits.shape) != (batch, length, vocab):
            raise _error(f"teacher_logits shape {tuple(teacher_logits.shape)} != (B, T, V) = {(batch, length, vocab)}"
                         " of the student's hidden states and weight; teacher and student must share the vocabulary")
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise _error("no teacher: pass teacher_logits (B, T, V), or teacher_hidden and teacher_weight")
        if _check_layer("teacher", teacher_hidden, teacher_weight, teacher_bias) != vocab \
                or tuple(teacher_hidden.shape[:2]) != (batch, length):
            raise _error(f"teacher hidden states {tuple(teacher_hidden.shape)} / weight {tuple(teacher_weight.shape)}"
                         f" do not match the student's (B, T) = {(batch, length)} and vocabulary {vocab}")
    valid = _sequence._check_mask(mask, (batch, length))
    beta, skew = _sequence._check_beta(beta), _sequence._check_skew(skew)
    student_temperature = _sequence._check_temperature("student_temperature", student_temperature)
    teacher_temperature = _sequence._check_temperature("teacher_temperature", teacher_temperature)
    denominator = _check_denominator(denominator)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise _error(f"chunk_size must be None or an integer >= 1 (token rows per chunk), got {chunk_size!r}")

    device = student_hidden.device
    teacher_tensors = [t for t in (teacher_logits, teacher_hidden, teacher_weight) if t is not None]
    dtype = torch.promote_types(torch.float32, student_hidden.dtype)
    for tensor in (student_weight, *teacher_tensors):
        dtype = torch.promote_types(dtype, tensor.dtype)
    if valid is not None:
        valid = valid.to(device)
    rows = batch * length
    flat_valid = None if valid is None else valid.reshape(rows)
    weights = _position_weights(valid, (batch, length), reduction, denominator, dtype, device).reshape(rows)
    flat_labels = None
    if divergence == "ce":
        flat_labels = labels.reshape(rows).long().to(device)
        if flat_valid is not None:
            flat_labels = torch.where(flat_valid, flat_labels, torch.zeros_like(flat_labels))
    options = None
    if divergence != "ce":
        name, fixed = FAMILY_MEMBERS[divergence]
        options = (name, dict(beta=beta, scaled=bool(scaled), skew=skew, **fixed))
    plan = _Plan(divergence=divergence, options=options, student_temperature=student_temperature,
                 teacher_temperature=teacher_temperature, valid=flat_valid, labels=flat_labels, weights=weights,
                 teacher_logits=teacher_logits, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                 teacher_bias=teacher_bias, compute_dtype=dtype,
                 chunk_rows=int(chunk_size) if chunk_size is not None else default_chunk_rows(vocab, rows))

    def reduce(values):
        return reduce_positions(values.reshape(batch, length), valid, SEQUENCE_REDUCTIONS[reduction], denominator)

    hidden = student_hidden.reshape(rows, student_hidden.shape[-1])
    if not torch.is_grad_enabled():  # evaluation: values only (the Function would still see requires_grad)
        return reduce(plan.run(hidden, student_weight, student_bias, (False, False, False))[0])
    return _FusedDivergence.apply(hidden, student_weight, student_bias, plan, reduce)
