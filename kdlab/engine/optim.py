"""Optimisers and learning-rate schedules (schedules are pure functions of the step)."""
from __future__ import annotations

import logging
import math

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
