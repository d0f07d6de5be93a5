"""The inner maximisation shared by the adversarial-robustness methods, and their common plumbing.

Not a method (nothing is registered here). ``adversarial_training``, ``trades``,
``ard``, ``rslad``, ``mtard`` and ``awr_kd`` all solve

    x' = argmax_{‖x' − x‖_∞ ≤ ε, x' ∈ [0, 1]}  objective(student(x'))

by signed-gradient ascent (PGD, Madry et al. 2018, §2: the inner max of Eq. 2.1). What differs
between their official codes — and what silently changes results when a
re-implementation gets it wrong — is the objective (CE with the label, KL to the
student's own clean prediction, KL to the teacher), the starting point (uniform
in the ball or x + 0.001·N(0, 1)) and the mode of the student's BatchNorm/dropout
during the attack: ARD runs it in **train** mode, TRADES, RSLAD, MTARD and
SRST-AWR in **eval** mode. ``perturb`` takes all three explicitly, and each method
exposes them as hyperparameters with its paper's code as the default.

Why not ``kdlab.robust.attacks.pgd``: that is the evaluation attack (CE or a
chosen loss on labels, restarts); the training objectives here are functions of
logits that close over teacher outputs or the student's clean prediction.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.methods.base import Batch, Method

INITS = ("uniform", "normal_0.001", "zero")
MODES = ("train", "eval")
KL_REDUCTIONS = ("paper", "batchmean")


@contextlib.contextmanager
def training_mode(model: nn.Module, mode: str):
    """Run the block with ``model`` in ``mode`` ("train" or "eval"); its previous mode is restored on exit.

    Only the top-level flag is saved, as ``nn.Module.train`` sets every submodule:
    a model whose submodules were in mixed modes comes back uniformly in the old top-level mode.
    """
    if mode not in MODES:
        raise KdlabError(f"attack mode: {mode!r} is not one of {', '.join(map(repr, MODES))}")
    was_training = model.training
    model.train(mode == "train")
    try:
        yield model
    finally:
        model.train(was_training)


def _start(inputs: torch.Tensor, init: str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    if init == "uniform":  # Madry et al. 2018 (random start); ARD, SRST-AWR
        noise = torch.rand(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        return inputs + (2.0 * noise - 1.0) * eps
    if init == "normal_0.001":  # TRADES, RSLAD, MTARD: x + 0.001·N(0, 1)
        return inputs + 0.001 * torch.randn(inputs.shape, generator=generator, device=inputs.device,
                                            dtype=inputs.dtype)
    if init == "zero":
        return inputs.clone()
    raise KdlabError(f"attack init: {init!r} is not one of {', '.join(map(repr, INITS))}")


def _project(x: torch.Tensor, inputs: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the L∞ ball of radius ``eps`` around ``inputs``, then into the image range [0, 1]."""
    return torch.clamp(torch.minimum(torch.maximum(x, inputs - eps), inputs + eps), 0.0, 1.0)


