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

__all__ = ["accuracy", "agreement", "brier", "classification_metrics", "ece", "kl_teacher_student", "nll"]
