"""Optimisers and learning-rate schedules (schedules are pure functions of the step).

A method may bring its own optimiser (``Method.make_optimizer``, asked by the loop first); one that takes
some loss terms' gradients apart (``SplitGradientOptimizer``, DOT) receives the named terms from the loop.
"""
from __future__ import annotations

import functools
import logging
import math
import operator

import torch

from kdlab.config import TrainConfig
from kdlab.config.checks import device_problem
from kdlab.errors import KdlabError


def build_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW over ``params``.

    Weight decay applies to every parameter, as in the CIFAR recipes KD papers
    follow (CRD, DKD); use ``weight_decay: 0`` to switch it off.
    """
    params = [p for p in params if p.requires_grad]
    # train.fused_optimizer: one fused kernel for the whole update (CUDA, and the CPU since torch 2.4);
    # where this torch has none for the parameters' device, the default (foreach) path, with a warning.
    kernel = {"fused": True} if getattr(train, "fused_optimizer", False) and params else {}
    try:
        return _optimizer(params, train, kernel)
    except RuntimeError as exc:
        if not kernel:
            raise
        logging.getLogger(__name__).warning("train.fused_optimizer: no fused %s here (%s); using the default "
                                            "kernel", train.optimizer, str(exc).splitlines()[0])
        return _optimizer(params, train, {})


def _optimizer(params, train: TrainConfig, kernel: dict) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov,
                               weight_decay=train.weight_decay, **kernel)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay, **kernel)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, **kernel)


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, train: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warmup over ``warmup_epochs`` (from 1/warmup_steps up to 1), then
    ``constant``; ``cosine`` decay to 0 at ``total_steps`` (Loshchilov & Hutter
    2017, without restarts); or ``step``: × ``gamma`` at each milestone fraction.
    """
    warmup_steps = int(round(train.warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if train.schedule == "constant":
        return 1.0
    if train.schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(1 for m in train.milestones if step >= m * total_steps)
    return train.gamma ** passed


def build_scheduler(optimizer, train: TrainConfig, *, total_steps: int, steps_per_epoch: int):
    """A per-step ``LambdaLR`` over :func:`lr_factor`; its state is just the step count."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, train=train)
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; a device this machine lacks is the config's one-line error."""
    problem = device_problem(name, "fp32", "train")
    if problem:
        raise KdlabError(problem)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


class SplitGradientOptimizer(torch.optim.Optimizer):
    """An optimiser that takes the gradient of its ``distill_terms`` apart from the rest (the task's).

    The loop hands it the step's named loss terms (``backward``) instead of backpropagating their sum:
    the distillation terms are backpropagated first and their gradient moved aside (summed over the
    step's micro-batches), then the other terms' gradient is left in ``.grad`` as usual. ``step`` reads
    both. Subclasses set ``distill_terms`` and implement ``step`` from ``self.distill_grads``.
    """

    distill_terms: tuple[str, ...] = ()

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self.distill_grads: dict[torch.Tensor, torch.Tensor] = {}  # param -> this step's distillation gradient

    def backward(self, terms: dict[str, torch.Tensor]) -> None:
        """Backpropagate one (micro-)batch's named terms: the distillation terms' gradient into
        ``distill_grads``, the others' into ``.grad`` (both added to what earlier micro-batches left)."""
        unknown = [name for name in self.distill_terms if name not in terms]
        if unknown:
            raise KdlabError(f"optimizer {type(self).__name__}: loss term {unknown[0]!r} is not among the "
                             f"method's terms ({', '.join(terms)})")
        distill = [v for k, v in terms.items() if k in self.distill_terms]
        task = [v for k, v in terms.items() if k not in self.distill_terms]
        params = [p for group in self.param_groups for p in group["params"]]
        task_so_far = {p: p.grad for p in params if p.grad is not None}  # earlier micro-batches' task gradient
        for p in task_so_far:
            p.grad = None
        functools.reduce(operator.add, distill).backward(retain_graph=bool(task))
        for p in params:
            if p.grad is not None:
                held = self.distill_grads.get(p)
                self.distill_grads[p] = p.grad if held is None else held + p.grad
            p.grad = task_so_far.get(p)
        if task:
            functools.reduce(operator.add, task).backward()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.distill_grads = {}


def dot_update(param: torch.Tensor, task_grad: torch.Tensor | None, distill_grad: torch.Tensor | None,
               state: dict, *, lr: float, momentum_task: float, momentum_distill: float,
               weight_decay: float) -> None:
    """One DOT step of one parameter, in place (Zhao, Cui, Song & Liang, ICCV 2023: one momentum per loss).

        v_task ← β_task · v_task + (g_task + wd·θ)      v_kd ← β_kd · v_kd + g_kd
        θ ← θ − lr · (v_task + v_kd)

    with β_task = β − Δ and β_kd = β + Δ. As mdistiller's ``engine/dot.py`` (``dot``): a buffer starts as
    its first gradient; a parameter reached by only one of the two losses keeps that loss's buffer at the
    mean momentum (β_task + β_kd)/2, and the weight decay then joins the distillation gradient (a
    parameter with a task gradient takes it there); both updates read θ before the step.
    """
    mean_momentum = (momentum_task + momentum_distill) / 2.0
    step = None
    if task_grad is not None:
        d = task_grad.add(param, alpha=weight_decay) if weight_decay else task_grad
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = d.detach().clone()
        else:
            buf.mul_(momentum_task if distill_grad is not None else mean_momentum).add_(d)
        step = buf.clone()
    if distill_grad is not None:
        buf = state.get("distill_momentum_buffer")
        if buf is None:
            buf = state["distill_momentum_buffer"] = distill_grad.detach().clone()
        elif task_grad is not None:
            buf.mul_(momentum_distill).add_(distill_grad)
        else:
            d = distill_grad.add(param, alpha=weight_decay) if weight_decay else distill_grad
            buf.mul_(mean_momentum).add_(d)
        step = buf.clone() if step is None else step.add_(buf)
    if step is not None:
        param.add_(step, alpha=-lr)


class DistillationOrientedTrainer(SplitGradientOptimizer):
    """DOT (Zhao et al., "DOT: A Distillation-Oriented Trainer", ICCV 2023): SGD with momentum β − Δ for the
    task gradient and β + Δ for the distillation gradient (``dot_update``); state per parameter:
    ``momentum_buffer`` and ``distill_momentum_buffer`` (checkpointed like SGD's)."""

    def __init__(self, params, *, lr: float, momentum: float, delta: float, weight_decay: float,
                 distill_terms: tuple[str, ...]):
        if not 0.0 <= momentum - delta <= momentum + delta < 1.0:
            raise KdlabError(f"method.delta: momentum {momentum} ± delta {delta} must stay in [0, 1); "
                             "lower method.delta")
        super().__init__(params, dict(lr=lr, momentum=momentum - delta, momentum_kd=momentum + delta,
                                      weight_decay=weight_decay))
        self.distill_terms = tuple(distill_terms)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                distill = self.distill_grads.get(p)
                if p.grad is None and distill is None:
                    continue
                dot_update(p, p.grad, distill, self.state[p], lr=group["lr"], momentum_task=group["momentum"],
                           momentum_distill=group["momentum_kd"], weight_decay=group["weight_decay"])
        self.distill_grads = {}
        return loss
