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
def export_max_error(model: nn.Module, *args, **kwargs) -> float:
    """Max |fake-quant output − output rebuilt from ``export(model)``|, both in eval mode."""
    was_training = model.training
    model.eval()
    try:
        reference = model(*args, **kwargs)
        rebuilt = dequantized_forward(model, export(model), *args, **kwargs)
    finally:
        model.train(was_training)
    return float((reference - rebuilt).abs().max())
