"""1-D convolutional network for sequences ``(C, L)`` such as MNIST-1D ``(1, 40)``."""
from typing import Optional

from torch import nn

from kdlab.config.validate import Depth, Width
from kdlab.models.common import StagedNet, check_common, check_positive, init_conv_bn, resolve_widths
from kdlab.registry import register


def conv_block(in_channels: int, out_channels: int, *, kernel_size: int, stride: int) -> nn.Sequential:
    """Conv1d -> BatchNorm1d -> ReLU; 'same' padding so the length only shrinks by ``stride``."""
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm1d(out_channels),
        nn.ReLU(),
    )


class CNN1d(StagedNet):
    """``block1 .. blockK`` conv blocks, ``pool`` (global average), ``head`` (Linear).

    ``block1`` keeps the length; every later block halves it with a stride-2
    conv (40 -> 40 -> 20 -> 10 for three blocks), which is both cheaper than
    pooling layers and accurate on MNIST-1D.
    """

    def __init__(self, *, input_shape, num_classes, mean, std, widths: tuple[int, ...], kernel_size: int):
        stages: list[tuple[str, nn.Module]] = []
        channels = input_shape[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            stages.append((f"block{index}", conv_block(channels, width, kernel_size=kernel_size, stride=stride)))
            channels = width
        stages.append(("pool", nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten())))
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                         stages=stages, head=nn.Linear(channels, num_classes))
        init_conv_bn(self)


@register("model", "cnn1d")
def cnn1d(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    width: Width = 32,
    depth: Depth = 3,
    widths: Optional[tuple[Width, ...]] = None,
    kernel_size: Width = 5,
) -> CNN1d:
    """1-D CNN for (C, L) sequences: conv-BN-ReLU blocks, stride-2 downsampling, global average pool.

    Input ``(N, C, L)`` -> logits ``(N, num_classes)``. ``width`` channels in each
    of ``depth`` blocks, or explicit per-block ``widths``. Any ``L >= 1`` works
    (strided convs round the length up, so it never reaches zero).
    """
    shape, mean, std = check_common("cnn1d", input_shape=input_shape, num_classes=num_classes,
                                    mean=mean, std=std, ranks=(2,))
    block_widths = resolve_widths("cnn1d", width=width, depth=depth, widths=widths, min_depth=1)
    check_positive("cnn1d", "kernel_size", kernel_size)
    return CNN1d(input_shape=shape, num_classes=num_classes, mean=mean, std=std, widths=block_widths,
                 kernel_size=kernel_size)
