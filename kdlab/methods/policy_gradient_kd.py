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
from torch import Tensor, nn

from kdlab.config.validate import NonNegativeCount, UnitInterval
from kdlab.data.sequence import prompt_lengths
from kdlab.errors import KdlabError, NonFiniteLossError
from kdlab.methods.base import Batch, Method
from kdlab.methods.scratch import sequence_cross_entropy
from kdlab.registry import register



IGNORE = -100
BASELINES = ("loo", "batch_mean", "moving_average", "none")
REDUCTIONS = ("token", "sequence", "sum")

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


class RewardError(NonFiniteLossError):
    """A reward became NaN or infinite (a ``NonFiniteLossError``: the run keeps its last good checkpoint)."""


# --------------------------------------------------------------------------- returns and baselines


def returns_to_go(rewards: Tensor, mask: Tensor, *, exclude_current: bool = False,
                  length_normalize: bool = False) -> Tensor:
    """Per position, the sum (or mean) of the rewards from t (or t + 1) to the end of the row's response.

    ``rewards`` (B, T) float, ``mask`` (B, T) bool (True at response positions; rewards elsewhere are
    ignored). ``exclude_current``: R_{t+1} = Σ_{t' > t} r_t' (0 at the last token). ``length_normalize``:
    divide by the number of summed terms (0 terms give 0). 0 at masked positions.
    """
    masked = torch.where(mask, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    total = masked.flip(1).cumsum(1).flip(1)  # Σ_{t' ≥ t}
    count = mask.to(rewards.dtype).flip(1).cumsum(1).flip(1)
    if exclude_current:
        total = total - masked
        count = count - mask.to(rewards.dtype)
    if length_normalize:
        total = total / count.clamp(min=1)
    return torch.where(mask, total, torch.zeros_like(total))


def _response_offsets(mask: Tensor) -> Tensor:
    """(B, T) index of each response position within its row's response (0, 1, ...); 0 where masked."""
    return torch.where(mask, mask.long().cumsum(1) - 1, torch.zeros_like(mask, dtype=torch.long))


def baselines(returns: Tensor, mask: Tensor, kind: str, *, moving_average: float = 0.0) -> Tensor:
    """The baseline b (B, T) for each response position (0 at masked positions); see the module docstring."""
    if kind == "none":
        return torch.zeros_like(returns)
    if kind == "moving_average":
        return torch.where(mask, torch.full_like(returns, float(moving_average)), torch.zeros_like(returns))
    offsets = _response_offsets(mask)
    width = int(offsets.max()) + 1 if returns.numel() else 1
    values = torch.where(mask, returns, torch.zeros_like(returns))
    sums = torch.zeros(width, dtype=returns.dtype, device=returns.device).scatter_add(0, offsets[mask], values[mask])
    counts = torch.zeros(width, dtype=returns.dtype, device=returns.device).scatter_add(
        0, offsets[mask], torch.ones_like(values[mask]))
    position_sums, position_counts = sums[offsets], counts[offsets]
    if kind == "batch_mean":
        base = position_sums / position_counts.clamp(min=1)
    elif kind == "loo":
        others = position_counts - 1
        base = torch.where(others > 0, (position_sums - values) / others.clamp(min=1), torch.zeros_like(values))
    else:
        raise KdlabError(f"method.baseline: {kind!r} is not one of {', '.join(BASELINES)}")
    return torch.where(mask, base, torch.zeros_like(base))


def _reduce(values: Tensor, mask: Tensor, reduction: str) -> Tensor:
    values = torch.where(mask, values, torch.zeros_like(values))
    if reduction == "token":
        return values.sum() / mask.sum().clamp(min=1)
    counts = mask.sum(dim=1)
    has_response = counts > 0
    per_sequence = values.sum(dim=1)
    if reduction == "sequence":
        per_sequence = per_sequence / counts.clamp(min=1).to(values.dtype)
    return (per_sequence * has_response).sum() / has_response.sum().clamp(min=1)


# --------------------------------------------------------------------------- the estimator


@dataclass
class PolicyGradientTerms:
    """What ``policy_gradient_terms`` computes; all (B, L − 1) tensors are aligned with ``logits[:, :-1]``."""

    pg: Tensor  # scalar, the policy-gradient surrogate (gradient: −Σ A·w·∇log q, reduced)
    single_step: Tensor  # scalar, α·(reduced token-level reverse KL) when single_step, else 0
    mask: Tensor  # (B, T) bool, response positions (the logits there predict a response token)
    rewards: Tensor  # (B, T) r_t = log p_T(y_t) − log p_S(y_t), 0 outside the response (detached)
    returns: Tensor  # (B, T) G_t = α·R_t + (1 − α)·r_task (detached)
    baselines: Tensor  # (B, T) b_t
    advantages: Tensor  # (B, T) A_t (after whitening, detached)
    weights: Tensor  # (B, T) importance weights q/p̃ (1 on-policy)
    token_reverse_kl: Tensor  # (B, T) Σ_v q (log q − log p) at each position (detached)
    task_reward: Tensor | None  # (B,) or None


def _check_finite(name: str, values: Tensor, mask: Tensor, what: str, hint: str) -> None:
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        kind = "NaN" if bool(torch.isnan(values[bad]).any()) else "infinite"
        raise RewardError(
            f"policy_gradient_kd: reward became NaN or infinite ({kind}) in term {name!r}: {what} at "
            f"{int(bad.sum())} of {int(mask.sum())} positions, first at row {where[0]}"
            + (f", position {where[1]}" if len(where) > 1 else "")
            + f"; {hint}; the run stops before this update, so the last good checkpoint is kept")


def policy_gradient_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
                          task_reward: Tensor | None = None, task_reward_weight: float = 0.0,
                          single_step: bool = True, length_normalize: bool = True, baseline: str = "loo",
                          moving_average: float = 0.0, whiten: bool = False, reduction: str = "token",
                          mix_alpha: float = 0.0, importance_clip: float | None = 0.2) -> PolicyGradientTerms:
    """The MiniLLM policy-gradient terms for sampled sequences in the canonical layout.

    ``student_logits``/``teacher_logits`` (B, L, V) (unshifted: position t predicts token t + 1),
    ``labels`` (B, L) with the sampled response tokens and -100 at prompt and padding. ``task_reward``
    (B,) in [0, 1] per sequence (needed when ``task_reward_weight`` > 0). ``mix_alpha`` > 0: the
    sequences were sampled from α_mix·p + (1 − α_mix)·q; importance weights q/p̃ per token.
    """
    if reduction not in REDUCTIONS:
        raise KdlabError(f"method.reduction: {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != labels.shape:
        raise KdlabError(f"policy_gradient_kd: student logits {tuple(student_logits.shape)}, teacher logits "
                         f"{tuple(teacher_logits.shape)} and labels {tuple(labels.shape)} must be (B, L, V), "
                         "(B, L, V) and (B, L) with one vocabulary")
    kd_weight = 1.0 - float(task_reward_weight)  # α of GKD Eq. 5
    dtype = torch.promote_types(torch.float32, student_logits.dtype)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    index = targets.clamp_min(0).unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)
    # Masked positions are replaced before any arithmetic: NaN/inf logits there reach nothing.
    log_q_all = torch.log_softmax(torch.where(mask[..., None], student_logits[:, :-1].to(dtype), zero), dim=-1)
    log_p_all = torch.log_softmax(torch.where(mask[..., None], teacher_logits[:, :-1].detach().to(dtype), zero),
                                  dim=-1)
    log_q = log_q_all.gather(-1, index).squeeze(-1)
    log_p = log_p_all.gather(-1, index).squeeze(-1)
    rewards = torch.where(mask, log_p - log_q.detach(), zero)
    _check_finite("pg", rewards, mask, "the per-token reward r_t = log p_T(y_t) − log p_S(y_t)",
                  "the teacher's or the student's logits are not finite: lower train.lr, set train.grad_clip, "
                  "or check the teacher checkpoint")

    returns = kd_weight * returns_to_go(rewards, mask, exclude_current=single_step,
                                        length_normalize=length_normalize)
    if task_reward is not None:
        task_reward = task_reward.to(device=rewards.device, dtype=dtype)
        rows = torch.ones_like(task_reward, dtype=torch.bool)
        _check_finite("task_reward", task_reward, rows, "the sequence-level task reward",
                      "the task checker returned a non-finite value")
        returns = returns + (1.0 - kd_weight) * task_reward[:, None]
    elif kd_weight != 1.0:
        raise KdlabError("policy_gradient_kd: task_reward_weight > 0 needs the task reward of every sequence")
    returns = torch.where(mask, returns, zero)
    base = baselines(returns, mask, baseline, moving_average=moving_average)
    advantages = torch.where(mask, returns - base, zero)
    if whiten and int(mask.sum()) > 1:
        advantages = advantages / (advantages[mask].std() + 1e-8)

    ratio = torch.exp(log_q - log_q.detach())  # 1, with gradient ∇log q
    if mix_alpha > 0.0:
        log_mixed = torch.logaddexp(math.log(mix_alpha) + log_p, math.log1p(-mix_alpha) + log_q.detach()) \
            if mix_alpha < 1.0 else log_p
        weights = torch.where(mask, torch.exp(log_q.detach() - log_mixed), zero)
        weighted = ratio * weights
        per_token = -advantages * weighted
        if importance_clip is not None:
            clipped = weighted.clamp(1.0 - importance_clip, 1.0 + importance_clip)
            per_token = torch.maximum(per_token, -advantages * clipped)
    else:
        weights = torch.where(mask, torch.ones_like(rewards), zero)
        per_token = -advantages * ratio
    pg = _reduce(per_token, mask, reduction)

    token_kl = torch.where(mask, (log_q_all.exp() * (log_q_all - log_p_all)).sum(dim=-1), zero)
    if single_step:  # an infinite KL (a token the teacher gives probability 0) would make the update NaN
        _check_finite("single_step", token_kl.detach(), mask,
                      "the expected immediate reward −Σ_v p_S(v)(log p_S(v) − log p_T(v))",
                      "the teacher gives probability 0 (or NaN) to tokens the student can emit")
    single = kd_weight * _reduce(token_kl, mask, reduction) if single_step else zero.clone()
    return PolicyGradientTerms(pg=pg, single_step=single, mask=mask, rewards=rewards, returns=returns.detach(),
                               baselines=base.detach(), advantages=advantages.detach(), weights=weights.detach(),
                               token_reverse_kl=token_kl.detach(), task_reward=task_reward)


