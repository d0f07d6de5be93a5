"""A teacher section of a config as a network: the one place that knows every kind of teacher.

* ``checkpoint`` — a safetensors file (quantized files rebuild their fake-quantized layers);
* a recipe (``model`` + ``train``) — the weights of its own run, at the end or after ``epoch``;
* ``trajectory`` — that run's kept epochs in order, then its final weights;
* ``assistants`` — the last assistant's run, distilled down the chain;
* ``members`` — an ensemble of teacher sections, each one of these.

Runs are trained and stored by the caller (``kdlab.study.runner``): it passes ``load_run``,
which returns the weights of the run a section names (training it first if needed; which run
that is, is the run graph's business, ``kdlab.plan``). Without ``load_run`` the same sections
give their untrained networks, enough to check files, shapes and taps before anything trains.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from kdlab.config import TeacherConfig
from kdlab.config.entries import pretrained_teacher
from kdlab.data import Splits
from kdlab.engine.build import build_model, load_model_file

# (section, "teacher" for its recipe run or "assistant" for the last stage of its chain, epoch or None for the
# final weights) -> the trained network
LoadRun = Callable[[TeacherConfig, str, "int | None"], nn.Module]


def teacher_module(t: TeacherConfig, splits: Splits, *, load_run: LoadRun | None = None) -> nn.Module:
    """The network of teacher section ``t`` (trained through ``load_run``; untrained without it)."""
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
