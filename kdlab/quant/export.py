"""Export real low-bit integer weights plus scales, and load them back.

``export(model)`` returns a plain dict (``torch.save``-able)::

    {"format": "kdlab.quant/1",
     "layers": {name: {"weight_int": int8 tensor (levels, e.g. {-1, 0, 1}),
                       "scale": float32 tensor (scalar, or (out, 1) per channel),
                       "bias": float tensor or None,
                       "weight_bits": 2|4|8|"ternary", "per_channel": bool,
                       "act_quant": state_dict of the activation quantizer or None}}}

``load_exported(model, exported)`` makes every ``QuantLinear`` of an already quantized model run
on ``weight_int · scale`` instead of its latent weight; ``export_max_error`` checks that this
dequantized model reproduces the fake-quant outputs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.quant.fake import quantize_weight
from kdlab.quant.model import quant_layers

FORMAT = "kdlab.quant/1"


@torch.no_grad()
def export(model: nn.Module) -> dict:
    """Integer weights, scales, biases and activation-quantizer state of every ``QuantLinear``."""
    layers = quant_layers(model)
    if not layers:
        raise KdlabError("quant export: the model has no QuantLinear layers; run quantize_model first")
    out = {}
    for name, layer in layers.items():
        if layer.uses_exported:
            q, scale = layer.weight_int.clone(), layer.weight_scale.clone()
        else:
            q, scale = quantize_weight(layer.weight, layer.spec.weight_bits, layer.spec.per_channel)
        out[name] = {
            "weight_int": q.to(torch.int8).cpu(),
            "scale": scale.detach().to(torch.float32).cpu(),
            "bias": None if layer.bias is None else layer.bias.detach().clone().cpu(),
            "weight_bits": layer.spec.weight_bits,
            "per_channel": layer.spec.per_channel,
            "act_quant": None if layer.act_quant is None
            else {k: v.detach().clone().cpu() for k, v in layer.act_quant.state_dict().items()},
        }
    return {"format": FORMAT, "layers": out}


@torch.no_grad()
def load_exported(model: nn.Module, exported: dict) -> nn.Module:
    """Make each ``QuantLinear`` of ``model`` use the exported integers (in place; returns model).

    ``model`` must be quantized with the same layer names; its latent weights are then ignored.
    """
    if not isinstance(exported, dict) or exported.get("format") != FORMAT:
        raise KdlabError(f"quant export: not a {FORMAT} export (missing or wrong 'format')")
    layers, stored = quant_layers(model), exported["layers"]
    missing = sorted(set(layers) - set(stored))
    extra = sorted(set(stored) - set(layers))
    if missing or extra:
        raise KdlabError(f"quant export: layer names differ from the model; missing in export: "
                         f"{missing or 'none'}; not in model: {extra or 'none'}")
    for name, layer in layers.items():
        entry = stored[name]
        q = entry["weight_int"]
        if tuple(q.shape) != tuple(layer.weight.shape):
            raise KdlabError(f"quant export: {name}.weight_int has shape {tuple(q.shape)}, "
                             f"the model expects {tuple(layer.weight.shape)}")
        device = layer.weight.device
        layer.weight_int = q.to(device=device, dtype=torch.int8)
        layer.weight_scale = entry["scale"].to(device=device, dtype=torch.float32)
        if entry["bias"] is not None and layer.bias is not None:
            layer.bias.copy_(entry["bias"].to(layer.bias))
        if entry["act_quant"] is not None and layer.act_quant is not None:
            layer.act_quant.load_state_dict(entry["act_quant"])
    return model


def clear_exported(model: nn.Module) -> nn.Module:
    """Return every ``QuantLinear`` to fake-quantizing its latent weight."""
    for layer in quant_layers(model).values():
        layer.weight_int = None
        layer.weight_scale = None
    return model


@torch.no_grad()
def dequantized_forward(model: nn.Module, exported: dict, *args, **kwargs):
    """Run a copy of ``model`` (eval mode) whose quantized layers use only the exported integers.

    The copy's latent weights are zeroed first, so the output cannot come from them.
    """
    rebuilt = copy.deepcopy(model).eval()
    for layer in quant_layers(rebuilt).values():
        layer.weight.zero_()
    load_exported(rebuilt, exported)
    return rebuilt(*args, **kwargs)


@torch.no_grad()
def export_max_error(model: nn.Module, *args, exported: dict | None = None, **kwargs) -> float:
    """Max |fake-quant output − output rebuilt from ``exported`` (default ``export(model)``)|, both in eval mode."""
    was_training = model.training
    model.eval()
    try:
        reference = model(*args, **kwargs)
        rebuilt = dequantized_forward(model, export(model) if exported is None else exported, *args, **kwargs)
    finally:
        model.train(was_training)
    return float((reference - rebuilt).abs().max())


def save_export(path, exported: dict) -> None:
    """Write an ``export`` dict as safetensors (no pickle): ``<layer>.weight_int`` (int8 levels),
    ``<layer>.scale``, ``<layer>.bias``, ``<layer>.act.<key>``; bit widths in the JSON metadata."""
    import json

    from safetensors.torch import save

    from kdlab.store.files import atomic_write_bytes

    tensors, meta = {}, {}
    for name, entry in exported["layers"].items():
        tensors[f"{name}.weight_int"] = entry["weight_int"].contiguous()
        tensors[f"{name}.scale"] = entry["scale"].contiguous()
        if entry["bias"] is not None:
            tensors[f"{name}.bias"] = entry["bias"].contiguous()
        for key, value in (entry["act_quant"] or {}).items():
            tensors[f"{name}.act.{key}"] = value.contiguous()
        meta[name] = {"weight_bits": entry["weight_bits"], "per_channel": entry["per_channel"],
                      "act_quant": entry["act_quant"] is not None}
    # Atomic (temp file + fsync + rename): a full disk leaves the previous file, never a truncated one.
    atomic_write_bytes(path, save(tensors, metadata={"format": FORMAT, "layers": json.dumps(meta)}))


def read_export(path) -> dict:
    """The ``export`` dict written by ``save_export`` (safetensors; a file of another format is refused)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT:
                raise KdlabError(f"{path}: not a {FORMAT} export; write it with kdlab.quant.save_export")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, RuntimeError, ValueError) as error:
        raise KdlabError(f"{path}: cannot read the quantized export ({error})") from None
    layers = {}
    for name, info in json.loads(meta["layers"]).items():
        prefix = f"{name}.act."
        layers[name] = {"weight_int": tensors[f"{name}.weight_int"], "scale": tensors[f"{name}.scale"],
                        "bias": tensors.get(f"{name}.bias"), "weight_bits": info["weight_bits"],
                        "per_channel": info["per_channel"],
                        "act_quant": {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                        if info["act_quant"] else None}
    return {"format": FORMAT, "layers": layers}
