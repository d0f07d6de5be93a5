"""On-policy distillation of sequence models as reinforcement learning (MiniLLM-style policy gradient).

Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language
Models", ICLR 2024 (arXiv 2306.08543); official code ``microsoft/LMOps``,
``minillm/minillm/{sampler,losses,reward,utils}.py``. Combined with the RL
objective of GKD (Agarwal et al., ICLR 2024, Eq. 5).

The student q = p_S^θ is a policy; the teacher p = p_T scores its samples.
The distillation target is the sequence-level reverse KL

    KL(q ‖ p)(x) = E_{y~q(·|x)} [ Σ_t log q(y_t | y_<t, x) − log p(y_t | y_<t, x) ],

i.e. the per-token reward r_t = log p(y_t | y_<t, x) − log q(y_t | y_<t, x)
(detached), whose sum over a sampled response is minus a one-sample estimate of
the reverse KL. Per step (``make_batch``) the student samples one response to
each prompt of the batch (temperature 1, no top-k/top-p, no gradient through the
sampling, per-step seeded generator as in ``gkd``); ``loss_terms`` then builds,
on the canonical layout (logits at t predict token t + 1; prompt and padding
positions carry no reward and no gradient):

* return-to-go R_t = Σ_{t' ≥ t} r_t' (γ = 1), or with ``single_step`` R_{t+1} =
  Σ_{t' > t} r_t' (MiniLLM's "long" part; 0 at the last token). With
  ``length_normalize`` the sum is divided by its number of terms (the mean of
  the remaining rewards), as MiniLLM's R^Norm (official code: ``lens`` = tokens
  left, ``rw / lens``) — a heuristic against the bias towards short responses
  (it changes the objective; the plain sum is the unbiased one).
* the combined objective of GKD Eq. 5, maximise (1 − α)·E[r_task] −
  α·E[KL(q ‖ p)], α = 1 − ``task_reward_weight``: the return is G_t = α·R_t +
  (1 − α)·r_task with r_task ∈ {0, 1} the exact match of the sampled response
  (``sequence.is_correct(prompt, decode(response))``), a terminal reward that
  is part of the return of every response token (never length-normalised).
* advantage A_t = G_t − b_t, detached. Baselines (``baseline``):
  ``loo`` (default) — the leave-one-out mean of the *other* sequences' returns
  at the same response position (RLOO; independent of the row's own sample, so
  unbiased; 0 where no other row reaches that position); ``batch_mean`` — the
  mean over all rows at that position, own row included (the advantages sum to
  exactly 0 per position; scales the expected gradient by (1 − 1/n));
  ``moving_average`` — a scalar exponential moving average (``baseline_decay``)
  of the mean return per token over previous steps (unbiased; checkpointed with
  the method); ``none``. ``whiten`` further divides the advantages by their
  standard deviation over the batch's response tokens (MiniLLM's code whitens;
  a rescaling only).
* the policy-gradient term, per response token, −A_t·w_t·∇log q(y_t | y_<t, x),
  implemented as the surrogate −A_t·w_t·ρ_t with ρ_t = exp(log q − stopgrad(log
  q)) (= 1, gradient ∇log q); w_t = 1 on-policy.
* ``single_step`` adds MiniLLM's single-step decomposition term, the token-level
  reverse KL Σ_v q(v | y_<t, x)(log q(v | ·) − log p(v | ·)) at every response
  position, differentiated directly (the exact expectation of −r_t over the next
  token): α·KL_t. Then ∇[Σ_t KL_t] + the long part with R_{t+1} is an unbiased
  estimator of ∇ KL(q ‖ p) (without length normalisation), with less variance
  than the plain return. The term equals
  ``sequence_divergence(..., divergence="reverse_kl")`` on the same batch.

Reductions (``reduction``, both terms alike): ``token`` — mean over all response
tokens of the batch (MiniLLM's code); ``sequence`` — per-sequence mean, then the
mean over sequences (GKD's Eq. 2); ``sum`` — per-sequence sum, then the mean
over sequences (the exact Monte-Carlo gradient of the sequence-level objective).

Teacher-mixed sampling (``teacher_mix_alpha`` = α_mix > 0, MiniLLM uses 0.2):
responses are drawn token by token from p̃ = α_mix·p + (1 − α_mix)·q (both
models' forwards with their KV caches, ``teacher_mixed_generate``), and each
token's terms are importance-weighted by the per-token ratio w_t = q(y_t)/p̃(y_t)
(MiniLLM's approximation of the product of ratios over the prefix; recomputed
in ``loss_terms`` from the training forwards, detached). As in MiniLLM's code
the weighted ratio is clipped PPO-style: the token's term is max(−A·w·ρ,
−A·clip(w·ρ, 1 − ε, 1 + ε)), ε = ``importance_clip`` (null = no clipping); the
single-step term is not weighted (as in the official code).

The logged terms are ``sft`` (SFT warm-up, ``sft_steps``, as in ``gkd``),
``pg`` (its value, −mean(A·w), is ≈ 0 by construction and not a progress
measure) and ``single_step`` (the token-level reverse KL when on; 0 otherwise).
Progress is in ``metrics()`` (per epoch, ``method/<name>``): ``reverse_kl`` (the
sampled Σ_t −r_t per sequence: the on-policy estimate of the sequence reverse
KL), ``token_reverse_kl``, ``task_reward`` (exact match of the sampled
responses), ``return``, ``response_length``, ``importance_weight``.

Where the pieces live: the estimator (returns, baselines, importance weights, the
two terms) is ``kdlab.losses.policy_gradient``; teacher-mixed sampling is
``kdlab.seq.sampling.teacher_mixed_generate``; prompts, seeded sampling and the
SFT warm-up are the generation base shared with GKD
(``kdlab.methods.generation.GenerationMethod``). This file is the method: its
hyperparameters, the batch (``make_batch``), the task reward and the terms.

A non-finite reward (NaN/inf teacher or student log-probabilities) raises
``RewardError`` — a ``NonFiniteLossError`` (a ``KdlabError``) — before any
update, so the run stops with its last good checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Optional

from annotated_types import Interval
import torch
from torch import Tensor

from kdlab.config.validate import NonNegativeCount, UnitInterval
from kdlab.data.sequence import prompt_lengths
from kdlab.errors import KdlabError
from kdlab.losses.policy_gradient import (  # the estimator (pure functions); re-exported here
    BASELINES,
    IGNORE,
    REDUCTIONS,
    PolicyGradientTerms,
    RewardError,
    baselines,
    policy_gradient_terms,
    returns_to_go,
)
from kdlab.methods.base import Batch
from kdlab.methods.generation import GenerationMethod, check_sft_steps
from kdlab.registry import register
from kdlab.seq.sampling import teacher_mixed_generate  # the sampler; re-exported here

__all__ = [
    "BASELINES",
    "REDUCTIONS",
    "PolicyGradientKD",
    "PolicyGradientKDHparams",
    "PolicyGradientTerms",
    "RewardError",
    "baselines",
    "policy_gradient_terms",
    "returns_to_go",
    "teacher_mixed_generate",
]


# --------------------------------------------------------------------------- the method


@dataclass
class PolicyGradientKDHparams:
    single_step: bool = True  # add MiniLLM's single-step term; the policy gradient then uses R_{t+1}
    length_normalize: bool = True  # MiniLLM's R^Norm: the mean of the remaining rewards, not their sum
    baseline: str = "loo"  # loo | batch_mean | moving_average | none
    baseline_decay: Annotated[float, Interval(ge=0, lt=1)] = 0.9  # moving_average: b ← decay·b + (1 − decay)·(this step's mean return)
    whiten: bool = False  # divide the advantages by their std over the batch (MiniLLM's code does)
    teacher_mix_alpha: Annotated[float, Interval(ge=0, lt=1)] = 0.0  # α_mix of teacher-mixed sampling (MiniLLM: 0.2); 0 = pure on-policy
    importance_clip: Optional[Annotated[float, Interval(gt=0, lt=1)]] = 0.2  # ε of the PPO-style clip of w·ρ (teacher-mixed only); null = none
    task_reward_weight: UnitInterval = 0.0  # 1 − α of GKD Eq. 5: weight of the exact-match task reward
    reduction: str = "token"  # token | sequence | sum
    sft_steps: NonNegativeCount = 0  # steps of SFT on the reference responses before distilling (as gkd)

    check_config = staticmethod(check_sft_steps)  # run at config validation


def _check(h: PolicyGradientKDHparams) -> None:
    if h.baseline not in BASELINES:
        raise KdlabError(f"method.baseline: {h.baseline!r} is not one of {', '.join(BASELINES)}")
    if h.reduction not in REDUCTIONS:
        raise KdlabError(f"method.reduction: {h.reduction!r} is not one of {', '.join(REDUCTIONS)}")


_METRICS = ("reverse_kl", "token_reverse_kl", "task_reward", "return", "response_length", "importance_weight")


@register("method", "policy_gradient_kd")
class PolicyGradientKD(GenerationMethod):
    """MiniLLM-style on-policy distillation: policy gradient on the reward log p_T − log p_S (+ task reward)."""

    Hparams = PolicyGradientKDHparams
    sft_follows_reduction = False  # the warm-up's cross-entropy is per token whatever ``reduction`` says

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        _check(hparams)
        self.generation_calls = {"student": 0, "mixed": 0}
        # The moving-average baseline is state: a buffer, so checkpoints carry it and resume exactly.
        self.register_buffer("baseline_value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("baseline_started", torch.zeros((), dtype=torch.bool))
        self.last_terms: PolicyGradientTerms | None = None
        self._sums = dict.fromkeys(_METRICS, 0.0)
        self._counts = dict.fromkeys(_METRICS, 0)

    def make_batch(self, batch: Batch) -> Batch:
        """One response per prompt from q (temperature 1), or from α_mix·p + (1 − α_mix)·q."""
        if self.in_sft():
            return self.data_batch(batch)
        prompts, lengths = self.prompts(batch)
        alpha = self.hparams.teacher_mix_alpha
        if alpha == 0.0:
            out = self.generate("student", prompts, lengths, temperature=1.0,
                                generator=self.step_generator(prompts.device, 1))
            return self.generated_batch(batch, out, "student")
        self.generation_calls["mixed"] += 1
        out = teacher_mixed_generate(self._networks["student"], self._networks["teacher"], prompts, lengths,
                                     alpha=alpha, generator=self.step_generator(prompts.device, 2),
                                     **self.generation_options(prompts))
        return self.generated_batch(batch, out, "mixed")

    # ----------------------------------------------------------------- rewards and loss

    def task_rewards(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """(B,) 1.0 where the row's response is correct by ``sequence.is_correct(prompt, response)``, else 0."""
        info = self.sequence
        if info is None:
            raise KdlabError("policy_gradient_kd: task_reward_weight needs a sequence task (its is_correct)")
        lengths = prompt_lengths(labels).tolist()
        values = []
        for row, label_row, n in zip(tokens.tolist(), labels.tolist(), lengths):
            response = [token for token, label in zip(row, label_row) if label != IGNORE]
            values.append(1.0 if info.is_correct(info.decode(row[:n]), info.decode(response)) else 0.0)
        return torch.tensor(values, dtype=torch.float32, device=tokens.device)

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        zero = student_out.logits.new_zeros((), dtype=torch.float32)
        if self.in_sft():
            return {"sft": self.sft_loss(student_out.logits, batch.labels), "pg": zero, "single_step": zero}
        mixed = batch.extras.get("source") == "mixed"
        task_reward = None
        if h.task_reward_weight > 0.0 or self.sequence is not None:
            task_reward = self.task_rewards(batch.inputs, batch.labels)
        terms = policy_gradient_terms(
            student_out.logits, teacher_out.logits, batch.labels, task_reward=task_reward,
            task_reward_weight=h.task_reward_weight, single_step=h.single_step,
            length_normalize=h.length_normalize, baseline=h.baseline, moving_average=float(self.baseline_value),
            whiten=h.whiten, reduction=h.reduction, mix_alpha=h.teacher_mix_alpha if mixed else 0.0,
            importance_clip=h.importance_clip)
        mask = terms.mask
        mean_return = terms.returns[mask].mean().double() if bool(mask.any()) else None
        if h.baseline == "moving_average" and mean_return is not None:
            # Updated after use: this step's baseline came from earlier steps only (unbiased).
            with torch.no_grad():
                new = torch.where(self.baseline_started,
                                  h.baseline_decay * self.baseline_value + (1 - h.baseline_decay) * mean_return,
                                  mean_return)
                self.baseline_value.copy_(new)
                self.baseline_started.fill_(True)
        self._record(terms, mean_return)
        self.last_terms = dataclasses.replace(terms, pg=terms.pg.detach(), single_step=terms.single_step.detach())
        return {"sft": zero, "pg": terms.pg, "single_step": terms.single_step}

    # ----------------------------------------------------------------- logging

    def _record(self, terms: PolicyGradientTerms, mean_return) -> None:
        mask = terms.mask
        rows = mask.any(dim=1)
        values = {
            "reverse_kl": (-terms.rewards.sum(dim=1))[rows].mean(),
            "token_reverse_kl": terms.token_reverse_kl[mask].mean(),
            "response_length": mask.sum(dim=1)[rows].float().mean(),
            "importance_weight": terms.weights[mask].mean(),
        }
        if terms.task_reward is not None:
            values["task_reward"] = terms.task_reward.mean()
        if mean_return is not None:
            values["return"] = mean_return
        for name, value in values.items():
            value = float(value)
            if math.isfinite(value):
                self._sums[name] += value
                self._counts[name] += 1

    def metrics(self) -> dict[str, float]:
        """Means since the last call (once per epoch): sampled reverse KL, task reward, ... (empty in SFT)."""
        out = {name: self._sums[name] / self._counts[name] for name in _METRICS if self._counts[name]}
        self._sums = dict.fromkeys(_METRICS, 0.0)
        self._counts = dict.fromkeys(_METRICS, 0)
        return out
