"""White-box and transfer attacks: pure functions of a model, inputs, labels, a budget and a generator.

Conventions shared by every attack here:

* **Inputs live in [0, 1]** and the model normalises inside ``forward`` (every
  kdlab zoo model does, with its ``normalize`` stage). Inputs outside [0, 1]
  raise ``KdlabError``; :func:`check_model_normalises` warns about models that
  look as if they expect normalised inputs.
* **Budget.** ``eps`` is the radius of the threat model around the clean input
  ``x``: ``norm="linf"`` (‖δ‖∞ ≤ ε, so 0 ≤ ε ≤ 1; write 8/255, not 8) or
  ``norm="l2"`` (‖δ‖₂ ≤ ε over all features of a sample). Every returned point
  lies in the ε-ball ∩ [0, 1]: L∞ clamps to [x − ε, x + ε] ∩ [0, 1]; L2 projects
  onto the ball and then clamps to [0, 1]. The clamp after the projection cannot
  leave the ball: x itself is in [0, 1], so clamping moves each coordinate of
  x + δ towards x and no |δ_i| grows. (Up to float rounding: ‖δ‖ may exceed ε by
  an ulp of the input dtype.)
* **Modes and gradients.** Every module of the model is put in eval mode
  (BatchNorm uses and keeps its running statistics, dropout is off) and given
  back its own previous mode on return, even after an error. Gradients are
  taken with ``torch.autograd.grad`` with respect to the input only, so nothing
  accumulates in ``param.grad``.
* **Output.** A detached tensor with the input's shape, dtype and device.
  Randomness (random starts) comes only from ``generator`` (the global RNG when
  it is ``None``); the generator may live on the CPU or on the input's device.
* **Losses.** ``"ce"``: cross-entropy of the logits against ``labels``;
  ``"cw"``: the Carlini–Wagner margin ``max_{j≠y} z_j − z_y`` (Carlini & Wagner
  2017, "Towards Evaluating the Robustness of Neural Networks": their
  objective f_6 without the confidence κ), positive exactly when the sample is misclassified. A
  targeted attack (``targeted=True``, ``labels`` = the targets) maximises the
  negated loss, i.e. minimises the loss toward the target class.
* **Which point is returned.** Iterative attacks keep, per sample, the best
  point seen over all iterates and restarts, ranked lexicographically by
  (attack succeeded, objective): any point that misclassifies (or, targeted,
  reaches the target) beats every point that does not, and among equals the
  higher objective (untargeted: the higher loss) wins; ties keep the earlier
  point. So more steps or more restarts never give a weaker result on a fixed
  model (the run with fewer steps follows a prefix of the same trajectory when
  the step size is fixed and there is no random start).

fgsm, pgd and apgd share the signature ``attack(model, inputs, labels, *, eps,
norm, loss, generator, ...)`` and are registered under kind ``"attack"``;
:func:`transfer` (two models) and :func:`disagreement` (no labels) are not,
since they do not fit that contract (as the GAN losses are not registered as
student/teacher losses).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings
from fractions import Fraction
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.errors import KdlabError
from kdlab.registry import register

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw")

# An objective maps a batch of candidate inputs to (per-sample objective (N,), per-sample success (N,) bool).
Objective = Callable[[Tensor], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------- checks


def parse_eps(text) -> float:
    """A budget from a number or a string such as ``"8/255"``, ``"0.031"`` or ``"1e-2"``.

    Returns a finite float ≥ 0. Callers that log settings keep the original text
    next to the value (see ``kdlab.robust.protocol.AttackSpec.eps_text``).
    """
    if isinstance(text, bool):
        raise KdlabError(f"eps: got the boolean {text!r}; give a number such as 8/255 or 0.031")
    if isinstance(text, numbers.Real):
        value = float(text)
    elif isinstance(text, str):
        match = re.fullmatch(r"\s*([^/\s]+)\s*(?:/\s*([^/\s]+)\s*)?", text)
        try:
            if match is None:
                raise ValueError
            value = float(match.group(1))
            if match.group(2) is not None:
                value /= float(match.group(2))
        except (ValueError, ZeroDivisionError):
            raise KdlabError(
                f"eps: cannot parse {text!r}; write a number or a fraction such as '8/255' or '0.031'"
            ) from None
    else:
        raise KdlabError(f"eps: expected a number or a string such as '8/255', got {type(text).__name__}")
    if not math.isfinite(value) or value < 0:
        raise KdlabError(f"eps: {text!r} must be a finite number >= 0, e.g. 8/255")
    return value


def _check_eps(attack: str, eps, norm: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise KdlabError(f"{attack}: eps={eps!r} must be a finite number >= 0 (use parse_eps for text like '8/255')")
    if norm == "linf" and eps > 1:
        raise KdlabError(
            f"{attack}: eps={eps!r} is larger than 1 for norm linf; it looks like pixel units (0-255), "
            f"but inputs are in [0, 1]: use e.g. eps=8/255"
        )
    return float(eps)


def _check_choice(attack: str, key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KdlabError(f"{attack}: {key}={value!r} is not supported; use one of {', '.join(map(repr, choices))}")


def _check_count(attack: str, key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise KdlabError(f"{attack}: {key}={value!r} must be an integer >= {minimum}")
    return int(value)


def _check_step_size(attack: str, step_size, default: float) -> float:
    if step_size is None:
        return default
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real) or not step_size >= 0:
        raise KdlabError(f"{attack}: step_size={step_size!r} must be a number >= 0 (or None for the default)")
    return float(step_size)


def _check_inputs(attack: str, inputs) -> Tensor:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise KdlabError(f"{attack}: inputs must be a floating-point tensor (N, ...), got {inputs!r:.80}")
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise KdlabError(f"{attack}: inputs of shape {tuple(inputs.shape)} have no samples; pass (N, ...) with N >= 1")
    if not bool(torch.isfinite(inputs).all()) or bool((inputs < 0).any()) or bool((inputs > 1).any()):
        raise KdlabError(
            f"{attack}: attacks expect inputs in [0, 1]; the model must normalise inside forward "
            f"(got values in [{inputs.min().item():.3g}, {inputs.max().item():.3g}])"
        )
    return inputs.detach()


def _check_labels(attack: str, labels, inputs: Tensor) -> Tensor:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise KdlabError(f"{attack}: labels must be an integer tensor of class indices (torch.int64)")
    if tuple(labels.shape) != (inputs.shape[0],):
        raise KdlabError(f"{attack}: labels of shape {tuple(labels.shape)} do not match {inputs.shape[0]} inputs; "
                         "pass shape (N,)")
    return labels.detach().long().to(inputs.device)


def check_model_normalises(model: nn.Module, *, warn: bool = True) -> bool:
    """Whether ``model`` seems to normalise its inputs itself; warn (``UserWarning``) if not.

    A heuristic: kdlab zoo models hold a ``Normalize`` module with ``mean`` and
    ``std`` buffers. A model with no submodule carrying tensors named ``mean``
    and ``std`` probably expects inputs that were normalised outside, and
    attacking it in [0, 1] pixel space would use the wrong ε. Models that
    normalise otherwise (or need no normalisation) can ignore the warning.
    """
    for module in model.modules():
        if isinstance(getattr(module, "mean", None), Tensor) and isinstance(getattr(module, "std", None), Tensor):
            return True
    if warn:
        warnings.warn(
            f"{type(model).__name__} has no submodule with mean/std buffers; attacks assume the model takes "
            "inputs in [0, 1] and normalises inside forward (like kdlab's Normalize stage)",
            UserWarning,
            stacklevel=2,
        )
    return False


# --------------------------------------------------------------------------- building blocks


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every module of ``models`` in eval mode; restore each module's own flag on exit."""
    saved = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


