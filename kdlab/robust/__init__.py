"""Adversarial robustness: attacks (registered under kind "attack"), the robust evaluation protocol,
interval bounds and the faithfulness metrics.

Attacks take inputs in [0, 1] (the model normalises inside ``forward``) and
return detached adversarial inputs; see ``kdlab.robust.attacks``. The protocol
(``kdlab.robust.protocol``) turns a list of ``AttackSpec`` into robust and
worst-case accuracy, calibration under attack and gradient-masking warnings.
``kdlab.robust.bounds`` propagates intervals (IBP) through chains of layers
(the zoo's ``mlp`` and ``cnn1d``); ``kdlab.robust.faithfulness`` measures how a
student agrees with its teacher and shares its confidence inside an ε-ball.
"""
from kdlab.robust import attacks, section  # noqa: F401  (registration: the attacks, the robust section's rules)
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
from kdlab.robust.bounds import (
    check_supported,
    input_box,
    interval_bounds,
    margin_bounds,
    probability_bounds,
)
from kdlab.robust.faithfulness import (
    CertifiedCalibration,
    Disagreement,
    EmpiricalCalibration,
    adversarial_disagreement_rate,
    agreement,
    certified_agreement_rate,
    certified_relative_calibration,
    confidence_gap,
    confidence_gap_bound,
    maximise_confidence_gap,
    relative_calibration,
)
from kdlab.robust.protocol import (
    AttackSpec,
    eps_curve,
    gradient_masking_checks,
    robust_evaluate,
    sanity_checks,
)

__all__ = ["AttackSpec", "CertifiedCalibration", "Disagreement", "EmpiricalCalibration",
           "adversarial_disagreement_rate", "agreement", "apgd", "apgd_checkpoints", "attack_loss",
           "certified_agreement_rate", "certified_relative_calibration", "check_model_normalises", "check_supported",
           "confidence_gap", "confidence_gap_bound", "disagreement", "eps_curve", "eval_mode", "fgsm",
           "gradient_masking_checks", "input_box", "interval_bounds", "margin_bounds", "maximise_confidence_gap",
           "parse_eps", "pgd", "probability_bounds", "relative_calibration", "robust_evaluate", "sanity_checks",
           "transfer"]
