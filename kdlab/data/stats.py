"""Per-channel input statistics that models normalise with."""
from __future__ import annotations

import torch

# A constant channel has std 0; dividing by it would make inf/NaN inputs.
_MIN_STD = 1e-12


def channel_mean_std(inputs: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of every channel of ``inputs``.

    inputs: float (N, C, *spatial), N >= 1; channel is dim 1 (for an input
    shape of one dimension, (N, F), every feature is its own channel).
    The std is the population one (divides by the number of values, like
    ``numpy.std``) over all samples and positions of the channel; a channel
    whose std is below 1e-12 gets std 1.0 so normalising only centres it.
    Returns two tuples of C Python floats.
    """
    dims = (0, *range(2, inputs.dim()))
    # var_mean accumulates in double on the CPU and makes no float64 copy of the data.
    variance, mean = torch.var_mean(inputs, dim=dims, correction=0)
    std = variance.double().sqrt()
    std = torch.where(std < _MIN_STD, torch.ones_like(std), std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