def attack_loss(logits: Tensor, labels: Tensor, loss: str = "ce") -> Tensor:
    """Per-sample attack loss, shape (N,), in at least float32.

    ``"ce"``: cross-entropy −log softmax(z)_y. ``"cw"``: the margin
    ``max_{j≠y} z_j − z_y`` (Carlini & Wagner 2017), > 0 iff argmax ≠ y.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if loss == "cw":
        true = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        others = logits.scatter(1, labels.unsqueeze(1), float("-inf"))  # (N, C) with z_y masked out
        return others.amax(dim=1) - true
    raise KdlabError(f"attack loss={loss!r} is not supported; use one of {', '.join(map(repr, LOSSES))}")


def _classifier_objective(model: nn.Module, labels: Tensor, loss: str, targeted: bool) -> Objective:
    """Objective to maximise: the loss (untargeted) or minus the loss toward ``labels`` (targeted)."""

    def objective(x: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        value = attack_loss(logits, labels, loss)
        prediction = logits.argmax(dim=1)
        if targeted:
            return -value, prediction == labels
        return value, prediction != labels

    return objective


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) to broadcast against ``like`` (N, ...)."""
    return values.view((-1,) + (1,) * (like.ndim - 1))


def _l2_norm(delta: Tensor) -> Tensor:
    """Per-sample L2 norm over all non-batch dims, shape (N,), in at least float32."""
    return delta.flatten(1).to(torch.promote_types(delta.dtype, torch.float32)).norm(dim=1)


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Nearest point of the ε-ball around ``x``, then clamped to [0, 1] (which keeps it in the ball)."""
    if norm == "linf":
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    delta = x_adv - x
    # Radial projection: scale δ by min(1, ε/‖δ‖₂) per sample.
    scale = (eps / _l2_norm(delta).clamp_min(1e-12)).clamp(max=1.0).to(x.dtype)
    return (x + delta * _per_sample(scale, x)).clamp(0.0, 1.0)


def _direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit norm: sign(g) for L∞, g/‖g‖₂ for L2 (0 where g = 0)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample(_l2_norm(grad).clamp_min(1e-12).to(grad.dtype), grad)


def _uniform(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """U[0, 1) samples drawn on the generator's device, moved to ``like``'s device and dtype."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device, like.dtype)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A uniformly random point of the ε-ball (L∞: the cube; L2: the ball), clamped to [0, 1]."""
    if norm == "linf":
        delta = (2 * _uniform(x.shape, generator, x) - 1) * eps
    else:
        device = generator.device if generator is not None else x.device
        direction = torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)
        direction = direction / _per_sample(_l2_norm(direction).clamp_min(1e-12).to(x.dtype), x)
        # radius ε·U^(1/d) makes the point uniform in the d-dimensional ball (d = features per sample)
        features = x[0].numel()
        radius = eps * _uniform((x.shape[0],), generator, x) ** (1.0 / features)
        delta = direction * _per_sample(radius, x)
    return _project(x + delta, x, eps, norm)


