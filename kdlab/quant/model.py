"""``QuantSpec``, ``QuantLinear`` and ``quantize_model``: swap chosen ``nn.Linear`` layers for QAT.

Only ``nn.Linear`` modules whose dotted name matches one of ``spec.layers`` (``fnmatch``, case
sensitive, against the full name from ``model.named_modules()``) are replaced; embeddings,
LayerNorm and every other module stay in full precision.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.errors import KdlabError
from kdlab.quant.fake import LSQActQuant, MinMaxActQuant, fake_quantize_weight

WEIGHT_BITS = (2, 4, 8, "ternary")
ACTIVATION_BITS = (None, 8)
ACTIVATION_MODES = ("minmax", "lsq")
# BERT / Hugging Face names: attention Q/K/V, attention output projection, FFN in and out.
BERT_LINEARS = ("*.query", "*.key", "*.value", "*.attention.output.dense",
                "*.intermediate.dense", "*.output.dense")


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how.

    weight_bits: 2, 4, 8 (symmetric uniform) or ``"ternary"`` (TernaryBERT).
    per_channel: one scale per output row instead of one per tensor.
    activation_bits: ``None`` (full-precision inputs) or 8 (fake-quantize each layer's input).
    activation_mode: ``"minmax"`` (running range, asymmetric) or ``"lsq"`` (learned step).
    layers: ``fnmatch`` patterns on module names; each must match at least one ``nn.Linear``.
    """

    weight_bits: int | str = "ternary"
    per_channel: bool = False
    activation_bits: int | None = None
    activation_mode: str = "minmax"
    layers: tuple[str, ...] = BERT_LINEARS

    def __post_init__(self):
        problems = []
        wb = self.weight_bits
        if isinstance(wb, bool) or wb not in WEIGHT_BITS:
            problems.append(f"quant.weight_bits: unsupported value {wb!r}; use one of 2, 4, 8 or 'ternary'")
        ab = self.activation_bits
        if isinstance(ab, bool) or ab not in ACTIVATION_BITS:
            problems.append(f"quant.activation_bits: unsupported value {ab!r}; use None or 8")
        if self.activation_mode not in ACTIVATION_MODES:
            problems.append(f"quant.activation_mode: unknown mode {self.activation_mode!r}; "
                            f"use one of {', '.join(ACTIVATION_MODES)}")
        if not isinstance(self.per_channel, bool):
            problems.append(f"quant.per_channel: must be true or false, got {self.per_channel!r}")
        layers = self.layers
        if isinstance(layers, str):
            layers = (layers,)
        try:
            layers = tuple(layers)
        except TypeError:
            layers = ()
        if not layers or not all(isinstance(p, str) and p for p in layers):
            problems.append(f"quant.layers: must be a non-empty list of name patterns, got {self.layers!r}")
        else:
            object.__setattr__(self, "layers", layers)
        if problems:
            raise KdlabError("\n".join(problems))


class QuantLinear(nn.Module):
    """An ``nn.Linear`` that fake-quantizes its weight (and optionally its input) on every forward.

    ``weight`` is the full-precision latent parameter the optimizer updates (the very Parameter of
    the replaced layer). After :func:`kdlab.quant.export.load_exported` the layer instead uses the
    stored integer weights ``weight_int · weight_scale`` (buffers), ignoring ``weight``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 spec: QuantSpec | None = None):
        super().__init__()
        self.spec = spec or QuantSpec()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.spec.activation_bits is None:
            self.act_quant = None
        elif self.spec.activation_mode == "lsq":
            self.act_quant = LSQActQuant(self.spec.activation_bits)
        else:
            self.act_quant = MinMaxActQuant(self.spec.activation_bits)
        # Set by kdlab.quant.export.load_exported: int8 levels and float scales (None until then).
        self.register_buffer("weight_int", None)
        self.register_buffer("weight_scale", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantLinear":
        """Wrap ``linear``, sharing its weight and bias Parameters (no copy)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, spec)
        q.weight = linear.weight
        q.bias = linear.bias
        if q.act_quant is not None:
            q.act_quant.to(device=linear.weight.device)
        return q

    @property
    def uses_exported(self) -> bool:
        return self.weight_int is not None

    def quantized_weight(self) -> torch.Tensor:
        """The weight used in forward: fake-quant of the latent weight, or the exported integers."""
        if self.weight_int is not None:
            return self.weight_int.to(self.weight.dtype) * self.weight_scale.to(self.weight.dtype)
        return fake_quantize_weight(self.weight, self.spec.weight_bits, self.spec.per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        act = "fp" if s.activation_bits is None else f"{s.activation_bits}-bit {s.activation_mode}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight_bits={s.weight_bits}, "
                f"per_channel={s.per_channel}, activations={act}"
                + (", exported" if self.uses_exported else ""))


def linear_names(model: nn.Module) -> list[str]:
    """Dotted names of the plain ``nn.Linear`` modules of ``model`` (not yet quantized)."""
    return [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose name matches a ``spec.layers`` pattern.

    Returns the swapped names in module order. Raises ``KdlabError`` (before changing anything)
    for a pattern that matches no ``nn.Linear``, listing some of the available names.
    """
    if not isinstance(spec, QuantSpec):
        raise KdlabError(f"quant: expected a QuantSpec, got {type(spec).__name__}")
    names = linear_names(model)
    unmatched = [p for p in spec.layers if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise KdlabError(
            f"quant.layers: pattern(s) {', '.join(map(repr, unmatched))} match no nn.Linear "
            f"(patterns are fnmatch on full dotted names); available: {shown or 'none'}")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in spec.layers)]
    for name in chosen:
        _set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), spec))
    return chosen


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Name → ``QuantLinear`` for every quantized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def quant_spec(options: dict, *, key: str = "student.quant") -> QuantSpec:
    """A ``QuantSpec`` from a config mapping; errors name ``key`` (e.g. ``student.quant.weight_bits``)."""
    if not isinstance(options, dict):
        raise KdlabError(f"{key}: expected a mapping such as {{weight_bits: ternary, activation_bits: 8}}, "
                         f"got {options!r}")
    known = [f.name for f in dataclasses.fields(QuantSpec)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise KdlabError(f"{key}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(known)}")
    try:
        return QuantSpec(**options)
    except KdlabError as exc:
        raise KdlabError(str(exc).replace("quant.", f"{key}.")) from None
