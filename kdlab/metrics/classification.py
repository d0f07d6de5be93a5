"""Classification metrics: pure functions of logits and labels.

Every metric takes ``(N, C)`` logits (float16/bfloat16 are upcast to float32,
float64 is kept) and ``(N,)`` integer labels, runs without autograd, and
returns a Python ``float`` so that results can be logged or written to JSON as
they are. Each is registered under kind ``"metric"``; the convenience
``classification_metrics`` (which returns a dict) is not.
"""
from __future__ import annotations

import torch

from kdlab.errors import KdlabError
from kdlab.registry import register


def _logits(name: str, logits) -> torch.Tensor:
    """Detached logits in at least float32, checked to be (N, C) with N ≥ 1."""
    if not isinstance(logits, torch.Tensor):
        raise KdlabError(f"metric {name}: expected a tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise KdlabError(
            f"metric {name}: expected shape (N, C), got {tuple(logits.shape)}; flatten positions into the batch first"
        )
    if not logits.is_floating_point():
        raise KdlabError(f"metric {name}: expected floating-point logits, got dtype {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise KdlabError(f"metric {name}: got an empty tensor of shape {tuple(logits.shape)}; pass at least one sample")
    return logits.detach().to(torch.promote_types(logits.dtype, torch.float32))


def _labels(labels, logits: torch.Tensor) -> torch.Tensor:
    """Integer labels of shape (N,) with values in [0, C)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise KdlabError("metric labels: expected an integer tensor of class indices; pass labels as torch.int64")
    if tuple(labels.shape) != (logits.shape[0],):
        raise KdlabError(
            f"metric labels: shape {tuple(labels.shape)} does not match {logits.shape[0]} samples; pass shape (N,)"
        )
    num_classes = logits.shape[1]
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise KdlabError(f"metric labels: values must lie in [0, {num_classes}); check the label encoding")
    return labels.detach().long().to(logits.device)


def _pair(student_logits, teacher_logits) -> tuple[torch.Tensor, torch.Tensor]:
    student = _logits("student_logits", student_logits)
    teacher = _logits("teacher_logits", teacher_logits)
    if student.shape != teacher.shape:
        raise KdlabError(
            f"metric logits: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}; "
            "both must be (N, C) over the same samples and classes"
        )
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    return student.to(dtype), teacher.to(dtype)


@register("metric", "accuracy")
def accuracy(logits, labels, *, topk=1) -> float:
    """Top-k accuracy: fraction of samples whose label is among the k largest logits.

    Shapes: logits (N, C), labels (N,) int. ``topk`` in [1, C]; ties between
    logits are broken by ``torch.topk`` (for k = 1, as ``argmax``).
    Returns a float in [0, 1].
    """
    logits = _logits("logits", logits)
    labels = _labels(labels, logits)
    num_classes = logits.shape[1]
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_classes:
        raise KdlabError(f"metric accuracy topk: must be an integer in [1, {num_classes}], got {topk!r}")
    top = logits.topk(topk, dim=-1).indices
    return (top == labels.unsqueeze(-1)).any(dim=-1).double().mean().item()


@register("metric", "nll")
def nll(logits, labels) -> float:
    """Mean negative log-likelihood −(1/N)·Σ_i log softmax(z_i)[y_i], natural log (nats).

    Shapes: logits (N, C), labels (N,) int. Computed with ``log_softmax``, so it
    is finite for any finite logits.
    """
    logits = _logits("logits", logits)
    labels = _labels(labels, logits)
    log_probs = torch.log_softmax(logits, dim=-1)
    return (-log_probs.gather(-1, labels.unsqueeze(-1))).mean().item()


def _ece_bin_index(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each confidence: bin b covers (b/n, (b+1)/n], bin 0 is closed [0, 1/n].

    The edges are the correctly rounded values of b/n in the confidence's dtype;
    a confidence exactly on an interior edge b/n goes to the lower bin b − 1,
    and 1.0 goes to the last bin (Guo et al. 2017's I_m = ((m−1)/M, m/M]).
    """
    edges = (torch.arange(n_bins + 1, dtype=torch.float64) / n_bins).to(confidence.dtype).to(confidence.device)
    # bucketize(right=False) returns i with edges[i-1] < x <= edges[i]: the upper edge.
    return (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, n_bins - 1)


@register("metric", "ece")
def ece(logits, labels, *, n_bins=15) -> float:
    """Expected calibration error over equal-width bins of top-1 confidence.

    Guo et al. (2017), "On Calibration of Modern Neural Networks", eq. 3:
    ``ECE = Σ_m (|B_m| / N)·|acc(B_m) − conf(B_m)|`` with ``M = n_bins`` bins
    ``B_m = ((m−1)/M, m/M]`` over the top-1 softmax probability. Boundary
    convention: bins are left-open, right-closed, so a confidence exactly on an
    edge goes to the lower bin; the first bin also holds 0 and the last bin
    holds 1.0. Empty bins contribute 0. The top-1 prediction is ``argmax``.

    Shapes: logits (N, C), labels (N,) int. Returns a float in [0, 1].
    """
    logits = _logits("logits", logits)
    labels = _labels(labels, logits)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise KdlabError(f"metric ece n_bins: must be an integer >= 1, got {n_bins!r}")
    confidence, prediction = torch.softmax(logits, dim=-1).max(dim=-1)
    correct = (prediction == labels).to(confidence.dtype)
    bins = _ece_bin_index(confidence, n_bins)
    # (|B|/N)·|acc(B) − conf(B)| = |Σ_{i∈B} (correct_i − conf_i)| / N: no per-bin division.
    gap_per_bin = torch.zeros(n_bins, dtype=confidence.dtype, device=confidence.device)
    gap_per_bin.index_add_(0, bins, correct - confidence)
    return (gap_per_bin.abs().sum() / logits.shape[0]).item()


def reliability_bins(logits, labels, *, n_bins=15) -> dict[str, torch.Tensor]:
    """Per-bin count, accuracy and mean top-1 confidence: the points of a reliability diagram.

    Same bins as :func:`ece` (Guo et al. 2017, §2: B_m = ((m−1)/M, m/M]), so
    ``Σ_m count_m·|accuracy_m − confidence_m| / N`` is the ECE. Empty bins
    have count 0 and NaN accuracy and confidence. Returns float64 tensors of
    shape (n_bins,) under ``count``, ``accuracy``, ``confidence``.
    """
    logits = _logits("logits", logits)
    labels = _labels(labels, logits)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise KdlabError(f"reliability_bins n_bins: must be an integer >= 1, got {n_bins!r}")
    confidence, prediction = torch.softmax(logits.double(), dim=-1).max(dim=-1)
    correct = (prediction == labels).double()
    bins = _ece_bin_index(confidence, n_bins)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins.cpu(), torch.ones_like(correct).cpu())
    hits = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins.cpu(), correct.cpu())
    confidence_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins.cpu(), confidence.cpu())
    return {"count": count, "accuracy": hits / count, "confidence": confidence_sum / count}


