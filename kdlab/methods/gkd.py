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
the paper starts every student from an SFT checkpoint. Prompts, seeded sampling
and the warm-up are the generation base shared with policy-gradient KD
(``kdlab.methods.generation``); D is one member of the divergence family
(``kdlab.losses.divergences``) under GKD's spelling (``kdlab.losses.sequence``). ``fused: true``
computes it from the student's last hidden states and output layer (``kdlab.losses.fused``), so the
student's (B, T, V) logits are never formed.

``teacher_targets: topk | sampled`` (with ``teacher_targets_k``) trains supervised KD and SeqKD arms from
offline teacher targets, computed once and memory-mapped (``kdlab.engine.seq_teacher_cache``): the top-k
log-probabilities with a tail bucket, or k tokens sampled from the teacher (Random-Sampling KD, Anshumann
et al., ACL 2025), with the forward KL of ``kdlab.losses.sparse_targets``; no teacher forward in training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Optional

from annotated_types import Interval
import torch

from kdlab.config.schema import OMIT_DEFAULT
from kdlab.config.validate import Count, NonNegative, NonNegativeCount, Positive, UnitInterval
from kdlab.errors import KdlabError
from kdlab.losses.fused import fused_sequence_divergence
from kdlab.losses.sequence import DIVERGENCES, response_mask, sequence_divergence, shift_logits_and_mask
from kdlab.losses.sparse_targets import sampled_kl, topk_tail_kl
from kdlab.methods.base import Batch
from kdlab.methods.generation import GenerationMethod, check_sft_steps
from kdlab.registry import register


FUSED_MODELS = ("tinygpt", "hf_causal_lm")  # the zoo's models that expose hidden states + output layer
TEACHER_TARGETS = ("full", "topk", "sampled")


def offline_targets_problem(get) -> str | None:
    """Why offline teacher targets cannot serve these hparams (``get(name)``: a value or its default), or None."""
    targets = get("teacher_targets")
    if targets not in TEACHER_TARGETS:
        return f"method.teacher_targets: {targets!r} is not one of {', '.join(TEACHER_TARGETS)}"
    if targets == "full":
        return None
    if get("on_policy_fraction") > 0:
        return ("method.teacher_targets: offline targets hold no teacher outputs on the student's own samples "
                f"(on_policy_fraction {get('on_policy_fraction')}); set on_policy_fraction: 0 or teacher_targets: full")
    if get("divergence") != "forward_kl":
        return (f"method.teacher_targets: {targets} targets train the forward KL, not {get('divergence')!r}; set "
                "divergence: forward_kl or teacher_targets: full")
    if get("fused"):
        return "method.teacher_targets: not with method.fused (the sparse losses need no fusion); set fused: false"
    if get("seqkd") and get("teacher_sampling_temperature") != 0:
        return ("method.teacher_targets: SeqKD responses are cached greedy only; set teacher_sampling_temperature: 0 "
                "or teacher_targets: full")
    return None


def check_config(cfg, errors: list[str]) -> None:
    """GKD's config rules: the SFT warm-up leaves steps to distil; ``fused`` needs a model with an output layer."""
    check_sft_steps(cfg, errors)
    options = cfg.method.options
    problem = offline_targets_problem(lambda name: options.get(name, getattr(GKDHparams, name)))
    if problem:
        errors.append(problem)
    model = getattr(cfg.student, "model", None)
    if (cfg.method.options.get("fused") is True and isinstance(model, str)
            and not any(model == name or model.startswith(f"{name}-") for name in FUSED_MODELS)):
        errors.append(f"method.fused: student model {model!r} does not expose its hidden states and output layer "
                      f"({', '.join(FUSED_MODELS)} do); set method.fused: false")


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
    # The divergence fused with the student's output layer (kdlab.losses.fused): no (B, T, V) student tensor;
    # chunk_size then counts positions of every sequence (chunks of B·chunk_size tokens; null: ~16 MiB of logits)
    fused: bool = field(default=False, metadata=OMIT_DEFAULT)
    # Offline teacher targets (kdlab.engine.seq_teacher_cache): full = the live teacher's logits every step;
    # topk = its k largest log-probabilities + tail mass; sampled = k tokens drawn from it (unbiased)
    teacher_targets: str = field(default="full", metadata=OMIT_DEFAULT)
    teacher_targets_k: Count = field(default=64, metadata=OMIT_DEFAULT)

    check_config = staticmethod(check_config)  # run at config validation


