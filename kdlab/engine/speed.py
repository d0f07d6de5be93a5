"""The loop's speed options: compiled forwards with feature taps, channels-last, a bfloat16 teacher,
and the teacher-output cache's checks (``train.compile``, ``channels_last``, ``teacher_dtype``,
``teacher_cache``).

``TappedForward`` is how the loop calls a network: ``logits, features = forward(x)``. The
taps' forward hooks are installed once, before compiling, and the wrapper returns the
captured features as outputs, so ``torch.compile`` traces the hooks into the graph (no
graph break) and the hooks dict never changes afterwards (no recompilation per step;
``tests/engine/test_speed.py`` counts them). The wrapped network keeps its own
``state_dict`` keys (compiling the wrapper, not the network, adds no ``_orig_mod.`` prefix
to checkpoints).
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.models import Taps

log = logging.getLogger(__name__)


class TappedForward(nn.Module):
    """``model``'s forward returning ``(logits, {tap: feature})``.

    ``input_dtype`` casts floating-point inputs first (a teacher held in bfloat16; token ids stay integers)
    and its outputs back to float32; ``device`` moves the inputs to a network held on another device than the
    batch (``teacher.device``) and ``output_device`` the outputs back (as float32); ``channels_last`` hands
    4-d inputs over in NHWC memory format. ``tap_model``: the module whose paths ``names`` are, when ``model``
    wraps it (DistributedDataParallel); default ``model``.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...] = (), *, detach: bool = False,
                 input_dtype: torch.dtype | None = None, channels_last: bool = False,
                 tap_model: nn.Module | None = None, device: torch.device | None = None,
                 output_device: torch.device | None = None):
        super().__init__()
        self.model = model
        # Hooks only when features are asked for: an empty Taps would still put the model on nn.Module's
        # slower hook path every forward.
        self.taps = Taps(tap_model if tap_model is not None else model, names, detach=detach) if names else None
        self.input_dtype, self.channels_last = input_dtype, channels_last
        self.device, self.output_device = device, output_device

    def forward(self, inputs: torch.Tensor):
        if self.device is not None:
            inputs = inputs.to(self.device)
        if self.input_dtype is not None and inputs.is_floating_point():
            inputs = inputs.to(self.input_dtype)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = self.model(inputs)
        features = self.taps.captured if self.taps is not None else {}
        if self.output_device is not None:
            logits = logits.to(self.output_device, torch.float32)
            features = {name: value.to(self.output_device, torch.float32) for name, value in features.items()}
        elif self.input_dtype is not None:
            logits = logits.float()
            features = {name: value.float() for name, value in features.items()}
        return logits, features

    def close(self) -> None:
        if self.taps is not None:
            self.taps.close()


def compile_forward(module: nn.Module, *, key: str = "train.compile") -> nn.Module:
    """``torch.compile(module)``; a clear error where this platform cannot compile."""
    try:
        from torch._dynamo import is_dynamo_supported

        supported = is_dynamo_supported()
    except ImportError:
        supported = False
    if not supported or not hasattr(torch, "compile"):
        raise KdlabError(f"{key}: torch.compile is not supported on this platform (torch {torch.__version__}); "
                         "set train.compile: false")
    return torch.compile(module)


def use_channels_last(model: nn.Module, input_shape: tuple[int, ...], *, role: str) -> bool:
    """Put an image model's weights in channels-last format; False (with a warning) for non-image inputs."""
    if len(input_shape) != 3:
        log.warning("train.channels_last: the %s takes inputs of shape %s, not images (C, H, W); left as is",
                    role, tuple(input_shape))
        return False
    model.to(memory_format=torch.channels_last)
    return True


def teacher_network(teacher: nn.Module, placed) -> nn.Module:
    """The teacher module the training forward runs, where ``kdlab.engine.teacher.place_teacher`` put it.

    ``train.teacher_dtype: bf16`` (``placed.training_copy``) runs a bfloat16 copy (the float32 teacher stays
    for evaluation and agreement metrics); ``teacher.dtype`` converted the teacher itself (no copy).
    """
    if not placed.training_copy:
        return teacher
    return copy.deepcopy(teacher).to(device=placed.device, dtype=torch.bfloat16)


def check_device_options(train, device: torch.device) -> None:
    """CUDA-only options on another device: a clear error (the CPU has no fp16 autocast to speak of)."""
    if train.precision == "fp16" and device.type != "cuda":
        raise KdlabError(f"train.precision: fp16 (with a gradient scaler) needs a CUDA device, but training runs "
                         f"on {device}; use bf16 or fp32")


def check_teacher_cache(method, teacher, splits, train) -> None:
    """Refuse ``train.teacher_cache`` where cached outputs would not be the teacher's outputs on the batch."""
    name = type(method).__name__
    if teacher is None or not method.needs_teacher:
        raise KdlabError(f"train.teacher_cache: method {name} runs no teacher; set train.teacher_cache: false")
    if not method.can_cache_teacher():
        from kdlab.methods.base import teacher_cache_refusal

        raise KdlabError(teacher_cache_refusal(name))
    if splits.sequence is not None:
        raise KdlabError("train.teacher_cache: sequence tasks are not cached (their teachers score generated "
                         "tokens); set train.teacher_cache: false")


def default_cache_root() -> Path:
    """Where teacher outputs go when the caller names no folder: $KDLAB_CACHE or ~/.cache/kdlab."""
    return Path(os.environ.get("KDLAB_CACHE", Path.home() / ".cache" / "kdlab")) / "teacher_outputs"
