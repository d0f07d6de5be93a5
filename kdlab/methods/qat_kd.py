"""KD for quantization-aware training of transformer encoders (Kim et al., EMNLP 2022).

Kim, Lee, Kim, Yoo & Kim, "Understanding and Improving Knowledge Distillation for
Quantization-Aware Training of Large Transformer Encoders". The student is the
fine-tuned full-precision encoder with fake-quantized weights (``student.quant``,
``student.init: teacher``); the teacher is that full-precision model. The loss is

    L = w_logit · T²·KL(p_T^teacher ‖ p_T^student)                       logits (TernaryBERT's soft CE)
      + w_ce · CE(y, p^student)                                           labels (0 in the paper's code)
      + w_hidden · Σ_l MSE(H_l^S, H_{m(l)}^T)                             TernaryBERT hidden states
      + w_map · Σ_l KL(A_{m(l)}^T ‖ A_l^S)   per attention row            the attention-map loss
      + w_output · Σ_l MSE(LN(W_o·ctx + x)_l^S, (...)_{m(l)}^T)           the attention-output loss

over the student layers l mapped to teacher layers m(l) (``layer_map``; identity
for equal depths, else the uniform map m(l) = round((l+1)·L_T/L_S) − 1). The
paper's unified form γ·L_map + (1−γ)·L_output is ``map_weight: γ, output_weight: 1−γ``.
Soft CE and KL differ by the teacher's entropy, a constant: same gradients.
Padding (token id ``pad_token_id``) is masked in every term; ``layer_reduction``
``sum`` (the official code) or ``mean`` over the mapped layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from kdlab.config.validate import NonNegative, Positive
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.losses.attention import attention_map, attention_output, hidden_mse
from kdlab.methods.base import Method
from kdlab.registry import register


@dataclass
class QatKdHparams:
    logit_weight: NonNegative = 1.0  # soft-label term on the logits
    temperature: Positive = 1.0  # T of the soft-label term (TernaryBERT and Kim et al.: 1)
    ce_weight: NonNegative = 0.0  # hard-label cross-entropy (the paper's code: 0)
    hidden_weight: NonNegative = 0.0  # TernaryBERT hidden-state MSE
    map_weight: NonNegative = 0.0  # attention-map KL (Kim et al. §4.1)
    output_weight: NonNegative = 0.0  # attention-output MSE (Kim et al. §4.2)
    layer_map: Optional[dict] = None  # student layer -> teacher layer; null = identity / uniform
    hidden_embeddings: bool = True  # also match the embedding outputs in the hidden term (TernaryBERT)
    map_reduction: str = "sequence"  # attention-map rows: per-sequence mean (official code) or "token"
    layer_reduction: str = "sum"  # over mapped layers: "sum" (official code) or "mean"


def _encoder_layers(net, role: str) -> int:
    if net is None or not callable(getattr(net, "encoder_tap", None)):
        name = type(net).__name__
        raise KdlabError(f"method qat_kd: the {role} ({name}) publishes no attention probabilities or attention "
                         "outputs; use a transformer encoder (bert_encoder, minilm, or hf_encoder with eager attention)")
    return int(net.num_layers)


def resolve_layer_map(layer_map: dict | None, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer → teacher layer, checked; the default is identity or the uniform (TinyBERT) map."""
    if layer_map is None:  # m(l) = round((l+1)·L_T/L_S) − 1, halves up; a deeper student reuses teacher layer 0
        return {i: max(0, math.floor((i + 1) * teacher_layers / student_layers + 0.5) - 1)
                for i in range(student_layers)}
    if not isinstance(layer_map, dict) or not layer_map:
        raise KdlabError(f"method.layer_map: expected a mapping student layer -> teacher layer, e.g. {{0: 1, 1: 3}}, "
                         f"got {layer_map!r}")
    resolved = {}
    for key, value in layer_map.items():
        try:
            s, t = int(key), int(value)
        except (TypeError, ValueError):
            raise KdlabError(f"method.layer_map: {key!r}: {value!r} is not a pair of layer indices") from None
        if not 0 <= s < student_layers:
            raise KdlabError(f"method.layer_map: student layer {key} does not exist (the student has "
                             f"{student_layers} layers: 0..{student_layers - 1})")
        if not 0 <= t < teacher_layers:
            raise KdlabError(f"method.layer_map: teacher layer {value} (for student layer {key}) does not exist (the "
                             f"teacher has {teacher_layers} layers: 0..{teacher_layers - 1})")
        resolved[s] = t
    return dict(sorted(resolved.items()))


