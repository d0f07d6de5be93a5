"""Interval bound propagation (IBP): elementwise bounds on a network's logits over an input box.

Gowal et al. (2018), "On the Effectiveness of Interval Bound Propagation for
Training Verifiably Robust Models", §3: an input set ``[l, u]`` is pushed through
the network one layer at a time, each layer mapping a box to a box that
contains the image of the previous one. Here the input set is the L∞ ball of
radius ε around ``x`` intersected with the valid range:

    [l⁰, u⁰] = [clamp(x − ε, lower, upper), clamp(x + ε, lower, upper)]

and each layer is bounded as follows (μ = (u + l)/2, r = (u − l)/2):

* affine ``z ↦ Wz + b`` (Linear, Conv1d, Conv2d), centre/radius form (Gowal et
  al. eq. 6): ``μ' = Wμ + b``, ``r' = |W| r``, so ``[μ' − r', μ' + r']``;
* BatchNorm, a per-channel affine ``a·z + c`` with ``a = γ/√(σ² + ϵ)``:
  ``μ' = BN(μ)``, ``r' = |a|·r`` (sign-aware: γ < 0 swaps the ends). Eval mode
  uses the running statistics; training mode (or ``track_running_stats=False``)
  uses the statistics of the *nominal* batch, the unperturbed ``inputs`` carried
  through the network alongside the box, as the forward pass would; the running
  statistics are never updated;
* any map that is non-decreasing in every input, applied to both ends:
  ReLU-type and sigmoid-type activations (Gowal et al. eq. 7), max pooling,
  average pooling (linear with weights ≥ 0), Flatten/Unflatten/Identity, and
  the zoo models' input normalisation ``(x − mean)/std`` (std > 0);
* Dropout: the identity. The bounds are those of the deterministic network
  (dropout off), which is the network that is evaluated and certified; in
  training mode they therefore do not contain the randomly masked outputs.

Which models: a straight chain of those layers: an ``nn.Sequential`` (nested
freely), a single supported layer, or a kdlab zoo model (``StagedNet``:
``normalize -> stages in feature_stages order -> head``), which covers ``mlp``
and ``cnn1d``. Anything else (residual blocks, attention, LayerNorm, GELU, ...)
raises ``KdlabError`` naming the layer.

Soundness is in exact arithmetic; floating-point rounding can move an end by a
few ulps per layer, far below any margin worth certifying. At ε = 0 every
layer reproduces the forward computation, so ``lower == upper == model(x)``
(up to BatchNorm's rounding). Gradients flow through the bounds to the
parameters (IBP training).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F

from kdlab.errors import KdlabError

# Non-decreasing in every input: [l, u] -> [f(l), f(u)] (Gowal et al. eq. 7 for elementwise activations).
_MONOTONE = (
    nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardsigmoid, nn.LogSigmoid,
    nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Unflatten, nn.Identity,
)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)

SUPPORTED = ("Linear, Conv1d, Conv2d, BatchNorm1d/2d, ReLU, ReLU6, LeakyReLU (slope >= 0), ELU (alpha >= 0), "
             "Sigmoid, Tanh, Softplus, Hardtanh, Hardsigmoid, LogSigmoid, Max/Avg/AdaptiveMax/AdaptiveAvg pooling "
             "(1d/2d), Flatten, Unflatten, Identity, Dropout, nn.Sequential and kdlab zoo models (StagedNet)")


# --------------------------------------------------------------------------- the chain of layers


def _is_staged_net(model: nn.Module) -> bool:
    """A kdlab zoo model whose forward is ``normalize -> stages -> head`` (``kdlab.models.common.StagedNet``).

    Recognised by its published layout rather than imported, so that ``robust/`` depends on torch only;
    a subclass that overrides ``forward`` is not trusted to follow the layout.
    """
    return (isinstance(getattr(model, "feature_stages", None), tuple)
            and isinstance(getattr(model, "normalize", None), nn.Module)
            and isinstance(getattr(model, "head", None), nn.Module)
            and getattr(type(model).forward, "__qualname__", "") == "StagedNet.forward")


def _is(module: nn.Module, classes: tuple) -> bool:
    """``module`` is one of ``classes`` and runs that class's own forward (a subclass that overrides
    ``forward`` may compute something else, so it is not trusted)."""
    return any(isinstance(module, c) and type(module).forward is c.forward for c in classes)


def _unsupported(path: str, module: nn.Module, why: str = "") -> KdlabError:
    where = f" at {path!r}" if path else ""
    reason = f" ({why})" if why else ""
    return KdlabError(f"interval_bounds: unsupported layer {type(module).__name__}{where}{reason}; IBP here "
                      f"bounds straight chains of {SUPPORTED}; use a model built from those (e.g. mlp, cnn1d)")


def _chain(module: nn.Module, path: str = "") -> list[tuple[str, str, nn.Module]]:
    """The layers applied in order, as ``(kind, path, module)``; ``KdlabError`` for anything unsupported."""
    def join(name: str) -> str:
        return f"{path}.{name}" if path else name

    if _is_staged_net(module):
        normalize = module.normalize
        std = getattr(normalize, "std", None)
        if not isinstance(std, torch.Tensor) or not bool((std > 0).all()):
            raise _unsupported(join("normalize"), normalize, "needs a positive std buffer")
        out = [("monotone", join("normalize"), normalize)]  # (x − mean)/std, std > 0: increasing
        for name in module.feature_stages:
            out += _chain(module._modules[name], join(name))
        return out + _chain(module.head, join("head"))
    if _is(module, (nn.Sequential,)):
        out = []
        for name, child in module.named_children():
            out += _chain(child, join(name))
        return out
    if _is(module, _AFFINE):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
            # Reflect/replicate/circular padding copies inputs, which the radius conv would also have to do;
            # none of the zoo models uses it.
            raise _unsupported(path, module, f"padding_mode={module.padding_mode!r}, only 'zeros'")
        return [("affine", path, module)]
    if _is(module, _BATCHNORM):
        return [("batchnorm", path, module)]
    if _is(module, _DROPOUT):
        return [("identity", path, module)]
    if _is(module, (nn.LeakyReLU,)):
        if module.negative_slope < 0:
            raise _unsupported(path, module, "negative_slope < 0 is not monotone")
        return [("monotone", path, module)]
    if _is(module, (nn.ELU,)):
        if module.alpha < 0:
            raise _unsupported(path, module, "alpha < 0 is not monotone")
        return [("monotone", path, module)]
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)) \
            and module.return_indices:
        raise _unsupported(path, module, "return_indices=True")
    if _is(module, _MONOTONE):
        return [("monotone", path, module)]
    raise _unsupported(path, module)


def check_supported(model: nn.Module) -> None:
    """Raise ``KdlabError`` naming the first layer ``interval_bounds`` cannot bound; cheap, runs no forward."""
    if not isinstance(model, nn.Module):
        raise KdlabError(f"interval_bounds: expected an nn.Module, got {type(model).__name__}")
    _chain(model)


# --------------------------------------------------------------------------- one layer


def _affine(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    """Centre/radius form: μ' = Wμ + b, r' = |W|·r (Gowal et al. eq. 6)."""
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    if isinstance(module, nn.Linear):
        center = F.linear(center, module.weight, module.bias)
        radius = F.linear(radius, module.weight.abs())
    else:  # Conv1d/Conv2d with zero padding: padded radius entries are 0, as they should be
        center = module._conv_forward(center, module.weight, module.bias)
        radius = module._conv_forward(radius, module.weight.abs(), None)
    return center - radius, center + radius


def _batchnorm_statistics(module: nn.modules.batchnorm._BatchNorm, nominal: torch.Tensor | None):
    """(mean, var) the layer normalises with: running statistics in eval mode, else the nominal batch's."""
    if not module.training and module.running_mean is not None:
        return module.running_mean, module.running_var
    if nominal is None:  # _propagate carries the nominal batch whenever a layer needs it
        raise RuntimeError("batch-statistics BatchNorm reached without the nominal batch")
    dims = [0] + list(range(2, nominal.ndim))  # every dim but channels, as F.batch_norm in training
    return nominal.mean(dims), nominal.var(dims, unbiased=False)


