"""Several teachers as one module, for multi-teacher distillation (method ``multi_teacher``).

    teacher = TeacherEnsemble([resnet56, wrn_40_2, vit])
    teacher(x)                     # (N, C): the mean of the members' logits
    with Taps(teacher, teacher.feature_stages) as t:   # "members.0", "members.1", ...
        teacher(x)
        member_logits = [t[name] for name in teacher.feature_stages]

Each member's logits are tapped by its module path ``members.k`` (its forward
output), so the training loop's one teacher forward yields all of them.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kdlab.errors import KdlabError


class TeacherEnsemble(nn.Module):
    """K teacher networks over the same classes; ``forward`` returns the mean of their logits.

    ``members`` is an ``nn.ModuleList`` (state-dict keys ``members.k.*``);
    ``feature_stages = ("members.0", ..., "members.{K-1}")`` name the taps that
    capture each member's logits ``(N, C)``.

    What ``forward`` returns — the plain mean of the member logits, whatever
    combination rule a method distils from — is what the training loop sees as
    "the teacher": its val/test agreement metrics (``teacher_logits`` of
    ``kdlab.engine.loop.fit``), the class-count check, and ``Outputs.logits``
    of the teacher. The ``multi_teacher`` method ignores it and combines the
    tapped member logits with its own rule.
    """

    def __init__(self, members: Iterable[nn.Module]):
        super().__init__()
        members = list(members)
        if not members:
            raise KdlabError("teacher.members: give at least one teacher network")
        for k, member in enumerate(members):
            if not isinstance(member, nn.Module):
                raise KdlabError(f"teacher.members[{k}]: expected a torch nn.Module, got {type(member).__name__}")
        self.members = nn.ModuleList(members)
        self.feature_stages = tuple(f"members.{k}" for k in range(len(members)))

    def __len__(self) -> int:
        return len(self.members)

    def member_logits(self, x: Tensor) -> list[Tensor]:
        """Each member's logits for ``x``, checked to share one shape ``(N, C)``."""
        outs = [member(x) for member in self.members]
        for k, out in enumerate(outs):
            if out.shape != outs[0].shape:
                raise KdlabError(f"teacher.members[{k}] gives logits of shape {tuple(out.shape)} but member 0 gives "
                                 f"{tuple(outs[0].shape)}; every teacher must predict the same classes")
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """The mean of the member logits, ``(N, C)`` (see the class docstring for who reads it)."""
        outs = self.member_logits(x)
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(dim=0)
