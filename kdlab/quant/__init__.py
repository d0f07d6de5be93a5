"""Quantization-aware training groundwork: fake quantizers with straight-through gradients,
``quantize_model`` to swap chosen ``nn.Linear`` layers for ``QuantLinear``, and an integer export.

Usage::

    spec = QuantSpec(weight_bits="ternary", per_channel=True, activation_bits=8)
    swapped = quantize_model(model, spec)   # in place; returns the swapped names
    exported = export(model)                # int8 levels + float scales per layer
    assert export_max_error(model, inputs) <= 1e-6   # the integers reproduce fake-quant outputs
"""
from kdlab.quant.export import (clear_exported, dequantized_forward, export, export_max_error,
                                load_exported, read_export, save_export)
from kdlab.quant.fake import (LSQActQuant, MinMaxActQuant, fake_quantize_weight, quantize_weight,
                              straight_through, ternary_params, uniform_fake_quant, weight_levels)
from kdlab.quant.model import (BERT_LINEARS, QuantLinear, QuantSpec, linear_names, quant_layers, quant_spec,
                               quantize_model)

__all__ = [
    "QuantSpec", "QuantLinear", "quantize_model", "quant_layers", "quant_spec", "linear_names", "BERT_LINEARS",
    "export", "load_exported", "save_export", "read_export", "clear_exported", "dequantized_forward", "export_max_error",
    "fake_quantize_weight", "quantize_weight", "ternary_params", "uniform_fake_quant",
    "straight_through", "weight_levels", "MinMaxActQuant", "LSQActQuant",
]
