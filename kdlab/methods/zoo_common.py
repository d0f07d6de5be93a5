"""What the zoo's stage-pairing feature methods (NST, VID, CC, ...) share: paired taps and their shapes."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kdlab.config.validate import NonNegative
from kdlab.errors import KdlabError
from kdlab.methods.distill import _probe_shapes
from kdlab.models.taps import INPUT_SUFFIX
from kdlab.models.wrn import PreActBlock

# The three residual stages of the CIFAR ResNets (and WRNs): mdistiller's ``feats[1:]``.
CIFAR_STAGES = ("stage1", "stage2", "stage3")


@dataclass
class StagePairs:
    """Base of the Hparams of methods that compare the i-th student tap with the i-th teacher tap."""

    ce_weight: NonNegative = 1.0
    feature_weight: NonNegative = 1.0
    student_taps: tuple[str, ...] = CIFAR_STAGES
    teacher_taps: tuple[str, ...] = CIFAR_STAGES

    def problems(self) -> list[str]:
        if not self.student_taps:
            return ["method.student_taps: give at least one tap, e.g. [stage1, stage2, stage3]"]
        if len(self.student_taps) != len(self.teacher_taps):
            return [f"method.teacher_taps: {len(self.teacher_taps)} teacher taps for {len(self.student_taps)} student "
                    "taps; the i-th student tap is compared with the i-th teacher tap, so give as many of each"]
        return []


def pair_shapes(method_name: str, student_taps, teacher_taps, *, student, teacher, input_shape, maps: bool):
    """Per-sample shapes ``[(student_shape, teacher_shape), ...]`` of the paired taps, checked before training.

    A tap the model lacks is refused with the valid names; with ``maps`` each must be a ``(C, H, W)`` map.
    """
    if input_shape is None:
        raise KdlabError(f"method {method_name} needs the input shape to check its taps")
    s_shapes = _probe_shapes(student, {tap: "method.student_taps" for tap in student_taps}, input_shape, "student")
    t_shapes = _probe_shapes(teacher, {tap: "method.teacher_taps" for tap in teacher_taps}, input_shape, "teacher")
    pairs = [(s_shapes[s], t_shapes[t]) for s, t in zip(student_taps, teacher_taps)]
    if maps:
        for (s_shape, t_shape), s, t in zip(pairs, student_taps, teacher_taps):
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise KdlabError(f"method.student_taps/teacher_taps: method {method_name} compares (C, H, W) feature "
                                 f"maps, but {s} is {s_shape} and {t} is {t_shape}; tap convolutional stages "
                                 f"(e.g. {', '.join(CIFAR_STAGES)})")
    return pairs


def pre_relu_point(net: nn.Module, stage: str) -> tuple[str, str] | None:
    """``(tap, bn)``: where ``stage``'s output is tapped *before* its ReLU, and the BatchNorm that feeds that ReLU
    (its statistics give OFD's margin); None for a stage of neither kind below.

    As the OFD and AB authors' pre-ReLU features (clovaai/overhaul-distillation ``extract_feature(preReLU=True)``
    and ``get_bn_before_relu``; bhheo/AB_distillation's "Features before ReLU"): a stage of post-activation
    residual blocks (the CIFAR ResNets: the last block ends in ``bn2`` + shortcut, then ``relu2``) gives the input
    of its last ``relu2`` and that block's ``bn2``; a stage of pre-activation blocks (the WRNs) gives its output
    passed through the BatchNorm the next ReLU follows: the next stage's first ``relu1`` input (its ``bn1``), or
    after the last stage the final BN + ReLU of ``pool``.
    """
    module = net.get_submodule(stage)
    children = list(module.named_children()) if isinstance(module, nn.Sequential) else []
    if not children:
        return None
    name, last = children[-1]
    if all(hasattr(last, a) for a in ("bn2", "relu2")) and not isinstance(last, PreActBlock):
        return f"{stage}.{name}.relu2{INPUT_SUFFIX}", f"{stage}.{name}.bn2"
    if isinstance(last, PreActBlock):
        order = [n for n, _ in net.named_children()]
        after = order[order.index(stage) + 1] if stage in order[:-1] else None
        following = list(net.get_submodule(after).named_children()) if after else []
        if following and isinstance(following[0][1], PreActBlock):
            first = following[0][0]
            return f"{after}.{first}.relu1{INPUT_SUFFIX}", f"{after}.{first}.bn1"
        if len(following) > 1 and isinstance(following[0][1], nn.BatchNorm2d) and isinstance(following[1][1], nn.ReLU):
            return f"{after}.{following[1][0]}{INPUT_SUFFIX}", f"{after}.{following[0][0]}"
    return None
