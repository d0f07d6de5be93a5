"""Batched auto-regressive generation with a KV cache, returning kdlab's canonical training layout.

The canonical layout (also built by ``kdlab.seq.tasks.encode_examples``):
``tokens`` (B, L) int64 RIGHT-padded — prompt, response (EOS included when
emitted), padding — and ``labels`` (B, L) equal to ``tokens`` at response
positions and -100 at prompt and padding positions. Labels are *not* shifted:
the logits at position t predict ``labels[t + 1]``.

Decoding left-pads the prompts internally so every row's next token is at the
same column; ``attention_mask`` hides the padding and ``position_ids`` (mask
cumsum - 1) give each real token the position it has in the right-padded layout,
so a row decodes exactly as it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from kdlab.engine.fsdp import all_done
from kdlab.errors import KdlabError, NonFiniteLossError

IGNORE = -100  # label of prompt and padding positions


@dataclass
class Generation:
    """Generated sequences in the canonical layout (all ``(B, ...)`` int64 on the model's device)."""

    tokens: Tensor  # (B, L) prompt, response (incl. EOS if emitted), pad
    labels: Tensor  # (B, L) tokens at response positions, -100 elsewhere
    prompt_lengths: Tensor  # (B,)
    response_lengths: Tensor  # (B,) generated tokens kept, EOS included

    @classmethod
    def from_responses(cls, prompts: Tensor, prompt_lengths: Tensor, responses: Tensor, *, eos_id: int,
                       pad_id: int) -> "Generation":
        """Pack right-padded prompts and raw generated tokens (B, N) into the canonical layout,
        each response cut after its first EOS (kept)."""
        response_lengths = _response_lengths(responses, eos_id)
        tokens, labels = pack_canonical(prompts, prompt_lengths, responses, response_lengths, pad_id=pad_id)
        return cls(tokens=tokens, labels=labels, prompt_lengths=prompt_lengths, response_lengths=response_lengths)


# --------------------------------------------------------------------------- token choice


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """``logits`` (..., V) with all but the ``k`` largest per row set to -inf (ties at the k-th kept)."""
    k = min(int(k), logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability sums to at least ``p``; the top token is always kept. Others become -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    remove_sorted = mass_before >= p  # the set already reached p without this token
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(logits: Tensor, *, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator]) -> Tensor:
    """One token per row from last-position logits ``(B, V)``: greedy at temperature 0, else sampled
    from softmax(logits / temperature) after the top-k then top-p filters."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- layouts


def left_pad(prompts: Tensor, prompt_lengths: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``(B, P)`` prompts -> left-padded ``(B, W)`` ones (W = longest prompt) and their mask."""
    width = int(prompt_lengths.max())
    columns = torch.arange(width, device=prompts.device)[None, :]  # (1, W)
    source = columns - (width - prompt_lengths[:, None])  # (B, W) index into the right-padded row
    mask = source >= 0
    left = prompts.gather(1, source.clamp(min=0))
    return torch.where(mask, left, torch.full_like(left, pad_id)), mask.long()


def pack_canonical(prompts: Tensor, prompt_lengths: Tensor, responses: Tensor, response_lengths: Tensor, *,
                   pad_id: int) -> tuple[Tensor, Tensor]:
    """``(tokens, labels)`` in the canonical layout from right-padded ``prompts`` (B, P) and
    ``responses`` (B, N) with their lengths; L = max over rows of prompt + response length."""
    batch = prompts.shape[0]
    if responses.shape[1] == 0:  # nothing generated: one pad column keeps the gathers valid
        responses = torch.full((batch, 1), pad_id, dtype=prompts.dtype, device=prompts.device)
    ends = prompt_lengths + response_lengths
    length = int(ends.max())
    columns = torch.arange(length, device=prompts.device)[None, :].expand(batch, length)  # (B, L)
    in_prompt = columns < prompt_lengths[:, None]
    in_response = ~in_prompt & (columns < ends[:, None])
    from_prompt = prompts.gather(1, columns.clamp(max=prompts.shape[1] - 1))
    from_response = responses.gather(1, (columns - prompt_lengths[:, None]).clamp(0, responses.shape[1] - 1))
    tokens = torch.where(in_prompt, from_prompt,
                         torch.where(in_response, from_response, torch.full_like(from_prompt, pad_id)))
    labels = torch.where(in_response, tokens, torch.full_like(tokens, IGNORE))
    return tokens, labels


def prompts_from_canonical(tokens: Tensor, labels: Tensor, *, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded prompts ``(B, W)`` and their lengths ``(B,)`` of a canonical batch (the
    prompt ends at the first response label), e.g. to sample on-policy responses to them."""
    is_response = labels != IGNORE
    if not bool(is_response.any(dim=1).all()):
        raise ValueError("a row of labels has no response position; every sequence needs a response")
    lengths = is_response.int().argmax(dim=1)  # first response position
    width = max(int(lengths.max()), 1)
    columns = torch.arange(width, device=tokens.device)[None, :]
    prompts = torch.where(columns < lengths[:, None], tokens[:, :width], torch.full_like(tokens[:, :width], pad_id))
    return prompts, lengths


# --------------------------------------------------------------------------- generate


def _check_arguments(model: nn.Module, prompts: Tensor, prompt_lengths: Tensor, *, max_new_tokens: int,
                     temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if prompts.dim() != 2 or prompt_lengths.shape != (prompts.shape[0],):
        raise ValueError(f"prompts must be (B, P) and prompt_lengths (B,), got {tuple(prompts.shape)} "
                         f"and {tuple(prompt_lengths.shape)}")
    if prompts.shape[0] and not (1 <= int(prompt_lengths.min()) and int(prompt_lengths.max()) <= prompts.shape[1]):
        raise ValueError(f"prompt_lengths must be in [1, {prompts.shape[1]}]; every prompt needs a token")
    if max_new_tokens < 1:
        raise KdlabError(f"max_new_tokens={max_new_tokens!r} must be >= 1")
    if temperature < 0:
        raise KdlabError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise KdlabError(f"top_k={top_k!r} must be >= 1 (or null for no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise KdlabError(f"top_p={top_p!r} must be in (0, 1] (or null for no nucleus filter)")
    context = getattr(model, "context_length", None)
    longest = int(prompt_lengths.max()) if prompts.shape[0] else 0
    if context is not None and longest + max_new_tokens > context:
        raise KdlabError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context_length {context}; lower max_new_tokens to {context - longest} or raise the "
                         "model's context_length")


def generate(model: nn.Module, prompts: Tensor, prompt_lengths: Tensor, *, max_new_tokens: int, eos_id: int,
             pad_id: int, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             use_cache: bool = True, generator: Optional[torch.Generator] = None) -> Generation:
    """Sample up to ``max_new_tokens`` per row after right-padded ``prompts`` (B, P) int64.

    A row stops after emitting ``eos_id`` (its later tokens are ``pad_id``); the
    loop stops when every row has. ``temperature=0`` is greedy; else tokens are
    drawn by ``torch.multinomial`` with ``generator`` (on the model's device).
    ``use_cache=False`` recomputes the full forward each step (reference path).
    Runs in eval mode under ``no_grad`` and restores every submodule's mode.
    A model with a ``kdlab_generate`` method (the Hugging Face adapter) gets the
    call instead, with the same arguments.
    """
    options = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, temperature=temperature,
                   top_k=top_k, top_p=top_p, use_cache=use_cache, generator=generator)
    if hasattr(model, "kdlab_generate"):
        return model.kdlab_generate(prompts, prompt_lengths, **options)
    device = next(iter(model.parameters()), torch.zeros(())).device
    prompts = torch.as_tensor(prompts, dtype=torch.long).to(device)
    prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).to(device)
    _check_arguments(model, prompts, prompt_lengths, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            responses = _decode(model, prompts, prompt_lengths, **options)
    finally:
        for module, training in modes.items():
            module.training = training
    return Generation.from_responses(prompts, prompt_lengths, responses, eos_id=eos_id, pad_id=pad_id)


def _decode(model: nn.Module, prompts: Tensor, prompt_lengths: Tensor, *, max_new_tokens: int, eos_id: int,
            pad_id: int, temperature: float, top_k: Optional[int], top_p: Optional[float], use_cache: bool,
            generator: Optional[torch.Generator]) -> Tensor:
    """Generated tokens ``(B, N)``, N <= max_new_tokens; pad after each row's EOS."""
    sequence, mask = left_pad(prompts, prompt_lengths, pad_id)  # (B, W) each
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    if use_cache:
        logits, cache = model(sequence, attention_mask=mask, position_ids=positions, use_cache=True)
    else:
        logits = model(sequence, attention_mask=mask, position_ids=positions)
    done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    generated = []
    for step in range(max_new_tokens):
        token = next_tokens(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated.append(token)
        done = done | (token == eos_id)
        if step == max_new_tokens - 1 or all_done(done, model):  # sharded: every rank's rows (kdlab.engine.fsdp)
            break  # no forward for a token that will never be fed
        # Finished rows keep feeding pad (as a valid key): their outputs are discarded.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if use_cache:
            logits, cache = model(token[:, None], attention_mask=mask, position_ids=positions[:, -1:],
                                  past_key_values=cache, use_cache=True)
        else:
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            logits = model(sequence, attention_mask=mask, position_ids=positions)
    return torch.stack(generated, dim=1)


def _response_lengths(responses: Tensor, eos_id: int) -> Tensor:
    """Per row: up to and including the first EOS, else every generated token."""
    is_eos = responses == eos_id
    first = is_eos.int().argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first + 1, torch.full_like(first, responses.shape[1]))


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
                raise NonFiniteLossError("policy_gradient_kd: the teacher-mixed sampling distribution became NaN or "
                                  "infinite, so no reward can be computed for term 'pg': the teacher's or the "
                                  "student's logits are not finite; the last good checkpoint is kept")
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            generated.append(token)
            done = done | (token == eos_id)
            if step == max_new_tokens - 1 or all_done(done, student):
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