# --------------------------------------------------------------------------- teacher-mixed sampling


def _forward(model: nn.Module, tokens: Tensor, mask: Tensor, positions: Tensor, cache, use_cache: bool):
    if use_cache:
        return model(tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return model(tokens, attention_mask=mask, position_ids=positions), None


@torch.no_grad()
def teacher_mixed_generate(student: nn.Module, teacher: nn.Module, prompts: Tensor, prompt_lengths: Tensor, *,
                           alpha: float, max_new_tokens: int, eos_id: int, pad_id: int,
                           generator: torch.Generator | None = None, use_cache: bool = True):
    """Sample each token from p̃ = α·p_T + (1 − α)·p_S (MiniLLM's teacher-mixed sampling).

    Both models run side by side with their own KV caches (``use_cache=False`` recomputes full
    forwards, the reference path); layout, stopping and padding as ``kdlab.seq.sampling.generate``
    (α = 0 draws exactly what ``generate`` draws from the student with the same generator; α = 1 what it
    draws from the teacher). Runs in eval mode under no_grad and restores every submodule's mode.
    """
    from kdlab.seq.sampling import Generation, _check_arguments, left_pad

    if not 0.0 <= alpha <= 1.0:
        raise KdlabError(f"method.teacher_mix_alpha: {alpha!r} must be in [0, 1]")
    device = next(iter(student.parameters()), torch.zeros(())).device
    prompts = torch.as_tensor(prompts, dtype=torch.long).to(device)
    prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).to(device)
    for model in (student, teacher):
        _check_arguments(model, prompts, prompt_lengths, max_new_tokens=max_new_tokens, temperature=1.0,
                         top_k=None, top_p=None)
    modes = {module: module.training for net in (student, teacher) for module in net.modules()}
    student.eval()
    teacher.eval()
    try:
        sequence, mask = left_pad(prompts, prompt_lengths, pad_id)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        s_logits, s_cache = _forward(student, sequence, mask, positions, None, use_cache)
        t_logits, t_cache = _forward(teacher, sequence, mask, positions, None, use_cache)
        done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=device)
        generated = []
        for step in range(max_new_tokens):
            probs = (1.0 - alpha) * s_logits[:, -1].float().softmax(dim=-1) \
                + alpha * t_logits[:, -1].float().softmax(dim=-1)
            if not bool(torch.isfinite(probs).all()):
                raise RewardError("policy_gradient_kd: the teacher-mixed sampling distribution became NaN or "
                                  "infinite, so no reward can be computed for term 'pg': the teacher's or the "
                                  "student's logits are not finite; the last good checkpoint is kept")
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            generated.append(token)
            done = done | (token == eos_id)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            if use_cache:
                s_logits, s_cache = _forward(student, token[:, None], mask, positions[:, -1:], s_cache, True)
                t_logits, t_cache = _forward(teacher, token[:, None], mask, positions[:, -1:], t_cache, True)
            else:
                sequence = torch.cat([sequence, token[:, None]], dim=1)
                s_logits, _ = _forward(student, sequence, mask, positions, None, False)
                t_logits, _ = _forward(teacher, sequence, mask, positions, None, False)
        responses = torch.stack(generated, dim=1)
    finally:
        for module, training in modes.items():
            module.training = training
    return Generation.from_responses(prompts, prompt_lengths, responses, eos_id=eos_id, pad_id=pad_id)


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

    @staticmethod
    def check_config(cfg, errors: list[str]) -> None:
        """Run at config validation: SFT warm-up steps must leave distillation steps (issue 17 item 15)."""
        sft, steps = cfg.method.options.get("sft_steps", 0), cfg.train.steps
        if isinstance(sft, int) and isinstance(steps, int) and sft > 0 and sft >= steps:
            errors.append(f"method.sft_steps: {sft} warm-up steps leave none of train.steps ({steps}) for "
                          "distillation; lower method.sft_steps or raise train.steps")