def _better(success: Tensor, value: Tensor, best_success: Tensor, best_value: Tensor) -> Tensor:
    """Mask of samples where (success, value) beats (best_success, best_value) lexicographically."""
    return (success & ~best_success) | ((success == best_success) & (value > best_value))


class _Best:
    """Per-sample best point under the lexicographic (success, objective) rule of the module docstring."""

    def __init__(self, x: Tensor):
        self.x = x.clone()
        self.value = torch.full((x.shape[0],), float("-inf"), dtype=torch.float64, device=x.device)
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def update(self, x: Tensor, value: Tensor, success: Tensor) -> None:
        value = value.detach().to(self.value.dtype)
        mask = _better(success, value, self.success, self.value)
        self.x = torch.where(_per_sample(mask, x), x.detach(), self.x)
        self.value = torch.where(mask, value, self.value)
        self.success = self.success | success

    def merge(self, other: "_Best") -> None:
        self.update(other.x, other.value, other.success)


def _value_and_grad(objective: Objective, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Objective (N,), success (N,) and ∂(Σ objective)/∂x; only the input receives a gradient."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value, success = objective(x)
        # Samples are independent in eval mode, so the gradient of the sum is the per-sample gradient.
        (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), success.detach(), grad.detach()


def _ascend(objective: Objective, x: Tensor, start: Tensor, *, eps: float, norm: str, step_size: float,
            steps: int) -> _Best:
    """Projected gradient ascent from ``start``; the best of the ``steps + 1`` iterates per sample.

    Madry et al. (2018), "Towards Deep Learning Models Resistant to Adversarial
    Attacks": x^{t+1} = Π_{x+S}(x^t + α·sign(∇_x L)) for L∞; for L2 the
    sign is replaced by the normalised gradient ∇/‖∇‖₂ (steepest ascent for
    that norm).
    """
    best = _Best(start)
    x_adv = start
    for _ in range(steps):
        value, success, grad = _value_and_grad(objective, x_adv)
        best.update(x_adv, value, success)
        x_adv = _project(x_adv + step_size * _direction(grad, norm), x, eps, norm)
    with torch.no_grad():
        value, success = objective(x_adv)  # the last iterate needs no gradient
    best.update(x_adv, value, success)
    return best


def _finish(x_adv: Tensor, inputs: Tensor) -> Tensor:
    return x_adv.detach().to(device=inputs.device, dtype=inputs.dtype)


# --------------------------------------------------------------------------- attacks


@register("attack", "fgsm")
def fgsm(model: nn.Module, inputs: Tensor, labels: Tensor, *, eps, norm: str = "linf", loss: str = "ce",
         targeted: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Fast gradient sign method: one step of size ε along the steepest-ascent direction.

    Goodfellow et al. (2015), "Explaining and Harnessing Adversarial Examples",
    x' = x + ε·sign(∇_x J(θ, x, y)); with ``norm="l2"`` the step is
    ε·∇/‖∇‖₂ (the fast gradient method). Deterministic; ``generator`` is
    accepted for a uniform signature and unused. Returns x' (N, ...) — the
    one-step point, not the better of x and x'.
    """
    _check_choice("fgsm", "norm", norm, NORMS)
    _check_choice("fgsm", "loss", loss, LOSSES)
    eps = _check_eps("fgsm", eps, norm)
    x = _check_inputs("fgsm", inputs)
    labels = _check_labels("fgsm", labels, x)
    with eval_mode(model):
        objective = _classifier_objective(model, labels, loss, targeted)
        _, _, grad = _value_and_grad(objective, x)
        x_adv = _project(x + eps * _direction(grad, norm), x, eps, norm)
    return _finish(x_adv, inputs)


@register("attack", "pgd")
def pgd(model: nn.Module, inputs: Tensor, labels: Tensor, *, eps, step_size=None, steps: int = 10,
        norm: str = "linf", restarts: int = 1, random_start: bool = True, loss: str = "ce",
        targeted: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) with random restarts.

    Each restart starts at a uniform random point of the ε-ball (``random_start``;
    otherwise at x) and takes ``steps`` projected steps of ``step_size``
    (default 2.5·ε/steps, the rule of Madry et al.'s ``robustness`` library:
    enough to reach the boundary from anywhere in the ball). Returns, per sample, the best point over
    every iterate of every restart under the (success, objective) rule of the
    module docstring: a point that misclassifies (targeted: reaches ``labels``)
    beats one that does not; otherwise the higher loss wins.

    Shapes: inputs (N, ...) in [0, 1], labels (N,) int (targets when ``targeted``).
    Costs ``restarts·(steps + 1)`` forward and ``restarts·steps`` backward passes.
    """
    _check_choice("pgd", "norm", norm, NORMS)
    _check_choice("pgd", "loss", loss, LOSSES)
    eps = _check_eps("pgd", eps, norm)
    steps = _check_count("pgd", "steps", steps)
    restarts = _check_count("pgd", "restarts", restarts)
    step_size = _check_step_size("pgd", step_size, 2.5 * eps / steps)
    x = _check_inputs("pgd", inputs)
    labels = _check_labels("pgd", labels, x)
    best = None
    with eval_mode(model):
        objective = _classifier_objective(model, labels, loss, targeted)
        for _ in range(restarts):
            start = _random_start(x, eps, norm, generator) if random_start else x.clone()
            run = _ascend(objective, x, start, eps=eps, norm=norm, step_size=step_size, steps=steps)
            if best is None:
                best = run
            else:
                best.merge(run)
    return _finish(best.x, inputs)


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ⌈p_j·N⌉ ≤ N (Croce & Hein 2020, the checkpoints of Algorithm 1).

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06). The p_j
    are kept as exact fractions: in floating point 0.22 + 0.19 = 0.41000000000000003
    and the ceiling would give 42 instead of 41 for N = 100. Duplicates (small N)
    are dropped. For N = 100: [0, 22, 41, 57, 70, 80, 87, 93, 99].
    """
    steps = _check_count("apgd", "steps", steps)
    p = [Fraction(0), Fraction(22, 100)]
    while True:
        following = p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100))
        if following > 1:
            break
        p.append(following)
    checkpoints: list[int] = []
    for p_j in p:
        w_j = math.ceil(p_j * steps)
        if not checkpoints or w_j > checkpoints[-1]:
            checkpoints.append(w_j)
    return checkpoints


def _apgd_run(objective: Objective, x: Tensor, start: Tensor, *, eps: float, norm: str, steps: int,
              rho: float) -> _Best:
    """One run of Croce & Hein (2020), Algorithm 1 (APGD), with per-sample step sizes.

    Symbols as in the paper: f the objective, η the step size, α = 0.75 the
    momentum, W the checkpoints, x_max / f_max the highest-objective point so far.
    Returns the best point per sample under the (success, objective) rule, which
    also records misclassified points with a lower loss than x_max.
    """
    alpha = 0.75
    n = x.shape[0]
    checkpoints = apgd_checkpoints(steps)
    output = _Best(start)

    # η^(0) = 2ε (Croce & Hein 2020), one step size per sample.
    eta = torch.full((n,), 2.0 * eps, device=x.device)

    def step(point: Tensor, grad: Tensor) -> Tensor:
        return point + _per_sample(eta.to(x.dtype), x) * _direction(grad, norm)

    # Algorithm 1, first step: x^(1) = P_S(x^(0) + η∇f(x^(0))); f_max, x_max the better of x^(0), x^(1).
    x_prev = start
    f_prev, success, grad_prev = _value_and_grad(objective, x_prev)
    output.update(x_prev, f_prev, success)
    x_cur = _project(step(x_prev, grad_prev), x, eps, norm)
    f_cur, success, grad_cur = _value_and_grad(objective, x_cur)
    output.update(x_cur, f_cur, success)
    take = f_cur > f_prev
    x_max = torch.where(_per_sample(take, x), x_cur, x_prev)
    f_max = torch.where(take, f_cur, f_prev)
    grad_max = torch.where(_per_sample(take, x), grad_cur, grad_prev)

    # increased[i] = 1[f(x^(i+1)) > f(x^(i))], summed between checkpoints for condition 1.
    increased = [take]
    eta_at_check = eta.clone()
    f_max_at_check = f_prev.clone()  # f_max^(w_0): the objective at the starting point
    previous_checkpoint = 0

    for k in range(1, steps):
        # Algorithm 1, loop body: z = P_S(x^(k) + η∇f(x^(k)));
        # x^(k+1) = P_S(x^(k) + α(z − x^(k)) + (1 − α)(x^(k) − x^(k−1))).
        z = _project(step(x_cur, grad_cur), x, eps, norm)
        x_next = _project(x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev), x, eps, norm)
        if k < steps - 1:
            f_next, success, grad_next = _value_and_grad(objective, x_next)
        else:  # x^(N) is only evaluated, never stepped from
            with torch.no_grad():
                f_next, success = objective(x_next)
            f_next, grad_next = f_next.detach(), grad_cur
        output.update(x_next, f_next, success)
        increased.append(f_next > f_cur)

        # Algorithm 1: keep the highest-objective point x_max.
        take = f_next > f_max
        x_max = torch.where(_per_sample(take, x), x_next, x_max)
        f_max = torch.where(take, f_next, f_max)
        grad_max = torch.where(_per_sample(take, x), grad_next, grad_max)
        x_prev, x_cur, f_cur, grad_cur = x_cur, x_next, f_next, grad_next

        if k in checkpoints:
            # The checkpoint test of Algorithm 1 at w_j = k, with the paper's two conditions:
            # condition 1: Σ_{i=w_{j−1}}^{w_j−1} 1[f(x^(i+1)) > f(x^(i))] < ρ·(w_j − w_{j−1});
            # condition 2: η^(w_{j−1}) ≡ η^(w_j) and f_max^(w_{j−1}) ≡ f_max^(w_j).
            successes = torch.stack(increased[previous_checkpoint:k]).sum(dim=0)
            condition1 = successes < rho * (k - previous_checkpoint)
            condition2 = (eta_at_check == eta) & (f_max_at_check == f_max)
            reduce = condition1 | condition2
            # η ← η/2 and x^(k+1) ← x_max. The momentum term restarts at zero (x^(k) ← x_max too):
            # the paper leaves x^(k) unspecified after the restart.
            eta = torch.where(reduce, eta / 2, eta)
            mask = _per_sample(reduce, x)
            x_cur = torch.where(mask, x_max, x_cur)
            x_prev = torch.where(mask, x_max, x_prev)
            grad_cur = torch.where(mask, grad_max, grad_cur)
            f_cur = torch.where(reduce, f_max, f_cur)
            eta_at_check = eta.clone()
            f_max_at_check = f_max.clone()
            previous_checkpoint = k
    return output


@register("attack", "apgd")
def apgd(model: nn.Module, inputs: Tensor, labels: Tensor, *, eps, steps: int = 100, norm: str = "linf",
         restarts: int = 1, loss: str = "ce", rho: float = 0.75, random_start: bool = True,
         generator: torch.Generator | None = None) -> Tensor:
    """Auto-PGD (APGD-CE with ``loss="ce"``): step-size-free PGD with momentum.

    Croce & Hein (2020), "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks" (ICML), Algorithm 1: η starts at
    2ε, momentum α = 0.75, and at the checkpoints of :func:`apgd_checkpoints` η is
    halved and the iterate restarts from the best point x_max wherever condition
    1 (fewer than a fraction ``rho`` of the steps since the last checkpoint
    increased f) or condition 2 (neither η nor f_max changed since the last
    checkpoint) holds. Step sizes are per sample. ``steps`` is N_iter (one
    gradient per iteration). Each restart starts at a uniformly random point of
    the ε-ball, as in :func:`pgd` (the authors' code also starts at a random
    point, drawn differently; ``random_start=False``: at x).

    Returns, per sample, the best point over all iterates and restarts under the
    module's (success, objective) rule — a misclassified point is kept even when
    x_max has a higher loss. L∞ and L2 (η∇/‖∇‖₂ steps) are supported.
    """
    _check_choice("apgd", "norm", norm, NORMS)
    _check_choice("apgd", "loss", loss, LOSSES)
    eps = _check_eps("apgd", eps, norm)
    steps = _check_count("apgd", "steps", steps)
    restarts = _check_count("apgd", "restarts", restarts)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 <= rho <= 1:
        raise KdlabError(f"apgd: rho={rho!r} must be in [0, 1] (the paper uses 0.75)")
    x = _check_inputs("apgd", inputs)
    labels = _check_labels("apgd", labels, x)
    best = None
    with eval_mode(model):
        objective = _classifier_objective(model, labels, loss, targeted=False)
        for _ in range(restarts):
            start = _random_start(x, eps, norm, generator) if random_start else x.clone()
            run = _apgd_run(objective, x, start, eps=eps, norm=norm, steps=steps, rho=float(rho))
            if best is None:
                best = run
            else:
                best.merge(run)
    return _finish(best.x, inputs)


def transfer(source_model: nn.Module, target_model: nn.Module, inputs: Tensor, labels: Tensor, *,
             attack: Callable[..., Tensor] = pgd, **attack_kwargs) -> Tensor:
    """Black-box transfer: craft adversarial inputs on ``source_model`` to evaluate on ``target_model``.

    Papernot et al. (2016), "Transferability in Machine Learning". ``attack`` is
    any attack of this module (default :func:`pgd`), called as
    ``attack(source_model, inputs, labels, **attack_kwargs)``; the target model
    is never queried (it is only checked to be a module), so its accuracy on the
    result is the transfer accuracy. Returns the adversarial inputs (N, ...).
    """
    if not isinstance(target_model, nn.Module):
        raise KdlabError(f"transfer: target_model must be an nn.Module, got {type(target_model).__name__}")
    return attack(source_model, inputs, labels, **attack_kwargs)


def _disagreement_objective(student: nn.Module, teacher: nn.Module, x: Tensor, objective: str) -> Objective:
    if objective == "kl":
        def kl(x_adv: Tensor) -> tuple[Tensor, Tensor]:
            log_p = torch.log_softmax(student(x_adv).float(), dim=1)  # student
            log_q = torch.log_softmax(teacher(x_adv).float(), dim=1)  # teacher
            value = (log_p.exp() * (log_p - log_q)).sum(dim=1)  # KL(p_student ‖ p_teacher) per sample
            # Pure loss maximisation: no point counts as a "success", the highest KL wins.
            return value, torch.zeros_like(value, dtype=torch.bool)
        return kl

    with torch.no_grad():
        teacher_class = teacher(x).argmax(dim=1)  # the teacher's clean top-1 class c

    def margin(x_adv: Tensor) -> tuple[Tensor, Tensor]:
        value = attack_loss(student(x_adv), teacher_class, "cw")  # max_{j≠c} s_j − s_c
        return value, value > 0
    return margin


def disagreement(student: nn.Module, teacher: nn.Module, inputs: Tensor, *, eps, steps: int = 10,
                 step_size=None, norm: str = "linf", objective: str = "kl", random_start: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
    """PGD that drives the student away from the teacher inside the ε-ball.

    ``objective="kl"`` maximises KL(p_student ‖ p_teacher) = Σ_c p_s,c (log p_s,c −
    log p_t,c) at temperature 1, with gradients through both models.
    ``objective="margin"`` maximises the top-1 disagreement margin
    ``max_{c'≠c} s_{c'} − s_c`` where c is the teacher's top-1 class on the clean
    input and s the student's logits (> 0 iff the student's top-1 is not c).
    Steps, projection, ``step_size`` default (2.5·ε/steps) and random start as in
    :func:`pgd`; returns the best iterate per sample (margin: a disagreeing point
    first). Both models run in eval mode and get their modes back.
    """
    _check_choice("disagreement", "norm", norm, NORMS)
    _check_choice("disagreement", "objective", objective, ("kl", "margin"))
    eps = _check_eps("disagreement", eps, norm)
    steps = _check_count("disagreement", "steps", steps)
    step_size = _check_step_size("disagreement", step_size, 2.5 * eps / steps)
    x = _check_inputs("disagreement", inputs)
    with eval_mode(student, teacher):
        function = _disagreement_objective(student, teacher, x, objective)
        start = _random_start(x, eps, norm, generator) if random_start else x.clone()
        best = _ascend(function, x, start, eps=eps, norm=norm, step_size=step_size, steps=steps)
    return _finish(best.x, inputs)
