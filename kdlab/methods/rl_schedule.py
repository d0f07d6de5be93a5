"""RL schedule: a UCB bandit that picks Hinton KD's (T, α) for each epoch from a held-out reward.

The KD loss of an epoch is Hinton's (``kdlab.methods.kd``) with that epoch's arm (T, α):

    L = α · T² · KL(p_T^teacher ‖ p_T^student) + (1 − α) · CE(y, p_1^student)

Arms: the grid ``temperatures × alphas`` (arm a = (temperatures[a // |alphas|], alphas[a mod |alphas|])).

**Controller: discounted UCB1.** Auer, Cesa-Bianchi & Fischer (2002), "Finite-time Analysis of the
Multiarmed Bandit Problem", UCB1, with the discount of Garivier & Moulines (2011), "On Upper-Confidence
Bound Policies for Switching Bandit Problems" (D-UCB). After each epoch's reward r for arm a:

    N_b ← γ·N_b,  S_b ← γ·S_b  for every arm b;   N_a ← N_a + 1,  S_a ← S_a + r
    next arm = an arm never played (lowest index first), else argmax_b  S_b/N_b + c·√(2·ln(Σ N) / N_b)

with c = ``exploration`` and γ = ``discount`` (γ = 1 is UCB1; ties go to the lowest index). UCB1 is
deterministic, so the controller needs no random state; all of it (N, S, the arm, the probe) is in
buffers, saved in every checkpoint, and a resumed run picks the same arms.

**Reward (exact).** The method holds out a *probe* of K = max(1, round(probe_fraction · train_size))
train samples: the first K distinct samples of the first batches it sees (the loop's shuffled order of
epoch 1). They are masked out of both loss terms for the whole run (the student never fits their labels)
and scored with the student in eval mode under no_grad (its mode restored). The score is measured when
the probe is complete (at step 0, before any update, when K ≤ batch size) and at each epoch boundary (the first
step of each later epoch, before its update). The reward of the epoch's arm is

    reward: nll → r = NLL_probe(start) − NLL_probe(end)   the decrease of the probe's mean cross-entropy (nats)
    reward: acc → r = acc_probe(end) − acc_probe(start)    the gain of the probe's accuracy (fraction)

from the arm's start to the end of its epoch. A non-finite reward raises ``NonFiniteLossError`` (a
``KdlabError``), so the run stops and keeps its last good checkpoint.

Limits, stated plainly:

* The probe is not fully independent of training: its samples still pass through the student's
  train-mode forward, so BatchNorm's batch statistics (and running averages) include them; no gradient
  of their loss terms reaches the student. The loop's own val split is not available to methods.
  With ``data.augment`` the probe keeps the augmented inputs of the batches it was taken from.
* Rewards are not stationary: a student improves fastest early, so the first arms played (the
  round-robin of never-played arms) see larger rewards than the same arms would later. ``discount`` < 1
  forgets old rewards; the grid order decides who is played first.
* Logged per epoch (``metrics()``, read by the loop after the epoch's steps, before the next boundary):
  the arm, T and α used during that epoch, and the latest reward and probe scores (those of the arm
  before it; absent until the first reward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Interval, MinLen
import torch

from kdlab.config.validate import NonNegative, Positive, UnitInterval
from kdlab.errors import ConfigError, KdlabError, NonFiniteLossError
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Method
from kdlab.registry import register


KEY = "rl_schedule"
REWARDS = ("nll", "acc")


def ucb_select(counts: torch.Tensor, sums: torch.Tensor, exploration: float) -> int:
    """The arm UCB1 plays next: the first never-played arm, else argmax S/N + c·√(2·ln ΣN / N) (first on ties).

    ``counts`` N and ``sums`` S are (A,) float tensors of (discounted) plays and reward sums.
    """
    unplayed = (counts <= 0).nonzero()
    if len(unplayed):
        return int(unplayed[0])
    total = counts.sum()
    index = sums / counts + exploration * torch.sqrt(2.0 * torch.log(total) / counts)
    return int(torch.argmax(index))  # torch.argmax returns the first maximal index


def bandit_update(counts: torch.Tensor, sums: torch.Tensor, arm: int, reward: float,
                  discount: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """D-UCB bookkeeping after arm ``arm`` earned ``reward``: every arm's N and S decay by γ, then arm += (1, r)."""
    if not math.isfinite(reward):
        raise NonFiniteLossError(f"method {KEY}: the reward of arm {arm} is {reward!r} (the probe's score went "
                                 "non-finite: the student diverged); lower train.lr or set train.grad_clip")
    counts, sums = counts * discount, sums * discount
    counts[arm] += 1.0
    sums[arm] += reward
    return counts, sums


