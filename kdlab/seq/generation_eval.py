"""Open-ended generation evaluation of a student against its teacher on held-out prompts (issue 18).

``evaluate_generation(student, teacher, tokens, labels, info)`` decodes each
prompt four times — student and teacher, greedy and sampled — and returns the
metrics of ``kdlab.metrics.generation`` over the split plus one sample row per
prompt (``prompt``, ``student``, ``teacher``, ``reference``; the rows a run
writes to ``samples.jsonl``):

* ``reverse_kl`` — per-token KL(student‖teacher) on the student's samples
  (the quantity on-policy distillation minimises), token-weighted over the split;
* ``forward_kl`` — per-token KL(teacher‖student) on the teacher's samples;
* ``teacher_nll`` — the teacher's NLL per token of the student's greedy output;
* ``rouge_l_teacher`` — ROUGE-L F1 of the student's greedy output against the
  teacher's; ``rouge_l_reference`` against the reference where there is one;
* ``length`` / ``teacher_length`` — mean greedy response length in tokens (EOS
  counted), ``eos_fraction`` / ``teacher_eos_fraction`` — the share that ends with EOS;
* ``acc`` / ``answer_acc`` — the task's checkers (``SequenceInfo.is_correct``,
  ``answer_correct``) on the student's greedy output.

Rows whose reference is a placeholder (EOS alone: the prompt had no completion)
have ``reference`` None. Models follow kdlab's sequence protocol (``model(tokens)``
→ logits); both are put in eval mode and restored.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from kdlab.metrics.generation import per_token_kl, prediction_mask, response_nll, rouge_l


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def evaluate_generation(student: nn.Module, teacher: nn.Module, tokens: Tensor, labels: Tensor, info: Any, *,
                        max_new_tokens: int, device: torch.device | str = "cpu", batch_size: int = 8,
                        temperature: float = 1.0, seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """``(metrics, samples)`` over the canonical split ``(tokens, labels)`` (see the module docstring).

    ``temperature``: of the sampled decodes (the KL estimates); greedy decodes
    are at temperature 0. ``seed`` seeds one generator for all sampling, so a
    call is reproducible.
    """
    from kdlab.seq.sampling import generate, prompts_from_canonical

    device = torch.device(device)
    modes = [(net, {m: m.training for m in net.modules()}) for net in (student, teacher)]
    student.eval()
    teacher.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = {"reverse_kl": 0.0, "forward_kl": 0.0, "teacher_nll": 0.0}
    counts = {"reverse_kl": 0, "forward_kl": 0, "teacher_nll": 0}
    per_row: dict[str, list[float]] = {k: [] for k in ("rouge_l_teacher", "rouge_l_reference", "length",
                                                      "teacher_length", "eos_fraction", "teacher_eos_fraction",
                                                      "acc", "answer_acc")}
    samples: list[dict] = []
    options = dict(max_new_tokens=max_new_tokens, eos_id=info.eos_id, pad_id=info.pad_id)
    try:
        for start in range(0, len(tokens), batch_size):
            chunk, chunk_labels = tokens[start:start + batch_size].to(device), labels[start:start + batch_size].to(device)
            prompts, lengths = prompts_from_canonical(chunk, chunk_labels, pad_id=info.pad_id)
            greedy = {role: generate(net, prompts, lengths, temperature=0.0, **options)
                      for role, net in (("student", student), ("teacher", teacher))}
            sampled = {role: generate(net, prompts, lengths, temperature=temperature, generator=generator, **options)
                       for role, net in (("student", student), ("teacher", teacher))}
            for key, role, p_net, q_net in (("reverse_kl", "student", student, teacher),
                                            ("forward_kl", "teacher", teacher, student)):
                batch = sampled[role]
                mask = prediction_mask(batch.labels)
                value = per_token_kl(p_net(batch.tokens).float(), q_net(batch.tokens).float(), mask,
                                     temperature=temperature)
                sums[key] += float(value) * int(mask.sum())
                counts[key] += int(mask.sum())
            mask = prediction_mask(greedy["student"].labels)
            sums["teacher_nll"] += float(response_nll(teacher(greedy["student"].tokens), greedy["student"].labels)) \
                * int(mask.sum())
            counts["teacher_nll"] += int(mask.sum())
            texts = {role: _responses(gen, info) for role, gen in greedy.items()}
            for row in range(len(chunk)):
                n = int(lengths[row])
                prompt = info.decode(chunk[row, :n].tolist())
                reference_ids = chunk[row, n:][chunk_labels[row, n:] != -100].tolist()
                reference = None if reference_ids in ([], [info.eos_id]) else info.decode(reference_ids)
                student_text, teacher_text = texts["student"][row], texts["teacher"][row]
                per_row["rouge_l_teacher"].append(rouge_l(student_text, teacher_text)["f1"])
                if reference is not None:
                    per_row["rouge_l_reference"].append(rouge_l(student_text, reference)["f1"])
                for role, suffix in (("student", ""), ("teacher", "teacher_")):
                    length, ended = _length_and_end(greedy[role], row, info.eos_id)
                    per_row[f"{suffix}length"].append(length)
                    per_row[f"{suffix}eos_fraction"].append(float(ended))
                per_row["acc"].append(float(info.is_correct(prompt, student_text)))
                per_row["answer_acc"].append(float(info.answer_correct(prompt, student_text)))
                samples.append({"prompt": prompt, "student": student_text, "teacher": teacher_text,
                                "reference": reference})
    finally:
        for _, saved in modes:
            for module, training in saved.items():
                module.training = training
    metrics = {key: sums[key] / max(counts[key], 1) for key in sums}
    for key, values in per_row.items():
        mean = _mean(values)
        if mean is not None:
            metrics[key] = mean
    return metrics, samples


def _responses(generation, info) -> list[str]:
    rows = generation.tokens.tolist()
    return [info.decode(row[int(n):int(n) + int(m)])
            for row, n, m in zip(rows, generation.prompt_lengths.tolist(), generation.response_lengths.tolist())]


def _length_and_end(generation, row: int, eos_id: int) -> tuple[int, bool]:
    """Response length of ``row`` (EOS included) and whether its last token is EOS."""
    n, m = int(generation.prompt_lengths[row]), int(generation.response_lengths[row])
    return m, m > 0 and int(generation.tokens[row, n + m - 1]) == eos_id