def _check(h: PolicyGradientKDHparams) -> None:
    if h.baseline not in BASELINES:
        raise KdlabError(f"method.baseline: {h.baseline!r} is not one of {', '.join(BASELINES)}")
    if h.reduction not in REDUCTIONS:
        raise KdlabError(f"method.reduction: {h.reduction!r} is not one of {', '.join(REDUCTIONS)}")


_METRICS = ("reverse_kl", "token_reverse_kl", "task_reward", "return", "response_length", "importance_weight")


@register("method", "policy_gradient_kd")
class PolicyGradientKD(Method):
    """MiniLLM-style on-policy distillation: policy gradient on the reward log p_T − log p_S (+ task reward)."""

    Hparams = PolicyGradientKDHparams
    data_kinds = ("sequence",)

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        _check(hparams)
        self._networks = {"student": student, "teacher": teacher}  # not submodules (see gkd)
        self.schedule_seed = torch.initial_seed()
        self.generation_calls = {"student": 0, "mixed": 0}
        # The moving-average baseline is state: a buffer, so checkpoints carry it and resume exactly.
        self.register_buffer("baseline_value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("baseline_started", torch.zeros((), dtype=torch.bool))
        self.last_terms: PolicyGradientTerms | None = None
        self._sums = dict.fromkeys(_METRICS, 0.0)
        self._counts = dict.fromkeys(_METRICS, 0)

    # ----------------------------------------------------------------- sampling

    def _generator(self, device: torch.device, stream: int) -> torch.Generator:
        seed = (self.schedule_seed * 1_000_003 + self.step * 4 + stream) % (2 ** 63)
        return torch.Generator(device=device).manual_seed(seed)

    def _prompts(self, batch: Batch):
        from kdlab.seq.sampling import prompts_from_canonical

        return prompts_from_canonical(batch.inputs, batch.labels, pad_id=self.sequence.pad_id)

    def teacher_needed(self) -> bool:
        return self.step >= self.hparams.sft_steps

    def make_batch(self, batch: Batch) -> Batch:
        if self.step < self.hparams.sft_steps:
            return Batch(batch.inputs, batch.labels, batch.indices, extras={"source": "data"})
        from kdlab.seq.evaluate import max_new_tokens
        from kdlab.seq.sampling import generate

        prompts, lengths = self._prompts(batch)
        options = dict(max_new_tokens=max_new_tokens(self.sequence, prompts.shape[1]), eos_id=self.sequence.eos_id,
                       pad_id=self.sequence.pad_id)
        alpha = self.hparams.teacher_mix_alpha
        if alpha > 0.0:
            self.generation_calls["mixed"] += 1
            out = teacher_mixed_generate(self._networks["student"], self._networks["teacher"], prompts, lengths,
                                         alpha=alpha, generator=self._generator(prompts.device, 2), **options)
            source = "mixed"
        else:
            self.generation_calls["student"] += 1
            out = generate(self._networks["student"], prompts, lengths, temperature=1.0,
                           generator=self._generator(prompts.device, 1), **options)
            source = "student"
        return Batch(inputs=out.tokens, labels=out.labels, indices=batch.indices, extras={"source": source})

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
        if self.step < h.sft_steps:
            return {"sft": sequence_cross_entropy(student_out.logits, batch.labels), "pg": zero,
                    "single_step": zero}
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