@register("metric", "brier")
def brier(logits, labels) -> float:
    """Multi-class Brier score: (1/N)·Σ_i Σ_c (p_ic − onehot(y_i)_c)², in [0, 2].

    Brier (1950), "Verification of forecasts expressed in terms of probability"
    (the multi-class sum over classes, not divided by C).
    Shapes: logits (N, C), labels (N,) int.
    """
    logits = _logits("logits", logits)
    labels = _labels(labels, logits)
    probs = torch.softmax(logits, dim=-1)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(dim=-1).mean().item()


@register("metric", "agreement")
def agreement(student_logits, teacher_logits) -> float:
    """Top-1 agreement: fraction of samples where student and teacher argmax coincide.

    Stanton et al. (2021), "Does Knowledge Distillation Really Work?" (their
    fidelity measure). Shapes: both (N, C). Returns a float in [0, 1].
    """
    student, teacher = _pair(student_logits, teacher_logits)
    return (student.argmax(dim=-1) == teacher.argmax(dim=-1)).double().mean().item()


@register("metric", "kl_teacher_student")
def kl_teacher_student(student_logits, teacher_logits) -> float:
    """Mean KL(p_teacher ‖ p_student) at temperature 1, in nats.

    (1/N)·Σ_i Σ_c p_ic (log p_ic − log q_ic) with p = softmax(teacher),
    q = softmax(student), from ``log_softmax`` (0·log 0 = 0). Stanton et al.
    (2021)'s fidelity KL. Shapes: both (N, C).
    """
    student, teacher = _pair(student_logits, teacher_logits)
    log_p = torch.log_softmax(teacher, dim=-1)
    log_q = torch.log_softmax(student, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean().item()


def classification_metrics(logits, labels, teacher_logits=None) -> dict[str, float]:
    """All of the above at once: keys acc, nll, ece, brier (+ agreement, kl_ts with a teacher).

    ``acc`` is top-1 accuracy and ``ece`` uses the default 15 bins; with
    ``teacher_logits`` (N, C), ``agreement`` and ``kl_ts`` (KL(teacher ‖
    student)) compare ``logits`` (the student) to the teacher.
    """
    result = {
        "acc": accuracy(logits, labels),
        "nll": nll(logits, labels),
        "ece": ece(logits, labels),
        "brier": brier(logits, labels),
    }
    if teacher_logits is not None:
        result["agreement"] = agreement(logits, teacher_logits)
        result["kl_ts"] = kl_teacher_student(logits, teacher_logits)
    return result
