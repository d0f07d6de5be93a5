"""A teacher section of a config as a network: the one place that knows every kind of teacher.

* ``checkpoint`` — a safetensors file (quantized files rebuild their fake-quantized layers);
* a recipe (``model`` + ``train``) — the weights of its own run, at the end or after ``epoch``;
* ``trajectory`` — that run's kept epochs in order, then its final weights;
* ``assistants`` — the last assistant's run, distilled down the chain;
* ``members`` — an ensemble of teacher sections, each one of these.

Where and in what dtype the teacher runs is decided here too (``place_teacher``, the one home of ``teacher.device``,
``teacher.dtype`` and their older spelling ``train.teacher_dtype``).

Runs are trained and stored by the caller (``kdlab.study.runner``): it passes ``load_run``,
which returns the weights of the run a section names (training it first if needed; which run
that is, is the run graph's business, ``kdlab.plan``). Without ``load_run`` the same sections
give their untrained networks, enough to check files, shapes and taps before anything trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from kdlab.config import TeacherConfig
from kdlab.config.entries import pretrained_teacher
from kdlab.data import Splits
from kdlab.engine.build import build_model, load_model_file
from kdlab.errors import KdlabError

# (section, "teacher" for its recipe run or "assistant" for the last stage of its chain, epoch or None for the
# final weights) -> the trained network
LoadRun = Callable[[TeacherConfig, str, "int | None"], nn.Module]


def teacher_module(t: TeacherConfig, splits: Splits, *, load_run: LoadRun | None = None) -> nn.Module:
    """The network of teacher section ``t`` (trained through ``load_run``; untrained without it), carrying
    ``t.device``/``t.dtype`` as ``kdlab_placement`` when set (applied by ``fit``, after the student is built
    from the teacher's float32 weights)."""
    net = _network(t, splits, load_run=load_run)
    if getattr(t, "device", None) is not None or getattr(t, "dtype", None) is not None:
        net.kdlab_placement = Placement(device=t.device, dtype=t.dtype)
    return net


def _network(t: TeacherConfig, splits: Splits, *, load_run: LoadRun | None = None) -> nn.Module:
    from kdlab.models.ensemble import TeacherEnsemble
    from kdlab.models.trajectory import TeacherTrajectory

    if t.members:
        return TeacherEnsemble([teacher_module(member, splits, load_run=load_run) for member in t.members])
    if t.checkpoint is not None:
        return load_model_file(t.checkpoint, splits, model=t.model, options=t.options)[0]
    if t.assistants:
        if load_run is None:  # the end of the chain has the last assistant's shape
            return teacher_module(t.assistants[-1], splits)
        return load_run(t, "assistant", None)
    if t.trajectory:  # the kept checkpoints in order, then the final weights; the final one answers by default
        epochs = [e for e in sorted(t.train.keep_epochs) if e < t.train.epochs]
        if load_run is None:
            return TeacherTrajectory([build_model(t.model, t.options, splits) for _ in range(len(epochs) + 1)])
        return TeacherTrajectory([load_run(t, "teacher", e) for e in epochs] + [load_run(t, "teacher", None)])
    if load_run is None or pretrained_teacher(t):  # untrained, or a pretrained model used as it is
        return build_model(t.model, t.options, splits)
    return load_run(t, "teacher", t.epoch)


# --------------------------------------------------------------------------- placement

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """``teacher.device`` (None: the student's) and ``teacher.dtype`` (None: as loaded)."""

    device: Optional[str] = None
    dtype: Optional[str] = None


@dataclass(frozen=True)
class PlacedTeacher:
    """Where ``place_teacher`` put the teacher: its device, the dtype its floating inputs are cast to (None:
    none), whether the training forward runs a bfloat16 copy (``train.teacher_dtype: bf16``), and whether its
    outputs are moved back to the student's device as float32 (placement given)."""

    device: torch.device
    input_dtype: Optional[torch.dtype]
    training_copy: bool
    placed: bool


def place_teacher(teacher: nn.Module, train, student_device: torch.device) -> PlacedTeacher:
    """Move the teacher where it runs, in eval mode with no gradients (``requires_grad`` off).

    ``teacher.dtype`` converts the teacher itself (every forward, training and evaluation, runs in it: no
    float32 copy is kept, which is what lets a large teacher fit beside the student); ``teacher.device`` puts
    it on another device than the student. ``train.teacher_dtype: bf16``, the older spelling, keeps its recorded
    meaning (a bfloat16 copy for the training forward, the float32 teacher for evaluation), so runs made with it
    keep their results; given with a ``teacher.dtype`` they must agree (checked with the config).
    """
    from kdlab.engine.optim import resolve_device

    placement = getattr(teacher, "kdlab_placement", None) or Placement()
    device = student_device
    if placement.device is not None:
        try:
            device = resolve_device(placement.device)
        except KdlabError as error:  # its message names the student's key
            raise KdlabError(str(error).replace("train.device", "teacher.device", 1)) from None
        if device.index is None and device.type == student_device.type:
            device = student_device  # "cuda" is the student's GPU (under torchrun: the rank's)
    dtype = DTYPES[placement.dtype] if placement.dtype is not None else None
    if dtype is torch.float16 and device.type == "cpu":
        raise KdlabError("teacher.dtype: fp16 on the CPU is not supported (slow or missing kernels); use bf16 or "
                         "fp32, or put the teacher on a GPU (teacher.device: cuda)")
    teacher.to(device=device, dtype=dtype) if dtype is not None else teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    legacy = dtype is None and getattr(train, "teacher_dtype", "same") == "bf16"
    return PlacedTeacher(device=device, input_dtype=torch.bfloat16 if legacy else dtype, training_copy=legacy,
                         placed=placement != Placement())


def cache_precision(teacher: nn.Module | None, train) -> str:
    """The teacher's precision as the teacher-output cache keys it (unchanged strings for unplaced teachers)."""
    placement = getattr(teacher, "kdlab_placement", None)
    dtype = placement.dtype if placement is not None and placement.dtype is not None else None
    tag = train.teacher_dtype if dtype is None else {"fp32": "same", "bf16": "bf16", "fp16": "fp16"}[dtype]
    return f"{train.precision}/{tag}"