def _batchnorm(module, lower, upper, nominal):
    """``a·(z − mean) + β`` per channel with ``a = γ/√(var + ϵ)``: μ' = a·(μ − mean) + β, r' = |a|·r."""
    mean, var = _batchnorm_statistics(module, nominal)
    shape = (1, -1) + (1,) * (lower.ndim - 2)  # (1, C, 1, ...) against (N, C, *spatial)
    scale = torch.rsqrt(var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    scale, mean = scale.view(shape), mean.view(shape)
    shift = module.bias.view(shape) if module.bias is not None else 0.0

    def normalise(z: torch.Tensor) -> torch.Tensor:
        # Written out rather than F.batch_norm(training=False), which refuses gradients through batch statistics.
        return (z - mean) * scale + shift

    center, radius = normalise((upper + lower) / 2), (upper - lower) / 2 * scale.abs()
    return center - radius, center + radius, (normalise(nominal) if nominal is not None else None)


def _needs_nominal(layers) -> bool:
    return any(kind == "batchnorm" and (module.training or module.running_mean is None)
               for kind, _, module in layers)


def _propagate(layers, lower, upper, nominal):
    for kind, _, module in layers:
        if kind == "affine":
            lower, upper = _affine(module, lower, upper)
            nominal = module(nominal) if nominal is not None else None
        elif kind == "batchnorm":
            lower, upper, nominal = _batchnorm(module, lower, upper, nominal)
        elif kind == "monotone":
            lower, upper = module(lower), module(upper)
            nominal = module(nominal) if nominal is not None else None
        # "identity" (dropout): nothing to do
    return lower, upper


# --------------------------------------------------------------------------- public API


def _check_radius(eps):
    if isinstance(eps, torch.Tensor):
        if eps.is_floating_point() and bool((eps >= 0).all()) and bool(torch.isfinite(eps).all()):
            return eps
        raise KdlabError("interval_bounds eps: a tensor eps must be finite floats >= 0 (broadcastable to inputs)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise KdlabError(f"interval_bounds eps: must be a finite number >= 0, got {eps!r}; inputs live in [0, 1], "
                         "so e.g. 0.1")
    return float(eps)


def input_box(inputs: torch.Tensor, eps, *, lower: float | None = 0.0, upper: float | None = 1.0):
    """``[clamp(x − ε, lower, upper), clamp(x + ε, lower, upper)]``: the L∞ ball ∩ the valid range.

    ``lower``/``upper`` None leaves that side unclamped. ``eps`` is a float or a
    tensor broadcastable to ``inputs`` (e.g. one radius per sample, ``(N, 1, ...)``).
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise KdlabError("interval_bounds inputs: expected a floating-point tensor (N, *input_shape)")
    eps = _check_radius(eps)
    low, high = inputs - eps, inputs + eps
    if lower is not None or upper is not None:
        low, high = low.clamp(lower, upper), high.clamp(lower, upper)
    return low, high


def interval_bounds(model: nn.Module, inputs: torch.Tensor, eps, *, lower: float | None = 0.0,
                    upper: float | None = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP bounds ``(logit_lower, logit_upper)`` of ``model`` over ``B_ε(x) ∩ [lower, upper]``.

    For every ``x'`` with ``‖x' − x‖∞ ≤ ε`` and ``lower ≤ x' ≤ upper``:
    ``logit_lower ≤ model(x') ≤ logit_upper`` elementwise (see the module
    docstring for each layer's rule and for what BatchNorm/Dropout modes mean).

    Shapes: ``inputs (N, *input_shape)`` -> two ``(N, C)`` tensors (whatever
    the model outputs). Dtype: the model's (cast ``inputs`` to it; run without
    autocast when certifying). A pure function: the model's parameters, buffers
    and train/eval mode are untouched; gradients flow to the parameters. ``eps``
    is a float ≥ 0 or a tensor broadcastable to ``inputs``.
    """
    layers = _chain(model)
    low, high = input_box(inputs, eps, lower=lower, upper=upper)
    nominal = inputs if _needs_nominal(layers) else None
    return _propagate(layers, low, high, nominal)


def _check_box(name: str, logit_lower, logit_upper) -> None:
    for tensor in (logit_lower, logit_upper):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim < 1:
            raise KdlabError(f"{name}: expected floating-point logit bounds (..., C)")
    if logit_lower.shape != logit_upper.shape:
        raise KdlabError(f"{name}: lower bounds {tuple(logit_lower.shape)} and upper bounds "
                         f"{tuple(logit_upper.shape)} differ in shape")


def _logsumexp_others(values: torch.Tensor) -> torch.Tensor:
    """``out[..., i] = log Σ_{j≠i} exp(values[..., j])`` (−inf when there is no other class)."""
    classes = values.shape[-1]
    others = values.unsqueeze(-2).expand(*values.shape, classes)  # (..., i, j) = values[..., j]
    eye = torch.eye(classes, dtype=torch.bool, device=values.device)
    return torch.logsumexp(others.masked_fill(eye, float("-inf")), dim=-1)


def probability_bounds(logit_lower: torch.Tensor, logit_upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``softmax(z)`` for every ``z`` in the box ``[l, u]`` (classes last).

    softmax_i is increasing in z_i and decreasing in every z_j (j ≠ i), so its
    extremes over a box are at corners:

        p_i ≥ exp(l_i) / (exp(l_i) + Σ_{j≠i} exp(u_j)) = σ(l_i − log Σ_{j≠i} exp(u_j))
        p_i ≤ exp(u_i) / (exp(u_i) + Σ_{j≠i} exp(l_j)) = σ(u_i − log Σ_{j≠i} exp(l_j))

    (σ the logistic function; the right-hand forms never overflow). Both are
    attained, so these are the tightest per-class bounds given only the box.
    Shapes: ``(..., C)`` in, two ``(..., C)`` out; differentiable.
    """
    _check_box("probability_bounds", logit_lower, logit_upper)
    if logit_lower.shape[-1] == 1:  # one class: p = 1 everywhere
        ones = torch.ones_like(logit_lower)
        return ones, ones
    return (torch.sigmoid(logit_lower - _logsumexp_others(logit_upper)),
            torch.sigmoid(logit_upper - _logsumexp_others(logit_lower)))


def margin_bounds(logit_lower: torch.Tensor, logit_upper: torch.Tensor,
                  classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the margin ``m_k(z) = z_k − max_{j≠k} z_j`` of class ``k = classes[n]`` over the box.

    ``m_k ≥ l_k − max_{j≠k} u_j`` and ``m_k ≤ u_k − max_{j≠k} l_j``. A positive
    lower bound certifies that the prediction is ``k`` everywhere in the ball
    (ties aside). Shapes: bounds ``(N, C)``, classes ``(N,)`` int; returns two ``(N,)``.
    """
    _check_box("margin_bounds", logit_lower, logit_upper)
    if logit_lower.ndim != 2 or logit_lower.shape[-1] < 2:
        raise KdlabError("margin_bounds: expected logit bounds of shape (N, C) with C >= 2")
    index = classes.long().view(-1, 1)
    mask = torch.zeros_like(logit_lower, dtype=torch.bool).scatter_(1, index, True)
    others_upper = logit_upper.masked_fill(mask, float("-inf")).amax(dim=1)
    others_lower = logit_lower.masked_fill(mask, float("-inf")).amax(dim=1)
    return (logit_lower.gather(1, index).squeeze(1) - others_upper,
            logit_upper.gather(1, index).squeeze(1) - others_lower)


def difference_bounds(a_lower: torch.Tensor, a_upper: torch.Tensor, b_lower: torch.Tensor,
                      b_upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``a − b`` when ``a ∈ [a_l, a_u]`` and ``b ∈ [b_l, b_u]``: ``[a_l − b_u, a_u − b_l]``.

    This is what IBP gives for the joint network ``x ↦ f_S(x) − f_T(x)``: its
    two branches are bounded separately, so the pair of boxes is all it knows.
    """
    return a_lower - b_upper, a_upper - b_lower


def abs_upper(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``sup |v|`` over ``v ∈ [lower, upper]``: ``max(upper, −lower)`` (≥ 0 whenever lower ≤ upper)."""
    return torch.maximum(upper, -lower)
