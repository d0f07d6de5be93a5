"""Continuation-KD: Jafari, Kobyzev, Rezagholizadeh, Poupart, Ghodsi, "Continuation KD: Improved Knowledge
Distillation through the Lens of Continuation Optimization" (EMNLP 2022 Findings, arXiv 2212.05998).

The loss of the paper's Algorithm 1, at the i-th of n training units (epochs in the paper):

    L      = ψ(i) · CE(y, softmax(z_S)) + (1 − ψ(i)) · L_CNT
    L_CNT  = max{ 0, ‖z_S − φ(T_i)·z_T‖²₂ − m·φ(T_i) }
    φ(T)   = 1 − (T − 1)/T_max                    T_i ∈ {1, …, T_max}, an integer
    T_i    : T ← T_max, k ← ⌊n/T_max⌋; at unit i = 1 … n, if i mod k = 0 then T ← T − 1

so the teacher's logits are scaled by φ, which grows from 1/T_max to 1 (the smoothed objective first, the
full one last), the hinge margin m·φ is annealed with it (differences smaller than m·φ are ignored: the
paper's robustness to a noisy teacher), and ψ moves the loss from the logit hinge to cross-entropy.
Symbols (z_S, z_T, T, φ, ψ, m) are the paper's. With m = 0 and ψ a step function the method is
Annealing-KD (``kdlab.methods.annealing_kd``), the authors' predecessor.

ψ, as the paper sets it (both of its settings are one form, ψ(i) = min(1, i/(ramp·n)) until unit
round(jump·n), then 1):

* vision (n = 200 epochs): ψ(i) = i/150 for i ≤ 150, then 1          → psi_ramp 0.75, psi_jump 1.0
* NLU (n = 30 epochs):     ψ(i) = i/40 for i ≤ 20, then 1 (jump at 0.5) → psi_ramp 40/30, psi_jump 20/30

Choices the paper leaves open (each is an hparam or documented here):

* Reduction: ‖·‖²₂ is the squared L2 norm over the classes (a sum, not the mean of ``mse_logits``),
  the hinge is taken per sample and then averaged over the batch (``hinge: sample``); ``hinge: batch``
  applies it once to the batch mean of the squared norms. The margin m is therefore in squared-logit
  units summed over the C classes. The paper does not state m: the default 0 turns the hinge off; sweep it.
* The temperature never goes below 1: Algorithm 1 as written reaches T = 0 (φ = 1 + 1/T_max) at i = n
  when T_max divides n, so T_i = max(1, T_max − ⌊i/k⌋). n < T_max (k = 0) is an error.
* ψ(1) = 1/(ramp·n) (the paper's formula i/150 at i = 1), although its prose says ψ(1) = 0.
* ``unit: epoch`` is Algorithm 1 (i = the 1-based epoch, n = the epochs of the run);
  ``unit: step`` applies the same formulas per optimiser step, for runs shorter than T_max epochs.
* When ψ = 1 the teacher is not run (its term has weight 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Interval
import torch

from kdlab.config.validate import Count, NonNegative, Positive
from kdlab.errors import ConfigError, KdlabError
from kdlab.losses import cross_entropy
from kdlab.methods.base import Method
from kdlab.methods.schedules import term_weight
from kdlab.registry import register


KEY = "continuation_kd"
UNITS = ("epoch", "step")
HINGES = ("sample", "batch")


def unit_index(step: int, total_steps: int, steps_per_epoch: int | None, unit: str) -> tuple[int, int]:
    """``(i, n)``: the 1-based index of the unit (epoch or step) that optimiser step ``step`` (0-based) is in,
    and the number of units of the run. ``steps_per_epoch`` None (a method driven outside ``fit``) counts
    every step as an epoch."""
    if unit == "step":
        return step + 1, max(1, total_steps)
    per = steps_per_epoch or 1
    return step // per + 1, max(1, math.ceil(total_steps / per))


def max_temperature_problem(max_temperature, method: str) -> str | None:
    if isinstance(max_temperature, bool) or not isinstance(max_temperature, int) or max_temperature < 1:
        return (f"method.max_temperature ({method}): must be an integer >= 1 (T steps down T_max, ..., 1), "
                f"got {max_temperature!r}")
    return None


def _check_max_temperature(max_temperature, method: str) -> int:
    problem = max_temperature_problem(max_temperature, method)
    if problem:
        raise KdlabError(problem)
    return max_temperature


def temperatures_problem(max_temperature: int, n: int, method: str) -> str | None:
    """Why T_max temperatures do not fit in ``n`` units of training (each needs ⌊n/T_max⌋ ≥ 1 units), or None."""
    if n // max_temperature == 0:
        return (f"method.max_temperature ({method}): {max_temperature} temperatures do not fit in {n} units of "
                "training (T drops every ⌊n/T_max⌋ units); lower max_temperature, train longer, or set unit: step")
    return None


def known_units(train, unit: str) -> int | None:
    """The run's number of units (``unit_index``'s n) when the config alone gives it: the epochs of a run
    without ``train.steps``, or ``train.steps`` counted in steps; None when it depends on the data's size."""
    if unit == "step":
        return train.steps if isinstance(train.steps, int) else None
    return train.epochs if train.steps is None and isinstance(train.epochs, int) else None


