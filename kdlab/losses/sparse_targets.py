"""Forward KL against sparse (cached) teacher targets: top-k with a tail bucket, and sampled tokens.

Offline distillation stores a few numbers per response token instead of the teacher's V
log-probabilities. Two targets, each with its loss here (pure functions; the cache itself, its
files and its verification are elsewhere):

* **Top-k with a tail bucket** (DistillKit / Megatron-LM style): the teacher's k most probable
  tokens with their log-probabilities, plus the remaining mass ``1 − Σ_topk p`` as ONE extra class.
  The loss is the KL between the two (k + 1)-class distributions: teacher (p_topk, p_tail) and
  student (q_topk, q_tail = 1 − Σ_topk q, the student's mass outside the teacher's top k):

      KL_k = Σ_{i ∈ topk} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail).

  With k = V the tail is empty and KL_k is the full forward KL. For k < V it is a lower bound
  (the data-processing inequality: merging classes) and its gradient is biased: inside the tail
  the student is only asked to match the total, not the shape.

* **Sampled tokens** (Random-Sampling KD, Anshumann et al., "Sparse Logit Sampling: Accelerating
  Knowledge Distillation in LLMs", ACL 2025, arXiv 2503.16870): K token ids i_1..i_K drawn with
  replacement from a proposal r (the teacher's own distribution, r = p, in the paper's default)
  and their teacher log-probabilities. With importance weights w_k = p(i_k) / r(i_k) (1 when
  r = p) the per-position estimate

      L̂ = (1/K) Σ_k w_k (log p(i_k) − log q(i_k))

  has E[L̂] = Σ_i p_i (log p_i − log q_i) = KL(p ‖ q), and its gradient with respect to the student
  logits, q̂·(1/K)Σ_k w_k − (1/K)Σ_k w_k e_{i_k}, has expectation q − p: the full forward KL's
  gradient (unbiased, the paper's point against top-k). With r = p the target is the empirical
  frequency count_i / K. (Proposal and weights as in the paper's importance-sampling estimator;
  only the abstract could be read here, the estimator is derived above and checked in the tests by
  exact enumeration of every sample.)

Shapes: student logits ``(..., V)`` (``(N, V)`` or ``(B, T, V)``), targets ``(..., k)``; ``mask``
``(...)`` (nonzero = counts). Reductions as ``kdlab.losses.sequence``: ``"token"`` (mean over the
valid positions), ``"sequence"`` (``(B, T)`` only: per-sequence mean, then mean over sequences) or
``"none"``. Computed in at least float32; no T² factor (``student_temperature`` divides the
student's logits; the teacher's temperature is the cache's business).
"""
from __future__ import annotations

import math

import torch

from kdlab.errors import KdlabError
from kdlab.losses.divergences import _compute_dtype, _valid_positions, reduce_positions

REDUCTIONS = {"token": "batchmean", "sequence": "sequence", "none": "none"}

__all__ = ["id_dtype", "load_sparse_targets", "sample_targets", "sampled_kl", "save_sparse_targets",
           "targets_to_torch", "topk_tail_kl", "topk_targets"]


def _error(name: str, message: str) -> KdlabError:
    return KdlabError(f"{name}: {message}")


def _check_student(name, logits, reduction, temperature):
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2 or not logits.is_floating_point():
        raise _error(name, "student_logits: expected a floating-point tensor (..., V)")
    if reduction not in REDUCTIONS:
        raise _error(name, f"unknown reduction {reduction!r}; use one of {', '.join(map(repr, REDUCTIONS))}")
    if reduction == "sequence" and logits.ndim != 3:
        raise _error(name, f"reduction 'sequence' needs (B, T, V) logits, got {tuple(logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise _error(name, f"student_temperature must be a finite number > 0, got {temperature!r}")


def _check_ids(name, ids, logits, what):
    vocab = logits.shape[-1]
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise _error(name, f"{what}: expected an integer tensor (..., k) of token ids")
    if tuple(ids.shape[:-1]) != tuple(logits.shape[:-1]):
        raise _error(name, f"{what} shape {tuple(ids.shape)} does not match the logits' positions "
                           f"{tuple(logits.shape[:-1])}")
    if ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
        raise _error(name, f"{what}: token ids must lie in [0, {vocab}); the cache was built for another vocabulary")


def _student_log_probs(logits, valid, temperature, dtype):
    logits = logits.to(dtype)
    if valid is not None:
        logits = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=dtype, device=logits.device))
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _finish(per_position, valid, reduction):
    return reduce_positions(per_position, valid, REDUCTIONS[reduction])


