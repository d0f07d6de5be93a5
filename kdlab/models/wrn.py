"""Wide ResNets (Zagoruyko & Komodakis 2016, "Wide Residual Networks"), CIFAR layout.

Pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3) in three
groups of 16k/32k/64k channels, ``(depth - 4) / 6`` blocks each. Where the shape
changes the shortcut is a 1x1 conv on the pre-activated input, as in the paper's
code. Stage outputs are the raw residual sums (pre-activation, as in the CRD zoo's
WRN features); the final BN-ReLU lives in ``pool``.
"""
from torch import Tensor, nn

from kdlab.config.validate import Depth, Width
from kdlab.errors import KdlabError
from kdlab.models.common import StagedNet, check_common, check_dropout, check_positive, init_conv_bn
from kdlab.registry import register


class PreActBlock(nn.Module):
    """Pre-activation wide basic block; ``(N, C_in, H, W) -> (N, C_out, H/s, W/s)``."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.projects = stride != 1 or in_channels != out_channels
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if self.projects else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        # The projection sees the activated input; an identity shortcut carries x itself.
        residual = self.shortcut(activated) if self.projects else x
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + residual


class WideResNet(StagedNet):
    """``stem`` (conv3x3), ``stage1..3`` (strides 1, 2, 2), ``pool`` (BN-ReLU-avgpool), ``head``."""

    def __init__(self, *, input_shape, num_classes, mean, std, depth: int, widen_factor: int, dropout: float):
        blocks_per_stage = (depth - 4) // 6
        stages: list[tuple[str, nn.Module]] = [("stem", nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False))]
        channels = 16
        for index, (base, stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), start=1):
            width = base * widen_factor
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(PreActBlock(channels, width, stride=stride if block == 0 else 1, dropout=dropout))
                channels = width
            stages.append((f"stage{index}", nn.Sequential(*blocks)))
        pool = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        stages.append(("pool", pool))
        head = nn.Linear(channels, num_classes)
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                         stages=stages, head=head)
        init_conv_bn(self)
        nn.init.zeros_(head.bias)


@register("model", "wrn")
def wrn(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    depth: Depth = 16,
    widen_factor: Width = 2,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet WRN-depth-k for images (Zagoruyko & Komodakis 2016); depth = 6n+4.

    Input ``(N, C, H, W)`` -> logits ``(N, num_classes)``. ``dropout`` is applied
    between the two convs of each block, as in the paper.
    """
    return build_wrn("wrn", input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                     depth=depth, widen_factor=widen_factor, dropout=dropout)


def build_wrn(model: str, *, input_shape, num_classes, mean, std, depth: int, widen_factor: int,
              dropout: float) -> WideResNet:
    """Validate and build; ``model`` names the registry entry in error messages."""
    shape, mean, std = check_common(model, input_shape=input_shape, num_classes=num_classes,
                                    mean=mean, std=std, ranks=(3,))
    if depth < 10 or (depth - 4) % 6 != 0:
        raise KdlabError(f"{model}: depth={depth!r} must satisfy (depth - 4) % 6 == 0 with depth >= 10 "
                         "(10, 16, 22, 28, 40, ...); set depth to one of those")
    check_positive(model, "widen_factor", widen_factor)
    check_dropout(model, dropout)
    return WideResNet(input_shape=shape, num_classes=num_classes, mean=mean, std=std, depth=depth,
                      widen_factor=widen_factor, dropout=dropout)


def _named(depth: int, widen_factor: int):
    """Register ``wrn_{depth}_{widen_factor}`` with ``dropout`` still settable."""
    name = f"wrn_{depth}_{widen_factor}"

    def factory(*, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...],
                std: tuple[float, ...], dropout: float = 0.0) -> WideResNet:
        return build_wrn(name, input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                         depth=depth, widen_factor=widen_factor, dropout=dropout)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"Wide ResNet WRN-{depth}-{widen_factor} (Zagoruyko & Komodakis 2016).\n\n"
                       "Input ``(N, C, H, W)`` -> logits ``(N, num_classes)``.")
    return register("model", name)(factory)


wrn_16_1 = _named(16, 1)
wrn_16_2 = _named(16, 2)
wrn_40_1 = _named(40, 1)
wrn_40_2 = _named(40, 2)
