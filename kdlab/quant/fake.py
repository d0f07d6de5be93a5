"""Fake quantizers with straight-through estimators (pure torch).

Weights
-------
* **Ternary** (TernaryBERT, Zhang et al. 2020, eq. 4-5, the "TWN" approximation of Li & Liu 2016)::

      Δ = 0.7 · mean(|W|)                    threshold
      α = mean(|W_i|  over  |W_i| > Δ)       scale
      Q(W)_i = α · sign(W_i) · 1[|W_i| > Δ]  ∈ {−α, 0, +α}

  computed per tensor, or per output channel (one Δ and α per row of an ``nn.Linear`` weight).
* **Symmetric uniform b-bit** (b ∈ {2, 4, 8}), narrow range::

      Q_p = 2^(b−1) − 1,   s = max|W| / Q_p   (per tensor, or per row)
      q = clamp(round(W / s), −Q_p, Q_p),     Q(W) = s · q

  so the integer levels are {−Q_p, ..., Q_p}; for 2 bits that is {−1, 0, 1}, i.e. the values
  {−s, 0, s} (three levels, the fourth code −2 is unused so the grid stays symmetric).

Straight-through estimator (Bengio et al. 2013, clipped form): ``∂Q(x)/∂x = 1`` where ``x`` lies
inside the clip range ``[qmin·s, qmax·s]`` (asymmetric: ``[(qmin − z)·s, (qmax − z)·s]``) and 0
outside. For weights with the max-based scale every weight is inside the range, so the weight STE
is the identity (as in TernaryBERT); the clipping matters for activations and for a given scale.

Activations (8-bit)
-------------------
* **Min–max** (Jacob et al. 2018): running range ``[m, M]`` (an exponential moving average of
  the batch min and max, always containing 0), asymmetric::

      s = (M − m) / (2^b − 1),  z = clamp(round(−m / s), 0, 2^b − 1)
      q = clamp(round(x / s) + z, 0, 2^b − 1),  Q(x) = (q − z) · s

* **LSQ** (Esser et al. 2020, "Learned Step Size Quantization"): a learned step ``s``, signed
  levels ``Q_n = 2^(b−1)``, ``Q_p = 2^(b−1) − 1``::

      Q(x) = round(clamp(x / s, −Q_n, Q_p)) · s
      ∂Q/∂s = −x/s + round(x/s)  inside,   −Q_n or Q_p  outside          (LSQ eq. 3)
      the step's gradient is scaled by g = 1 / sqrt(N · Q_p)              (LSQ section 2.2)

  with ``N`` the number of elements quantized with that step; ``s`` is initialised on the first
  batch to ``2 · mean|x| / sqrt(Q_p)`` (LSQ section 2.1).
"""
from __future__ import annotations

import math

import torch
from torch import nn

TERNARY_THRESHOLD = 0.7  # Δ = 0.7 · mean|W|  (TernaryBERT eq. 5)
_EPS = 1e-12


class _ClippedSTE(torch.autograd.Function):
    """Forward: the quantized value ``q``; backward: the gradient times the in-range mask."""

    @staticmethod
    def forward(ctx, x, q, mask):
        ctx.save_for_backward(mask)
        return q

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None, None


