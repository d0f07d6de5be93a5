"""Annealing-KD: Jafari, Rezagholizadeh, Sharma, Ghodsi, "Annealing Knowledge Distillation" (EACL 2021,
arXiv 2104.07163), the predecessor of Continuation-KD (``kdlab.methods.continuation_kd``).

Two phases over the n units (epochs) of training, the first n₁ = round(phase1_fraction·n) of them phase 1:

    phase 1 (e < n₁):  L = ‖z_S − φ(T_e)·z_T‖²     φ(T) = 1 − (T − 1)/τ_max,  T_e = max(1, τ_max − ⌊e/k⌋)
    phase 2 (e ≥ n₁):  L = CE(y, softmax(z_S))       (the teacher is not run)

with e the 0-based unit and k = ⌊n₁/τ_max⌋: the student regresses the teacher's logits scaled by φ, from
1/τ_max (a heavily annealed, smooth target) up to 1 in τ_max equal stages of k units, then fine-tunes on
the labels. It is Continuation-KD with margin 0 and ψ a step function.

Verified in the official code (``huawei-noah/Efficient-NLP``, ``Annealing_KD/computer_vision_tasks/
annealing_kd_train.py`` and ``NLP_glue_tasks/annealing_kd_glue.py``):

* phase 1 is ``F.mse_loss(output, teacher_outputs * T / max_T)`` with the code's T counting *up*
  1 … max_T: T_code = τ_max + 1 − T, so T/max_T = φ(T). T_code += 1 at each 0-based epoch e > 0 with
  e mod ⌊epochs₁/max_T⌋ = 0, i.e. each value lasts k epochs; phase 2 is ``F.cross_entropy``.
* ``F.mse_loss`` averages over batch × classes: the default ``reduction: mean`` here (``mse_logits``);
  ``reduction: sum`` is the ‖·‖²₂ of the formula above, as Continuation-KD writes its special case
  (summed over classes, averaged over the batch); the Annealing-KD paper's own text was not retrieved.
* Code defaults: max_temperature 10 in the vision script, 7 in the README's GLUE command (kdlab's
  default, which also fits short runs: n₁ ≥ τ_max is required); 200 epochs of phase 1 and 100 of
  phase 2 (phase1_fraction 2/3); the code asserts epochs₁ ≥ max_T (here a KdlabError).
* The code trains the phases as two runs (phase 1's best-validation checkpoint starts phase 2 with a
  fresh optimiser and lr schedule); kdlab runs both inside one ``fit`` under ``train``'s one lr schedule.

kdlab's clamp T ≥ 1: when τ_max does not divide n₁ the official counter overshoots max_T (φ > 1) in the
last epochs of phase 1; here the target stays φ = 1 there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Interval
import torch

from kdlab.config.validate import Count
from kdlab.errors import ConfigError, KdlabError
from kdlab.losses import cross_entropy, mse_logits
from kdlab.methods.base import Method
from kdlab.methods.continuation_kd import (UNITS, known_units, max_temperature_problem, phi, temperature_at,
                                          temperatures_problem, unit_index)
from kdlab.registry import register


KEY = "annealing_kd"
REDUCTIONS = ("mean", "sum")


def _fraction_problem(phase1_fraction) -> str | None:
    if isinstance(phase1_fraction, bool) or not isinstance(phase1_fraction, (int, float)) or \
            not (math.isfinite(phase1_fraction) and 0 < phase1_fraction <= 1):
        return f"method.phase1_fraction ({KEY}): must lie in (0, 1], got {phase1_fraction!r}"
    return None


def annealing_schedule(e: int, n: int, *, max_temperature: int, phase1_fraction: float) -> tuple[int, int, float]:
    """``(phase, T, φ)`` at the 0-based unit ``e`` of ``n``: phase 1 for e < round(phase1_fraction·n), else 2
    (where T = 1 and φ = 1, the last phase-1 values; the teacher is unused)."""
    problem = _fraction_problem(phase1_fraction)
    if problem:
        raise KdlabError(problem)
    phase1 = round(phase1_fraction * n)
    if e >= phase1:
        return 2, 1, 1.0
    temperature = temperature_at(e, phase1, max_temperature, method=KEY)
    return 1, temperature, phi(temperature, max_temperature, method=KEY)


@dataclass
class AnnealingKDHparams:
    max_temperature: Count = 7  # τ_max: φ = 1 − (T−1)/τ_max steps 1/τ_max → 1 (official: 7 GLUE README, 10 vision)
    phase1_fraction: Annotated[float, Interval(gt=0, le=1)] = 2 / 3  # share of training in phase 1 (logit regression); the rest is CE (code: 200+100)
    reduction: Literal["mean", "sum"] = "mean"  # over classes: mean = the code's F.mse_loss; sum = ‖·‖²₂
    unit: Literal["epoch", "step"] = "epoch"  # e counts epochs (the paper, the code) or optimiser steps

    def problems(self) -> list[str]:
        """This method's rules, each message naming it: at config validation once the declared bounds hold,
        and for a method built in Python (``check_hparams``)."""
        out = [max_temperature_problem(self.max_temperature, KEY), _fraction_problem(self.phase1_fraction)]
        if self.reduction not in REDUCTIONS:
            out.append(f"method.reduction ({KEY}): {self.reduction!r} is not one of {', '.join(REDUCTIONS)}")
        if self.unit not in UNITS:
            out.append(f"method.unit ({KEY}): {self.unit!r} is not one of {', '.join(UNITS)}")
        return [p for p in out if p]

    @staticmethod
    def check_config(cfg, errors: list[str]) -> None:
        """At config validation: the T_max temperatures fit in phase 1, when the config gives the run's length."""
        options = cfg.method.options
        max_temperature, fraction = options.get("max_temperature", 7), options.get("phase1_fraction", 2 / 3)
        n = known_units(cfg.train, options.get("unit", "epoch"))
        if n is not None and max_temperature_problem(max_temperature, KEY) is None \
                and _fraction_problem(fraction) is None:
            problem = temperatures_problem(max_temperature, round(fraction * n), KEY)
            if problem:
                errors.append(problem)


