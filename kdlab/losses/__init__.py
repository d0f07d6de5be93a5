"""Distillation losses, registered under kind "loss" (see ``kdlab.losses.divergences``)."""
from kdlab.losses import divergences  # noqa: F401  (registration)
from kdlab.losses.divergences import REDUCTIONS, cross_entropy, generalized_jsd, kl, mse_logits, reverse_kl, tvd

__all__ = ["REDUCTIONS", "cross_entropy", "generalized_jsd", "kl", "mse_logits", "reverse_kl", "tvd"]
