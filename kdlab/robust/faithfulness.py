"""Faithfulness of a student to its teacher around data points: agreement and relative calibration.

Lamb et al. (2023), "Faithful Knowledge Distillation" (arXiv 2306.04431) ask two
questions of a teacher–student pair near correctly classified examples: (i) do
they *disagree* at nearby points, and (ii) is the student *as confident as* the
teacher there ("relative calibration"), each evaluated empirically (an attack)
and certified (bound propagation). Only the abstract could be read here; the
definitions below are kdlab's, chosen to answer those two questions [U = not
checked against the paper's equations]:

* Faithfulness violation at x [U]:

      Δ(x) = max_{x' ∈ B_ε(x) ∩ [0, 1]ᵈ} | c_S(x') − c_T(x') |

  with ``confidence="teacher_class"`` (default): ``c(x') = softmax(z(x'))_k``,
  the probability of the teacher's top-1 class k *at the clean x* (fixed over
  the ball, so Δ compares the two networks' confidence in one decision); or
  ``confidence="vector"``: ``max_c |p_S,c(x') − p_T,c(x')|``, the L∞ distance
  between the full probability vectors.
* Empirical Δ: projected gradient *ascent* on |c_S − c_T| (``_ascend``); the
  value reported is the largest seen at any evaluated point of the ball (the
  clean point included), so it is a lower bound on the true Δ.
* Certified Δ: IBP bounds of both networks (``kdlab.robust.bounds``) give
  probability bounds, and ``|c_S − c_T| ≤ max(p̄_S − p_T, p̄_T − p_S)`` (bars
  upper, plain lower); an upper bound on the true Δ. Hence certified ≥ empirical
  on every sample.
* Adversarial disagreement [U]: among the points both networks classify
  correctly, the fraction where an attack in the ball makes their top-1
  predictions differ.

Every function here puts the networks in eval mode and restores their modes;
no parameter gradients are accumulated.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.robust.bounds import abs_upper, difference_bounds, input_box, interval_bounds, margin_bounds, \
    probability_bounds

CONFIDENCES = ("teacher_class", "vector")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put ``models`` in eval mode for the block and restore each one's mode after."""
    modes = [(m, m.training) for m in models]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def _check_number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise KdlabError(f"faithfulness {name}: must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise KdlabError(f"faithfulness steps: must be an integer >= 0, got {steps!r}")
    return int(steps)


def _check_confidence(confidence: str) -> None:
    if confidence not in CONFIDENCES:
        raise KdlabError(f"faithfulness confidence: {confidence!r} is not one of {', '.join(CONFIDENCES)}")


def _margin(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``z_k − max_{j≠k} z_j`` per row, ``(N,)``: > 0 iff the top-1 class is k (strictly)."""
    index = classes.view(-1, 1)
    others = logits.scatter(1, index, float("-inf")).amax(dim=1)
    return logits.gather(1, index).squeeze(1) - others


def _ascend(objective: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, *, eps: float, steps: int,
            step_size: float | None, restarts: int = 1, random_start: bool = True, generator=None,
            lower: float | None = 0.0, upper: float | None = 1.0,
            success: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """L∞ projected gradient ascent (Madry et al. 2018) on a per-sample ``objective(x) -> (N,)``.

    Step ``x ← Π(x + α·sign(∇ₓ objective))``, Π the projection onto
    ``B_ε(x) ∩ [lower, upper]``; ``α`` defaults to 2.5·ε/steps. Every evaluated
    point (the clean one, each restart's start and iterates) competes for the
    best; ``success(x) -> (N,) bool``, if given, is checked at each of them.
    Returns ``(best_value (N,), best_inputs, ever_succeeded (N,) bool or None)``;
    all detached. The caller sets the networks' modes; only ``x`` gets a gradient.
    """
    low, high = input_box(inputs, eps, lower=lower, upper=upper)
    alpha = step_size if step_size is not None else (2.5 * eps / steps if steps else 0.0)
    best_x = inputs.detach().clone()
    with torch.no_grad():
        best = objective(best_x).detach()
        ever = success(best_x).clone() if success is not None else None

    def consider(x, value):
        nonlocal best, ever
        better = value > best
        best = torch.where(better, value, best)
        best_x[better] = x[better]
        if success is not None:
            ever = ever | success(x)

    if eps == 0:
        return best, best_x, ever
    for _ in range(restarts):
        x = inputs.detach().clone()
        if random_start:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype,
                               device=generator.device if generator is not None else x.device).to(x.device)
            x = low + (high - low) * noise  # uniform in the clipped ball
        for step in range(steps + 1):
            if step == steps:  # the last iterate is only evaluated
                with torch.no_grad():
                    consider(x, objective(x).detach())
                break
            x.requires_grad_(True)
            with torch.enable_grad():
                value = objective(x)
                (grad,) = torch.autograd.grad(value.sum(), x)
            x = x.detach()
            with torch.no_grad():
                consider(x, value.detach())
                x = torch.minimum(torch.maximum(x + alpha * grad.sign(), low), high)
    return best, best_x, ever


# --------------------------------------------------------------------------- discrepancies


def confidence_gap(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   classes: torch.Tensor | None = None) -> torch.Tensor:
    """``|c_S − c_T|`` per sample, ``(N,)``, from ``(N, C)`` logits (softmax at temperature 1).

    ``classes`` (N,) int: ``c = softmax(z)_k`` with ``k = classes[n]`` (the
    teacher's clean top-1 class in the ``teacher_class`` variant); None: the
    L∞ distance ``max_c |p_S,c − p_T,c|`` (the ``vector`` variant). Differentiable.
    """
    p_s, p_t = student_logits.softmax(dim=-1), teacher_logits.softmax(dim=-1)
    if classes is None:
        return (p_s - p_t).abs().amax(dim=-1)
    index = classes.long().view(-1, 1)
    return (p_s.gather(1, index) - p_t.gather(1, index)).abs().squeeze(1)


def confidence_gap_bound(student_bounds: tuple[torch.Tensor, torch.Tensor],
                         teacher_bounds: tuple[torch.Tensor, torch.Tensor],
                         classes: torch.Tensor | None = None) -> torch.Tensor:
    """Upper bound on ``confidence_gap`` over every pair of logits in the two boxes, ``(N,)``.

    With ``[p_S, p̄_S]`` and ``[p_T, p̄_T]`` from ``probability_bounds``:
    ``|p_S,k − p_T,k| ≤ max(p̄_S,k − p_T,k, p̄_T,k − p_S,k)``, for class
    ``k = classes[n]``, or the max over classes when ``classes`` is None.
    Differentiable in both boxes (IBP training backpropagates through it).
    """
    s_low, s_high = probability_bounds(*student_bounds)
    t_low, t_high = probability_bounds(*teacher_bounds)
    per_class = abs_upper(*difference_bounds(s_low, s_high, t_low, t_high))  # (N, C)
    if classes is None:
        return per_class.amax(dim=-1)
    return per_class.gather(1, classes.long().view(-1, 1)).squeeze(1)


def maximise_confidence_gap(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, *, eps: float,
                            steps: int = 10, step_size: float | None = None, restarts: int = 1,
                            classes: torch.Tensor | None = None, generator: torch.Generator | None = None,
                            lower: float | None = 0.0, upper: float | None = 1.0):
    """PGD ascent on ``confidence_gap(student(x'), teacher(x'), classes)`` over ``B_ε(x) ∩ [lower, upper]``.

    Returns ``(gap (N,), x' (N, ...))`` at the best point seen, detached. The
    networks are run in eval mode (restored after). Used by
    ``relative_calibration`` and by the ``faithful_kd`` method's "pgd" bound.
    """
    eps = _check_number("eps", eps)
    steps = _check_steps(steps)

    def objective(x):
        return confidence_gap(student(x), teacher(x), classes)

    with eval_mode(student, teacher):
        value, x_best, _ = _ascend(objective, inputs, eps=eps, steps=steps, step_size=step_size,
                                   restarts=restarts, generator=generator, lower=lower, upper=upper)
    return value, x_best


# --------------------------------------------------------------------------- metrics


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Top-1 agreement: fraction of rows where the student's and teacher's argmax coincide.

    The same quantity as ``kdlab.metrics.agreement`` (kept here so ``robust/``
    depends on torch only). Shapes: both ``(N, C)``, N ≥ 1. Returns a float in [0, 1].
    """
    if not (isinstance(student_logits, torch.Tensor) and isinstance(teacher_logits, torch.Tensor)) \
            or student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape or not len(student_logits):
        raise KdlabError("faithfulness agreement: expected two (N, C) logit tensors of the same shape, N >= 1")
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).double().mean().item()


@dataclass(frozen=True)
class Disagreement:
    """``rate = disagrees.sum() / eligible`` (0.0 when nothing is eligible)."""

    rate: float
    eligible: int  # points both networks classify correctly on the clean input
    disagrees: torch.Tensor  # (N,) bool: an attack found a point in the ball where the top-1s differ


def adversarial_disagreement_rate(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor,
                                  labels: torch.Tensor, *, eps: float, steps: int = 10,
                                  step_size: float | None = None, restarts: int = 1,
                                  generator: torch.Generator | None = None, lower: float | None = 0.0,
                                  upper: float | None = 1.0) -> Disagreement:
    """Among the points that both networks classify correctly, how often an attack makes them disagree.

    For each eligible ``(x, y)`` two margin attacks run (each with ``restarts``),
    with ``m(z) = z_y − max_{j≠y} z_j``:

        flip the student, keep the teacher:  max  min(m_T(x'), −m_S(x'))
        flip the teacher, keep the student:  max  min(m_S(x'), −m_T(x'))

    Either objective > 0 means exactly one network has left class y, i.e. a
    disagreement; any evaluated point where ``argmax S ≠ argmax T`` (also when
    both left y, for different classes) counts. A lower bound on the true rate.
    Shapes: inputs ``(N, *input_shape)`` in [lower, upper], labels ``(N,)`` int.
    """
    eps = _check_number("eps", eps)
    steps = _check_steps(steps)
    labels = labels.long().to(inputs.device)
    disagrees = torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
    with eval_mode(student, teacher):
        with torch.no_grad():
            eligible = (student(inputs).argmax(-1) == labels) & (teacher(inputs).argmax(-1) == labels)
        x, y = inputs[eligible], labels[eligible]
        if len(x):
            def differ(z):
                return student(z).argmax(-1) != teacher(z).argmax(-1)

            found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for flipped in ("student", "teacher"):
                def objective(z, flipped=flipped):
                    m_s, m_t = _margin(student(z), y), _margin(teacher(z), y)
                    return torch.minimum(m_t, -m_s) if flipped == "student" else torch.minimum(m_s, -m_t)

                _, _, ever = _ascend(objective, x, eps=eps, steps=steps, step_size=step_size, restarts=restarts,
                                     generator=generator, lower=lower, upper=upper, success=differ)
                found |= ever
            disagrees[eligible] = found
    count = int(eligible.sum())
    return Disagreement(rate=float(disagrees.sum()) / count if count else 0.0, eligible=count,
                        disagrees=disagrees)


@dataclass(frozen=True)
class EmpiricalCalibration:
    """Empirical relative calibration: PGD estimates of Δ (lower bounds on the true Δ)."""

    per_sample: torch.Tensor  # (N,) Δ̂(x_i)
    mean: float  # mean of Δ̂
    delta: float  # the tolerance δ
    violation_rate: float  # fraction with Δ̂ > δ: violations found by the attack


@dataclass(frozen=True)
class CertifiedCalibration:
    """Certified relative calibration: IBP upper bounds on Δ."""

    per_sample: torch.Tensor  # (N,) Δ̄(x_i) ≥ Δ(x_i)
    mean: float  # mean of Δ̄
    delta: float  # the tolerance δ
    certified_rate: float  # fraction with Δ̄ ≤ δ: certified faithful at tolerance δ


def relative_calibration(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, *, eps: float,
                         steps: int = 10, step_size: float | None = None, restarts: int = 1, delta: float = 0.1,
                         confidence: str = "teacher_class", generator: torch.Generator | None = None,
                         lower: float | None = 0.0, upper: float | None = 1.0) -> EmpiricalCalibration:
    """Empirical Δ(x) = max over the ball of |c_S − c_T|, by PGD ascent (see the module docstring).

    ``confidence``: "teacher_class" (c = probability of the teacher's clean
    top-1 class) or "vector" (L∞ over all class probabilities). Reports the
    per-sample estimates, their mean and the fraction above ``delta``.
    """
    _check_confidence(confidence)
    delta = _check_number("delta", delta)
    classes = None
    if confidence == "teacher_class":
        with eval_mode(teacher), torch.no_grad():
            classes = teacher(inputs).argmax(-1)
    gaps, _ = maximise_confidence_gap(student, teacher, inputs, eps=eps, steps=steps, step_size=step_size,
                                      restarts=restarts, classes=classes, generator=generator, lower=lower,
                                      upper=upper)
    return EmpiricalCalibration(per_sample=gaps, mean=gaps.mean().item(), delta=delta,
                                violation_rate=(gaps > delta).double().mean().item())


def certified_relative_calibration(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, *, eps: float,
                                   delta: float = 0.1, confidence: str = "teacher_class",
                                   lower: float | None = 0.0, upper: float | None = 1.0) -> CertifiedCalibration:
    """Per-sample IBP upper bound Δ̄(x) ≥ Δ(x) and the fraction certified Δ̄ ≤ δ.

    Both networks are bounded separately over ``B_ε(x) ∩ [lower, upper]``
    (IBP of the joint network [T; S] is exactly that), then
    ``confidence_gap_bound``. Run in float32 or float64 without autocast.
    """
    _check_confidence(confidence)
    delta = _check_number("delta", delta)
    eps = _check_number("eps", eps)
    with eval_mode(student, teacher), torch.no_grad():
        classes = teacher(inputs).argmax(-1) if confidence == "teacher_class" else None
        bound = confidence_gap_bound(interval_bounds(student, inputs, eps, lower=lower, upper=upper),
                                     interval_bounds(teacher, inputs, eps, lower=lower, upper=upper), classes)
    return CertifiedCalibration(per_sample=bound, mean=bound.mean().item(), delta=delta,
                                certified_rate=(bound <= delta).double().mean().item())


def certified_agreement_rate(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                             *, eps: float, lower: float | None = 0.0, upper: float | None = 1.0) -> float:
    """Among the points both classify correctly, the fraction IBP certifies to keep *both* on class y.

    Both margin lower bounds ``l_y − max_{j≠y} u_j > 0`` (``margin_bounds``)
    certify that no point of the ball makes them disagree, so
    ``certified_agreement_rate ≤ 1 − adversarial_disagreement_rate``. 0.0 when
    nothing is eligible.
    """
    eps = _check_number("eps", eps)
    labels = labels.long().to(inputs.device)
    with eval_mode(student, teacher), torch.no_grad():
        eligible = (student(inputs).argmax(-1) == labels) & (teacher(inputs).argmax(-1) == labels)
        if not bool(eligible.any()):
            return 0.0
        x, y = inputs[eligible], labels[eligible]
        s_margin, _ = margin_bounds(*interval_bounds(student, x, eps, lower=lower, upper=upper), y)
        t_margin, _ = margin_bounds(*interval_bounds(teacher, x, eps, lower=lower, upper=upper), y)
    return ((s_margin > 0) & (t_margin > 0)).double().mean().item()
