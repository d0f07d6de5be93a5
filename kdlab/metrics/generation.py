"""Metrics of open-ended generation for language-model distillation (pure functions).

Tensors follow kdlab's sequence conventions: logits ``(B, T, V)`` where the
logits at position t predict token t + 1, ``labels`` ``(B, T)`` holding the
token at response positions and -100 elsewhere.

* ``per_token_kl(p_logits, q_logits, mask)`` — mean over masked positions of
  the exact KL(p‖q) over the vocabulary. Reverse KL on the student's samples is
  ``per_token_kl(student, teacher, mask)`` (what on-policy distillation
  minimises); forward KL on the teacher's samples is
  ``per_token_kl(teacher, student, mask)``.
* ``response_nll(logits, labels)`` — mean negative log-likelihood per response
  token of a given output (the teacher's NLL of the student's greedy output).
* ``rouge_l`` — ROUGE-L F1 (Lin 2004, β = 1) with the tokenization of Google's
  ``rouge-score`` package (lowercase, runs of non-alphanumerics split, no
  stemming); equal to ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])``,
  which the tests check when that package is installed.
* ``response_mask`` / ``response_stats`` — response lengths and the fraction that
  ends with EOS, by the first EOS's position (safe when pad == EOS).
* ``last_number`` / ``exact_match`` — answer accuracy for arithmetic prompts.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def prediction_mask(labels: Tensor) -> Tensor:
    """``(B, T)`` bool: position t is scored when it predicts a response token (``labels[t + 1] != -100``)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def per_token_kl(p_logits: Tensor, q_logits: Tensor, mask: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Mean over ``mask`` positions of KL(p‖q) = Σ_v p_v (log p_v − log q_v), p = softmax(p_logits / T).

    ``p_logits``, ``q_logits``: ``(B, T, V)``; ``mask``: ``(B, T)`` bool. Computed
    in at least float32; 0 when the mask is empty. Returns a 0-dim tensor.
    """
    dtype = torch.promote_types(p_logits.dtype, torch.float32)
    log_p = F.log_softmax(p_logits.to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(q_logits.to(dtype) / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (B, T)
    count = mask.sum()
    return (kl * mask).sum() / count.clamp_min(1)


def response_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL per response token of ``labels`` under ``logits`` (aligned: logits at t predict labels[t + 1])."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    nll = F.cross_entropy(logits[:, :-1].to(dtype).transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def response_mask(responses: Tensor, *, eos_id: int) -> Tensor:
    """``(B, N)`` bool: True at each generated token up to and including the row's first EOS.

    Built from the first EOS's position, never from ``responses != pad``: when
    pad == EOS (SmolLM2, Llama 3, Qwen) a mask from the pad id drops the final
    EOS, so the model is never taught to stop (TRL fixed exactly this; DistiLLM
    still has it). A row without EOS is all True.
    """
    is_eos = (responses == eos_id).long()
    return is_eos.cumsum(dim=1) - is_eos == 0  # no EOS strictly before this position


def response_stats(responses: Tensor, *, eos_id: int) -> dict[str, float]:
    """``{"mean_length", "eos_fraction"}`` of raw generated tokens ``(B, N)`` (EOS counted in the length)."""
    mask = response_mask(responses, eos_id=eos_id)
    ended = (responses == eos_id).any(dim=1)
    return {"mean_length": float(mask.sum(dim=1).double().mean()), "eos_fraction": float(ended.double().mean())}


# --------------------------------------------------------------------------- text


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenization: lowercase, non-alphanumeric runs become spaces, split."""
    return [token for token in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if token]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)·len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if item == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L of ``candidate`` against ``reference``: ``{"precision", "recall", "f1"}`` (all 0 if either is empty).

    precision = LCS / candidate tokens, recall = LCS / reference tokens, F1 their harmonic mean.
    """
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    if not cand or not ref:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    common = lcs_length(ref, cand)
    precision, recall = common / len(cand), common / len(ref)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def mean_rouge_l(candidates: Sequence[str], references: Sequence[Optional[str]]) -> Optional[float]:
    """Mean ROUGE-L F1 over the pairs whose reference is not None (None if there are none)."""
    scores = [rouge_l(c, r)["f1"] for c, r in zip(candidates, references) if r is not None]
    return sum(scores) / len(scores) if scores else None


def last_number(text: str) -> Optional[str]:
    """The last integer in ``text`` (thousands commas dropped), or None."""
    found = re.findall(r"-?\d[\d,]*", text)
    return found[-1].rstrip(",").replace(",", "") if found else None


def exact_match(responses: Sequence[str], answers: Sequence[str], *, numeric: bool = True) -> float:
    """Fraction of responses whose answer equals the reference: the last integer (``numeric``) or the stripped text."""
    if not responses:
        return 0.0
    if numeric:
        hits = [last_number(r) == a.strip() for r, a in zip(responses, answers)]
    else:
        hits = [r.strip() == a.strip() for r, a in zip(responses, answers)]
    return sum(hits) / len(hits)