@register("method", KEY)
class AnnealingKD(Method):
    """Annealing-KD (Jafari et al. 2021): MSE to φ(T)·teacher logits as T steps down, then cross-entropy."""

    Hparams = AnnealingKDHparams

    @classmethod
    def check_hparams(cls, hparams) -> None:
        """Built in Python: ``Hparams.problems()``, whose messages name the method (a config met the declared
        bounds, then the same rules, when it was validated)."""
        problems = hparams.problems()
        if problems:
            raise ConfigError(problems[:1])

    def schedule(self) -> tuple[int, int, float]:
        """``(phase, T, φ)`` at the current step (after ``set_progress``)."""
        h = self.hparams
        i, n = unit_index(self.step, self.total_steps, self.steps_per_epoch, h.unit)
        return annealing_schedule(i - 1, n, max_temperature=h.max_temperature, phase1_fraction=h.phase1_fraction)

    def teacher_needed(self) -> bool:
        return self.schedule()[0] == 1

    def metrics(self) -> dict[str, float]:
        phase, temperature, scale = self.schedule()
        return {"phase": float(phase), "temperature": float(temperature), "phi": scale}

    def loss_terms(self, batch, student_out, teacher_out):
        phase, _, scale = self.schedule()
        logits = student_out.logits
        zero = logits.new_zeros((), dtype=torch.promote_types(torch.float32, logits.dtype))
        if phase == 2:
            return {"kd": zero, "ce": cross_entropy(logits, batch.labels)}
        # mse_logits: mean over classes of (z_S − φ·z_T)², averaged over the batch; × C for the sum.
        regression = mse_logits(logits, scale * teacher_out.logits)
        if self.hparams.reduction == "sum":
            regression = regression * logits.shape[-1]
        return {"kd": regression, "ce": zero}
