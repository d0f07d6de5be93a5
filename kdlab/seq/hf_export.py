"""Making and writing Hugging Face causal LMs: layer-dropped students, HF folders, tokenizer checks.

* ``drop_layers(model, keep)`` — a copy of a causal LM with only the decoder
  layers ``keep`` (a list of indices, or a count spread evenly over the depth,
  first and last included), as layer-dropping distillation recipes initialise
  students from their teacher.
* ``save_hf_folder(model, folder, tokenizer=...)`` — weights (safetensors),
  config, generation config and tokenizer, written atomically, loadable by
  ``AutoModelForCausalLM.from_pretrained`` with nothing from kdlab.
* ``export_student(student, folder, tokenizer_source=teacher.source)`` — the same
  with the teacher's tokenizer and generation config.
* A LoRA student (``kdlab.seq.peft``) is written merged (``W₀ + (α/r)·B·A``, a plain folder) with its adapter
  alone in ``adapter/`` inside it (``adapter_config.json`` + ``adapter_model.safetensors``).
* ``check_same_tokenizer(a, b)`` — teacher and student must tokenize alike:
  vocabulary, special tokens, chat template; one line naming the first difference.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from kdlab.errors import KdlabError


def _inner(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside an ``HFCausalLM`` (or the model itself)."""
    from kdlab.seq.hf import HFCausalLM

    return model.model if isinstance(model, HFCausalLM) else model


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, layers)``: the ModuleList holding the ``num_hidden_layers`` decoder blocks."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count and len(module) == count:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attribute, module
    raise KdlabError(f"keep_layers: cannot find the decoder layers of this {type(model).__name__} (no ModuleList "
                     f"of num_hidden_layers={count} blocks); layer dropping needs a standard decoder-only model")


def layers_to_keep(keep: int | Sequence[int], total: int, *, key: str = "student.keep_layers") -> list[int]:
    """Validated, sorted layer indices: a list as given, or a count spread evenly (first and last included)."""
    if isinstance(keep, bool):
        raise KdlabError(f"{key}: must be a list of layer indices or a count, got {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= total:
            raise KdlabError(f"{key}: a count must be between 1 and the teacher's {total} layers, got {keep}")
        if keep == 1:
            return [0]
        return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]
    if not isinstance(keep, (list, tuple)) or not keep:
        raise KdlabError(f"{key}: must be a non-empty list of layer indices or a count, got {keep!r}")
    for index in keep:
        if isinstance(index, bool) or not isinstance(index, int):
            raise KdlabError(f"{key}: layer indices must be integers, got {index!r}")
        if not 0 <= index < total:
            raise KdlabError(f"{key}: layer {index} does not exist; the teacher has layers 0..{total - 1}")
    if list(keep) != sorted(set(keep)):
        raise KdlabError(f"{key}: list each layer once, in increasing order, got {list(keep)}")
    return list(keep)


def drop_layers(model: nn.Module, keep: int | Sequence[int]) -> nn.Module:
    """A deep copy of ``model`` (an ``HFCausalLM`` or a ``transformers`` causal LM) keeping decoder layers ``keep``.

    The copy's ``config.num_hidden_layers`` is the kept count, per-layer config
    lists (``layer_types``) are cut alike, and every ``layer_idx`` attribute inside
    the kept blocks is renumbered 0.. so KV caches index the right slots. The
    input is not modified. Returns the same wrapper type as given.
    """
    from kdlab.seq.hf import HFCausalLM

    inner = _inner(model)
    total = int(inner.config.num_hidden_layers)
    indices = layers_to_keep(keep, total)
    clone = copy.deepcopy(inner)
    parent, attribute, layers = decoder_layers(clone)
    kept = nn.ModuleList(layers[i] for i in indices)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(parent, attribute, kept)
    config = clone.config
    for name in ("layer_types", "sliding_window_pattern_list"):
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == total:
            setattr(config, name, [values[i] for i in indices])
    config.num_hidden_layers = len(indices)
    return HFCausalLM(clone) if isinstance(model, HFCausalLM) else clone


