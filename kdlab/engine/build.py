"""Building models, methods and teachers from config sections (through the registry)."""
from __future__ import annotations

import inspect
from pathlib import Path

from torch import nn

from kdlab import registry
from kdlab.config import MethodConfig, ModelConfig
from kdlab.data import Splits
from kdlab.engine.checkpoint import load_into, read_model_file
from kdlab.errors import KdlabError
from kdlab.methods.base import Method
from kdlab.quant.model import quant_spec, quantize_model


def model_spec(name: str, options: dict, splits: Splits, *, quant: dict | None = None) -> dict:
    """The architecture record saved in a model file's metadata: enough to rebuild it (fake-quantized
    layers included: ``quant`` is the student's ``QuantSpec`` mapping)."""
    spec = {"model": name, "options": options, "num_classes": splits.num_classes,
            "input_shape": list(splits.input_shape), "dataset": splits.name}
    if quant is not None:
        spec["quant"] = quant
    return spec


def build_model(name: str, options: dict, splits: Splits) -> nn.Module:
    factory = registry.get("model", name)
    extra = {}
    if splits.text is not None:  # text encoders size their embeddings from the dataset's tokenizer (unless set)
        accepted = inspect.signature(factory).parameters
        extra = {key: value for key, value in (("vocab_size", splits.text.vocab_size), ("pad_token_id", splits.text.pad_id))
                 if key in accepted and options.get(key) is None}
    return factory(input_shape=tuple(splits.input_shape), num_classes=splits.num_classes,
                   mean=tuple(splits.mean), std=tuple(splits.std), **{**options, **extra})


