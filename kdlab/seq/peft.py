"""LoRA students through the ``peft`` library (issue 19):
``student.peft: {lora_r, lora_alpha, lora_dropout, target_modules}``.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, Eq. 3) replaces each
targeted layer's ``h = W₀x`` by ``h = W₀x + (α/r)·B·A·x`` with ``A ∈ R^{r×k}`` (random), ``B ∈ R^{d×r}``
(zero at the start, so the student starts as its base) and ``W₀`` frozen. ``apply_lora`` injects peft's LoRA
layers in place (``peft.get_peft_model``: the student keeps its class, its forward and its module paths, so
feature taps and generation are unchanged), freezes everything else and attaches an ``Adapter`` record as
``student.kdlab_adapter``, which the engine reads:

* the optimiser sees only the adapter's parameters (``requires_grad``; ``engine/loop.py``);
* checkpoints hold only the adapter's tensors + the optimiser state (``engine/state.py``): the frozen base is
  rebuilt from its source at resume (the run id already holds the source's SHA-256) and checked against the
  SHA-256 of its tensors recorded in the checkpoint (``Adapter.base_sha256``), so a resume never trains an adapter
  on another base;
* the run's ``model.safetensors`` and ``hf/`` hold the merged weights ``W₀ + (α/r)·B·A`` under the plain names
  (``merged_state_dict``): a Hugging Face folder anyone loads with ``AutoModelForCausalLM``; ``hf/adapter/`` the
  adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``, ``PeftModel.from_pretrained``).

Any torch student with linear, convolution or embedding layers can take LoRA; a Hugging Face causal LM
(``hf_causal_lm``) is adapted inside its wrapper, so the adapter's names are the ``transformers`` model's own.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kdlab.config.checks import config_rule
from kdlab.errors import KdlabError

INSTALL_HINT = "pip install 'kdlab[peft]'"
# The layer kinds peft's LoRA adapts (Conv1D is GPT-2's transposed linear layer).
_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


def _peft():
    try:
        import peft
    except ImportError:
        raise KdlabError(f"student.peft: LoRA students need the `peft` package, which is not installed; "
                         f"{INSTALL_HINT}") from None
    return peft


@dataclass
class Adapter:
    """What the engine needs to know about a LoRA student (``student.kdlab_adapter``)."""

    peft_model: Any  # peft's PeftModel around the adapted network (held here, not as a submodule)
    network: nn.Module  # the adapted network inside the student (the transformers model, or the student)
    prefix: str  # the network's key prefix in the student's state dict ("model." inside an HFCausalLM)
    trained_keys: tuple[str, ...]  # the student's state-dict keys that train: all a checkpoint holds of it
    base_sha256: str  # SHA-256 of the frozen base's tensors (names, dtypes, shapes, bytes) before adaptation
    base_source: Optional[str]  # the folder the base is, as is (None: cut from a teacher or built from a config)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D (GPT-2), without importing it


def adaptable_names(network: nn.Module) -> list[str]:
    """The last name component of every layer LoRA can adapt, each once, in model order."""
    names: dict[str, None] = {}
    for name, module in network.named_modules():
        if name and (isinstance(module, _ADAPTABLE) or _is_conv1d(module)):
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def tensors_sha256(network: nn.Module) -> str:
    """SHA-256 over the sorted state dict (name, dtype, shape, bytes): identical tensors, identical hash."""
    digest = hashlib.sha256()
    for name, value in sorted(network.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _spec_value(spec: Any, key: str, default: Any) -> Any:
    return spec.get(key, default) if isinstance(spec, dict) else getattr(spec, key, default)


def apply_lora(student: nn.Module, spec: Any, *, base_source: Optional[str] = None,
               key: str = "student.peft") -> nn.Module:
    """Inject LoRA into ``student`` in place (``spec``: ``PeftConfig`` or a mapping); return it, base frozen.

    Refused with one line: a fake-quantized student, target modules that match no layer of the student (a few of
    its layer names are listed), a student without adaptable layers, peft not installed.
    """
    from kdlab.seq.hf import HFCausalLM

    peft = _peft()
    if getattr(student, "kdlab_adapter", None) is not None:
        raise KdlabError(f"{key}: the student already has a LoRA adapter")
    if getattr(student, "quant_options", None) is not None:
        raise KdlabError(f"{key}: LoRA on a fake-quantized student (student.quant) is not supported; keep one of "
                         "student.peft and student.quant")
    hf = isinstance(student, HFCausalLM)
    network, prefix = (student.model, "model.") if hf else (student, "")
    names = adaptable_names(network)
    if not names:
        raise KdlabError(f"{key}: model {type(student).__name__} has no linear, convolution or embedding layer for "
                         "LoRA to adapt; remove student.peft")
    rank, alpha = _spec_value(spec, "lora_r", 16), _spec_value(spec, "lora_alpha", 32)
    dropout, targets = _spec_value(spec, "lora_dropout", 0.0), _spec_value(spec, "target_modules", None)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise KdlabError(f"{key}.lora_r: the adapter's rank must be an integer >= 1, got {rank!r}")
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    if targets is None and not hf:
        raise KdlabError(f"{key}.target_modules: name the layers to adapt (this model's: {shown})")
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    if isinstance(targets, (list, tuple)):
        modules = [name for name, _ in network.named_modules() if name]
        for target in targets:
            if not any(_matches(name, target) for name in modules):
                raise KdlabError(f"{key}.target_modules: {target!r} matches no module of the student; its adaptable "
                                 f"layers are named {shown}")
        targets = list(targets)
    base_sha256 = tensors_sha256(network)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             task_type="CAUSAL_LM" if hf else None)
    try:
        with warnings.catch_warnings():  # peft's notes on Conv1D fan-in/out and deprecated transformers helpers
            warnings.simplefilter("ignore")
            peft_model = peft.get_peft_model(network, config)
    except (ValueError, TypeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KdlabError(f"{key}: peft cannot adapt this {type(student).__name__} ({first}); target linear, "
                         f"convolution or embedding layers ({shown})") from None
    student.requires_grad_(False)  # only the adapter trains (the wrapper may hold parameters of its own)
    trained = []
    for name, parameter in network.named_parameters():
        if ".lora_" in name:
            parameter.requires_grad_(True)
            trained.append(prefix + name)
    if not trained:
        raise KdlabError(f"{key}.target_modules: {targets!r} selects no adaptable layer; its adaptable layers are "
                         f"named {shown}")
    student.kdlab_adapter = Adapter(peft_model=peft_model, network=network, prefix=prefix,
                                    trained_keys=tuple(trained), base_sha256=base_sha256, base_source=base_source)
    return student


def adapter_of(student: nn.Module) -> Optional[Adapter]:
    """The student's ``Adapter`` (None: a plain student, trained and saved whole)."""
    return getattr(student, "kdlab_adapter", None)