@dataclass
class RLScheduleHparams:
    temperatures: Annotated[tuple[Positive, ...], MinLen(1)] = (1.0, 2.0, 4.0, 8.0)  # T values of the arm grid
    alphas: Annotated[tuple[UnitInterval, ...], MinLen(1)] = (0.5, 0.9)  # α values of the arm grid (soft term's weight)
    exploration: NonNegative = 0.1  # c of the UCB bonus, in reward units (nats of probe NLL per epoch)
    discount: Annotated[float, Interval(gt=0, le=1)] = 1.0  # γ in (0, 1]: each epoch multiplies past plays and rewards by γ; 1 = UCB1
    probe_fraction: Annotated[float, Interval(gt=0, le=0.5)] = 0.1  # share of the train split held out as the probe (never trained on)
    reward: Literal["nll", "acc"] = "nll"  # probe NLL decrease or probe accuracy gain over the epoch


    def problems(self) -> list[str]:
        """This method's rules, each message naming it: at config validation once the declared bounds hold
        (an empty grid, a probe above half the train split), and for a method built in Python."""
        def finite(value) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

        def listed(values) -> list:
            return list(values) if isinstance(values, (list, tuple)) else []

        out = []
        temperatures, alphas = listed(self.temperatures), listed(self.alphas)
        if not temperatures or not all(finite(t) and t > 0 for t in temperatures):
            out.append(f"method.temperatures ({KEY}): give at least one temperature, each a finite number > 0; "
                       f"got {self.temperatures!r}")
        if not alphas or not all(finite(a) and 0.0 <= a <= 1.0 for a in alphas):
            out.append(f"method.alphas ({KEY}): give at least one α, each in [0, 1]; got {self.alphas!r}")
        if not (finite(self.exploration) and self.exploration >= 0):
            out.append(f"method.exploration ({KEY}): must be a finite number >= 0, got {self.exploration!r}")
        if not (finite(self.discount) and 0 < self.discount <= 1):
            out.append(f"method.discount ({KEY}): must lie in (0, 1] (1 = UCB1), got {self.discount!r}")
        if not (finite(self.probe_fraction) and 0 < self.probe_fraction <= 0.5):
            out.append(f"method.probe_fraction ({KEY}): must lie in (0, 0.5], got {self.probe_fraction!r}")
        if self.reward not in REWARDS:
            out.append(f"method.reward ({KEY}): {self.reward!r} is not one of {', '.join(REWARDS)}")
        return out


