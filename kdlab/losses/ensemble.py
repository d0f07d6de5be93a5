"""Multi-teacher distillation: combining K teachers' logits into one target distribution.

    probs = combine_teacher_probs(member_logits, rule="entropy", temperature=4.0)    # (N, C)
    w = teacher_weights(member_logits, rule="entropy", temperature=4.0)              # (N, K), rows sum to 1
    loss = multi_teacher_kl(student_logits, member_logits, rule="mean_probs", temperature=4.0)

``member_logits`` is a sequence of K tensors ``(N, C)`` or one ``(K, N, C)``
tensor; ``p_k = softmax(z_k / T)`` is teacher k's distribution at temperature T.

Rules (``w_{k,i}`` is teacher k's weight on sample i; every row sums to 1):

* ``"fixed"``: ``p̄ = Σ_k w_k p_k`` with user weights ``w`` (K non-negative
  numbers, not all 0), normalised to sum 1. The classic weighted ensemble target.
* ``"mean_probs"``: ``p̄ = (1/K) Σ_k p_k``, the average of the teachers'
  probabilities: the "arithmetic mean of their individual predictive
  distributions" that Hinton, Vinyals & Dean (2015), §1, name as the soft
  targets of an ensemble teacher.
* ``"mean_logits"``: ``p̄ = softmax((1/K) Σ_k z_k / T)``, logits averaged first.
  This is the normalised *geometric* mean of the ``p_k``, the other mean
  Hinton et al. (2015), §1, name; it is not a mixture, so ``teacher_weights`` reports the
  logit-averaging weights 1/K.
* ``"entropy"`` (label-free): ``w_{k,i} = softmax_k(−H(p_{k,i}) / τ_w)``,
  where ``H(p) = −Σ_c p_c log p_c`` is the entropy (in nats) of teacher k's
  distribution *at the distillation temperature T* and ``τ_w > 0`` is
  ``weight_temperature``; then ``p̄_i = Σ_k w_{k,i} p_{k,i}``. The more
  confident (lower-entropy) teacher weighs more; ``τ_w → ∞`` gives
  ``"mean_probs"``, ``τ_w → 0`` picks the most confident teacher per sample.
  This is our label-free counterpart of ``"confidence"`` below, with the
  teacher's cross-entropy to the label replaced by its cross-entropy to its own
  prediction (its entropy): for K = 2, CA-MKD's ``(1 − softmax_k(L_k))/(K−1)``
  equals ``softmax_k(−L_k)`` exactly, so with ``τ_w = 1`` this is CA-MKD's
  weighting with ``L_k = H(p_k)``. Entropy-based teacher weighting itself is
  the idea of Kwon, Na, Lee & Kim, "Adaptive Knowledge Distillation Based on
  Entropy" (ICASSP 2020, "EBKD"), whose form, as reimplemented as a baseline
  in the CA-MKD code, is ``(1 − H_k / Σ_j H_j)/(K−1)`` on T = 1 entropies; the
  softmax form here is not theirs (it is tunable through τ_w and lets a
  confident teacher take more than 1/(K−1) of the weight when K > 2).
* ``"confidence"`` (needs ``labels``): CA-MKD, Zhang, Chen & Wang,
  "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022
  (arXiv 2201.00007), Eq. 2 and the official code (``train_student.py``,
  ``ensemble_method == 'CAMKD'``): per sample,
  ``L_{k,i} = −log softmax(z_{k,i})[y_i]`` (teacher k's cross-entropy with the
  label at T = 1, as in the code) and ``w_{k,i} = (1 − softmax_k(L_{k,i})) / (K − 1)``;
  the teacher closer to the label weighs more. K = 1 gives weight 1.

CA-MKD (and EBKD) weigh per-teacher KL terms, ``Σ_k w_k KL(p_k ‖ q)``, where
``multi_teacher_kl`` takes ``KL(p̄ ‖ q)`` of the weighted mixture ``p̄``. The two
differ by ``H(p̄) − Σ_k w_k H(p_k)``, which does not involve the student ``q``,
so (with teacher weights that do not depend on the student, as here) their
gradients with respect to the student are identical; only the logged value
differs. (The CA-MKD code further divides its sum by K.)

Numerics: computed in at least float32 (float64 stays float64); mixtures are
formed in log space, ``log p̄ = logsumexp_k(log w_k + log p_k)``, clamped
below to the dtype's most negative finite value, so no ``log 0`` is taken and
``0·log 0`` is 0; the CA-MKD weights use ``log(1 − softmax_k(L))`` =
``logsumexp_{j≠k} log_softmax(L)_j``, finite even when a weight underflows.
All functions are differentiable in every logit (teacher logits are usually
detached by the caller).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from kdlab.errors import KdlabError
from kdlab.losses.divergences import (
    _check_labels,
    _check_reduction,
    _check_temperature,
    _clean_labels,
    _compute_dtype,
    _kl_per_position,
    _reduce,
)

RULES = ("fixed", "mean_probs", "mean_logits", "entropy", "confidence")


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def _check_rule(rule) -> None:
    if rule not in RULES:
        raise KdlabError(f"teacher combination rule: unknown value {rule!r}; use one of "
                         f"{', '.join(repr(r) for r in RULES)}")


def _members(member_logits) -> list[torch.Tensor]:
    """The K member logit tensors, checked: each floating, (N, C), all the same shape."""
    if isinstance(member_logits, torch.Tensor):
        if member_logits.ndim != 3:
            raise KdlabError(f"member_logits: expected a (K, N, C) tensor or a sequence of K (N, C) tensors, "
                             f"got a tensor of shape {tuple(member_logits.shape)}")
        members = list(member_logits.unbind(0))
    elif isinstance(member_logits, Sequence) and not isinstance(member_logits, str):
        members = list(member_logits)
    else:
        raise KdlabError(f"member_logits: expected a sequence of K (N, C) tensors, got {type(member_logits).__name__}")
    if not members:
        raise KdlabError("member_logits: got no teachers; pass at least one (N, C) logit tensor")
    for k, z in enumerate(members):
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim != 2:
            what = f"shape {tuple(z.shape)}, dtype {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise KdlabError(f"member_logits[{k}]: expected floating-point logits of shape (N, C), got {what}")
        if z.shape != members[0].shape:
            raise KdlabError(f"member_logits[{k}]: shape {tuple(z.shape)} != member 0's {tuple(members[0].shape)}; "
                             "every teacher must give (N, C) logits over the same classes for the same batch")
    return members


def fixed_weights(weights, num_teachers: int) -> list[float]:
    """User weights checked (K finite numbers ≥ 0, not all 0) and normalised to sum 1."""
    if weights is None:
        raise KdlabError(f"teacher weights: rule 'fixed' needs weights, one per teacher ({num_teachers}), "
                         "e.g. weights: [0.5, 0.5]")
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().reshape(-1).tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise KdlabError(f"teacher weights: expected a list of {num_teachers} numbers, got {weights!r}")
    values = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise KdlabError(f"teacher weights: expected finite numbers, got {list(weights)!r}")
        values.append(float(w))
    if len(values) != num_teachers:
        raise KdlabError(f"teacher weights: got {len(values)} weights for {num_teachers} teachers; "
                         "give one weight per teacher")
    if any(w < 0 for w in values):
        raise KdlabError(f"teacher weights: must be ≥ 0, got {values}")
    total = sum(values)
    if total <= 0:
        raise KdlabError(f"teacher weights: must not all be 0, got {values}")
    return [w / total for w in values]


def check_rule_options(rule, *, num_teachers: int, weights=None, weight_temperature=1.0) -> None:
    """Validate a rule and its options before any batch (used by the multi_teacher method at build)."""
    _check_rule(rule)
    if rule == "fixed":
        fixed_weights(weights, num_teachers)
    elif weights is not None:
        raise KdlabError(f"teacher weights: only rule 'fixed' takes weights, but the rule is {rule!r}; "
                         "remove the weights or use rule: fixed")
    if isinstance(weight_temperature, bool) or not isinstance(weight_temperature, numbers.Real) \
            or not (math.isfinite(weight_temperature) and weight_temperature > 0):
        raise KdlabError(f"teacher weight_temperature: must be a finite number > 0, got {weight_temperature!r}")


# ---------------------------------------------------------------------------
# The combination
# ---------------------------------------------------------------------------


def _log_weights(log_p: torch.Tensor, raw: torch.Tensor, *, rule, weights, labels, weight_temperature) -> torch.Tensor:
    """log w, shape (K, N): the mixture weights of ``rule`` (every column sums to 1).

    ``log_p`` is (K, N, C) = log_softmax(z_k / T); ``raw`` the (K, N, C) logits in the compute dtype.
    """
    num_teachers, n = log_p.shape[:2]
    if rule == "fixed":
        w = torch.tensor(fixed_weights(weights, num_teachers), dtype=log_p.dtype, device=log_p.device)
        return w.log().unsqueeze(1).expand(num_teachers, n)  # log 0 = −inf: that teacher drops out
    if rule in ("mean_probs", "mean_logits"):
        return torch.full((num_teachers, n), -math.log(num_teachers), dtype=log_p.dtype, device=log_p.device)
    if rule == "entropy":
        entropy = -_kl_per_position(log_p, torch.zeros_like(log_p))  # −Σ_c p_c log p_c, 0·log 0 = 0
        return torch.log_softmax(-entropy / weight_temperature, dim=0)
    # "confidence" (CA-MKD): L_k = CE(softmax(z_k), y) at T = 1; w_k = (1 − softmax_k(L_k)) / (K − 1).
    if labels is None:
        raise KdlabError("teacher combination rule 'confidence' needs the labels: pass labels=")
    _check_labels(labels, raw[0])
    if labels.device.type == "cpu":  # as cross_entropy: no per-step device sync on an accelerator
        _clean_labels(labels, None, raw.shape[-1])
    labels = labels.long()
    log_p1 = torch.log_softmax(raw, dim=-1)
    ce = -log_p1.gather(-1, labels.view(1, n, 1).expand(num_teachers, n, 1)).squeeze(-1)  # (K, N)
    if num_teachers == 1:
        return torch.zeros_like(ce)
    log_s = torch.log_softmax(ce, dim=0)
    # log(1 − s_k) = log Σ_{j≠k} s_j: a logsumexp with teacher k masked out, finite even when s_k → 1.
    eye = torch.eye(num_teachers, dtype=torch.bool, device=ce.device).unsqueeze(-1)  # (K, K, 1)
    others = log_s.unsqueeze(0).masked_fill(eye, -math.inf)  # [k, j, i] = log s_{j,i} for j ≠ k
    return torch.logsumexp(others, dim=1) - math.log(num_teachers - 1)


def _combine(member_logits, *, rule, weights, temperature, labels, weight_temperature):
    """(log p̄ (N, C), w (N, K)) in the compute dtype."""
    _check_rule(rule)
    _check_temperature(temperature)
    members = _members(member_logits)
    check_rule_options(rule, num_teachers=len(members), weights=weights, weight_temperature=weight_temperature)
    dtype = _compute_dtype(*members)
    raw = torch.stack([z.to(dtype) for z in members])  # (K, N, C)
    log_p = torch.log_softmax(raw / temperature, dim=-1)
    log_w = _log_weights(log_p, raw, rule=rule, weights=weights, labels=labels, weight_temperature=weight_temperature)
    if rule == "mean_logits":
        log_mix = torch.log_softmax(raw.mean(dim=0) / temperature, dim=-1)
    else:
        log_mix = torch.logsumexp(log_w.unsqueeze(-1) + log_p, dim=0)
    log_mix = log_mix.clamp(min=torch.finfo(dtype).min)  # never −inf: exp gives 0 and 0·(finite) = 0
    return log_mix, log_w.exp().transpose(0, 1)


def combine_teacher_probs(member_logits, *, rule, weights=None, temperature=1.0, labels=None,
                          weight_temperature=1.0) -> torch.Tensor:
    """The K teachers' combined target distribution ``p̄`` at temperature T, shape (N, C).

    ``rule``: ``"fixed"`` (needs ``weights``, one per teacher), ``"mean_probs"``,
    ``"mean_logits"``, ``"entropy"`` (sharpness ``weight_temperature``) or
    ``"confidence"`` (needs ``labels``, (N,) class indices); see the module
    docstring for the formulas and their sources. Rows sum to 1. ``labels`` is
    ignored by every rule except ``"confidence"``.
    """
    log_mix, _ = _combine(member_logits, rule=rule, weights=weights, temperature=temperature, labels=labels,
                          weight_temperature=weight_temperature)
    return log_mix.exp()


def teacher_weights(member_logits, *, rule, weights=None, temperature=1.0, labels=None,
                    weight_temperature=1.0) -> torch.Tensor:
    """Each teacher's weight on each sample, shape (N, K), rows summing to 1 (for logging).

    The mixture weights of ``p̄ = Σ_k w_{k,i} p_{k,i}``; for ``"mean_logits"``,
    which averages logits instead, the logit-averaging weights 1/K.
    """
    _, w = _combine(member_logits, rule=rule, weights=weights, temperature=temperature, labels=labels,
                    weight_temperature=weight_temperature)
    return w


def multi_teacher_kl(student_logits, member_logits, *, rule, weights=None, temperature=1.0, labels=None,
                     weight_temperature=1.0, reduction="batchmean") -> torch.Tensor:
    """T² · KL(p̄ ‖ softmax(z_s / T)), the combined teachers' target against the student.

    ``p̄`` is ``combine_teacher_probs(member_logits, rule=..., ...)``; the T²
    factor is Hinton et al. (2015) §2's, as in ``kdlab.losses.kl``, which this
    equals for one teacher under every rule (K = 1). Student logits ``(N, C)``,
    the same shape as each member's. Reduction ``"batchmean"`` (mean over the
    N samples), ``"sum"`` or ``"none"`` (shape (N,)). Computed on
    log-probabilities (see the module docstring), in at least float32.
    """
    _check_reduction(reduction)
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point() \
            or student_logits.ndim != 2:
        what = (f"shape {tuple(student_logits.shape)}, dtype {student_logits.dtype}"
                if isinstance(student_logits, torch.Tensor) else type(student_logits).__name__)
        raise KdlabError(f"loss student_logits: expected floating-point logits of shape (N, C), got {what}")
    log_mix, _ = _combine(member_logits, rule=rule, weights=weights, temperature=temperature, labels=labels,
                          weight_temperature=weight_temperature)
    if student_logits.shape != log_mix.shape:
        raise KdlabError(f"loss logits: student shape {tuple(student_logits.shape)} != teachers' "
                         f"{tuple(log_mix.shape)}; all must be (N, C) over the same classes")
    dtype = torch.promote_types(log_mix.dtype, student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return _reduce(temperature**2 * _kl_per_position(log_mix.to(dtype), log_q), None, reduction)
