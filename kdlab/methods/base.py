"""The method contract: a small module that turns a batch into named loss terms.

The training loop (``kdlab.engine.loop``) runs the teacher forward (no grad,
eval mode) and the student forward, with the feature taps each method declares,
then calls ``loss_terms`` and sums the terms it returns. A method is an
``nn.Module`` so that any trainable parts it owns (projectors, adapters,
discriminators) are optimised with the student and saved in its checkpoints.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from kdlab import registry
from kdlab.config.checks import config_rule
from kdlab.config.validate import check_fields
from kdlab.errors import ConfigError, KdlabError



def teacher_cache_refusal(method_name: str) -> str:
    """The one-line refusal of ``train.teacher_cache`` for a method that cannot use it (config and loop)."""
    return (f"train.teacher_cache: method {method_name} gives its teacher inputs it makes during training "
            "(generated, adversarial or sampled) or a changing teacher, so its outputs cannot be cached per "
            "sample; set train.teacher_cache: false")


@dataclass
class Batch:
    """One training batch: inputs in [0, 1], integer class labels and the samples' train-split indices."""

    inputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None  # positions in the train split (per-sample memories, e.g. PS-KD)
    # What ``make_batch`` computed beside the inputs (clean inputs, teacher outputs on them, a response
    # mask, ...), read back by the same method's ``loss_terms``.
    extras: dict = field(default_factory=dict)