@torch.no_grad()
def merged_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s weights with every LoRA update folded in (``W₀ + (α/r)·B·A``, peft's own delta) under the
    names the network had before adaptation; the network is not modified."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in network.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight
            for adapter in module.active_adapters:
                if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            deltas[f"{name}.base_layer.weight" if name else "base_layer.weight"] = weight
    out = {}
    for key, value in network.state_dict().items():
        if ".lora_" in key or key.startswith("lora_"):
            continue
        out[key.replace("base_layer.", "")] = deltas.get(key, value)
    return out


def save_adapter(student: nn.Module, folder: str | Path) -> Path:
    """Write the adapter alone as peft writes it (``adapter_config.json`` + ``adapter_model.safetensors``); its
    ``base_model_name_or_path`` is the base folder when the student's base is that folder as is, else null."""
    adapter = adapter_of(student)
    folder = Path(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter.peft_model.save_pretrained(str(folder), safe_serialization=True)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = adapter.base_source
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card template, empty of facts here
    return folder


@config_rule
def check_peft(cfg: Any, errors: list[str]) -> None:
    """``student.peft`` rules known before any work: peft installed, no fake-quantized student, target modules
    named for a model peft has no default for. (That they match layers of the student is checked when it is
    built, before any run starts.)"""
    from kdlab.config.schema import StudentConfig

    student = cfg.student
    if not isinstance(student, StudentConfig) or student.peft is None:
        return
    if not peft_installed():
        errors.append(f"student.peft: LoRA students need the `peft` package, which is not installed; {INSTALL_HINT}")
    if student.quant is not None:
        errors.append("student.peft: LoRA on a fake-quantized student (student.quant) is not supported; keep one of "
                      "student.peft and student.quant")
    if getattr(student.peft, "target_modules", None) is None and student.model != "hf_causal_lm":
        errors.append(f"student.peft.target_modules: name the layers of {student.model or 'the student'} to adapt "
                      "(only Hugging Face models have peft defaults)")
