"""Adversarial robustness: attacks (registered under kind "attack") and the robust evaluation protocol.

Attacks take inputs in [0, 1] (the model normalises inside ``forward``) and
return detached adversarial inputs; see ``kdlab.robust.attacks``. The protocol
(``kdlab.robust.protocol``) turns a list of ``AttackSpec`` into robust and
worst-case accuracy, calibration under attack and gradient-masking warnings.
"""
from kdlab.robust import attacks  # noqa: F401  (registration)
from kdlab.robust.attacks import (
    apgd,
    apgd_checkpoints,
    attack_loss,
    check_model_normalises,
    disagreement,
    eval_mode,
    fgsm,
    parse_eps,
    pgd,
    transfer,
)
from kdlab.robust.protocol import (
    AttackSpec,
    eps_curve,
    gradient_masking_checks,
    robust_evaluate,
    sanity_checks,
)

__all__ = ["AttackSpec", "apgd", "apgd_checkpoints", "attack_loss", "check_model_normalises", "disagreement",
           "eps_curve", "eval_mode", "fgsm", "gradient_masking_checks", "parse_eps", "pgd", "robust_evaluate",
           "sanity_checks", "transfer"]
