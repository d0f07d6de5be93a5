"""The shared base of methods that sample responses during training (GKD, policy-gradient KD).

What GKD and MiniLLM-style policy-gradient KD have in common, once: the student and teacher held
outside the module tree, the prompts of a canonical batch, per-step seeded generators (so sampling
is the same however often other code draws random numbers, and on resume), generation with the
sequence task's length budget, and the SFT warm-up (``hparams.sft_steps`` steps of next-token
cross-entropy on the reference responses before distilling, as both papers start from an SFT
student).
"""
from __future__ import annotations

import torch

from kdlab.losses.sequence import response_units
from kdlab.methods.base import Batch, Method
from kdlab.methods.scratch import sequence_cross_entropy


def check_sft_steps(cfg, errors: list[str]) -> None:
    """A generation method's ``check_config``: the SFT warm-up must leave steps to distil (issue 17 item 15)."""
    sft, steps = cfg.method.options.get("sft_steps", 0), cfg.train.steps
    if isinstance(sft, int) and isinstance(steps, int) and sft > 0 and sft >= steps:
        errors.append(f"method.sft_steps: {sft} warm-up steps leave none of train.steps ({steps}) for "
                      "distillation; lower method.sft_steps or raise train.steps")


class GenerationMethod(Method):
    """A method on sequence tasks whose ``make_batch`` may replace the responses by generated ones.

    Subclasses set ``generation_calls`` (a counter per source they sample from) and read
    ``hparams.sft_steps``.
    """

    data_kinds = ("sequence",)
    sft_follows_reduction = True  # the SFT warm-up's cross-entropy uses ``hparams.reduction`` (else per token)

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        # Not submodules: the student is trained by the loop and the teacher is frozen; registering them
        # here would save them twice in every checkpoint.
        self._networks = {"student": student, "teacher": teacher}
        # Generators are seeded by the run seed and the step (``step_generator``), never by a global stream.
        self.schedule_seed = torch.initial_seed()

    # ----------------------------------------------------------------- SFT warm-up

    def in_sft(self) -> bool:
        """True during the first ``sft_steps`` steps: reference responses, cross-entropy, no teacher."""
        return self.step < self.hparams.sft_steps

    def teacher_needed(self) -> bool:
        return not self.in_sft()

    def sft_loss(self, student_logits, labels, reduction: str = "token"):
        """Next-token cross-entropy on the batch's responses (the SFT warm-up's term)."""
        return sequence_cross_entropy(student_logits, labels, reduction=reduction)

    def trains_on_references(self) -> bool:
        """Whether some step learns from the data's own responses (here: the SFT warm-up)."""
        return self.hparams.sft_steps > 0

    # ----------------------------------------------------------------- sampling

    def step_generator(self, device: torch.device, stream: int) -> torch.Generator:
        """A generator for this step and ``stream`` (0: schedule draws, 1: student, 2: mixed, ...).

        Stream 0 is per optimiser step (one draw decides a whole accumulated batch, as for one large
        batch); the sampling streams are per micro-batch (``micro_batch``; 0 gives the seeds used before
        accumulation existed), so micro-batches do not reuse each other's random numbers."""
        seed = self.schedule_seed * 1_000_003 + self.step * 4 + stream
        if stream and self.micro_batch:
            seed += 0x9E3779B97F4A7C15 * self.micro_batch  # far from every (step, stream) seed of micro 0
        return torch.Generator(device=device).manual_seed(seed % (2 ** 63))

    def loss_count(self, batch: Batch):
        """The units the terms average over: the batch's response tokens or sequences (``hparams.reduction``);
        the SFT warm-up's cross-entropy follows the same reduction (GKD) or is per token."""
        reduction = self.hparams.reduction if not self.in_sft() or self.sft_follows_reduction else "token"
        return response_units(batch.labels, reduction)

    def prompts(self, batch: Batch):
        """(prompts, prompt lengths) of a canonical batch, right-padded."""
        from kdlab.seq.sampling import prompts_from_canonical

        return prompts_from_canonical(batch.inputs, batch.labels, pad_id=self.sequence.pad_id)

    def generation_options(self, prompts) -> dict:
        """The task's length budget and special tokens, as ``generate`` takes them."""
        from kdlab.seq.evaluate import max_new_tokens

        return dict(max_new_tokens=max_new_tokens(self.sequence, prompts.shape[1]), eos_id=self.sequence.eos_id,
                    pad_id=self.sequence.pad_id)

    def generate(self, role: str, prompts, lengths, *, temperature: float, generator, top_k=None, top_p=None):
        """``role``'s ("student" or "teacher") responses to ``prompts``, counted in ``generation_calls``."""
        from kdlab.seq import sampling  # looked up per call: tests stand in for ``sampling.generate``

        self.generation_calls[role] += 1
        # The frozen teacher samples in inference mode (its responses are data, never differentiated).
        with torch.inference_mode(role == "teacher"):
            return sampling.generate(self._networks[role], prompts, lengths, temperature=temperature, top_k=top_k,
                                     top_p=top_p, generator=generator, **self.generation_options(prompts))

    @staticmethod
    def data_batch(batch: Batch) -> Batch:
        """The batch with its own (reference) responses."""
        return Batch(batch.inputs, batch.labels, batch.indices, extras={"source": "data"})

    @staticmethod
    def generated_batch(batch: Batch, generation, source: str) -> Batch:
        """The batch's prompts with generated responses (canonical layout), labelled by ``source``."""
        return Batch(inputs=generation.tokens, labels=generation.labels, indices=batch.indices,
                     extras={"source": source})
