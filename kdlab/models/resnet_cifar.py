"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2).

Three stages of basic blocks at 16/32/64 channels (times ``width_multiplier``),
``n`` blocks each, depth ``6n + 2``. Shortcuts where the shape changes are
option B (1x1 conv + BN projection), as in the CRD / mdistiller model zoos that
KD papers report against; identity elsewhere. The x4 variants (resnet8x4,
resnet32x4) use a 32-channel stem and 64/128/256-channel stages, as in those zoos.
"""
from typing import Optional

from torch import Tensor, nn

from kdlab.config.validate import Depth, Width
from kdlab.errors import KdlabError
from kdlab.models.common import StagedNet, check_common, check_positive, init_conv_bn
from kdlab.registry import register


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU; ``(N, C_in, H, W) -> (N, C_out, H/s, W/s)``."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()  # separate module so the block's own activations can be tapped

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(StagedNet):
    """``stem`` (conv-BN-ReLU), ``stage1..3`` (basic blocks; strides 1, 2, 2), ``pool``, ``head``."""

    def __init__(self, *, input_shape, num_classes, mean, std, blocks_per_stage: int,
                 stage_widths: tuple[int, int, int], stem_width: int):
        stem = nn.Sequential(
            nn.Conv2d(input_shape[0], stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(),
        )
        stages: list[tuple[str, nn.Module]] = [("stem", stem)]
        channels = stem_width
        for index, (width, stride) in enumerate(zip(stage_widths, (1, 2, 2)), start=1):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, stride=stride if block == 0 else 1))
                channels = width
            stages.append((f"stage{index}", nn.Sequential(*blocks)))
        stages.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                         stages=stages, head=nn.Linear(channels, num_classes))
        init_conv_bn(self)


def build_resnet_cifar(model: str, *, input_shape, num_classes, mean, std, depth: int,
                       width_multiplier: int, stem_width: Optional[int]) -> ResNetCifar:
    """Validate and build; ``model`` names the registry entry in error messages."""
    shape, mean, std = check_common(model, input_shape=input_shape, num_classes=num_classes,
                                    mean=mean, std=std, ranks=(3,))
    if depth < 8 or (depth - 2) % 6 != 0:
        raise KdlabError(f"{model}: depth={depth!r} must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...); "
                         "set depth to one of those")
    check_positive(model, "width_multiplier", width_multiplier)
    widths = (16 * width_multiplier, 32 * width_multiplier, 64 * width_multiplier)
    if stem_width is None:
        stem_width = 16 * width_multiplier
    check_positive(model, "stem_width", stem_width)
    return ResNetCifar(input_shape=shape, num_classes=num_classes, mean=mean, std=std,
                       blocks_per_stage=(depth - 2) // 6, stage_widths=widths, stem_width=stem_width)


@register("model", "resnet_cifar")
def resnet_cifar(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    depth: Depth = 20,
    width_multiplier: int = 1,
    stem_width: Optional[Width] = None,
) -> ResNetCifar:
    """CIFAR ResNet of any depth 6n+2 and width (He et al. 2016 §4.2), for sweeping depth in grids.

    Input ``(N, C, H, W)`` -> logits ``(N, num_classes)``. Stage widths are
    16/32/64 x ``width_multiplier``; ``stem_width`` defaults to 16 x
    ``width_multiplier`` (the named x4 models use 32).
    """
    return build_resnet_cifar("resnet_cifar", input_shape=input_shape, num_classes=num_classes, mean=mean,
                              std=std, depth=depth, width_multiplier=width_multiplier, stem_width=stem_width)


def _named(depth: int, width_multiplier: int = 1, stem_width: Optional[Width] = None):
    """Register ``resnet{depth}`` (or ``resnet{depth}x4``) as a fixed configuration."""
    name = f"resnet{depth}" + (f"x{width_multiplier}" if width_multiplier != 1 else "")

    def factory(*, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...],
                std: tuple[float, ...]) -> ResNetCifar:
        return build_resnet_cifar(name, input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                                  depth=depth, width_multiplier=width_multiplier, stem_width=stem_width)

    widths = "/".join(str(c * width_multiplier) for c in (16, 32, 64))
    blocks = (depth - 2) // 6
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"CIFAR ResNet-{depth} ({widths} channels, {blocks} block{'s' if blocks > 1 else ''} "
                       f"per stage; He et al. 2016).\n\nInput ``(N, C, H, W)`` -> logits ``(N, num_classes)``.")
    return register("model", name)(factory)


resnet8 = _named(8)
resnet14 = _named(14)
resnet20 = _named(20)
resnet32 = _named(32)
resnet44 = _named(44)
resnet56 = _named(56)
resnet110 = _named(110)
resnet8x4 = _named(8, 4, stem_width=32)
resnet32x4 = _named(32, 4, stem_width=32)