def load_model_file(path: str | Path, splits: Splits, *, model: str | None = None, options: dict | None = None,
                    key: str = "teacher.checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild and load a network from a safetensors file for this dataset.

    The architecture comes from the file's kdlab metadata, or from ``model``/
    ``options`` for a plain state dict. A class-count or input-shape mismatch with
    the dataset is refused with the fix.
    """
    tensors, spec = read_model_file(path)
    if model is None:
        if spec is None:
            raise KdlabError(f"{key}: {path} has no kdlab architecture metadata; also set the model name "
                             f"({key.rsplit('.', 1)[0]}.model) and its options")
        model, options = spec["model"], spec.get("options", {})
    if spec is not None:
        if spec.get("num_classes") != splits.num_classes:
            raise KdlabError(f"{key}: {path} predicts {spec.get('num_classes')} classes but dataset "
                             f"{splits.name!r} has {splits.num_classes}; use a checkpoint trained on {splits.name}")
        if tuple(spec.get("input_shape", ())) != tuple(splits.input_shape):
            raise KdlabError(f"{key}: {path} takes inputs of shape {tuple(spec['input_shape'])} but dataset "
                             f"{splits.name!r} gives {tuple(splits.input_shape)}")
    network = build_model(model, options or {}, splits)
    quant = spec.get("quant") if spec is not None else None
    if quant is not None:  # the file holds fake-quantized layers (weights, activation ranges or steps)
        quantize_model(network, quant_spec(quant, key=key))
    load_into(network, tensors, source=str(path))
    return network, model_spec(model, options or {}, splits, quant=quant)


def build_student(cfg: ModelConfig, splits: Splits, teacher: nn.Module | None = None) -> nn.Module:
    """The student: built or loaded, optionally started from the teacher's weights, then fake-quantized.

    ``student.quant_options`` records the quantization actually applied (the config's, or the one a
    loaded model file carries); the runner saves it with the model and exports the integers from it.
    """
    quant = cfg.quant
    if cfg.checkpoint is not None:
        student, spec = load_model_file(cfg.checkpoint, splits, model=cfg.model, options=cfg.options,
                                        key="student.checkpoint")
        if spec.get("quant") is not None:  # the file is already quantized: its spec is the student's
            if quant is not None and quant_spec(quant) != quant_spec(spec["quant"], key="student.checkpoint"):
                raise KdlabError(f"student.quant: {cfg.checkpoint} already holds a model quantized as {spec['quant']}; "
                                 "remove student.quant or give the same settings")
            quant = spec["quant"]
        elif quant is not None:
            quantize_model(student, quant_spec(quant))
    elif cfg.init == "teacher" and getattr(cfg, "keep_layers", None) is not None:
        student = _cut_from_teacher(teacher, cfg.keep_layers)
        if quant is not None:
            quantize_model(student, quant_spec(quant))
    else:
        student = build_model(cfg.model, cfg.options, splits)
        if cfg.init == "teacher":
            copy_teacher_weights(student, teacher)
        if quant is not None:
            quantize_model(student, quant_spec(quant))
    student.quant_options = quant
    if getattr(cfg, "peft", None) is not None:  # LoRA: the adapter trains on the frozen student built above
        from kdlab.seq.peft import apply_lora

        source = getattr(student, "source", None)  # the base is that folder only if loaded from it as is
        as_is = source is not None and cfg.checkpoint is None and getattr(cfg, "keep_layers", None) is None
        apply_lora(student, cfg.peft, base_source=str(source) if as_is else None)
    return student


def _cut_from_teacher(teacher: nn.Module | None, keep) -> nn.Module:
    """``student.init: teacher`` + ``keep_layers``: a copy of the (Hugging Face) teacher keeping those decoder
    layers; it shares the teacher's tokenizer (``source``)."""
    from kdlab.seq.hf import HFCausalLM
    from kdlab.seq.hf_export import drop_layers

    if not isinstance(teacher, HFCausalLM):
        raise KdlabError("student.keep_layers: drops decoder layers of a Hugging Face teacher (model: hf_causal_lm); "
                         "remove keep_layers for this teacher")
    student = drop_layers(teacher, keep)
    student.source = teacher.source
    return student


def copy_teacher_weights(student: nn.Module, teacher: nn.Module | None) -> None:
    """``student.init: teacher``: load the teacher's state into the (same-architecture) student."""
    if teacher is None:
        raise KdlabError("student.init: 'teacher' copies the teacher's weights; add a teacher section")
    own, theirs = student.state_dict(), teacher.state_dict()
    mismatched = sorted(set(own) ^ set(theirs)) + [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if mismatched:
        raise KdlabError(f"student.init: the teacher's architecture differs from the student's (first difference: "
                         f"{mismatched[0]}); give the student the teacher's model and options")
    student.load_state_dict(theirs)


def build_method(cfg: MethodConfig, *, student: nn.Module, teacher: nn.Module | None,
                 input_shape: tuple[int, ...] | None = None, train_size: int | None = None,
                 sequence=None) -> Method:
    """Build the method; bad hyperparameters, tap names or shapes fail here, before training.

    ``sequence`` is the dataset's ``SequenceInfo`` for sequence tasks (None for classification).
    """
    method_cls = registry.get("method", cfg.name, key="method.name")
    if sequence is not None and "sequence" not in method_cls.data_kinds:
        raise KdlabError(f"method.name: {cfg.name!r} is a classification method but the dataset is the sequence "
                         f"task {sequence.task!r}; use a sequence method ({', '.join(_sequence_methods())})")
    if sequence is None and "classification" not in method_cls.data_kinds:
        raise KdlabError(f"method.name: {cfg.name!r} trains on sequence tasks; use a sequence dataset "
                         "(e.g. data.dataset: addition)")
    problem = method_cls.teacher_problem(cfg.name, teacher is not None)  # the rule the config checks too
    if problem:
        raise KdlabError(problem)
    method = method_cls(method_cls.Hparams(**cfg.options), student=student, teacher=teacher, input_shape=input_shape,
                        train_size=train_size)
    method.sequence = sequence
    missing = getattr(sequence, "missing_references", 0)
    trains_on_references = getattr(method, "trains_on_references", lambda: True)
    if missing and trains_on_references():  # a placeholder EOS would teach the student to stop at once
        first = getattr(sequence, "first_missing_reference", "")
        raise KdlabError(f"method.name: {missing} train prompts of {sequence.task!r} have no reference completion"
                         f"{f' (first: {first})' if first else ''}, "
                         f"and {cfg.name!r} with these settings learns from the data's responses (SFT or off-policy "
                         "batches); add completions, or train on-policy only (gkd: on_policy_fraction: 1.0, "
                         "sft_steps: 0)")
    return method


def _sequence_methods() -> list[str]:
    return [name for name in registry.names("method") if "sequence" in registry.get("method", name).data_kinds]


def check_sequence_models(student: nn.Module, teacher: nn.Module | None, splits: Splits) -> None:
    """Token models must cover the task's vocabulary and context (one line naming the fix otherwise)."""
    info = splits.sequence
    sources = [getattr(net, "source", None) for net in (teacher, student)]
    if all(source is not None for source in sources) and sources[0] != sources[1]:
        from kdlab.seq.hf_export import check_same_tokenizer
        from kdlab.seq.hf_load import load_tokenizer

        check_same_tokenizer(load_tokenizer(sources[0]), load_tokenizer(sources[1]))
    for role, net in (("student", student), ("teacher", teacher)):
        context = getattr(net, "context_length", None)
        if net is not None and context is not None and context < info.context_length:
            raise KdlabError(f"{role}.context_length: {context} tokens is shorter than task {info.task!r} needs "
                             f"({info.context_length}: longest prompt + response + generation room); raise it or "
                             "leave it unset")


def check_class_counts(student: nn.Module, teacher: nn.Module | None, splits: Splits) -> None:
    """Teacher and student must predict the same classes (one line naming both counts otherwise)."""
    import torch

    if splits.sequence is not None:
        check_sequence_models(student, teacher, splits)
    if teacher is None:
        return
    outs = []
    example = splits.train[0][:1]  # a real input: token ids for sequence tasks, an image otherwise
    for net in (student, teacher):
        device = next(iter(net.parameters()), torch.zeros(())).device
        was = net.training
        net.eval()
        with torch.no_grad():
            outs.append(net(example.to(device)).shape[-1])
        net.train(was)
    if outs[0] != outs[1] and splits.sequence is not None:
        raise KdlabError(f"teacher vocabulary {outs[1]} != student vocabulary {outs[0]}; distil between models that "
                         "share the task's tokenizer")
    if outs[0] != outs[1]:
        raise KdlabError(f"teacher predicts {outs[1]} classes but the student predicts {outs[0]}; "
                         "distil between models trained for the same classes")
