"""Evaluation of sequence models on a prompt → response task.

Metrics, all over the responses of one split:

* ``acc`` — exact match under greedy decoding: the generated response is
  correct by the task's checker (equal to the reference for deterministic
  tasks; any valid answer for tasks with several).
* ``answer_acc`` — only the final answer is right (scratchpad tasks).
* ``token_acc`` / ``nll`` — teacher-forced on the reference: argmax accuracy and
  mean negative log-likelihood per response token (EOS included).
* ``agreement`` — the greedy response equals the teacher's greedy response.
* ``sampled_acc`` — exact match when sampling at temperature 1 (seeded), asked
  for explicitly: mode-seeking and mode-covering students differ most here.

``acc`` and ``nll`` keep the names the classification metrics use, so the
best-val selection rule and the study tables work unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.data.sequence import IGNORE, SequenceInfo, prompt_lengths

# Generation room beyond the longest reference response: a model that does not stop is marked
# wrong after this many extra tokens rather than running to the end of its context.
EXTRA_TOKENS = 4


def max_new_tokens(info: SequenceInfo, prompt_width: int) -> int:
    room = getattr(info, "generation_room", EXTRA_TOKENS)
    return max(1, min(info.max_response_tokens + room, info.context_length - prompt_width))


@torch.no_grad()
def generate_responses(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, info: SequenceInfo, *,
                       device: torch.device, batch_size: int = 256, temperature: float = 0.0,
                       generator: torch.Generator | None = None) -> list[str]:
    """The model's responses (decoded text) to the prompts of a split."""
    from kdlab.seq.sampling import generate, prompts_from_canonical

    responses: list[str] = []
    for start in range(0, len(tokens), batch_size):
        chunk_tokens = tokens[start:start + batch_size].to(device)
        prompts, lengths = prompts_from_canonical(chunk_tokens, labels[start:start + batch_size].to(device),
                                                  pad_id=info.pad_id)
        out = generate(model, prompts, lengths, max_new_tokens=max_new_tokens(info, prompts.shape[1]),
                       eos_id=info.eos_id, pad_id=info.pad_id, temperature=temperature, generator=generator)
        for row, prompt_len in zip(out.tokens.tolist(), lengths.tolist()):
            responses.append(info.decode(row[prompt_len:]))
    return responses


def _texts(tokens: torch.Tensor, labels: torch.Tensor, info: SequenceInfo) -> tuple[list[str], list[str]]:
    lengths = prompt_lengths(labels).tolist()
    rows = tokens.tolist()
    prompts = [info.decode(row[:n]) for row, n in zip(rows, lengths)]
    references = [info.decode(row[n:]) for row, n in zip(rows, lengths)]
    return prompts, references


@torch.no_grad()
def teacher_forced(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
                   batch_size: int = 256) -> dict[str, float]:
    """Per-token accuracy and NLL on the reference responses (logits at t predict token t + 1)."""
    correct = nll = count = 0.0
    for start in range(0, len(tokens), batch_size):
        x = tokens[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)[:, 1:]
        logits = model(x)[:, :-1].float()
        mask = y != IGNORE
        targets = y.clamp_min(0)
        nll += float(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")[mask].sum())
        correct += float((logits.argmax(-1) == targets)[mask].sum())
        count += float(mask.sum())
    return {"token_acc": correct / max(count, 1.0), "nll": nll / max(count, 1.0)}


def sequence_metrics(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor], info: SequenceInfo, *,
                     device: torch.device, teacher_responses: list[str] | None = None, sampled: bool = False,
                     seed: int = 0) -> dict[str, float]:
    tokens, labels = split
    was_training = model.training
    model.eval()
    try:
        prompts, _ = _texts(tokens, labels, info)
        responses = generate_responses(model, tokens, labels, info, device=device)
        metrics = {
            "acc": sum(info.is_correct(p, r) for p, r in zip(prompts, responses)) / len(prompts),
            "answer_acc": sum(info.answer_correct(p, r) for p, r in zip(prompts, responses)) / len(prompts),
            **teacher_forced(model, tokens, labels, device=device),
        }
        if teacher_responses is not None:
            metrics["agreement"] = sum(a == b for a, b in zip(responses, teacher_responses)) / len(prompts)
        if sampled:
            generator = torch.Generator(device=device).manual_seed(seed)
            drawn = generate_responses(model, tokens, labels, info, device=device, temperature=1.0,
                                       generator=generator)
            metrics["sampled_acc"] = sum(info.is_correct(p, r) for p, r in zip(prompts, drawn)) / len(prompts)
    finally:
        model.train(was_training)
    return metrics
