"""What the zoo's stage-pairing feature methods (NST, VID, CC, ...) share: paired taps and their shapes."""
from __future__ import annotations

from dataclasses import dataclass

from kdlab.config.validate import NonNegative
from kdlab.errors import KdlabError
from kdlab.methods.distill import _probe_shapes

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
