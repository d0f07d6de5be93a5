"""Evaluation of a model on one split: eval-mode logits (``predict``) and the split's metrics (``evaluate``),
classification by logits, sequence tasks by generation (``kdlab.seq.evaluate``); shared by the loop and its callers.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from kdlab.data import SequenceInfo
from kdlab.errors import KdlabError
from kdlab.metrics import classification_metrics


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise KdlabError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, *, device: torch.device, precision: str = "fp32",
            batch_size: int = 1024, input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Eval-mode logits for ``inputs`` (float32, on the CPU); the model's mode is restored. ``input_dtype``: the
    dtype floating inputs are cast to (a teacher held in bf16/fp16)."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size].to(device)
        if input_dtype is not None and batch.is_floating_point():
            batch = batch.to(input_dtype)
        with _autocast(device, precision):
            chunks.append(model(batch).float().cpu())
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def evaluate(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor], *, prefix: str, device: torch.device,
             precision: str, teacher_logits=None, sequence: SequenceInfo | None = None,
             final: bool = False) -> dict[str, float]:
    """Metrics of ``model`` on one split, keyed ``<prefix>/<name>``.

    Sequence tasks (``sequence`` set) are scored by generation (kdlab.seq.evaluate), where
    ``teacher_logits`` holds the teacher's greedy responses; ``final`` adds the sampled exact match.
    """
    inputs, labels = split
    if len(inputs) == 0:
        return {}
    if sequence is not None:
        from kdlab.seq.evaluate import sequence_metrics

        with _autocast(device, precision):
            metrics = sequence_metrics(model, split, sequence, device=device, teacher_responses=teacher_logits,
                                       sampled=final)
        return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    logits = predict(model, inputs, device=device, precision=precision)
    metrics = classification_metrics(logits, labels, teacher_logits=teacher_logits)
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
