"""REINFORCE with a baseline: the score-function policy-gradient estimator, as small pure functions.

Williams (1992), "Simple Statistical Gradient-Following Algorithms for
Connectionist Reinforcement Learning", Machine Learning 8: for a stochastic
policy π_θ(a | s) and a reward r(a),

    ∇_θ E_{a∼π_θ}[r(a)] = E_{a∼π_θ}[(r(a) − b) · ∇_θ log π_θ(a | s)]

for any baseline ``b`` that does not depend on the sampled action ``a``: the
extra term ``b · E[∇ log π] = b · ∇ Σ_a π(a) = b · ∇1 = 0``. A single sample of
``(r − b)·∇ log π(a)`` is therefore an unbiased estimate of the gradient of the
expected reward, whatever ``b``; a ``b`` close to E[r] (e.g. a moving average of
past rewards) makes it much less noisy (Williams' "reinforcement comparison").

``reinforce_loss`` is the surrogate whose *gradient* is minus that estimate
(averaged over samples), so an optimiser that minimises it ascends the expected
reward. Its value is not the expected reward and means nothing on its own.

Sampling uses an explicit ``torch.Generator`` when one is given (on the
probabilities' device), else the global RNG.
"""
from __future__ import annotations

import torch


def reinforce_loss(log_probs: torch.Tensor, rewards, baseline=0.0, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The REINFORCE surrogate −mean((r − b) · log π(a)), with the advantage r − b detached.

    ``log_probs``: log π_θ(a_i | s_i) of the sampled actions, any shape (one entry
    per sample), carrying the graph to the policy parameters θ. ``rewards`` and
    ``baseline``: numbers or tensors broadcastable to ``log_probs`` (one reward for
    the whole batch, or one per sample); both are detached, so no gradient flows
    into a learned baseline or a differentiable reward through this term.
    ``mask`` (bool, the shape of ``log_probs``): only the True entries count, and
    the mean is over them (an all-False mask gives 0, not NaN).

    Gradient: −mean_i (r_i − b)·∇_θ log π_θ(a_i | s_i), i.e. minus the sample-mean
    of Williams' (1992) estimator of ∇_θ E[r] (see the module docstring). Computed
    in at least float32.
    """
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    log_probs = log_probs.to(dtype)
    advantage = (torch.as_tensor(rewards, dtype=dtype, device=log_probs.device)
                 - torch.as_tensor(baseline, dtype=dtype, device=log_probs.device)).detach()
    terms = advantage * log_probs  # broadcast: one advantage per sample, or one for all
    if mask is None:
        return -terms.mean()
    mask = mask.to(torch.bool)
    total = torch.where(mask, terms, torch.zeros((), dtype=dtype, device=terms.device)).sum()
    return -total / mask.sum().clamp(min=1)


def ema_update(average, value, decay: float):
    """One exponential-moving-average step: ``decay·average + (1 − decay)·value``.

    As a REINFORCE baseline, update it *after* using it for the current reward, so
    that the baseline of each sample depends only on earlier rewards (and the
    estimator stays unbiased). Started at 0, the average after n updates is biased
    towards 0 by the factor ``1 − decay**n``; ``debiased`` divides that out.
    """
    return decay * average + (1.0 - decay) * value


def debiased(average, decay: float, count: int):
    """The EMA ``average`` after ``count`` updates from 0, bias-corrected: ``average / (1 − decay**count)``.

    0 when ``count`` is 0 (nothing seen yet). The same correction as Adam's
    moment estimates (Kingma & Ba 2015, Algorithm 1).
    """
    if count <= 0:
        return 0.0 * average
    return average / (1.0 - decay ** count)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One action per row of ``probs`` (..., K), drawn from Categorical(probs); int64 of shape ``probs.shape[:-1]``.

    Rows need not be normalised (``torch.multinomial`` normalises them), but must
    be ≥ 0 with a positive sum. ``generator`` (on ``probs``' device) makes the draw
    reproducible; None uses the global RNG.
    """
    flat = probs.detach().reshape(-1, probs.shape[-1]).float()
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def sample_bernoulli(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent 0/1 draws with success probabilities ``probs`` (any shape, values in [0, 1]); float, same shape."""
    return torch.bernoulli(probs.detach().float(), generator=generator)


def categorical_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log π(a) = log_softmax(logits)[a] per row: logits (..., K), int actions (...) → (...), differentiable."""
    log_pi = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    return log_pi.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def bernoulli_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log π(a) = a·log σ(l) + (1 − a)·log(1 − σ(l)), elementwise, from logits l (stable: ``logsigmoid``)."""
    logits = logits.float() if logits.dtype != torch.float64 else logits
    actions = actions.to(logits.dtype)
    return actions * torch.nn.functional.logsigmoid(logits) + (1 - actions) * torch.nn.functional.logsigmoid(-logits)
