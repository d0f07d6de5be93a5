"""Distillation losses, registered under kind "loss".

Logit and label losses: ``kdlab.losses.divergences``; more logit losses (skew
KL, DKD, DIST, logit standardization, hinge, LogSum): ``kdlab.losses.logit``;
feature losses (and ``batchnorm_standardize``): ``kdlab.losses.features``; the mdistiller/torchdistill
zoo's (NST, CC, ...; issue 21): ``kdlab.losses.zoo``, ``kdlab.losses.ofd``, ``kdlab.losses.ctkd``.
``kdlab.losses.divergences`` is also the home of the divergence family that
``kdlab.losses.sequence`` (token-level divergences of sequence models) shares.
Not registered (not teacher/student losses of the usual signature):
``policy_gradient`` (MiniLLM's estimator) and ``balancing`` (MTARD's rules).
"""
from kdlab.losses import attention, divergences, features, logit, zoo  # noqa: F401  (registration)
from kdlab.losses.adversarial import (  # GAN losses for discriminators (not registered: not teacher/student losses)
    GAN_LOSSES,
    discriminator_accuracy,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)
from kdlab.losses.divergences import REDUCTIONS, cross_entropy, generalized_jsd, kl, mse_logits, reverse_kl, tvd
from kdlab.losses.ensemble import combine_teacher_probs, multi_teacher_kl, teacher_weights
from kdlab.losses.features import FEATURE_LOSSES as _FEATURE_LOSSES
from kdlab.losses.features import (
    attention_map,
    attention_transfer,
    batchnorm_standardize,
    fitnet,
    pkt,
    rkd,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)
from kdlab.losses.logit import (
    dist,
    dkd,
    dkd_parts,
    hinge_logits,
    logit_standardization,
    logsum,
    pearson_distance,
    skew_kl,
    standardize_logits,
)
from kdlab.losses.zoo import FEATURE_LOSSES as _ZOO_FEATURE_LOSSES

FEATURE_LOSSES = _FEATURE_LOSSES + _ZOO_FEATURE_LOSSES  # every registered loss of kind "feature"

__all__ = [
    "FEATURE_LOSSES",
    "GAN_LOSSES",
    "REDUCTIONS",
    "attention_map",
    "attention_transfer",
    "batchnorm_standardize",
    "combine_teacher_probs",
    "cross_entropy",
    "discriminator_accuracy",
    "discriminator_loss",
    "dist",
    "dkd",
    "dkd_parts",
    "fitnet",
    "generalized_jsd",
    "generator_loss",
    "gradient_penalty",
    "hinge_logits",
    "kl",
    "logit_standardization",
    "logsum",
    "mse_logits",
    "multi_teacher_kl",
    "pearson_distance",
    "pkt",
    "reverse_kl",
    "rkd",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "skew_kl",
    "standardize_logits",
    "teacher_weights",
    "tvd",
]
