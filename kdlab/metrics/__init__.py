"""Evaluation metrics, registered under kind "metric" (see ``kdlab.metrics.classification``)."""
from kdlab.metrics import classification  # noqa: F401  (registration)
from kdlab.metrics.classification import (
    accuracy,
    agreement,
    brier,
    classification_metrics,
    ece,
    kl_teacher_student,
    nll,
)
from kdlab.metrics.deviation import (
    deviation_summary,
    fit_slope,
    logit_confidence,
    teacher_class_probabilities,
    underconfidence_by_bucket,
)

__all__ = ["accuracy", "agreement", "brier", "classification_metrics", "deviation_summary", "ece", "fit_slope",
           "kl_teacher_student", "logit_confidence", "nll", "teacher_class_probabilities", "underconfidence_by_bucket"]