def number_problem(value, key: str, method: str, *, low: float, high: float | None = None,
                   low_open: bool = False) -> str | None:
    """A finite number in [low, high] (``low_open``: (low, high]), as this method words its bounds; else why not."""
    bounds = (f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high is not None
              else f"{'>' if low_open else '>='} {low:g}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < low or (low_open and value == low) or (high is not None and value > high):
        return f"method.{key} ({method}): must be a finite number {bounds}, got {value!r}"
    return None


def phi(temperature: int, max_temperature: int, *, method: str = KEY) -> float:
    """The teacher's scale φ(T) = 1 − (T − 1)/T_max, in [1/T_max, 1] for T in [1, T_max]."""
    _check_max_temperature(max_temperature, method)
    if not 1 <= temperature <= max_temperature:
        raise KdlabError(f"method {method}: temperature {temperature!r} left its range [1, "
                         f"max_temperature={max_temperature}]")
    return 1.0 - (temperature - 1) / max_temperature


def temperature_at(i: int, n: int, max_temperature: int, *, method: str = KEY) -> int:
    """T_i = max(1, T_max − ⌊i/k⌋) with k = ⌊n/T_max⌋: Algorithm 1's T after unit ``i`` of ``n`` (0 ≤ i ≤ n).

    Continuation-KD passes the 1-based epoch i (T drops at the start of epoch k, 2k, ...); Annealing-KD's
    official code the 0-based one (each T lasts k epochs). The clamp at 1 is kdlab's (see the module doc).
    """
    _check_max_temperature(max_temperature, method)
    if not 0 <= i <= n:
        raise KdlabError(f"method {method}: unit {i!r} is outside the run's [0, {n}]")
    problem = temperatures_problem(max_temperature, n, method)
    if problem:
        raise KdlabError(problem)
    return max(1, max_temperature - i // (n // max_temperature))


def psi_problem(ramp, jump, method: str) -> str | None:
    if not (math.isfinite(ramp) and ramp > 0):
        return f"method.psi_ramp ({method}): must be a finite number > 0, got {ramp!r}"
    if not (math.isfinite(jump) and 0 < jump <= 1):
        return f"method.psi_jump ({method}): must lie in (0, 1], got {jump!r}"
    return None


def psi_at(i: int, n: int, *, ramp: float, jump: float = 1.0, method: str = KEY) -> float:
    """ψ(i) = min(1, i/(ramp·n)) for i ≤ round(jump·n), then 1 — the CE weight at unit ``i`` of ``n``.

    The ramp is ``term_weight``'s linear warm-up over the fraction ``ramp`` of training.
    """
    problem = psi_problem(ramp, jump, method)
    if problem:
        raise KdlabError(problem)
    if not 0 <= i <= n:
        raise KdlabError(f"method {method}: unit {i!r} is outside the run's [0, {n}]")
    value = 1.0 if i > round(jump * n) else term_weight(1.0, i / n, schedule="linear_warmup", warmup=ramp)
    if not 0.0 <= value <= 1.0:  # cannot happen with the checks above; a schedule must never leave [0, 1]
        raise KdlabError(f"method {method}: ψ = {value!r} left [0, 1] at unit {i} of {n}")
    return value


def continuation_hinge(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, phi: float, margin: float,
                       hinge: str = "sample") -> torch.Tensor:
    """L_CNT = max{0, ‖z_S − φ·z_T‖²₂ − m·φ}: the squared norm summed over the classes (last dim).

    ``hinge="sample"``: per position, then averaged over the positions (the rows of an (N, C) batch);
    ``"batch"``: the hinge of the positions' mean squared norm. Computed in at least float32 (float64 kept).
    """
    dtype = torch.promote_types(torch.promote_types(torch.float32, student_logits.dtype), teacher_logits.dtype)
    squared = (student_logits.to(dtype) - phi * teacher_logits.to(dtype)).square().sum(dim=-1)
    if hinge == "sample":
        return (squared - margin * phi).clamp_min(0.0).mean()
    return (squared.mean() - margin * phi).clamp_min(0.0)


@dataclass
class ContinuationKDHparams:
    max_temperature: Count = 10  # T_max: T steps down T_max → 1, so φ grows 1/T_max → 1 (paper: 20 vision, 10 NLU)
    margin: NonNegative = 0.0  # m: hinge margin, annealed as m·φ; squared-logit units summed over classes (unstated; sweep)
    psi_ramp: Positive = 0.75  # ψ(i) = min(1, i/(psi_ramp·n)): ψ reaches 1 at this fraction of training (vision 150/200)
    psi_jump: Annotated[float, Interval(gt=0, le=1)] = 1.0  # ψ = 1 after unit round(psi_jump·n) (NLU: 20/30, with psi_ramp 40/30); 1 = no jump
    hinge: Literal["sample", "batch"] = "sample"  # hinge per sample then batch mean, or on the batch-mean norm
    unit: Literal["epoch", "step"] = "epoch"  # i counts epochs (Algorithm 1) or optimiser steps

    def problems(self) -> list[str]:
        """This method's rules, each message naming it: at config validation once the declared bounds hold,
        and for a method built in Python (``check_hparams``)."""
        out = [max_temperature_problem(self.max_temperature, KEY),
               number_problem(self.margin, "margin", KEY, low=0.0)]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.psi_ramp, self.psi_jump)):
            out.append(psi_problem(self.psi_ramp, self.psi_jump, KEY))
        else:
            out.append(f"method.psi_ramp ({KEY}): psi_ramp and psi_jump must be numbers, got "
                       f"{self.psi_ramp!r}, {self.psi_jump!r}")
        if self.hinge not in HINGES:
            out.append(f"method.hinge ({KEY}): {self.hinge!r} is not one of {', '.join(HINGES)}")
        if self.unit not in UNITS:
            out.append(f"method.unit ({KEY}): {self.unit!r} is not one of {', '.join(UNITS)}")
        return [p for p in out if p]

    @staticmethod
    def check_config(cfg, errors: list[str]) -> None:
        """At config validation: the T_max temperatures fit in the run, when the config gives its length."""
        options = cfg.method.options
        unit, max_temperature = options.get("unit", "epoch"), options.get("max_temperature", 10)
        n = known_units(cfg.train, unit)
        if n is not None and max_temperature_problem(max_temperature, KEY) is None:
            problem = temperatures_problem(max_temperature, n, KEY)
            if problem:
                errors.append(problem)


