"""Pieces shared by the model zoo: in-model normalisation, the staged layout, option checks.

Every zoo model is a ``StagedNet``: ``normalize -> stage_1 -> ... -> stage_K -> head``.
The stage names are published as ``model.feature_stages`` so that feature taps
(``kdlab.models.taps``) can name them; the last stage is always ``pool``, the
penultimate feature vector ``(N, D)`` that ``head`` (a ``nn.Linear``) maps to logits.
Using the same last name in every family lets one config tap the penultimate
features of any teacher/student pair.
"""
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdlab.errors import KdlabError


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for channel-first inputs ``(N, C, ...)``.

    ``mean`` and ``std`` are *persistent* buffers, so a saved state dict carries
    the statistics the model was trained with and a checkpoint is self-contained:
    loading it restores them even if the model was built with other values.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, input_shape: tuple[int, ...]):
        super().__init__()
        # (C, 1, ..., 1) broadcasts against (N, C, *spatial) for any number of spatial dims.
        view = (-1,) + (1,) * (len(input_shape) - 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(view))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class StagedNet(nn.Module):
    """``normalize -> stages (in order) -> head``; the stage names are ``feature_stages``.

    Subclasses build their stages and pass them as ``(name, module)`` pairs; the
    last one must produce the penultimate feature vector ``(N, D)``.
    """

    feature_stages: tuple[str, ...]

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        stages: Sequence[tuple[str, nn.Module]],
        head: nn.Module,
    ):
        super().__init__()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.normalize = Normalize(mean, std, input_shape=self.input_shape)
        for name, module in stages:
            self.add_module(name, module)
        self.head = head
        self.feature_stages = tuple(name for name, _ in stages)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, *input_shape)`` in [0, 1]."""
        x = self.normalize(x)
        for name in self.feature_stages:
            x = self._modules[name](x)
        return self.head(x)


# --------------------------------------------------------------------------- checks


def check_common(
    model: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    ranks: Sequence[int] = (),
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """Validate the arguments kdlab supplies; return ``input_shape, mean, std`` as tuples.

    ``ranks`` lists the accepted ``len(input_shape)`` (empty: any). A single
    mean/std value is broadcast to every channel.
    """
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1 for d in shape):
        raise KdlabError(f"{model}: input_shape {shape!r} must be positive integers, channel first; "
                         "check the dataset's input_shape")
    if ranks and len(shape) not in ranks:
        expected = " or ".join(_RANK_NAMES[r] for r in ranks)
        raise KdlabError(f"{model}: expects input_shape {expected}, got {shape!r}; "
                         f"pick a model for this data (e.g. mlp, vit_tiny) or another dataset")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise KdlabError(f"{model}: num_classes={num_classes!r} must be a positive integer; "
                         "check the dataset's num_classes")
    shape = tuple(int(d) for d in shape)
    channels = shape[0]
    stats = []
    for key, values in (("mean", mean), ("std", std)):
        values = tuple(float(v) for v in values)
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            raise KdlabError(f"{model}: {key} has {len(values)} values but the input has {channels} channels; "
                             f"give one {key} per channel (or a single value)")
        stats.append(values)
    if any(not s > 0 for s in stats[1]):
        raise KdlabError(f"{model}: std {stats[1]!r} must be positive; fix the dataset's std")
    return shape, stats[0], stats[1]


_RANK_NAMES = {1: "(F,)", 2: "(C, L)", 3: "(C, H, W)"}


def check_positive(model: str, key: str, value: int | float) -> None:
    """Raise ``KdlabError`` unless option ``key`` is > 0."""
    if not value > 0:
        raise KdlabError(f"{model}: {key}={value!r} must be positive; set {key} to a value > 0")


def check_dropout(model: str, value: float, *, key: str = "dropout") -> None:
    """Raise ``KdlabError`` unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise KdlabError(f"{model}: {key}={value!r} must be in [0, 1); set {key} to e.g. 0.0 or 0.1")


def resolve_widths(model: str, *, width: int, depth: int, widths: Sequence[int] | None,
                   min_depth: int) -> tuple[int, ...]:
    """Per-layer widths: explicit ``widths`` if given, else ``depth`` copies of ``width``."""
    if widths is None:
        check_positive(model, "width", width)
        if depth < min_depth:
            raise KdlabError(f"{model}: depth={depth!r} must be >= {min_depth}; raise depth")
        return (int(width),) * int(depth)
    widths = tuple(widths)
    if len(widths) < min_depth or any(not w > 0 for w in widths):
        raise KdlabError(f"{model}: widths={widths!r} must be at least {min_depth} positive integers; "
                         "fix widths or set it to null to use width/depth")
    return tuple(int(w) for w in widths)


def init_conv_bn(module: nn.Module) -> None:
    """He (fan-out) init for convs, unit BN scales, zero biases; linears keep PyTorch's default.

    The fan-out counts the outputs one input channel feeds, ``out / groups x kernel``:
    PyTorch's ``kaiming_normal_`` ignores groups, which shrinks depthwise convs by
    sqrt(channels) and makes a fresh MobileNetV2's eval-mode activations vanish.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            fan_out = m.out_channels // m.groups * math.prod(m.kernel_size)
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