@register("method", KEY)
class RLSchedule(Method):
    """Hinton KD whose (T, α) a discounted-UCB1 bandit picks each epoch from a held-out probe's NLL decrease."""

    Hparams = RLScheduleHparams

    @classmethod
    def check_hparams(cls, hparams) -> None:
        """Built in Python: ``Hparams.problems()``, whose messages name the method (a config met the declared
        bounds, then the same rules, when it was validated)."""
        problems = hparams.problems()
        if problems:
            raise ConfigError(problems[:1])

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if input_shape is None or train_size is None:  # the builder's arguments, not the config's
            raise KdlabError(f"method {KEY}: build it with build_method(..., input_shape=splits.input_shape, "
                             "train_size=len(splits.train[0])) to size its held-out probe")
        if train_size < 2:
            raise KdlabError(f"method {KEY}: the train split has {train_size} sample(s); the probe needs at "
                             "least 2")
        self.__dict__["_student"] = student  # a plain reference, not a submodule: not the method's state
        self.arms = [(float(t), float(a)) for t in hparams.temperatures for a in hparams.alphas]
        size = max(1, round(hparams.probe_fraction * train_size))
        # Controller state, all in buffers (checkpointed with the method). float64 keeps the reward sums exact.
        self.register_buffer("counts", torch.zeros(len(self.arms), dtype=torch.float64))
        self.register_buffer("sums", torch.zeros(len(self.arms), dtype=torch.float64))
        self.register_buffer("arm", torch.zeros((), dtype=torch.long))
        self.register_buffer("probe_inputs", torch.zeros(size, *input_shape))
        self.register_buffer("probe_labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("probe_indices", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("probe_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("has_start", torch.zeros((), dtype=torch.bool))  # a start score is recorded
        self.register_buffer("start_score", torch.zeros((), dtype=torch.float64))  # probe score at the arm's start
        self.register_buffer("last_probe", torch.zeros(2, dtype=torch.float64))  # latest (NLL, accuracy)
        self.register_buffer("last_reward", torch.full((), math.nan, dtype=torch.float64))
        self.register_buffer("boundary_step", torch.full((), -1, dtype=torch.long))  # last boundary processed
        self._sync_from_buffers()

    # -- Python mirrors of the scalar buffers: read every step without a device sync ------------------------

    def _sync_from_buffers(self) -> None:
        self._arm = int(self.arm)
        self._filled = int(self.probe_filled)
        self._boundary = int(self.boundary_step)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_from_buffers()

    # -- the probe --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def probe_scores(self) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the student on the probe, in eval mode (its mode restored)."""
        student = self._student
        was_training = student.training
        student.eval()
        try:
            logits = torch.cat([student(chunk) for chunk in self.probe_inputs.split(1024)]).double()
        finally:
            student.train(was_training)
        nll = torch.nn.functional.cross_entropy(logits, self.probe_labels).item()
        accuracy = (logits.argmax(-1) == self.probe_labels).double().mean().item()
        self.last_probe.copy_(torch.tensor([nll, accuracy], dtype=torch.float64))
        return nll, accuracy

    def _score(self) -> float:
        nll, accuracy = self.probe_scores()
        return nll if self.hparams.reward == "nll" else accuracy

    def _take_probe(self, inputs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Fill the probe from this batch while it is incomplete; the bool mask of the samples to train on."""
        held = torch.isin(indices, self.probe_indices[:self._filled])
        size = len(self.probe_indices)
        if self._filled < size:
            new = (~held).nonzero().squeeze(1)[:size - self._filled]
            end = self._filled + len(new)
            self.probe_inputs[self._filled:end] = inputs[new].to(self.probe_inputs.dtype)
            self.probe_labels[self._filled:end] = labels[new]
            self.probe_indices[self._filled:end] = indices[new]
            held[new] = True
            self._filled = end
            self.probe_filled.fill_(end)
            if end == size:  # complete: the score the first arm's reward starts from
                self.start_score.fill_(self._score())
                self.has_start.fill_(True)
        return ~held

    # -- the controller ---------------------------------------------------------------------------------------

    def _end_epoch(self) -> None:
        """At an epoch boundary: reward the arm just played, then choose the next one."""
        if self._filled < len(self.probe_indices) or not bool(self.has_start):
            return  # no start score yet (a probe larger than an epoch cannot happen: probe_fraction ≤ 0.5)
        score = self._score()
        start = float(self.start_score)
        reward = start - score if self.hparams.reward == "nll" else score - start
        if not math.isfinite(reward):
            raise NonFiniteLossError(f"method {KEY}: the reward of epoch {self.step // (self.steps_per_epoch or 1)} "
                                     f"is {reward!r} (probe {self.hparams.reward} {start!r} → {score!r}: the "
                                     "student diverged); lower train.lr or set train.grad_clip")
        counts, sums = bandit_update(self.counts, self.sums, self._arm, reward, self.hparams.discount)
        self.counts.copy_(counts)
        self.sums.copy_(sums)
        self._arm = ucb_select(self.counts, self.sums, self.hparams.exploration)
        self.arm.fill_(self._arm)
        self.start_score.fill_(score)
        self.last_reward.fill_(reward)

    def make_batch(self, batch):
        if batch.indices is None:
            raise KdlabError(f"method {KEY}: batches must carry their train-split indices (Batch.indices) to hold "
                             "out the probe; train it through kdlab's fit")
        per = self.steps_per_epoch or 1
        if self.step > 0 and self.step % per == 0 and self._boundary != self.step:
            self._end_epoch()
            self._boundary = self.step
            self.boundary_step.fill_(self.step)
        batch.extras["train_mask"] = self._take_probe(batch.inputs, batch.labels, batch.indices)
        return batch

    def current(self) -> tuple[float, float]:
        """(T, α) of the arm in play."""
        return self.arms[self._arm]

    def metrics(self) -> dict[str, float]:
        temperature, alpha = self.current()
        out = {"arm": float(self._arm), "temperature": temperature, "alpha": alpha}
        reward = float(self.last_reward)
        if math.isfinite(reward):
            out["reward"] = reward
        if bool(self.has_start):
            out["probe_nll"], out["probe_acc"] = (float(v) for v in self.last_probe)
        return out

    def loss_terms(self, batch, student_out, teacher_out):
        temperature, alpha = self.current()
        mask = batch.extras.get("train_mask")  # False on the probe's samples: never trained on
        logits = student_out.logits
        return {
            "kd": alpha * kl(logits, teacher_out.logits, temperature=temperature, mask=mask),
            "ce": (1.0 - alpha) * cross_entropy(logits, batch.labels, mask=mask),
        }