def straight_through(x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``q`` exactly in the forward pass, with ``∂/∂x = mask`` (1 everywhere by default)."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    return _ClippedSTE.apply(x, q.detach(), mask)


def uniform_fake_quant(x: torch.Tensor, scale: torch.Tensor | float, qmin: int, qmax: int,
                       zero_point: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``(clamp(round(x/s) + z, qmin, qmax) − z) · s`` with the clipped STE (no gradient to ``s``).

    The gradient w.r.t. ``x`` is 1 where ``(qmin − z)·s ≤ x ≤ (qmax − z)·s`` and 0 outside.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device).clamp_min(_EPS)
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        q = (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale
        mask = (x >= (qmin - zero_point) * scale) & (x <= (qmax - zero_point) * scale)
    return straight_through(x, q, mask)


def _rowwise(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """View ``w`` as (channels, rest): one row per output channel, or a single row."""
    return w.reshape(w.shape[0], -1) if per_channel and w.dim() > 1 else w.reshape(1, -1)


def _scale_shape(w: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    return (w.shape[0],) + (1,) * (w.dim() - 1) if per_channel and w.dim() > 1 else ()


def ternary_params(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """TernaryBERT threshold ``Δ = 0.7·mean|W|`` and scale ``α = mean(|W| over |W| > Δ)``.

    Returns ``(delta, alpha)`` shaped to broadcast against ``w`` (scalars when per tensor, one
    value per output row when ``per_channel``). A row with nothing above Δ (all zeros) gets α = 0.
    """
    a = _rowwise(w.detach(), per_channel).abs()
    delta = TERNARY_THRESHOLD * a.mean(dim=1, keepdim=True)
    above = (a > delta).to(a.dtype)
    alpha = (a * above).sum(dim=1, keepdim=True) / above.sum(dim=1, keepdim=True).clamp_min(1.0)
    shape = _scale_shape(w, per_channel)
    return delta.reshape(shape), alpha.reshape(shape)


def weight_levels(bits: int | str) -> int:
    """``Q_p``: the largest integer level (1 for ternary, ``2^(b−1) − 1`` for b bits)."""
    return 1 if bits == "ternary" else 2 ** (int(bits) - 1) - 1


def quantize_weight(w: torch.Tensor, bits: int | str, per_channel: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer levels and the float scale of a weight: ``Q(W) = q · scale``.

    ``q`` is an int8 tensor shaped like ``w`` (ternary: {−1, 0, 1}; b bits: {−Q_p..Q_p}); ``scale``
    is a float tensor (scalar, or ``(out, 1, ...)`` per output channel). Used by the fake-quant
    forward and by :func:`kdlab.quant.export.export`, so both give bit-identical weights.
    """
    w = w.detach()
    if bits == "ternary":
        delta, alpha = ternary_params(w, per_channel)
        q = torch.sign(w) * (w.abs() > delta)
        return q.to(torch.int8), alpha
    qp = weight_levels(bits)
    amax = _rowwise(w, per_channel).abs().amax(dim=1, keepdim=True)
    scale = (amax / qp).clamp_min(_EPS).reshape(_scale_shape(w, per_channel))
    q = torch.clamp(torch.round(w / scale), -qp, qp)
    return q.to(torch.int8), scale


def fake_quantize_weight(w: torch.Tensor, bits: int | str, per_channel: bool = False) -> torch.Tensor:
    """``Q(W)`` in the forward pass, the clipped STE in the backward pass.

    The clip range is ``[−Q_p·s, Q_p·s]`` (b bits) or ``[−max|W|, max|W|]`` (ternary), which every
    weight lies in, so the weight gradient passes through unchanged.
    """
    q, scale = quantize_weight(w, bits, per_channel)
    value = q.to(w.dtype) * scale.to(w.dtype)
    if bits == "ternary":
        return straight_through(w, value)
    qp = weight_levels(bits)
    mask = w.detach().abs() <= qp * scale * (1 + 1e-6)
    return straight_through(w, value, mask)


class MinMaxActQuant(nn.Module):
    """Asymmetric b-bit activation fake quantizer over a running min–max range (see module doc).

    In training the range is an EMA (``momentum``) of the batch min and max, initialised by the
    first batch; in eval the stored range is used as is. Gradient: identity inside, zero outside.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.1):
        super().__init__()
        self.bits, self.momentum = int(bits), float(momentum)
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the current range (the range always contains 0)."""
        lo = torch.clamp(self.running_min, max=0.0)
        hi = torch.clamp(self.running_max, min=0.0)
        qmax = 2 ** self.bits - 1
        scale = ((hi - lo) / qmax).clamp_min(_EPS)
        zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
        return scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                lo, hi = x.detach().min().to(self.running_min), x.detach().max().to(self.running_max)
                if not bool(self.initialized):
                    self.running_min.copy_(lo)
                    self.running_max.copy_(hi)
                    self.initialized.fill_(True)
                else:
                    self.running_min.lerp_(lo, self.momentum)
                    self.running_max.lerp_(hi, self.momentum)
        elif not bool(self.initialized):
            return x  # never calibrated: pass through rather than collapse everything to 0
        scale, zero_point = self.qparams()
        return uniform_fake_quant(x, scale, 0, 2 ** self.bits - 1, zero_point)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``x``, gradient ``g · ∂`` (LSQ's ``gradscale``)."""
    return (x - x * g).detach() + x * g


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """Value ``round(x)``, gradient identity (LSQ's ``roundpass``)."""
    return (x.round() - x).detach() + x


class LSQActQuant(nn.Module):
    """Signed b-bit activation quantizer with a learned step size (LSQ, Esser et al. 2020).

    ``Q(x) = round(clamp(x/s, −Q_n, Q_p)) · s``; the step ``s`` is a parameter whose gradient is
    scaled by ``1 / sqrt(N · Q_p)``, ``N = x.numel()``. Initialised on the first call to
    ``2·mean|x| / sqrt(Q_p)``. ``∂Q/∂x`` is 1 inside ``[−Q_n·s, Q_p·s]`` and 0 outside.
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = int(bits)
        self.qn, self.qp = 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.copy_((2 * x.detach().abs().mean() / math.sqrt(self.qp)).clamp_min(1e-8))
                self.initialized.fill_(True)
        g = 1.0 / math.sqrt(x.numel() * self.qp)
        s = grad_scale(self.step, g).to(x.dtype)
        return round_pass(torch.clamp(x / s, -self.qn, self.qp)) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