@register("method", "qat_kd")
class QatKD(Method):
    """Kim et al. QAT distillation: logits + hidden-state + attention-map + attention-output terms."""

    Hparams = QatKdHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        h = hparams
        for key in ("logit_weight", "temperature", "ce_weight", "hidden_weight", "map_weight", "output_weight"):
            value = getattr(h, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise KdlabError(f"method.{key}: expected a number >= 0, got {value!r}")
        if h.temperature <= 0:
            raise KdlabError(f"method.temperature: must be > 0, got {h.temperature}")
        if h.map_reduction not in ("sequence", "token"):
            raise KdlabError(f"method.map_reduction: {h.map_reduction!r} is not 'sequence' or 'token'")
        if h.layer_reduction not in ("sum", "mean"):
            raise KdlabError(f"method.layer_reduction: {h.layer_reduction!r} is not 'sum' or 'mean'")
        self.kinds = [kind for kind, weight in (("hidden", h.hidden_weight), ("attention_probs", h.map_weight),
                                                ("attention_output", h.output_weight)) if weight > 0]
        self.pad_token_id = getattr(student, "pad_token_id", 0)
        self.layer_map: dict[int, int] = {}
        if self.kinds:
            s_layers, t_layers = _encoder_layers(student, "student"), _encoder_layers(teacher, "teacher")
            self.layer_map = resolve_layer_map(h.layer_map, s_layers, t_layers)
            if "attention_probs" in self.kinds and getattr(student, "probs_dropout", 0.0) > 0:
                raise KdlabError(f"method.map_weight: the student returns attention probabilities after dropout "
                                 f"(p = {student.probs_dropout}), so the map loss would compare dropped maps; set "
                                 "the student's attention_probs_dropout_prob to 0 (hf_encoder config)")
            if "attention_probs" in self.kinds and student.num_heads != teacher.num_heads:
                raise KdlabError(f"method.map_weight: the attention-map loss compares heads one by one but the student "
                                 f"has {student.num_heads} heads and the teacher {teacher.num_heads}; use equal head "
                                 "counts or set map_weight: 0")
            pairs = [(kind, s, t) for kind in self.kinds for s, t in self.layer_map.items()]
            if "hidden" in self.kinds and h.hidden_embeddings:
                pairs.append(("hidden", -1, -1))
            self.pairs = pairs
            self.student_taps = tuple(dict.fromkeys(student.encoder_tap(k, s) for k, s, _ in pairs))
            self.teacher_taps = tuple(dict.fromkeys(teacher.encoder_tap(k, t) for k, _, t in pairs))
            self._student_tap = {(k, s): student.encoder_tap(k, s) for k, s, _ in pairs}
            self._teacher_tap = {(k, t): teacher.encoder_tap(k, t) for k, _, t in pairs}
        else:
            self.pairs = []

    def _layer_sum(self, kind, student_out, teacher_out, mask) -> torch.Tensor:
        h = self.hparams
        values = []
        for k, s, t in self.pairs:
            if k != kind:
                continue
            s_x = student_out.features[self._student_tap[(k, s)]]
            t_x = teacher_out.features[self._teacher_tap[(k, t)]]
            if kind == "attention_probs":
                values.append(attention_map(s_x, t_x, mask=mask, reduction=h.map_reduction, eps=1e-8))
            elif kind == "attention_output":
                values.append(attention_output(s_x, t_x, mask=mask))
            else:
                values.append(hidden_mse(s_x, t_x, mask=mask))
        total = torch.stack(values).sum()
        return total / len(values) if h.layer_reduction == "mean" else total

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        mask = batch.inputs != self.pad_token_id
        terms = {"kd": h.logit_weight * kl(student_out.logits, teacher_out.logits, temperature=h.temperature)}
        if h.ce_weight > 0:
            terms["ce"] = h.ce_weight * cross_entropy(student_out.logits, batch.labels)
        names = {"hidden": ("hidden", h.hidden_weight), "attention_probs": ("attn_map", h.map_weight),
                 "attention_output": ("attn_output", h.output_weight)}
        for kind in self.kinds:
            name, weight = names[kind]
            terms[name] = weight * self._layer_sum(kind, student_out, teacher_out, mask)
        return terms