@dataclass
class Outputs:
    """A network's outputs for a batch: logits and the tapped features by name."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class NoHparams:
    """A method without hyperparameters."""


class Method(nn.Module):
    """Base class of every distillation method (register subclasses under kind "method").

    Subclasses set ``Hparams`` (a dataclass: each field is a config key with its
    default), ``needs_teacher``, optionally ``student_taps``/``teacher_taps``
    (module paths or named stages), and implement ``loss_terms``.
    """

    Hparams: ClassVar[type] = NoHparams
    needs_teacher: ClassVar[bool] = True
    refuses_teacher: ClassVar[bool] = False  # self-distillation methods: a teacher section is an error
    # False: the loop runs no teacher forward (``teacher_out`` is None); the method queries the teacher
    # itself, e.g. on the clean inputs while the student sees adversarial ones (ARD, RSLAD, MTARD).
    teacher_in_loop: ClassVar[bool] = True
    # Whether the teacher's outputs depend only on the data sample, so ``train.teacher_cache`` may serve
    # them from disk. None = decide from the class: a teacher run by the loop on unchanged inputs
    # (``teacher_in_loop`` and ``make_batch`` not overridden). Set False where the teacher itself changes
    # during training (route_constrained's checkpoint sequence).
    teacher_cacheable: ClassVar[bool | None] = None
    # True: the method trains on samples whose label is hidden (-1, ``data.labels_per_class``); the config
    # refuses labels_per_class (without drop_unlabelled) for every other method.
    uses_unlabelled: ClassVar[bool] = False
    # Hyperparameters an assistant run of a TAKD chain (``teacher.assistants``) takes from this method; every
    # stage of a chain is trained by KD, so only KD-family methods pass theirs on (kdlab.plan).
    assistant_hparams: ClassVar[tuple[str, ...]] = ()
    # True: the method keeps per-sample state indexed by ``Batch.indices`` (PS-KD's past predictions), which
    # DDP would split between processes; refused under torchrun.
    per_sample_state: ClassVar[bool] = False
    # The kinds of data a method trains on: "classification" (inputs → class logits) and/or "sequence"
    # (token ids in, (B, L, V) next-token logits out); the builder refuses the others before training.
    data_kinds: ClassVar[tuple[str, ...]] = ("classification",)
    sequence = None  # the task's SequenceInfo (EOS/pad ids, decoding), set by the builder for sequence methods
    # Bumped when a fix changes what the method computes for the same hyperparameters: its runs then get new
    # ids (kdlab.runs, left out of ids at 1), so a workspace never reuses a run trained by the old code.
    revision: ClassVar[int] = 1
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    # The adversary extension point (see ``adversary_loss``): how often and how many adversary steps.
    adversary_every: int = 1  # run the adversary before every k-th student step
    adversary_steps: int = 1  # adversary optimiser steps each time it runs
    adversary_lr: float | None = None  # its learning rate; None = train.lr

    def __init__(self, hparams, *, student: nn.Module, teacher: nn.Module | None,
                 input_shape: tuple[int, ...] | None = None, train_size: int | None = None):
        """``input_shape`` (no batch dim) lets a method probe tap shapes to size its adapters;
        ``train_size`` sizes per-sample memories indexed by ``Batch.indices``."""
        super().__init__()
        self.check_hparams(hparams)
        self.hparams = hparams
        self.step = 0  # optimiser steps taken so far (set by the loop before each step)
        # Which micro-batch of the optimiser step ``make_batch`` is making (0 .. train.grad_accum_steps − 1;
        # set by the loop): methods that sample give each micro-batch its own random stream.
        self.micro_batch = 0
        self.total_steps = 1
        self.steps_per_epoch: int | None = None  # set by the loop before training (per-epoch schedules)
        self.adversary_metrics: dict[str, float] = {}  # set by adversary_loss; logged as adv/<name>

    def set_progress(self, step: int, total_steps: int) -> None:
        """Extension point, called by the loop before every step: schedules read ``self.progress``."""
        self.step, self.total_steps = step, total_steps

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))

    def teacher_needed(self) -> bool:
        """Extension point, asked before each step: False skips this step's teacher forward
        (``teacher_out`` is None), e.g. during a teacher-free warm-up."""
        return True

    @classmethod
    def check_hparams(cls, hparams) -> None:
        """The bounds declared on ``Hparams``, for a method built in Python (a config was checked on load)."""
        if dataclasses.is_dataclass(hparams):
            problems: list[str] = []
            check_fields(hparams, "method", problems)
            if not problems and hasattr(hparams, "problems"):
                problems = hparams.problems()
            if problems:
                raise ConfigError(problems[:1])

    @classmethod
    def teacher_problem(cls, name: str, has_teacher: bool) -> str | None:
        """The one rule on whether method ``name`` takes a teacher (asked by the config and the builder)."""
        if cls.needs_teacher and not has_teacher:
            return (f"teacher: method {name!r} needs a teacher; add a teacher section "
                    "(teacher.model + teacher.train, or teacher.checkpoint)")
        if cls.refuses_teacher and has_teacher:
            return f"teacher: method {name!r} distils the student from itself; set teacher: null"
        return None

    @classmethod
    def check_config(cls, cfg, errors: list[str]) -> None:
        """Extension point, run at config validation: the method's rules that tie its hyperparameters
        (``cfg.method.options``) to other sections, e.g. GKD's ``sft_steps`` below ``train.steps``.
        Single-field bounds are declared on ``Hparams``; rules between its fields are ``Hparams.problems()``
        (run here and when the method is built), rules that read other sections ``Hparams.check_config``."""
        rule = getattr(cls.Hparams, "check_config", None)
        if rule is not None:
            rule(cfg, errors)
        if hasattr(cls.Hparams, "problems") and not any(e.startswith("method.") for e in errors):
            try:  # the Hparams' own cross-field rules (also run when built in Python), once its fields are valid
                errors.extend(cls.Hparams(**cfg.method.options).problems())
            except (TypeError, ValueError):
                pass  # a wrongly typed field: already reported by the coercer

    @classmethod
    def teacher_cache_problem(cls, name: str) -> str | None:
        """Why ``train.teacher_cache`` cannot serve method ``name`` (asked at config validation), or None."""
        return None if cls.can_cache_teacher() else teacher_cache_refusal(repr(name))

    @classmethod
    def can_cache_teacher(cls) -> bool:
        """True when the loop may replace this method's teacher forward by cached outputs (see ``teacher_cacheable``)."""
        if cls.teacher_cacheable is not None:
            return cls.teacher_cacheable
        return cls.needs_teacher and cls.teacher_in_loop and cls.make_batch is Method.make_batch

    def make_batch(self, batch: Batch) -> Batch:
        """Extension point, called before the forwards: replace or augment the batch.

        Default: the data batch unchanged. Data-free methods return generated
        inputs here; adversarial-robustness methods return perturbed ones.
        """
        return batch

    def loss_count(self, batch: Batch):
        """Extension point for gradient accumulation: how many units this batch's loss terms average over,
        counted on the batch ``make_batch`` returned (after any generation); an int or a 0-dim tensor.

        With ``train.grad_accum_steps`` = k the loop weights micro-batch j's terms by
        count_j / Σ count over the optimiser step's micro-batches, so the step's gradient is that of one
        batch holding all of them. Default: the samples (per-sample means). Sequence losses averaged per
        token return the response tokens, per sequence the sequences that have one
        (``kdlab.losses.sequence.response_units``). Not asked when k = 1.
        """
        return int(batch.inputs.shape[0])

    # Extension point (optional): ``metrics() -> dict[str, float]``, defined by methods with state worth
    # watching (e.g. MTARD's balanced weights and temperatures). The loop calls it once per epoch, after
    # the epoch's steps, and logs each value as ``method/<name>``. Not defined here, so other methods
    # cost nothing.

    def resets_optimizer(self) -> bool:
        """Extension point, asked by the loop before every optimiser step (after ``set_progress``): True
        clears the optimiser's state (Adam's moments, SGD's momentum) before this step, as a recipe whose
        next stage starts a fresh optimiser (AB's CE stage after its boundary initialisation)."""
        return False

    def make_optimizer(self, params: list[nn.Parameter], train) -> torch.optim.Optimizer | None:
        """Extension point: the main optimiser over ``params`` (the student's and this method's own trainable
        parameters), or None for the one ``train`` names. A ``kdlab.engine.optim.SplitGradientOptimizer``
        (DOT) is handed the step's named loss terms and takes their gradients apart itself."""
        return None

    def adversary_parameters(self) -> list[nn.Parameter]:
        """Extension point: parameters of an adversary (discriminator, generator) that the main
        optimiser must not touch; a second optimiser minimises ``adversary_loss`` over them."""
        return []

    def adversary_loss(self, batch: Batch, student_out: Outputs, teacher_out: Outputs | None) -> dict[str, torch.Tensor]:
        """Terms the adversary minimises, run before ``loss_terms`` on each adversary step.

        ``student_out.logits`` are detached (the student is not moved by this step);
        a method that needs fresh forwards (e.g. through a generator) runs them here.
        """
        raise NotImplementedError

    def loss_terms(self, batch: Batch, student_out: Outputs, teacher_out: Outputs | None) -> dict[str, torch.Tensor]:
        """Named scalar loss terms for this batch; the loop sums them and logs each.

        Return the same names, in the same order, at every step (the loop keeps running sums by position).
        """
        raise NotImplementedError