def perturb(model: nn.Module, inputs: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], *,
            eps: float, step_size: float, steps: int, init: str = "uniform", model_mode: str = "eval",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """L∞ PGD ascent on ``objective(model(x'))``; returns the detached adversarial inputs.

    ``inputs``: clean inputs in [0, 1], any shape ``(N, ...)``. ``objective`` maps
    the logits ``(N, C)`` at the current ``x'`` to a scalar to **maximise** (its
    scale is irrelevant: only the sign of its gradient is used). Per step
    (Madry et al. 2018, §2.1): ``x' ← Π(x' + step_size·sign(∇_{x'} objective))``
    with Π the projection onto ``‖x' − x‖_∞ ≤ eps`` and then onto [0, 1]. The start
    ``init`` is "uniform" (x + U(−ε, ε)), "normal_0.001" (x + 0.001·N(0, 1)) or
    "zero" (x); it is projected too, so the output lies in the ball and in [0, 1]
    even with ``steps = 0``. (The official codes of ARD, TRADES, RSLAD and MTARD do
    not clamp their start to [0, 1]; that moves only the first gradient's
    evaluation point, by at most 0.001 for the normal start.)

    ``model_mode`` ("train" or "eval") is the model's mode during the attack; its
    own mode is restored before returning. In train mode BatchNorm uses batch
    statistics *and updates its running averages* on every attack forward, as in
    the PyTorch codes that attack in train mode (ARD). Gradients are taken with
    ``torch.autograd.grad`` with respect to ``x'`` only, so no parameter ``.grad``
    is touched; this works under an outer ``torch.no_grad``. The noise comes from
    ``generator`` (None: the global RNG, which the training loop checkpoints).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise KdlabError(f"attack steps: must be an integer >= 0, got {steps!r}")
    inputs = inputs.detach()
    with training_mode(model, model_mode), torch.enable_grad():
        x_adv = _project(_start(inputs, init, eps, generator), inputs, eps)
        for _ in range(int(steps)):
            x_adv.requires_grad_(True)
            value = objective(model(x_adv))
            (grad,) = torch.autograd.grad(value, [x_adv])
            x_adv = _project(x_adv.detach() + step_size * grad.sign(), inputs, eps)
    return x_adv.detach()


def kl_scale(kl_reduction: str, num_classes: int) -> float:
    """Factor on a batchmean KL (summed over classes) that reproduces a method's loss scale.

    "paper": 1/C — the official codes of ARD (``nn.KLDivLoss()``, default mean over
    N·C elements), RSLAD and MTARD (``torch.mean`` of the element-wise KL) average
    over batch × classes, i.e. they use KL/C; keeping their weights with a true
    KL would multiply the KL terms' effective weight by C. "batchmean": 1 — the
    per-sample KL averaged over the batch, with the weights read at face value.
    """
    if kl_reduction == "paper":
        return 1.0 / num_classes
    if kl_reduction == "batchmean":
        return 1.0
    raise KdlabError(f"method.kl_reduction: {kl_reduction!r} is not one of {', '.join(map(repr, KL_REDUCTIONS))}")


def _check_number(name: str, value, *, low: float, strict: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and (
        value > low if strict else value >= low)
    if not ok:
        raise KdlabError(f"method.{name}: must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def check_attack_hparams(hparams) -> None:
    """The attack keys every robust method has: epsilon, step_size, steps, attack_init, attack_mode."""
    _check_number("epsilon", hparams.epsilon, low=0.0, strict=False)
    _check_number("step_size", hparams.step_size, low=0.0, strict=True)
    steps = hparams.steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise KdlabError(f"method.steps: must be an integer >= 0 (0 = no attack, clean training), got {steps!r}")
    if hparams.attack_init not in INITS:
        raise KdlabError(f"method.attack_init: {hparams.attack_init!r} is not one of {', '.join(map(repr, INITS))}")
    if hparams.attack_mode not in MODES:
        raise KdlabError(f"method.attack_mode: {hparams.attack_mode!r} is not one of {', '.join(map(repr, MODES))}")
    if hasattr(hparams, "kl_reduction") and hparams.kl_reduction not in KL_REDUCTIONS:
        raise KdlabError(f"method.kl_reduction: {hparams.kl_reduction!r} is not one of "
                         f"{', '.join(map(repr, KL_REDUCTIONS))}")


class RobustMethod(Method):
    """Base of the adversarial-robustness methods: attack hyperparameters checked, networks at hand.

    The student and the teacher are kept as plain references (not submodules: they
    are not part of the method's state, and the student's parameters must not be
    optimised twice). ``make_batch`` of a subclass returns the adversarial inputs as
    ``Batch.inputs`` (what the loop's student forward sees, in train mode) and puts
    what ``loss_terms`` needs in ``Batch.extras`` (at least ``"clean"``).
    """

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        check_attack_hparams(hparams)
        self.__dict__["_student"] = student
        self.__dict__["_teacher"] = teacher

    def attack(self, inputs: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``perturb`` the student with this method's attack hyperparameters (global RNG)."""
        h = self.hparams
        return perturb(self._student, inputs, objective, eps=h.epsilon, step_size=h.step_size, steps=h.steps,
                       init=h.attack_init, model_mode=h.attack_mode)

    @torch.no_grad()
    def teacher_logits(self, network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """A fixed teacher's logits in eval mode (the loop keeps teachers in eval mode; this makes sure)."""
        with training_mode(network, "eval"):
            return network(inputs)

    def extra(self, batch: Batch, key: str) -> torch.Tensor:
        """``batch.extras[key]``, or an error saying the batch did not come from ``make_batch``."""
        try:
            return batch.extras[key]
        except KeyError:
            raise RuntimeError(f"{type(self).__name__}.loss_terms: batch.extras has no {key!r}; pass the batch "
                               "through method.make_batch first (it builds the adversarial inputs)") from None
