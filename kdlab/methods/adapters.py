"""Trainable adapters that map a student feature to the teacher's feature shape.

A feature-distillation method owns its adapters (they are submodules of the
``Method``, so they are optimised with the student and saved in its
checkpoints) and builds them from the tap shapes (``kdlab.models.tap_shapes``,
batch dim dropped):

    adapter = make_adapter((16, 20), (64, 20), student_tap="block2", teacher_tap="block2")
    loss = fitnet(adapter(student_out.features["block2"]), teacher_out.features["block2"])

What ``kind="auto"`` builds, by the shapes without the batch dim
(``layout="channels_first"``, i.e. ``(D,)``, ``(C, L)`` or ``(C, H, W)``):

=====================  ====================  ===========================================
student                teacher               adapter
=====================  ====================  ===========================================
equal shapes           equal shapes          identity (no parameters)
``(C, H, W)``          ``(C', H', W')``      [avg-pool to (H', W')] → 1×1 Conv2d → BN2d
``(C, L)``             ``(C', L')``          [avg-pool to L'] → 1×1 Conv1d → BN1d
``(D,)``               ``(D',)``             Linear(D, D')
``(C, *spatial)``      ``(D',)``             global avg-pool → Linear(C, D')
``(D,)``               ``(C', *spatial)``    error: a vector has no spatial layout
=====================  ====================  ===========================================

Spatial-size mismatches. When the student map is *larger* than the
teacher's in every spatial dim, it is reduced with adaptive average pooling
to the teacher's size before the 1×1 conv (pooling and a 1×1 conv are both
linear and commute, so the order only saves compute). This is a fixed,
parameter-free downsampling of the same kind the networks apply themselves
(strided convs, pooling), CRD's RepDistiller pools the larger map the same
way for AT, and the adapter's ``repr`` shows the pooling layer, so it is not
hidden. When the ratio is not an integer the pooling windows are uneven (and
may overlap) — still an average of neighbouring positions. When the student
map is *smaller* in any spatial dim, ``KdlabError``: matching it would mean
upsampling, i.e. inventing positions the student never computed; choose an
earlier (larger) student tap or a later (smaller) teacher tap, or use
``kind="linear"`` on pooled features.

``kind``:

* ``"auto"``: the table above;
* ``"identity"``: no adapter; the shapes must be equal;
* ``"conv"``: the 1×1 conv + BN path even when the shapes are equal (both
  must have spatial dims of the same rank);
* ``"linear"``: the linear projector of Miles & Mikolajczyk (arXiv
  2303.11098): global-average-pool the student feature over its spatial dims
  (if any), then ``Linear(C, D')``; the teacher shape must be a vector
  ``(D',)`` (tap its pooled feature), and a Linear is built even if the
  dims are equal. No normalisation is included (the recipe normalises in the
  loss: ``kdlab.losses.batchnorm_standardize``).

``layout="channels_last"`` is for token features ``(T, D)`` (e.g. the ViT
blocks): with equal token counts ``T`` the adapter is ``Linear(D_s, D_t)``
over the last dim (identity if ``D_s == D_t``); different token counts are a
``KdlabError``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdlab.errors import KdlabError

KINDS = ("auto", "identity", "conv", "linear")
LAYOUTS = ("channels_first", "channels_last")


class GlobalAvgPool(nn.Module):
    """``(N, C, *spatial) -> (N, C)``: mean over every spatial dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