@register("method", KEY)
class ContinuationKD(Method):
    """Continuation-KD (Jafari et al. 2022): ψ·CE + (1−ψ)·max{0, ‖z_S − φ·z_T‖² − m·φ}, T stepped down, ψ ramped."""

    Hparams = ContinuationKDHparams

    @classmethod
    def check_hparams(cls, hparams) -> None:
        """Built in Python: ``Hparams.problems()``, whose messages name the method (a config met the declared
        bounds, then the same rules, when it was validated)."""
        problems = hparams.problems()
        if problems:
            raise ConfigError(problems[:1])

    def schedule(self) -> tuple[int, float, float]:
        """``(T, φ, ψ)`` at the current step (after ``set_progress``)."""
        h = self.hparams
        i, n = unit_index(self.step, self.total_steps, self.steps_per_epoch, h.unit)
        temperature = temperature_at(i, n, h.max_temperature)
        return temperature, phi(temperature, h.max_temperature), psi_at(i, n, ramp=h.psi_ramp, jump=h.psi_jump)

    def teacher_needed(self) -> bool:
        return self.schedule()[2] < 1.0  # ψ = 1: the hinge has weight 0

    def metrics(self) -> dict[str, float]:
        temperature, scale, psi = self.schedule()
        return {"temperature": float(temperature), "phi": scale, "psi": psi}

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        _, scale, psi = self.schedule()
        logits = student_out.logits
        if psi < 1.0:
            hinge = continuation_hinge(logits, teacher_out.logits, phi=scale, margin=h.margin, hinge=h.hinge)
        else:
            hinge = logits.new_zeros((), dtype=torch.promote_types(torch.float32, logits.dtype))
        return {"kd": (1.0 - psi) * hinge, "ce": psi * cross_entropy(logits, batch.labels)}
