"""Multi-layer perceptron on the flattened input."""
from typing import Optional

from torch import nn

from kdlab.config.validate import Depth, Width
from kdlab.models.common import StagedNet, check_common, check_dropout, resolve_widths
from kdlab.registry import register


class MLP(StagedNet):
    """``layer1 .. layerK`` (Linear -> ReLU -> Dropout), ``pool`` (identity), ``head`` (Linear).

    ``layer1`` flattens its input; ``pool`` is the penultimate vector, named as in
    every other family (with no hidden layers it is the flattened input).
    """

    def __init__(self, *, input_shape, num_classes, mean, std, widths: tuple[int, ...], dropout: float):
        stages: list[tuple[str, nn.Module]] = []
        features = 1
        for d in input_shape:
            features *= d
        for index, width in enumerate(widths, start=1):
            layers: list[nn.Module] = [nn.Flatten()] if index == 1 else []
            layers += [nn.Linear(features, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            stages.append((f"layer{index}", nn.Sequential(*layers)))
            features = width
        stages.append(("pool", nn.Flatten() if not widths else nn.Identity()))
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                         stages=stages, head=nn.Linear(features, num_classes))


@register("model", "mlp")
def mlp(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    width: Width = 128,
    depth: Depth = 2,
    widths: Optional[tuple[Width, ...]] = None,
    dropout: float = 0.0,
) -> MLP:
    """MLP on the flattened input: depth hidden ReLU layers of `width` units (any input shape).

    Input ``(N, *input_shape)`` -> logits ``(N, num_classes)``. ``widths`` lists the
    hidden sizes explicitly and overrides ``width``/``depth``; ``depth=0`` (or
    ``widths=()``) gives multinomial logistic regression.
    """
    shape, mean, std = check_common("mlp", input_shape=input_shape, num_classes=num_classes, mean=mean, std=std)
    layer_widths = resolve_widths("mlp", width=width, depth=depth, widths=widths, min_depth=0)
    check_dropout("mlp", dropout)
    return MLP(input_shape=shape, num_classes=num_classes, mean=mean, std=std, widths=layer_widths,
               dropout=dropout)
