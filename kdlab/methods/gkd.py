"""Generalized Knowledge Distillation (GKD) for auto-regressive sequence models.

Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", ICLR 2024 (arXiv 2306.13649). The objective (§3.1):

    L_GKD(θ) = (1 − λ)·E_{(x,y)~(X,Y)}[ D(p_T ‖ p_S^θ)(y|x) ] + λ·E_{x~X} E_{y~p_S(·|x)}[ D(p_T ‖ p_S^θ)(y|x) ]

with D the per-sequence mean of a token-level divergence (Eq. 2,
``kdlab.losses.sequence.sequence_divergence``). As in the paper's Algorithm 1
the mixture is realised per batch: a seeded draw u ~ U(0, 1) per step; if u < λ
the student generates the responses to the batch's prompts at temperature γ
(no gradient through sampling), otherwise the batch keeps its fixed responses —
the reference ones (supervised KD), or with ``seqkd: true`` the teacher's own
responses, generated once per prompt and cached (SeqKD, Kim & Rush 2016).

Special cases (paper Table 1): supervised KD = λ 0 + forward KL; on-policy KD =
λ 1 + forward KL; SeqKD = ``seqkd`` + ``divergence: ce`` (hard targets).
``sft_steps`` first fine-tunes the student on the reference responses, since
the paper starts every student from an SFT checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

from annotated_types import Interval
import torch

from kdlab.config.validate import Count, NonNegative, NonNegativeCount, Positive, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses.sequence import DIVERGENCES, sequence_divergence, shift_logits_and_mask
from kdlab.methods.base import Batch, Method
from kdlab.methods.scratch import sequence_cross_entropy
from kdlab.registry import register




@dataclass
class GKDHparams:
    on_policy_fraction: UnitInterval = 0.5  # λ: share of batches whose responses the student samples
    divergence: str = "jsd"  # forward_kl | reverse_kl | jsd | tvd | skew_kl | skew_reverse_kl | ce
    beta: UnitInterval = 0.5  # generalized JSD's β (0 = forward KL, 1 = reverse KL, exact branches)
    scaled_jsd: bool = False  # divide the JSD by β(1 − β): no jump in scale at the ends
    skew: UnitInterval = 0.1  # skew KL's mixing weight
    student_temperature: Positive = 1.0
    teacher_temperature: Positive = 1.0
    reduction: str = "sequence"  # the paper averages per sequence (Eq. 2); "token" averages all tokens
    seqkd: bool = False  # the fixed data's responses are the teacher's, generated once per prompt
    teacher_sampling_temperature: NonNegative = 0.0  # for SeqKD generation; 0 = greedy
    sampling_temperature: NonNegative = 1.0  # γ: the student's sampling temperature (paper: 1)
    top_k: Optional[Count] = None
    top_p: Optional[Annotated[float, Interval(gt=0, le=1)]] = None
    sft_steps: NonNegativeCount = 0  # steps of SFT on the reference responses before distilling
    chunk_size: Optional[Count] = None  # divergence computed over this many positions at a time (large vocabularies)

    @staticmethod
    def check_config(cfg, errors: list[str]) -> None:
        """Run at config validation: SFT warm-up steps must leave distillation steps (issue 17 item 15)."""
        sft, steps = cfg.method.options.get("sft_steps", 0), cfg.train.steps
        if isinstance(sft, int) and isinstance(steps, int) and sft > 0 and sft >= steps:
            errors.append(f"method.sft_steps: {sft} warm-up steps leave none of train.steps ({steps}) for "
                          "distillation; lower method.sft_steps or raise train.steps")


def _check(h: GKDHparams) -> None:
    if h.divergence not in DIVERGENCES + ("ce",):
        raise KdlabError(f"method.divergence: {h.divergence!r} is not one of {', '.join(DIVERGENCES + ('ce',))}")
    if h.reduction not in ("token", "sequence"):
        raise KdlabError(f"method.reduction: {h.reduction!r} is not one of token, sequence")


@register("method", "gkd")
class GKD(Method):
    """GKD (Agarwal et al. 2023): token-level divergence on a seeded mix of fixed and student-sampled responses."""

    Hparams = GKDHparams
    data_kinds = ("sequence",)

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        _check(hparams)
        # Not submodules: the student is trained by the loop and the teacher is frozen; registering them
        # here would save them twice in every checkpoint.
        self._networks = {"student": student, "teacher": teacher}
        # The data-source schedule draws from its own generator seeded by the run seed and the step, so
        # it is the same however often sampling consumes random numbers, and on resume.
        self.schedule_seed = torch.initial_seed()
        self.generation_calls = {"student": 0, "teacher": 0}
        self.last_source = "data"
        self._teacher_cache: dict[int, list[int]] = {}  # train index -> teacher response ids (SeqKD)

    def _generator(self, device: torch.device, stream: int) -> torch.Generator:
        seed = (self.schedule_seed * 1_000_003 + self.step * 4 + stream) % (2 ** 63)
        return torch.Generator(device=device).manual_seed(seed)

    def data_source(self) -> str:
        """Where this step's responses come from: "student" (on-policy), "teacher" (SeqKD) or "data"."""
        h = self.hparams
        if self.step < h.sft_steps:
            return "data"
        u = float(torch.rand((), generator=self._generator(torch.device("cpu"), 0)))
        if u < h.on_policy_fraction:  # λ = 0 never samples, λ = 1 always does
            return "student"
        return "teacher" if h.seqkd else "data"

    def _prompts(self, batch: Batch):
        from kdlab.seq.sampling import prompts_from_canonical

        return prompts_from_canonical(batch.inputs, batch.labels, pad_id=self.sequence.pad_id)

    def _generate(self, role: str, prompts, lengths, temperature: float, generator):
        from kdlab.seq.evaluate import max_new_tokens
        from kdlab.seq.sampling import generate

        self.generation_calls[role] += 1
        h = self.hparams
        return generate(self._networks[role], prompts, lengths,
                        max_new_tokens=max_new_tokens(self.sequence, prompts.shape[1]), eos_id=self.sequence.eos_id,
                        pad_id=self.sequence.pad_id, temperature=temperature, top_k=h.top_k, top_p=h.top_p,
                        generator=generator)

    def _teacher_batch(self, batch: Batch, prompts, lengths) -> Batch:
        """SeqKD: the teacher's response to each prompt, generated on first use and cached by train index."""
        if batch.indices is None:
            raise KdlabError("method.seqkd: needs the batch's train indices to cache teacher responses")
        keys = batch.indices.tolist()
        missing = [i for i, k in enumerate(keys) if k not in self._teacher_cache]
        temperature = self.hparams.teacher_sampling_temperature
        # Greedy responses depend on the prompt only: one batched call. Sampled ones are drawn row by
        # row from a generator seeded by the train index, so a resumed run (whose cache starts empty)
        # draws the same response for every prompt as an uninterrupted one.
        groups = [missing] if temperature == 0 else [[i] for i in missing]
        for group in groups:
            if not group:
                continue
            rows = torch.tensor(group, device=prompts.device)
            generator = None if temperature == 0 else torch.Generator(device=prompts.device).manual_seed(
                (self.schedule_seed * 1_000_003 + 7919 * keys[group[0]] + 2) % (2 ** 63))
            width = int(lengths[rows].max())
            out = self._generate("teacher", prompts[rows][:, :width], lengths[rows], temperature, generator)
            kept = (lengths[rows] + out.response_lengths.to(lengths.device)).tolist()
            for i, row, n in zip(group, out.tokens.tolist(), kept):
                self._teacher_cache[keys[i]] = row[:n]
        sequences = [self._teacher_cache[k] for k in keys]
        width = max(len(s) for s in sequences)
        tokens = torch.full((len(keys), width), self.sequence.pad_id, dtype=torch.long)
        labels = torch.full((len(keys), width), -100, dtype=torch.long)
        for i, (seq, n) in enumerate(zip(sequences, lengths.tolist())):
            tokens[i, :len(seq)] = torch.tensor(seq)
            labels[i, n:len(seq)] = torch.tensor(seq[n:])
        device = batch.inputs.device
        return Batch(inputs=tokens.to(device), labels=labels.to(device), indices=batch.indices,
                     extras={"source": "teacher"})

    def teacher_needed(self) -> bool:
        """No teacher forward during the SFT warm-up, nor for hard-target (``ce``) SeqKD steps."""
        return self.step >= self.hparams.sft_steps and self.hparams.divergence != "ce"

    def make_batch(self, batch: Batch) -> Batch:
        source = self.data_source()
        self.last_source = source
        if source == "data":
            return Batch(batch.inputs, batch.labels, batch.indices, extras={"source": "data"})
        prompts, lengths = self._prompts(batch)
        if source == "teacher":
            return self._teacher_batch(batch, prompts, lengths)
        out = self._generate("student", prompts, lengths, self.hparams.sampling_temperature,
                             self._generator(prompts.device, 1))
        return Batch(inputs=out.tokens, labels=out.labels, indices=batch.indices, extras={"source": "student"})

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        zero = student_out.logits.new_zeros(())
        if self.step < h.sft_steps:  # the SFT warm-up: reference responses, cross-entropy
            return {"sft": sequence_cross_entropy(student_out.logits, batch.labels, reduction=h.reduction),
                    "gkd": zero}
        if h.divergence == "ce":  # hard targets (SeqKD when the responses are the teacher's)
            return {"sft": zero, "gkd": sequence_cross_entropy(student_out.logits, batch.labels,
                                                               reduction=h.reduction)}
        student_logits, mask = shift_logits_and_mask(student_out.logits, batch.labels)
        teacher_logits = teacher_out.logits[:, :-1]
        loss = sequence_divergence(student_logits, teacher_logits, mask, divergence=h.divergence, beta=h.beta,
                                   scaled=h.scaled_jsd, skew=h.skew, student_temperature=h.student_temperature,
                                   teacher_temperature=h.teacher_temperature, reduction=h.reduction,
                                   chunk_size=h.chunk_size)
        return {"sft": zero, "gkd": loss}
