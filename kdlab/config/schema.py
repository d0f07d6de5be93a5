"""The experiment schema: dataclasses only, every default and every bound declared on its field.

Bounds are ``annotated_types`` metadata (``Annotated[int, Ge(1)]``), honoured by the one coercer in
``kdlab.config.validate``; choices are ``Literal``. Rules that tie two fields together live in
``kdlab.config.checks``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from annotated_types import Ge, Gt, Interval, Le, MaxLen, MinLen

from kdlab.config.validate import Says

# Field metadata of keys added after run ids were in use: left out of the resolved config (and so of the
# run id's content hash) while they hold their default, so configs that do not set them keep their ids.
OMIT_DEFAULT = {"omit_default": True}

Count = Annotated[int, Ge(1)]  # a whole number of things (epochs, steps, samples): at least one
Fraction = Annotated[float, Interval(ge=0, le=1)]
# Names become parts of run ids, folder names and report file names: bounded so a file name stays legal.
Name = Annotated[str, MaxLen(64)]


@dataclass
class TrainConfig:
    """Optimisation of one model (the student, or a recipe teacher)."""

    epochs: Count = 30  # passes over the train split
    steps: Optional[Count] = None  # if set, train for exactly this many optimiser steps instead
    batch_size: Annotated[int, Ge(1), Le(1 << 24)] = 128  # the micro-batch when grad_accum_steps > 1
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: Annotated[float, Gt(0), Says("a positive finite number")] = 0.01  # peak (after warmup); no upper bound:
    # an exploding run is a legitimate experiment (tests/reliability/test_numerical.py)
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: Annotated[float, Interval(ge=0, le=1e3)] = 0.0
    schedule: Literal["constant", "cosine", "step"] = "cosine"  # per optimiser step
    warmup_epochs: Annotated[float, Interval(ge=0, le=1e6)] = 0.0  # linear warmup from 0, in epochs
    milestones: tuple[Annotated[float, Interval(ge=0, le=1)], ...] = (0.5, 0.75)  # "step": fractions of training
    gamma: Annotated[float, Interval(gt=0, le=1)] = 0.1  # "step" schedule: lr factor at each milestone
    grad_clip: Optional[Annotated[float, Gt(0), Le(1e6)]] = None  # max global gradient norm; None = no clipping
    eval_every: Count = 1  # validate every N epochs (and always after the last)
    checkpoint_every: Count = 5  # checkpoint every N epochs (and always after the last)
    selection: Literal["last", "best_val"] = "last"  # which epoch's weights give the test metrics
    keep_epochs: tuple[Count, ...] = ()  # keep the model's weights after these epochs (early-stopped teachers)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (checked against this machine)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 needs CUDA
    # Speed (kdlab.engine.speed; each off by default, so existing run ids are kept):
    # the teacher's train-split outputs computed once and read from a verified on-disk cache.
    teacher_cache: bool = field(default=False, metadata=OMIT_DEFAULT)
    compile: bool = field(default=False, metadata=OMIT_DEFAULT)  # torch.compile the student and teacher forwards
    channels_last: bool = field(default=False, metadata=OMIT_DEFAULT)  # NHWC memory format (image conv nets)
    fused_optimizer: bool = field(default=False, metadata=OMIT_DEFAULT)  # fused optimiser kernel where available
    # The teacher's weights: "same" as the student (float32; autocast applies), or a bfloat16 copy for the training
    # forward (evaluation keeps the float32 teacher). The older spelling of teacher.dtype (kdlab.engine.teacher).
    teacher_dtype: Literal["same", "bf16"] = field(default="same", metadata=OMIT_DEFAULT)
    # Intra-op CPU threads of this run, wherever it is executed (serially, a --workers process, a Ray task),
    # so its numbers do not depend on scheduling; 1 suits a shared machine. null: the process's own count.
    threads: Optional[Annotated[int, Ge(1), Le(1024)]] = field(default=1, metadata=OMIT_DEFAULT)
    # Gradient accumulation: one optimiser step per this many micro-batches of batch_size samples (an
    # optimiser batch of grad_accum_steps × batch_size); steps, epochs' step counts, schedule and checkpoints
    # count optimiser steps. Normalised exactly as one batch of that size (docs/methods.md).
    grad_accum_steps: Annotated[int, Ge(1), Le(1 << 16)] = field(default=1, metadata=OMIT_DEFAULT)
    sharding: Literal["ddp", "fsdp"] = field(default="ddp", metadata=OMIT_DEFAULT)  # torchrun: student replicated or FSDP2


@dataclass
class DataConfig:
    """The dataset and how it is split; other keys go to the dataset factory."""

    dataset: str = "mnist1d"
    root: Optional[str] = None  # folder holding the files of file-based datasets (cifar10, mnist, ...)
    val_fraction: Annotated[float, Interval(ge=0, lt=1)] = 0.1  # carved from train; test is never touched
    split_seed: Annotated[int, Ge(0)] = 0  # fixed across run seeds so every run (and the teacher) sees the same splits
    augment: Literal["none", "crop_flip", "flip", "rrc_flip"] = "none"  # train-time augmentation (data/augment.py)
    # Low-label regime: keep this many train labels per class (chosen by split_seed), hide the rest as -1.
    # Val and test keep every label. Only methods that use unlabelled samples (awr_kd) accept -1 labels.
    labels_per_class: Optional[Annotated[int, Ge(1), Says("an integer >= 1")]] = field(default=None,
                                                                                      metadata=OMIT_DEFAULT)
    # With labels_per_class: drop the unlabelled train samples instead (supervised training on the labelled ones).
    drop_unlabelled: bool = field(default=False, metadata=OMIT_DEFAULT)
    options: dict = field(default_factory=dict)  # dataset factory keyword arguments


@dataclass
class MethodConfig:
    """The distillation method; other keys are its hyperparameters (its ``Hparams`` dataclass)."""

    name: str = "kd"
    options: dict = field(default_factory=dict)


@dataclass
class QuantConfig:
    """``student.quant``: which linear layers are fake-quantized and how (``kdlab.quant.QuantSpec``).

    Declares the keys and their choices for validation only: the config keeps the mapping as written
    (so run ids do not change), and the defaults that apply are ``QuantSpec``'s.
    """

    weight_bits: Literal[2, 4, 8, "ternary"] = "ternary"
    per_channel: bool = False
    activation_bits: Optional[Literal[8]] = None
    activation_mode: Literal["minmax", "lsq"] = "minmax"
    # fnmatch patterns on module names (each must match an nn.Linear: checked when the model is built)
    layers: Union[Annotated[str, MinLen(1)], Annotated[list[Annotated[str, MinLen(1)]], MinLen(1)]] = "*"


@dataclass
class PeftConfig:
    """``student.peft``: a LoRA adapter trained on a frozen student (``kdlab.seq.peft``, the ``peft`` extra)."""

    lora_r: Annotated[int, Ge(1), Le(1 << 16)] = 16  # the adapter's rank r
    lora_alpha: Annotated[float, Gt(0), Le(1e6)] = 32  # α: the update is scaled by α / r
    lora_dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0  # dropout on the adapter's input
    # Layers to adapt: module names (a name matches itself and any module path ending in ".name"), or
    # "all-linear"; null = peft's default for the architecture (q_proj and v_proj for Llama).
    target_modules: Optional[Union[Literal["all-linear"], Annotated[list[Annotated[str, MinLen(1)]], MinLen(1)]]] = None


@dataclass
class StudentConfig:
    """The student network: a zoo model with its options, optionally started from a checkpoint."""

    model: Optional[str] = None  # zoo name (or NAME-wW-dD, e.g. cnn1d-w16)
    checkpoint: Optional[str] = None  # safetensors weights to load
    # Fake-quantize chosen linear layers for quantization-aware training (QuantConfig's keys); null = full precision.
    # Kept as written (a mapping), so run ids do not change when QuantConfig gains a key.
    quant: Optional[dict] = field(default=None, metadata=OMIT_DEFAULT)
    # "teacher" = start from the teacher's weights (same model and options), as QAT of a fine-tuned model.
    init: Optional[Literal["teacher"]] = field(default=None, metadata=OMIT_DEFAULT)
    # With init: teacher (a Hugging Face causal LM): keep only these decoder layers of the teacher (a list of
    # indices, or a count spread evenly over its depth), as layer-dropping distillation recipes start students.
    keep_layers: Optional[Union[Annotated[int, Ge(1)], Annotated[list[Annotated[int, Ge(0)]], MinLen(1)]]] = field(
        default=None, metadata=OMIT_DEFAULT)
    # A LoRA adapter (PeftConfig's keys): only the adapter trains and is checkpointed; null = train every weight.
    peft: Optional[PeftConfig] = field(default=None, metadata=OMIT_DEFAULT)
    options: dict = field(default_factory=dict)  # model factory keyword arguments

    # The teacher-only keys at their defaults, written into the resolved student section exactly as when
    # one class held both sections: run ids (content hashes of resolved configs) stay unchanged.
    RUN_ID_KEYS: ClassVar[dict] = {"train": None, "seed": 0, "epoch": None, "trajectory": False,
                                   "assistants": [], "members": []}


@dataclass
class TeacherConfig:
    """A teacher: a kdlab checkpoint (it records the architecture), a recipe (model + train), or members.

    ``assistants`` and ``members`` are lists of teacher sections of their own.
    """

    model: Optional[str] = None  # zoo name (or NAME-wW-dD); may be omitted for a kdlab checkpoint
    checkpoint: Optional[str] = None  # safetensors weights to load
    train: Optional[TrainConfig] = None  # its training recipe (defaults: TrainConfig())
    seed: Annotated[int, Ge(0)] = 0  # the seed of its training run
    epoch: Optional[Count] = None  # use the recipe's weights after this epoch (in train.keep_epochs)
    trajectory: bool = False  # expose the recipe's kept checkpoints, in order (route_constrained)
    assistants: list = field(default_factory=list)  # chain teacher → assistants → student (TAKD)
    members: list = field(default_factory=list)  # several teachers (multi_teacher)
    # The method that trains a recipe teacher (no teacher of its own), e.g. adversarial_training; null = scratch.
    method: Optional[MethodConfig] = field(default=None, metadata=OMIT_DEFAULT)
    # Where the teacher runs (kdlab.engine.teacher): auto | cpu | cuda | cuda:N | mps; null = the student's device.
    device: Optional[str] = field(default=None, metadata=OMIT_DEFAULT)
    # The teacher's weights held in this dtype (no float32 copy kept); null = as loaded, or train.teacher_dtype.
    dtype: Optional[Literal["fp32", "bf16", "fp16"]] = field(default=None, metadata=OMIT_DEFAULT)
    options: dict = field(default_factory=dict)  # model factory keyword arguments


ModelConfig = StudentConfig  # the name engine/build.py and older callers use for a network to build


Eps = Union[Annotated[float, Interval(ge=0, le=1e3)], str]  # a radius: 0.1 or "8/255"


@dataclass
class AttackConfig:
    """One attack run on the test subset after training (``kdlab.robust.protocol.AttackSpec``)."""

    name: Literal["fgsm", "pgd", "apgd", "autoattack"] = "pgd"  # autoattack: the standard version, extra "autoattack"
    eps: Optional[Eps] = None  # radius in input units ([0, 1]): 0.1 or "8/255"; null = robust.eps
    norm: Literal["linf", "l2"] = "linf"
    # Lower bounds (and the per-attack rules) are AttackSpec's; these upper bounds stop absurd budgets early.
    steps: Optional[Annotated[int, Le(100_000)]] = None  # null: the attack's default
    step_size: Optional[Annotated[float, Le(1e3)]] = None  # null: the attack's default
    restarts: Annotated[int, Le(10_000)] = 1  # random restarts; the per-sample strongest point is kept
    loss: Literal["ce", "cw"] = "ce"  # cross-entropy or Carlini–Wagner margin
    seed: Annotated[int, Ge(0)] = 0  # seeds the attack's random start
    label: Optional[Annotated[str, MaxLen(64)]] = None  # metric key (robust/<label>/acc)


@dataclass
class RobustConfig:
    """Robust and faithfulness metrics computed on the test split after training (``robust/...`` metrics)."""

    eps: Eps = "8/255"  # default radius of the attacks and of the faithfulness metrics
    attacks: list[AttackConfig] = field(default_factory=lambda: [AttackConfig(name="pgd", steps=20)])
    eps_curve: list[Eps] = field(default_factory=list)  # robust accuracy of the first attack at these ε
    subset: Optional[Annotated[int, Ge(1), Says("an integer >= 1")]] = 500  # attacked test samples; null = all
    subset_seed: Annotated[int, Ge(0)] = 0
    faithfulness: bool = False  # agreement, adversarial disagreement, relative calibration (needs a teacher)
    faithfulness_steps: Annotated[int, Ge(1), Le(100_000), Says("an integer >= 1")] = 20  # PGD steps
    delta: Fraction = 0.1  # relative-calibration tolerance: a confidence gap above δ is a violation
    sanity_checks: bool = True  # gradient-masking checks on the first attack (a few extra attack runs)
    batch_size: Annotated[int, Ge(1), Le(1 << 24), Says("an integer >= 1")] = 500  # samples attacked at once


@dataclass
class MlflowConfig:
    """An MLflow tracking destination (extra ``mlflow``)."""

    uri: Optional[str] = None  # tracking URI; null: a local file store, <workspace>/mlruns
    experiment: Optional[str] = None  # MLflow experiment name; null: the kdlab experiment's name


@dataclass
class TrackingConfig:
    """Where per-epoch and final metrics are also sent (``kdlab.study.tracking``). Never changes results,
    so it is not part of a run's identity: left out of the resolved config and so of run ids."""

    tensorboard: bool = False  # event files in <run folder>/tensorboard (extra ``tensorboard``)
    mlflow: Union[bool, MlflowConfig] = False  # true or {uri: ..., experiment: ...}: log to MLflow


@dataclass
class ExperimentConfig:
    """One experiment: data, teacher, student, method, training, seeds and an optional grid."""

    name: Name = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: Optional[TeacherConfig] = None  # null: no teacher (methods that need one refuse)
    student: StudentConfig = field(default_factory=lambda: StudentConfig(model="cnn1d"))
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: list[Annotated[int, Ge(0)]] = field(default_factory=lambda: [0])
    grid: dict[str, Any] = field(default_factory=dict)  # key.path -> [values] or {name: value}; product × seeds
    robust: Optional[RobustConfig] = field(default=None, metadata=OMIT_DEFAULT)  # null: no robust evaluation
    tracking: Optional[TrackingConfig] = field(default=None, metadata=OMIT_DEFAULT)  # null: store only
    # The user's modules imported before validation (kdlab.plugins): names on sys.path or .py files (absolute once
    # loaded). Not part of a run's identity (RunSpec.identity).
    imports: Optional[list[str]] = field(default=None, metadata=OMIT_DEFAULT)