def _check(h: GKDHparams) -> None:
    if h.divergence not in DIVERGENCES + ("ce",):
        raise KdlabError(f"method.divergence: {h.divergence!r} is not one of {', '.join(DIVERGENCES + ('ce',))}")
    if h.reduction not in ("token", "sequence"):
        raise KdlabError(f"method.reduction: {h.reduction!r} is not one of token, sequence")
    problem = offline_targets_problem(lambda name: getattr(h, name))
    if problem:
        raise KdlabError(problem)


@register("method", "gkd")
class GKD(GenerationMethod):
    """GKD (Agarwal et al. 2023): token-level divergence on a seeded mix of fixed and student-sampled responses."""

    Hparams = GKDHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        _check(hparams)
        self.generation_calls = {"student": 0, "teacher": 0}
        self.last_source = "data"
        self._teacher_cache: dict[int, list[int]] = {}  # train index -> teacher response ids (SeqKD)
        self.offline = None  # the SeqTargetCache (teacher_targets: topk | sampled), set by attach_offline_targets
        vocab = getattr(student, "vocab_size", None)
        if hparams.teacher_targets != "full" and isinstance(vocab, int):
            from kdlab.engine.seq_teacher_cache import check_k

            check_k(hparams.teacher_targets_k, vocab)
        if hparams.fused:
            if not callable(getattr(student, "output_layer", None)) or not hasattr(student, "emit_hidden_states"):
                raise KdlabError(f"method.fused: the student ({type(student).__name__}) does not expose its hidden "
                                 f"states and output layer ({', '.join(FUSED_MODELS)} do); set method.fused: false")
            student.output_layer()  # its own one-line refusal (e.g. soft-capped logits)
            student.emit_hidden_states = True  # training forwards return the head's input, not the logits

    def data_source(self) -> str:
        """Where this step's responses come from: "student" (on-policy), "teacher" (SeqKD) or "data"."""
        h = self.hparams
        if self.in_sft():
            return "data"
        u = float(torch.rand((), generator=self.step_generator(torch.device("cpu"), 0)))  # Algorithm 1's draw
        if u < h.on_policy_fraction:  # λ = 0 never samples, λ = 1 always does
            return "student"
        return "teacher" if h.seqkd else "data"

    def _sample(self, role: str, prompts, lengths, temperature: float, generator):
        h = self.hparams
        return self.generate(role, prompts, lengths, temperature=temperature, generator=generator, top_k=h.top_k,
                             top_p=h.top_p)

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
            out = self._sample("teacher", prompts[rows][:, :width], lengths[rows], temperature, generator)
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

    def trains_on_references(self) -> bool:
        """The SFT warm-up, and off-policy batches of the data's responses (λ < 1 without SeqKD)."""
        h = self.hparams
        return h.sft_steps > 0 or (h.on_policy_fraction < 1 and not h.seqkd)

    def teacher_needed(self) -> bool:
        """No teacher forward during the SFT warm-up, for hard-target (``ce``) SeqKD steps, nor with offline targets."""
        h = self.hparams
        return not self.in_sft() and h.divergence != "ce" and h.teacher_targets == "full"

    def attach_offline_targets(self, splits, **options) -> None:
        """Open (building first if missing) this run's offline teacher targets; called by the loop at setup."""
        if self.hparams.teacher_targets != "full":
            from kdlab.engine.seq_teacher_cache import attach

            self.offline = attach(self, splits, **options)

    def _offline_loss(self, student_logits, batch):
        """The forward KL against the cached sparse targets of the batch's response tokens."""
        h = self.hparams
        if self.offline is None:
            raise KdlabError(f"method.teacher_targets: {h.teacher_targets} targets were not built (the training loop "
                             "builds them); set teacher_targets: full")
        if batch.indices is None:
            raise KdlabError("method.teacher_targets: needs the batch's train indices to find its cached targets")
        student_logits, mask = shift_logits_and_mask(student_logits, batch.labels)
        t = self.offline.targets(batch.indices, mask)
        common = dict(student_temperature=h.student_temperature, reduction=h.reduction)
        if h.teacher_targets == "topk":
            return topk_tail_kl(student_logits, t["ids"], t["log_probs"], t["tail_log_mass"], mask, **common)
        return sampled_kl(student_logits, t["ids"], t["log_probs"], mask, **common)

    def make_batch(self, batch: Batch) -> Batch:
        source = self.data_source()
        self.last_source = source
        if source == "data":
            return self.data_batch(batch)
        prompts, lengths = self.prompts(batch)
        if source == "teacher":
            return self._teacher_batch(batch, prompts, lengths)
        out = self._sample("student", prompts, lengths, self.hparams.sampling_temperature,
                           self.step_generator(prompts.device, 1))
        return self.generated_batch(batch, out, "student")

    def _fused_loss(self, hidden, labels, teacher_out, divergence: str):
        """The loss of ``loss_terms`` from the student's hidden states (``method.fused``), never its logits."""
        h = self.hparams
        weight, bias = self._networks["student"].output_layer()
        if hidden.shape[-1] != weight.shape[1]:
            raise KdlabError(f"method.fused: the student returned {tuple(hidden.shape)}, not hidden states of width "
                             f"{weight.shape[1]}; its forward ignores emit_hidden_states")
        mask = response_mask(labels)
        chunk = None if h.chunk_size is None else h.chunk_size * hidden.shape[0]
        common = dict(student_bias=bias, reduction=h.reduction, chunk_size=chunk)
        if divergence == "ce":
            return fused_sequence_divergence(hidden[:, :-1], weight, None, mask, labels=labels[:, 1:],
                                             divergence="ce", **common)
        return fused_sequence_divergence(hidden[:, :-1], weight, teacher_out.logits[:, :-1], mask,
                                         divergence=divergence, beta=h.beta, scaled=h.scaled_jsd, skew=h.skew,
                                         student_temperature=h.student_temperature,
                                         teacher_temperature=h.teacher_temperature, **common)

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        zero = student_out.logits.new_zeros(())
        if h.fused:  # student_out.logits holds the hidden states (B, L, H) here
            if self.in_sft():
                return {"sft": self._fused_loss(student_out.logits, batch.labels, None, "ce"), "gkd": zero}
            return {"sft": zero, "gkd": self._fused_loss(student_out.logits, batch.labels, teacher_out, h.divergence)}
        if self.in_sft():  # the SFT warm-up: reference responses, cross-entropy
            return {"sft": self.sft_loss(student_out.logits, batch.labels, h.reduction), "gkd": zero}
        if h.divergence == "ce":  # hard targets (SeqKD when the responses are the teacher's)
            return {"sft": zero, "gkd": self.sft_loss(student_out.logits, batch.labels, h.reduction)}
        if h.teacher_targets != "full":
            return {"sft": zero, "gkd": self._offline_loss(student_out.logits, batch)}
        # D(p_T ‖ p_S^θ)(y|x) of Eq. 2, on the aligned next-token logits of the response positions
        student_logits, mask = shift_logits_and_mask(student_out.logits, batch.labels)
        teacher_logits = teacher_out.logits[:, :-1]
        # The columns before the earliest response position (the prompts' common part) count in no row: the
        # full-vocabulary divergence starts there (same loss, less work and memory on long prompts).
        start = int(mask.any(dim=0).int().argmax())
        if start:
            student_logits, teacher_logits, mask = student_logits[:, start:], teacher_logits[:, start:], mask[:, start:]
        loss = sequence_divergence(student_logits, teacher_logits, mask, divergence=h.divergence,
                                   beta=h.beta, scaled=h.scaled_jsd, skew=h.skew,
                                   student_temperature=h.student_temperature,
                                   teacher_temperature=h.teacher_temperature, reduction=h.reduction,
                                   chunk_size=h.chunk_size)
        return {"sft": zero, "gkd": loss}
