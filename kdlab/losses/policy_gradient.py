"""The MiniLLM policy-gradient estimator for on-policy sequence distillation (pure functions).

Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language
Models", ICLR 2024 (arXiv 2306.08543); official code ``microsoft/LMOps``
(``minillm/minillm/losses.py``, ``reward.py``), with the task reward of GKD
(Agarwal et al., ICLR 2024) Eq. 5. ``kdlab.methods.policy_gradient_kd`` states
the objective, the returns, baselines, importance weights and the single-step
term in full; this module computes them for one sampled batch.

Reductions (``REDUCTIONS``, both terms alike), the divergence family's
(``kdlab.losses.divergences.reduce_positions``) under this estimator's
spelling: ``token`` — mean over all response tokens (family: "batchmean");
``sequence`` — per-sequence mean, then the mean over sequences ("sequence");
``sum`` — per-sequence sum, then the mean over sequences ("sequence_sum", the
exact Monte-Carlo gradient of the sequence-level objective).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kdlab.errors import KdlabError, NonFiniteLossError
from kdlab.losses.divergences import reduce_positions

IGNORE = -100
BASELINES = ("loo", "batch_mean", "moving_average", "none")
REDUCTIONS = ("token", "sequence", "sum")
_FAMILY_REDUCTION = {"token": "batchmean", "sequence": "sequence", "sum": "sequence_sum"}

__all__ = [
    "BASELINES",
    "REDUCTIONS",
    "PolicyGradientTerms",
    "RewardError",
    "baselines",
    "policy_gradient_terms",
    "returns_to_go",
]


class RewardError(NonFiniteLossError):
    """A reward became NaN or infinite (a ``NonFiniteLossError``: the run keeps its last good checkpoint)."""


# --------------------------------------------------------------------------- returns and baselines


def returns_to_go(rewards: Tensor, mask: Tensor, *, exclude_current: bool = False,
                  length_normalize: bool = False) -> Tensor:
    """Per position, the sum (or mean) of the rewards from t (or t + 1) to the end of the row's response.

    ``rewards`` (B, T) float, ``mask`` (B, T) bool (True at response positions; rewards elsewhere are
    ignored). ``exclude_current``: R_{t+1} = Σ_{t' > t} r_t' (0 at the last token). ``length_normalize``:
    divide by the number of summed terms (0 terms give 0). 0 at masked positions.
    """
    masked = torch.where(mask, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    total = masked.flip(1).cumsum(1).flip(1)  # Σ_{t' ≥ t}
    count = mask.to(rewards.dtype).flip(1).cumsum(1).flip(1)
    if exclude_current:
        total = total - masked
        count = count - mask.to(rewards.dtype)
    if length_normalize:
        total = total / count.clamp(min=1)
    return torch.where(mask, total, torch.zeros_like(total))


def _response_offsets(mask: Tensor) -> Tensor:
    """(B, T) index of each response position within its row's response (0, 1, ...); 0 where masked."""
    return torch.where(mask, mask.long().cumsum(1) - 1, torch.zeros_like(mask, dtype=torch.long))


def baselines(returns: Tensor, mask: Tensor, kind: str, *, moving_average: float = 0.0) -> Tensor:
    """The baseline b (B, T) for each response position (0 at masked positions); see the module docstring."""
    if kind == "none":
        return torch.zeros_like(returns)
    if kind == "moving_average":
        return torch.where(mask, torch.full_like(returns, float(moving_average)), torch.zeros_like(returns))
    offsets = _response_offsets(mask)
    width = int(offsets.max()) + 1 if returns.numel() else 1
    values = torch.where(mask, returns, torch.zeros_like(returns))
    sums = torch.zeros(width, dtype=returns.dtype, device=returns.device).scatter_add(0, offsets[mask], values[mask])
    counts = torch.zeros(width, dtype=returns.dtype, device=returns.device).scatter_add(
        0, offsets[mask], torch.ones_like(values[mask]))
    position_sums, position_counts = sums[offsets], counts[offsets]
    if kind == "batch_mean":
        base = position_sums / position_counts.clamp(min=1)
    elif kind == "loo":
        others = position_counts - 1
        base = torch.where(others > 0, (position_sums - values) / others.clamp(min=1), torch.zeros_like(values))
    else:
        raise KdlabError(f"method.baseline: {kind!r} is not one of {', '.join(BASELINES)}")
    return torch.where(mask, base, torch.zeros_like(base))


def _reduce(values: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """The divergence family's reduction under this estimator's spelling (``REDUCTIONS``)."""
    return reduce_positions(values, mask, _FAMILY_REDUCTION[reduction])


# --------------------------------------------------------------------------- the estimator


@dataclass
class PolicyGradientTerms:
    """What ``policy_gradient_terms`` computes; all (B, L − 1) tensors are aligned with ``logits[:, :-1]``."""

    pg: Tensor  # scalar, the policy-gradient surrogate (gradient: −Σ A·w·∇log q, reduced)
    single_step: Tensor  # scalar, α·(reduced token-level reverse KL) when single_step, else 0
    mask: Tensor  # (B, T) bool, response positions (the logits there predict a response token)
    rewards: Tensor  # (B, T) r_t = log p_T(y_t) − log p_S(y_t), 0 outside the response (detached)
    returns: Tensor  # (B, T) G_t = α·R_t + (1 − α)·r_task (detached)
    baselines: Tensor  # (B, T) b_t
    advantages: Tensor  # (B, T) A_t (after whitening, detached)
    weights: Tensor  # (B, T) importance weights q/p̃ (1 on-policy)
    token_reverse_kl: Tensor  # (B, T) Σ_v q (log q − log p) at each position (detached)
    task_reward: Tensor | None  # (B,) or None


def _check_finite(name: str, values: Tensor, mask: Tensor, what: str, hint: str) -> None:
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        kind = "NaN" if bool(torch.isnan(values[bad]).any()) else "infinite"
        raise RewardError(
            f"policy_gradient_kd: reward became NaN or infinite ({kind}) in term {name!r}: {what} at "
            f"{int(bad.sum())} of {int(mask.sum())} positions, first at row {where[0]}"
            + (f", position {where[1]}" if len(where) > 1 else "")
            + f"; {hint}; the run stops before this update, so the last good checkpoint is kept")


def policy_gradient_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
                          task_reward: Tensor | None = None, task_reward_weight: float = 0.0,
                          single_step: bool = True, length_normalize: bool = True, baseline: str = "loo",
                          moving_average: float = 0.0, whiten: bool = False, reduction: str = "token",
                          mix_alpha: float = 0.0, importance_clip: float | None = 0.2) -> PolicyGradientTerms:
    """The MiniLLM policy-gradient terms for sampled sequences in the canonical layout.

    ``student_logits``/``teacher_logits`` (B, L, V) (unshifted: position t predicts token t + 1),
    ``labels`` (B, L) with the sampled response tokens and -100 at prompt and padding. ``task_reward``
    (B,) in [0, 1] per sequence (needed when ``task_reward_weight`` > 0). ``mix_alpha`` > 0: the
    sequences were sampled from α_mix·p + (1 − α_mix)·q; importance weights q/p̃ per token.
    """
    if reduction not in REDUCTIONS:
        raise KdlabError(f"method.reduction: {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != labels.shape:
        raise KdlabError(f"policy_gradient_kd: student logits {tuple(student_logits.shape)}, teacher logits "
                         f"{tuple(teacher_logits.shape)} and labels {tuple(labels.shape)} must be (B, L, V), "
                         "(B, L, V) and (B, L) with one vocabulary")
    kd_weight = 1.0 - float(task_reward_weight)  # α of GKD Eq. 5
    dtype = torch.promote_types(torch.float32, student_logits.dtype)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    index = targets.clamp_min(0).unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)
    # Masked positions are replaced before any arithmetic: NaN/inf logits there reach nothing.
    log_q_all = torch.log_softmax(torch.where(mask[..., None], student_logits[:, :-1].to(dtype), zero), dim=-1)
    log_p_all = torch.log_softmax(torch.where(mask[..., None], teacher_logits[:, :-1].detach().to(dtype), zero),
                                  dim=-1)
    log_q = log_q_all.gather(-1, index).squeeze(-1)
    log_p = log_p_all.gather(-1, index).squeeze(-1)
    rewards = torch.where(mask, log_p - log_q.detach(), zero)
    _check_finite("pg", rewards, mask, "the per-token reward r_t = log p_T(y_t) − log p_S(y_t)",
                  "the teacher's or the student's logits are not finite: lower train.lr, set train.grad_clip, "
                  "or check the teacher checkpoint")

    returns = kd_weight * returns_to_go(rewards, mask, exclude_current=single_step,
                                        length_normalize=length_normalize)
    if task_reward is not None:
        task_reward = task_reward.to(device=rewards.device, dtype=dtype)
        rows = torch.ones_like(task_reward, dtype=torch.bool)
        _check_finite("task_reward", task_reward, rows, "the sequence-level task reward",
                      "the task checker returned a non-finite value")
        returns = returns + (1.0 - kd_weight) * task_reward[:, None]
    elif kd_weight != 1.0:
        raise KdlabError("policy_gradient_kd: task_reward_weight > 0 needs the task reward of every sequence")
    returns = torch.where(mask, returns, zero)
    base = baselines(returns, mask, baseline, moving_average=moving_average)
    advantages = torch.where(mask, returns - base, zero)
    if whiten and int(mask.sum()) > 1:
        advantages = advantages / (advantages[mask].std() + 1e-8)

    ratio = torch.exp(log_q - log_q.detach())  # 1, with gradient ∇log q
    if mix_alpha > 0.0:
        log_mixed = torch.logaddexp(math.log(mix_alpha) + log_p, math.log1p(-mix_alpha) + log_q.detach()) \
            if mix_alpha < 1.0 else log_p
        weights = torch.where(mask, torch.exp(log_q.detach() - log_mixed), zero)
        weighted = ratio * weights
        per_token = -advantages * weighted
        if importance_clip is not None:
            clipped = weighted.clamp(1.0 - importance_clip, 1.0 + importance_clip)
            per_token = torch.maximum(per_token, -advantages * clipped)
    else:
        weights = torch.where(mask, torch.ones_like(rewards), zero)
        per_token = -advantages * ratio
    pg = _reduce(per_token, mask, reduction)

    token_kl = torch.where(mask, (log_q_all.exp() * (log_q_all - log_p_all)).sum(dim=-1), zero)
    if single_step:  # an infinite KL (a token the teacher gives probability 0) would make the update NaN
        _check_finite("single_step", token_kl.detach(), mask,
                      "the expected immediate reward −Σ_v p_S(v)(log p_S(v) − log p_T(v))",
                      "the teacher gives probability 0 (or NaN) to tokens the student can emit")
    single = kd_weight * _reduce(token_kl, mask, reduction) if single_step else zero.clone()
    return PolicyGradientTerms(pg=pg, single_step=single, mask=mask, rewards=rewards, returns=returns.detach(),
                               baselines=base.detach(), advantages=advantages.detach(), weights=weights.detach(),
                               token_reverse_kl=token_kl.detach(), task_reward=task_reward)
