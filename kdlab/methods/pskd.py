"""PS-KD: Kim, Ji, Yoon, Hwang, "Self-Knowledge Distillation with Progressive Refinement of Targets" (ICCV 2021).

The student distils from its own predictions of the previous epoch:

    α_t = α_T · (t + 1) / E                            t = 0 … E−1, the 0-based epoch; E epochs in all
    ỹ_t = (1 − α_t) · onehot(y) + α_t · p^{t−1}(x)     p^{t−1}: the student's softmax on x one epoch earlier
    L   = mean_batch Σ_c −ỹ_t,c · log p_c(x)

Verified in the official code (``lgcnsai/PS-KD-Pytorch``, ``main.py`` and ``loss/pskd_loss.py``):

* ``alpha_t = alpha_T * ((epoch + 1) / end_epoch)`` with the 0-based epoch, so α_0 = α_T/E and the last
  epoch has α_T; ``--alpha_T`` defaults to 0.8.
* One (N, C) float matrix ``all_predictions`` holds a prediction per train sample. At epoch 0 the
  batch's rows are first set to the one-hot labels, so the epoch-0 target is the one-hot label and the
  loss is plain cross-entropy. After each optimiser step the rows of the batch are overwritten with the
  softmax of that step's (train-mode) forward. Each sample is visited once per epoch, so a row read at
  epoch t still holds the prediction written at epoch t−1: one buffer suffices, read then overwritten.
* The loss is ``(-targets * log_softmax(outputs)).mean(0).sum()``: soft-target cross-entropy averaged
  over the batch.

kdlab's form (choices, where the loop differs from the official script):

* The memory is a registered buffer ``memory`` (train_size, C) plus a bool buffer ``seen`` (train_size,):
  a row not yet written stands for the one-hot label (the official epoch-0 overwrite). Both are in the
  method's state dict, so checkpoints carry them and a resumed run is exact (the first official
  ``main.py`` did not restore the matrix on ``--resume``; a later one in the repository saves it as
  ``prev_predictions``). C comes from probing the student with a zeros input of ``input_shape`` at
  build. The memory lives on the training device (20 MB for 50k samples × 100 classes).
* The epoch is not passed to a method; the loop gives ``step``/``total_steps``. The method infers the
  batch size B from the first (largest) batch it sees — in ``fit`` the first batch of an epoch, also
  after a resume — and uses the loop's own arithmetic: steps_per_epoch = ⌈N/B⌉, E = ⌈total_steps /
  steps_per_epoch⌉, t = step // steps_per_epoch. With ``train.steps`` E counts the last, partial epoch.
* The memory is written in ``loss_terms`` (before the loop's optimiser step, from the same forward whose
  logits give the loss): the same values the official code writes after ``optimizer.step()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kdlab.config.validate import UnitInterval
from kdlab.errors import KdlabError
from kdlab.methods.base import Method
from kdlab.registry import register


def pskd_alpha(alpha_T: float, epoch: int, epochs: int) -> float:
    """α_t = α_T · (t + 1) / E for the 0-based epoch t of E (official ``main.py``; never below 0)."""
    return max(0.0, alpha_T * (epoch + 1) / max(1, epochs))


def pskd_targets(labels: torch.Tensor, previous: torch.Tensor, alpha: float,
                 seen: torch.Tensor | None = None) -> torch.Tensor:
    """ỹ = (1 − α)·onehot(y) + α·previous, with ``previous`` the one-hot label where ``seen`` is False.

    ``previous`` is (N, C) probabilities; ``labels`` (N,) integer; the result is (N, C) float32 (or wider).
    """
    onehot = torch.nn.functional.one_hot(labels.long(), previous.shape[-1]).to(previous.dtype)
    if seen is not None:
        previous = torch.where(seen.unsqueeze(-1), previous, onehot)
    return (1.0 - alpha) * onehot + alpha * previous


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_n Σ_c −targets_nc · log softmax(logits)_nc (official ``Custom_CrossEntropy_PSKD``), in ≥ float32."""
    dtype = torch.promote_types(torch.float32, logits.dtype)
    log_probs = torch.log_softmax(logits.to(dtype), dim=-1)
    return -(targets.to(dtype) * log_probs).sum(dim=-1).mean()


def num_classes_of(student: nn.Module, input_shape: tuple[int, ...] | None, method: str) -> int:
    """The student's number of outputs, by one eval-mode forward of a zeros input (mode restored)."""
    if input_shape is None:
        raise KdlabError(f"method {method} needs the input shape to size its per-sample prediction memory; "
                         "build it with build_method(..., input_shape=splits.input_shape)")
    device = next(iter(student.parameters()), torch.zeros(())).device
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            logits = student(torch.zeros(1, *input_shape, device=device))
    finally:
        student.train(was_training)
    return int(logits.shape[-1])