def plain_copy(model: nn.Module) -> nn.Module:
    """A model ``save_pretrained`` accepts: a GGUF-loaded model is rebuilt from its config (without its
    ``quantization_config``) with the state dict copied; any other model is returned as is."""
    inner = _inner(model)
    if getattr(inner.config, "quantization_config", None) is None:
        return inner
    from kdlab.seq.hf import _transformers

    config = copy.deepcopy(inner.config)
    del config.quantization_config
    rebuilt = _transformers().AutoModelForCausalLM.from_config(config)
    rebuilt.load_state_dict(inner.state_dict())
    rebuilt.generation_config = copy.deepcopy(inner.generation_config)
    return rebuilt.to(next(inner.parameters()).dtype)


def save_hf_folder(model: nn.Module, folder: str | os.PathLike, *, tokenizer: Any = None,
                   generation_config: Any = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face folder (safetensors weights, config, generation config, tokenizer).

    A LoRA student's weights are merged (a plain folder ``AutoModelForCausalLM`` loads) and its adapter is
    written alone to ``adapter/`` inside the folder. ``generation_config`` replaces the model's own (e.g. the
    teacher's, with its EOS/pad ids). Written to a temporary sibling and renamed into place; an
    existing non-empty ``folder`` is refused unless ``overwrite``.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise KdlabError(f"export: {str(folder)!r} already exists and is not empty; choose a new folder or remove it")
    from kdlab.seq.peft import adapter_of, merged_state_dict, save_adapter

    adapter = adapter_of(model)
    inner = plain_copy(model)
    weights = {"state_dict": merged_state_dict(inner)} if adapter is not None else {}
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        saved = inner.generation_config
        if generation_config is not None:
            inner.generation_config = generation_config
        from kdlab.seq.hf_load import quiet_transformers

        with quiet_transformers():  # no "Writing model shards" bar
            try:
                inner.save_pretrained(temporary, safe_serialization=True, **weights)
            finally:
                inner.generation_config = saved
            if tokenizer is not None:
                tokenizer.save_pretrained(temporary)
            if adapter is not None:
                save_adapter(model, temporary / "adapter")
        if folder.exists():
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def export_student(student: nn.Module, folder: str | os.PathLike, *, tokenizer_source: str | os.PathLike,
                   overwrite: bool = False) -> Path:
    """``save_hf_folder`` with the tokenizer and generation config (EOS, pad) of ``tokenizer_source``, the
    teacher's folder (``HFCausalLM.source``): what a finished run writes to ``runs/<id>/hf/``."""
    from kdlab.seq.hf_load import load_generation_config, load_tokenizer

    return save_hf_folder(student, folder, tokenizer=load_tokenizer(tokenizer_source),
                          generation_config=load_generation_config(tokenizer_source), overwrite=overwrite)


def _special(tokenizer: Any) -> dict[str, Any]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    found = {name: getattr(tokenizer, name, None) for name in names}
    found["special tokens"] = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", ()) or ())
    return found


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """None if HF tokenizers ``a`` and ``b`` tokenize alike; else the first difference, in a few words."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        return f"vocabularies of {len(vocab_a)} vs {len(vocab_b)} tokens"
    for token in sorted(vocab_a):
        if vocab_b.get(token) != vocab_a[token]:
            return f"token {token!r} has id {vocab_a[token]} vs {vocab_b.get(token)}"
    special_a, special_b = _special(a), _special(b)
    for name in special_a:
        if special_a[name] != special_b[name]:
            return f"{name} {special_a[name]!r} vs {special_b[name]!r}"
    template_a, template_b = getattr(a, "chat_template", None), getattr(b, "chat_template", None)
    if template_a != template_b:
        if not template_a or not template_b:
            return f"chat template {'present' if template_a else 'absent'} vs {'present' if template_b else 'absent'}"
        return "chat templates differ"
    return None


def check_same_tokenizer(a: Any, b: Any, *, names: tuple[str, str] = ("teacher", "student")) -> None:
    """One-line KdlabError when the two tokenizers differ (vocabulary, special tokens, chat template)."""
    difference = tokenizer_difference(a, b)
    if difference is not None:
        raise KdlabError(f"{names[1]}: its tokenizer differs from the {names[0]}'s ({difference}); distillation "
                         f"compares logits token by token, so give the {names[1]} the {names[0]}'s tokenizer "
                         f"(init: {names[0]}, or a model folder saved with the same tokenizer files)")