# ---------------------------------------------------------------------------
# Producing the targets (what a cache stores)
# ---------------------------------------------------------------------------


def topk_targets(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """(ids (..., k) int64, log p of those (..., k), log tail mass (...)) of the teacher at ``temperature``.

    The tail mass is taken as the log-sum-exp of the log-probabilities outside the top k (not
    1 − Σ, which cancels): −inf when k = V.
    """
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise KdlabError(f"top-k targets: k = {k!r} must be an integer in [1, {vocab}] (the vocabulary size); "
                         "lower k")
    log_p = torch.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / temperature, dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf"))
    return ids, values, torch.logsumexp(rest, dim=-1)


def sample_targets(teacher_logits: torch.Tensor, samples: int, *, generator: torch.Generator | None = None,
                   temperature: float = 1.0):
    """(ids (..., K) drawn with replacement from the teacher at ``temperature``, their log p (..., K))."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise KdlabError(f"sampled targets: K = {samples!r} must be an integer >= 1")
    log_p = torch.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / temperature, dim=-1)
    flat = log_p.reshape(-1, log_p.shape[-1])
    ids = torch.multinomial(flat.exp(), samples, replacement=True, generator=generator)
    ids = ids.reshape(*log_p.shape[:-1], samples)
    return ids, log_p.gather(-1, ids)


# ---------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------


def topk_tail_kl(student_logits, topk_ids, topk_log_probs, tail_log_mass=None, mask=None, *,
                 student_temperature=1.0, reduction="token"):
    """KL between the teacher's top-k + tail bucket and the student's mass on the same k + 1 classes.

    ``topk_ids`` (..., k) distinct token ids, ``topk_log_probs`` (..., k) the teacher's log p of
    them, ``tail_log_mass`` (...) log of the teacher's remaining mass (None: log(1 − Σ p_topk),
    clamped at 0 mass). An empty student tail (k = V) contributes 0, as does a zero teacher tail.
    """
    name = "top-k KL"
    _check_student(name, student_logits, reduction, student_temperature)
    _check_ids(name, topk_ids, student_logits, "topk_ids")
    if tuple(topk_log_probs.shape) != tuple(topk_ids.shape):
        raise _error(name, f"topk_log_probs shape {tuple(topk_log_probs.shape)} != topk_ids shape "
                           f"{tuple(topk_ids.shape)}")
    valid = _valid_positions(mask, student_logits.shape[:-1])
    dtype = _compute_dtype(student_logits, topk_log_probs)
    log_q = _student_log_probs(student_logits, valid, student_temperature, dtype)
    log_p = topk_log_probs.to(dtype)
    if valid is not None:
        log_p = torch.where(valid.unsqueeze(-1), log_p, torch.zeros((), dtype=dtype, device=log_p.device))
    ids = topk_ids.long()
    head = (log_p.exp() * (log_p - log_q.gather(-1, ids))).sum(dim=-1)
    if tail_log_mass is None:
        tail_log_mass = torch.log((-torch.expm1(torch.logsumexp(log_p, dim=-1))).clamp_min(0.0))
    tail_p = tail_log_mass.to(dtype)
    if valid is not None:  # masked-out rows: no tail (NaN there must reach no gradient)
        tail_p = torch.where(valid, tail_p, torch.full_like(tail_p, float("-inf")))
    # The student's tail: log-sum-exp over the ids outside the top k. Rows with an empty tail get a
    # finite stand-in before logsumexp (its backward would be NaN on all −inf) and contribute 0.
    outside = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, ids, False)
    empty = ~outside.any(dim=-1)
    safe = torch.where(outside | empty.unsqueeze(-1), log_q, torch.full_like(log_q, float("-inf")))
    tail_q = torch.logsumexp(safe, dim=-1)
    counts = ~empty & (tail_p > float("-inf"))
    safe_p = torch.where(counts, tail_p, torch.zeros_like(tail_p))
    tail = torch.where(counts, safe_p.exp() * (safe_p - tail_q), torch.zeros_like(tail_q))
    return _finish(head + tail, valid, reduction)


def sampled_kl(student_logits, sample_ids, sample_log_probs, mask=None, *, proposal_log_probs=None,
               student_temperature=1.0, reduction="token"):
    """The importance-sampled forward KL of K sampled tokens per position (unbiased; see the module docstring).

    ``sample_ids`` (..., K) drawn with replacement from the proposal, ``sample_log_probs`` (..., K)
    the teacher's log p of them, ``proposal_log_probs`` (..., K) the proposal's log r of them
    (None: the proposal is the teacher, all weights 1).
    """
    name = "sampled KL"
    _check_student(name, student_logits, reduction, student_temperature)
    _check_ids(name, sample_ids, student_logits, "sample_ids")
    for what, tensor in (("sample_log_probs", sample_log_probs), ("proposal_log_probs", proposal_log_probs)):
        if tensor is not None and tuple(tensor.shape) != tuple(sample_ids.shape):
            raise _error(name, f"{what} shape {tuple(tensor.shape)} != sample_ids shape {tuple(sample_ids.shape)}")
    valid = _valid_positions(mask, student_logits.shape[:-1])
    dtype = _compute_dtype(student_logits, sample_log_probs)
    log_q = _student_log_probs(student_logits, valid, student_temperature, dtype)
    log_p = sample_log_probs.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=log_p.device)
    if valid is not None:
        log_p = torch.where(valid.unsqueeze(-1), log_p, zero)
    terms = log_p - log_q.gather(-1, sample_ids.long())
    if proposal_log_probs is not None:
        log_r = proposal_log_probs.to(dtype)
        if valid is not None:
            log_r = torch.where(valid.unsqueeze(-1), log_r, zero)
        terms = terms * (log_p - log_r).exp()
    return _finish(terms.mean(dim=-1), valid, reduction)


# ---------------------------------------------------------------------------
# Compact storage (what an offline cache writes): ids uint16/int32, log-probabilities float16, memory-mapped
# ---------------------------------------------------------------------------

STORED = ("ids", "log_probs", "tail_log_mass")


def id_dtype(vocab_size: int):
    """numpy dtype of stored token ids: uint16 up to 65,536 tokens, else int32."""
    import numpy as np

    return np.uint16 if vocab_size <= 2**16 else np.int32


def save_sparse_targets(folder, ids: torch.Tensor, log_probs: torch.Tensor, tail_log_mass=None, *,
                        vocab_size: int) -> dict:
    """Write ids (``id_dtype``), log-probabilities and the tail log-mass (float16) as ``.npy`` files in ``folder``.

    Log-probabilities, not probabilities, are stored: float16 keeps about 3 significant digits of
    log p down to −65504 (p underflows float16 below 6e-8). Returns {name: bytes written}.
    """
    import numpy as np
    from pathlib import Path

    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise KdlabError(f"sparse targets: token ids must lie in [0, {vocab_size}); check vocab_size")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"ids": ids.cpu().numpy().astype(id_dtype(vocab_size)),
              "log_probs": log_probs.detach().cpu().numpy().astype(np.float16)}
    if tail_log_mass is not None:
        arrays["tail_log_mass"] = tail_log_mass.detach().cpu().numpy().astype(np.float16)
    written = {}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array, allow_pickle=False)
        written[name] = (folder / f"{name}.npy").stat().st_size
    return written


def load_sparse_targets(folder) -> dict:
    """The arrays ``save_sparse_targets`` wrote, memory-mapped read-only (rows are read on access)."""
    import numpy as np
    from pathlib import Path

    folder = Path(folder)
    if not (folder / "ids.npy").exists():
        raise KdlabError(f"sparse targets: no ids.npy in {str(folder)!r}; build the cache first")
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in STORED if (folder / f"{name}.npy").exists()}


def targets_to_torch(stored: dict, rows, *, device=None) -> dict:
    """Rows ``rows`` (an index or slice over the first dimension) of loaded targets as tensors:
    ids int64, log-probabilities and tail log-mass float32 (the losses upcast further as needed)."""
    import numpy as np

    out = {"ids": torch.from_numpy(np.asarray(stored["ids"][rows]).astype(np.int64))}
    for name in ("log_probs", "tail_log_mass"):
        if name in stored:
            out[name] = torch.from_numpy(np.asarray(stored[name][rows]).astype(np.float32))
    return {name: value.to(device) for name, value in out.items()} if device is not None else out
