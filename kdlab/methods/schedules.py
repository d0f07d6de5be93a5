"""Weight schedules for loss terms: pure functions of training progress in [0, 1]."""
from __future__ import annotations

import math

from kdlab.errors import KdlabError

SCHEDULES = ("constant", "linear_warmup", "cosine")


def term_weight(weight: float, progress: float, *, schedule: str = "constant", warmup: float = 0.1,
                final_weight: float = 0.0) -> float:
    """The weight of a loss term at ``progress`` (fraction of optimiser steps done).

    * ``constant``: ``weight``.
    * ``linear_warmup``: ``weight · min(1, progress / warmup)`` — ramps up from 0
      over the first ``warmup`` fraction of training (e.g. to let a projector
      settle before a feature term dominates).
    * ``cosine``: ``final_weight + (weight − final_weight)·½(1 + cos(π·progress))``
      — anneals from ``weight`` at the start to ``final_weight`` at the end.
    """
    if schedule == "constant":
        return weight
    if schedule == "linear_warmup":
        if warmup <= 0:
            return weight
        return weight * min(1.0, progress / warmup)
    if schedule == "cosine":
        return final_weight + (weight - final_weight) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise KdlabError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
