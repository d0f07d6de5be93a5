"""A teacher's training trajectory as one module: its kept checkpoints in order, one active at a time.

Used by ``route_constrained`` (Jin et al., ICCV 2019), which moves the active
checkpoint along the route as the student trains. Only the active stage runs in
``forward`` (one teacher forward per step, not one per checkpoint); by default
the last stage — the converged teacher — is active, so evaluation-time
agreement is measured against the final teacher.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from kdlab.errors import KdlabError


class TeacherTrajectory(nn.Module):
    """Checkpoints ``stages[0..K-1]`` of one teacher (early to final); ``forward`` runs ``stages[active]``."""

    def __init__(self, stages: Iterable[nn.Module], *, active: int | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        if len(self.stages) == 0:
            raise KdlabError("teacher.trajectory: the teacher kept no checkpoints; set teacher.train.keep_epochs")
        self.active = len(self.stages) - 1 if active is None else active

    def __len__(self) -> int:
        return len(self.stages)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages[self.active](x)