@config_rule
def method_rules(cfg, errors: list[str]) -> None:
    """The contract's rules at config validation: the method's teacher, unlabelled samples, the teacher cache,
    then the method's own ``check_config``."""
    if not isinstance(cfg.method.name, str):
        return
    try:
        method_cls = registry.get("method", cfg.method.name)
    except KdlabError:
        return  # reported where the method section is parsed
    lpc = cfg.data.labels_per_class
    if lpc is not None and cfg.data.drop_unlabelled is False and not getattr(method_cls, "uses_unlabelled", False):
        errors.append(f"data.labels_per_class: method {cfg.method.name!r} cannot use unlabelled samples (their "
                      "labels are -1); set data.drop_unlabelled: true to train on the labelled ones only, or use "
                      "a method that uses them (awr_kd)")
    if hasattr(method_cls, "teacher_problem"):
        problem = method_cls.teacher_problem(cfg.method.name, cfg.teacher is not None)
        if problem:
            errors.append(problem)
    if cfg.train.teacher_cache is True and hasattr(method_cls, "teacher_cache_problem"):
        problem = method_cls.teacher_cache_problem(cfg.method.name)
        if problem:
            errors.append(problem)
    if hasattr(method_cls, "check_config"):  # the method's own cross-field rules (e.g. sft_steps < train.steps)
        method_cls.check_config(cfg, errors)