class Adapter(nn.Module):
    """A student→teacher feature map built by ``make_adapter``; checks its input shape.

    ``student_shape``/``teacher_shape`` are the per-sample shapes (no batch dim);
    ``body`` is the layer stack (``nn.Identity`` for an identity adapter, in
    which case ``forward`` returns its input unchanged).
    """

    def __init__(self, body: nn.Module, *, student_shape, teacher_shape, kind: str, student_tap: str):
        super().__init__()
        self.body = body
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.kind = kind
        self.student_tap = student_tap

    @property
    def is_identity(self) -> bool:
        return isinstance(self.body, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.student_shape:
            raise KdlabError(
                f"adapter for student tap {self.student_tap}: expected features of shape (N, "
                f"{', '.join(map(str, self.student_shape))}), got {tuple(x.shape)}; "
                "the adapter was built for other tap shapes"
            )
        return self.body(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, {self.student_shape} -> {self.teacher_shape}"


def _as_shape(role: str, shape) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise KdlabError(f"make_adapter: {role} shape must be a tuple of positive ints (no batch dim), got {shape!r}")
    shape = tuple(int(d) for d in shape)
    if not 1 <= len(shape) <= 3:
        raise KdlabError(
            f"make_adapter: {role} shape {shape} has {len(shape)} dims; expected (D,), (C, L) or (C, H, W) "
            "without the batch dim"
        )
    return shape


def _conv_path(student, teacher, fail) -> nn.Module:
    """[adaptive avg-pool] → 1×1 conv → BN for channel-first maps of the same spatial rank."""
    spatial_s, spatial_t = student[1:], teacher[1:]
    if len(spatial_s) != len(spatial_t):
        fail("the spatial ranks differ; tap features of the same kind (both (C, L) or both (C, H, W))")
    if any(s < t for s, t in zip(spatial_s, spatial_t)):
        fail(
            "the student map is smaller than the teacher's in a spatial dim and would need upsampling; "
            "tap an earlier (larger) student layer or a later (smaller) teacher layer, or use kind='linear' "
            "on pooled features"
        )
    layers: list[nn.Module] = []
    two_d = len(spatial_s) == 2
    if spatial_s != spatial_t:
        layers.append(nn.AdaptiveAvgPool2d(spatial_t) if two_d else nn.AdaptiveAvgPool1d(spatial_t[0]))
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if two_d else (nn.Conv1d, nn.BatchNorm1d)
    layers += [conv(student[0], teacher[0], kernel_size=1, bias=False), norm(teacher[0])]
    return nn.Sequential(*layers)


def _linear_path(student, teacher) -> nn.Module:
    """[global avg-pool] → Linear(C_s, D_t)."""
    layers: list[nn.Module] = [GlobalAvgPool()] if len(student) > 1 else []
    layers.append(nn.Linear(student[0], teacher[0]))
    return nn.Sequential(*layers)


def make_adapter(
    student_shape,
    teacher_shape,
    *,
    kind: str = "auto",
    layout: str = "channels_first",
    student_tap: str = "(unnamed)",
    teacher_tap: str = "(unnamed)",
) -> Adapter:
    """A trainable map from student features ``(N, *student_shape)`` to ``(N, *teacher_shape)``.

    Shapes exclude the batch dim. See the module docstring for what each
    ``kind`` builds and why a smaller student map is an error while a larger
    one is average-pooled. The tap names only label error messages.
    Raises ``KdlabError`` ("student tap X has shape A, teacher tap Y has shape
    B; ...") when no adapter of that kind can map one shape to the other.
    """
    if kind not in KINDS:
        raise KdlabError(f"make_adapter: unknown kind {kind!r}; use one of {', '.join(map(repr, KINDS))}")
    if layout not in LAYOUTS:
        raise KdlabError(f"make_adapter: unknown layout {layout!r}; use one of {', '.join(map(repr, LAYOUTS))}")
    student = _as_shape("student", student_shape)
    teacher = _as_shape("teacher", teacher_shape)

    def fail(reason: str):
        raise KdlabError(
            f"student tap {student_tap} has shape {student}, teacher tap {teacher_tap} has shape {teacher}; "
            f"kind={kind!r}: {reason}"
        )

    def build(body: nn.Module) -> Adapter:
        return Adapter(body, student_shape=student, teacher_shape=teacher, kind=kind, student_tap=student_tap)

    if layout == "channels_last":
        if kind == "conv":
            fail("a 1x1 conv needs layout='channels_first'; with channels-last tokens use kind='auto' or 'linear'")
        if student[:-1] != teacher[:-1]:
            fail("the leading (token/position) dims differ; a channels-last adapter only maps the last dim")
        if kind == "identity" or (kind == "auto" and student == teacher):
            if student != teacher:
                fail("kind='identity' needs equal shapes")
            return build(nn.Identity())
        return build(nn.Linear(student[-1], teacher[-1]))

    if kind == "identity":
        if student != teacher:
            fail("kind='identity' needs equal shapes; use kind='auto' for a trainable adapter")
        return build(nn.Identity())
    if kind == "linear":
        if len(teacher) != 1:
            fail("kind='linear' maps to a vector (D,); tap the teacher's pooled feature (e.g. 'pool')")
        return build(_linear_path(student, teacher))
    if kind == "conv":
        if len(student) == 1 or len(teacher) == 1:
            fail("kind='conv' needs channel-first maps (C, L) or (C, H, W) on both sides")
        return build(_conv_path(student, teacher, fail))

    # kind == "auto"
    if student == teacher:
        return build(nn.Identity())
    if len(teacher) == 1:
        return build(_linear_path(student, teacher))
    if len(student) == 1:
        fail(
            "a vector has no spatial layout to map onto the teacher's map; tap a student feature map, "
            "or the teacher's pooled feature"
        )
    return build(_conv_path(student, teacher, fail))