class ProgressiveTargets(nn.Module):
    """PS-KD's per-sample memory of the previous epoch's predictions and its α_t schedule.

    Buffers (checkpointed with the method): ``memory`` (train_size, C) float32, ``seen`` (train_size,) bool.
    ``loss`` returns the soft-target cross-entropy against ỹ_t and then stores the batch's predictions.
    """

    def __init__(self, alpha_T: float, *, train_size: int | None, num_classes: int, method: str):
        super().__init__()
        if isinstance(alpha_T, bool) or not isinstance(alpha_T, (int, float)) or not 0.0 <= alpha_T <= 1.0:
            raise KdlabError(f"method.alpha_T: must be a number in [0, 1], got {alpha_T!r}; the paper uses 0.8")
        if train_size is None or train_size < 1:
            raise KdlabError(f"method {method} keeps a prediction per train sample and needs train_size; build it "
                             "with build_method(..., train_size=len(splits.train[0]))")
        self.alpha_T = float(alpha_T)
        self.train_size = int(train_size)
        self.method_name = method
        self.register_buffer("memory", torch.zeros(self.train_size, num_classes))
        self.register_buffer("seen", torch.zeros(self.train_size, dtype=torch.bool))
        self.batch_size: int | None = None  # inferred from the largest batch seen (see the module docstring)
        self.epoch, self.epochs, self.alpha = 0, 1, 0.0  # of the latest batch, for inspection

    def schedule(self, step: int, total_steps: int, batch_len: int,
                 steps_per_epoch: int | None = None) -> tuple[int, int, float]:
        """``(t, E, α_t)`` for the loop's ``step`` of ``total_steps``.

        ``steps_per_epoch`` comes from the loop (``Method.steps_per_epoch``); called
        without it (e.g. by hand), it is inferred from the largest batch seen.
        """
        if steps_per_epoch is None:
            if self.batch_size is None or batch_len > self.batch_size:
                self.batch_size = batch_len
            steps_per_epoch = math.ceil(self.train_size / self.batch_size)
        epochs = max(1, math.ceil(total_steps / steps_per_epoch))
        epoch = min(step // steps_per_epoch, epochs - 1)
        return epoch, epochs, pskd_alpha(self.alpha_T, epoch, epochs)

    def targets(self, labels: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
        """ỹ_t for the samples at ``indices`` (one-hot where no prediction is stored yet)."""
        return pskd_targets(labels, self.memory[indices], alpha, self.seen[indices])

    @torch.no_grad()
    def remember(self, indices: torch.Tensor, logits: torch.Tensor) -> None:
        """Store softmax(logits) as the samples' latest predictions."""
        self.memory[indices] = torch.softmax(logits.detach().float(), dim=-1).to(self.memory.dtype)
        self.seen[indices] = True

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None, *,
             step: int, total_steps: int, steps_per_epoch: int | None = None) -> torch.Tensor:
        if indices is None:
            raise KdlabError(f"method {self.method_name} needs the batch's train-split indices (Batch.indices); "
                             "kdlab's training loop sets them")
        if indices.shape != labels.shape:
            raise KdlabError(f"method {self.method_name}: Batch.indices has shape {tuple(indices.shape)} but the "
                             f"labels {tuple(labels.shape)}; pass one train-split index per sample")
        if logits.shape[-1] != self.memory.shape[-1]:
            raise KdlabError(f"method {self.method_name}: the student predicts {logits.shape[-1]} classes but the "
                             f"memory was sized for {self.memory.shape[-1]}")
        self.epoch, self.epochs, self.alpha = self.schedule(step, total_steps, len(indices), steps_per_epoch)
        value = soft_cross_entropy(logits, self.targets(labels, indices, self.alpha))
        self.remember(indices, logits)
        return value


@dataclass
class PSKDHparams:
    alpha_T: UnitInterval = 0.8  # α_T: weight of the previous-epoch prediction in the last epoch (official default 0.8)


@register("method", "pskd")
class PSKD(Method):
    """PS-KD: cross-entropy to (1−α_t)·onehot + α_t·(own softmax of the previous epoch), α_t = α_T·(t+1)/E."""

    per_sample_state = True  # past predictions per train sample
    Hparams = PSKDHparams
    needs_teacher = False
    refuses_teacher = True

    def __init__(self, hparams, *, student, teacher=None, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        self.progressive = ProgressiveTargets(hparams.alpha_T, train_size=train_size,
                                              num_classes=num_classes_of(student, input_shape, "pskd"),
                                              method="pskd")

    def loss_terms(self, batch, student_out, teacher_out):
        return {"pskd": self.progressive.loss(student_out.logits, batch.labels, batch.indices,
                                              step=self.step, total_steps=self.total_steps,
                                              steps_per_epoch=self.steps_per_epoch)}
