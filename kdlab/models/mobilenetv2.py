"""MobileNetV2 for 32x32 images (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

The ImageNet network downsamples 32x; on CIFAR that would leave a 1x1 map, so,
as in the CIFAR zoos used by KD papers, the stem conv has stride 1 and the first
stride-2 bottleneck (the 24-channel one) has stride 1: 32x32 -> 4x4 overall.
Channel counts are ``int(c * width_multiplier)`` (the CRD zoo's rule, so its
0.5-width "MobileNetV2" student is ``width_multiplier: 0.5``); the last 1x1 conv
keeps 1280 channels unless the multiplier is > 1.
"""
from torch import Tensor, nn

from kdlab.models.common import StagedNet, check_common, check_positive, init_conv_bn
from kdlab.registry import register

# (expansion t, output channels c, repeats n, first stride s) per bottleneck sequence; the
# paper's table 2 with the stride of the 24-channel sequence reduced from 2 to 1 for CIFAR.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Which stage each sequence belongs to: stages end where the resolution next drops.
STAGE_OF_SEQUENCE = (1, 1, 2, 3, 3, 4, 4)


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection, residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),  # linear bottleneck: no activation
        ]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class MobileNetV2(StagedNet):
    """``stem``, ``stage1..4`` (32, 16, 8, 4 px on 32x32 input), ``last_conv`` (1x1 to 1280), ``pool``, ``head``."""

    def __init__(self, *, input_shape, num_classes, mean, std, width_multiplier: float):
        def scaled(c: int) -> int:
            return max(1, int(c * width_multiplier))

        channels = scaled(32)
        stem = nn.Sequential(nn.Conv2d(input_shape[0], channels, 3, padding=1, bias=False),
                             nn.BatchNorm2d(channels), nn.ReLU6())
        stage_blocks: dict[int, list[nn.Module]] = {1: [], 2: [], 3: [], 4: []}
        for (expansion, c, repeats, stride), stage in zip(SETTINGS, STAGE_OF_SEQUENCE):
            for repeat in range(repeats):
                block = InvertedResidual(channels, scaled(c), stride=stride if repeat == 0 else 1,
                                         expansion=expansion)
                stage_blocks[stage].append(block)
                channels = scaled(c)
        last = scaled(1280) if width_multiplier > 1.0 else 1280
        stages: list[tuple[str, nn.Module]] = [("stem", stem)]
        stages += [(f"stage{i}", nn.Sequential(*blocks)) for i, blocks in stage_blocks.items()]
        stages.append(("last_conv", nn.Sequential(nn.Conv2d(channels, last, 1, bias=False),
                                                  nn.BatchNorm2d(last), nn.ReLU6())))
        stages.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                         stages=stages, head=nn.Linear(last, num_classes))
        init_conv_bn(self)


@register("model", "mobilenetv2")
def mobilenetv2(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    width_multiplier: float = 1.0,
) -> MobileNetV2:
    """MobileNetV2 adapted to 32x32 images (Sandler et al. 2018; stride-1 stem, CIFAR strides).

    Input ``(N, C, H, W)`` -> logits ``(N, num_classes)``; any H, W (global
    average pool), 4x4 final map for 32x32 inputs.
    """
    shape, mean, std = check_common("mobilenetv2", input_shape=input_shape, num_classes=num_classes,
                                    mean=mean, std=std, ranks=(3,))
    check_positive("mobilenetv2", "width_multiplier", width_multiplier)
    return MobileNetV2(input_shape=shape, num_classes=num_classes, mean=mean, std=std,
                       width_multiplier=width_multiplier)
