"""Loss-balancing rules of multi-teacher adversarial distillation (MTARD / B-MTARD): pure functions.

Zhao et al., ECCV 2022 (Normalization Loss Balance) and Zhao, Wang & Wei, TPAMI
2024 ("Balanced MTARD", Entropy-Based Balance); ``kdlab.methods.mtard`` states
the rules, their order within a step and their sources in full. Each function
maps this step's detached statistics to the next weights or temperatures.
"""
from __future__ import annotations

import torch


def normalization_balance_step(weights: torch.Tensor, losses: torch.Tensor, initial_losses: torch.Tensor,
                               lr: float) -> torch.Tensor:
    """One Normalization Loss Balance update of the weights ``(K,)`` from this step's losses ``(K,)``.

    ℓ̂ = losses / initial_losses; w ← w − lr·(w − ℓ̂/Σℓ̂); clip at 0; renormalise to sum 1.
    """
    relative = losses / initial_losses.clamp_min(torch.finfo(losses.dtype).tiny)
    target = relative / relative.sum()
    updated = (weights - lr * (weights - target)).clamp_min(0.0)
    return updated / updated.sum().clamp_min(torch.finfo(updated.dtype).tiny)


def entropy_balance_step(temperatures: torch.Tensor, entropies: torch.Tensor, lr: float, low: float,
                         high: float) -> torch.Tensor:
    """One Entropy-Based Balance update of ``(τ_adv, τ_nat)`` from the teachers' mean entropies ``(H_adv, H_nat)``.

    The higher-entropy teacher is sharpened (τ − lr), the other softened (τ + lr); equal entropies: no change.
    """
    direction = torch.sign(entropies[0] - entropies[1])
    step = torch.stack([direction, -direction]).to(temperatures.dtype)
    return (temperatures - lr * step).clamp(low, high)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy −Σ_c p log p of softmax(logits), averaged over the batch (float32 at least)."""
    log_p = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()
