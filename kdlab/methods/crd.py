"""CRD — Tian, Krishnan & Isola (ICLR 2020), "Contrastive Representation Distillation".

    L = ce_weight · CE + kl_weight · T²·KL(p_t^T ‖ p_s^T)
        + crd_weight · (L_nce(e_s against memory_t) + L_nce(e_t against memory_s))

Embeddings ``e_s = normalize(W_s f_s + b_s)`` and ``e_t = normalize(W_t f_t + b_t)`` (``Embed``: linear to
``feat_dim``, then L2 norm) of the penultimate features. Each sample of the train split has a row in two
memories, one per network. A student anchor e_s is scored against the teacher memory's row of its own
sample (the positive) and of ``nce_k`` other samples (negatives): P = exp(mᵀe_s/τ)/Z; the teacher anchor
against the student memory likewise; both go through the NCE critic loss (§3.2–3.4, the critic
h = P/(P + K/N); ``kdlab.losses.crd.nce_loss``). Then each network's memory row of the batch's samples
moves towards the new embedding: m ← normalize(m·nce_m + e·(1 − nce_m)).

As the official code (HobbitLong/RepDistiller: ``crd/criterion.py``, ``crd/memory.py``, ``train_student.py``,
``helper/loops.py``, ``dataset/cifar100.py``; mdistiller ``distillers/CRD.py``):

* memories initialised uniform in ±1/√(feat_dim/3); the normalisation constants Z (one per direction) set on
  the first batch to mean(exp(·/τ))·N and then fixed;
* negatives per sample drawn (without replacement) from the samples of *other classes*
  (``CIFAR100InstanceSample``, ``mode='exact'``: the positive is the sample itself);
* defaults ``feat_dim`` 128, ``nce_k`` 16384, ``nce_t`` 0.07, ``nce_m`` 0.5, the pooled features
  (``feat[-1]``), and the weights of the README's CRD command ``-r 1 -a 0 -b 0.8`` (CRD alone, the 75.51 of
  the published table); ``kl_weight: 1`` (with ``kd_T`` 4) is its "CRD+KD" command ``-a 1 -b 0.8``.

kdlab's form: the memories, the constants Z, the labels seen so far and the sampling seed are buffers, so a
checkpoint carries them and a resumed run is exact. The loop's ``Batch.indices`` give the samples' rows.
The official dataset knows every label in advance; here a sample's label is learned when its batch first
comes, so in the first epoch a not-yet-seen sample of the anchor's class can be drawn as a negative (from the
second epoch on, the official distribution). Negatives are drawn from a generator seeded by the saved seed
and the step, not by a global stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kdlab.config.validate import Count, NonNegative, Positive, UnitInterval, Width
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.losses.crd import contrast_scores, l2_normalize, momentum_rows, nce_loss, sample_negatives
from kdlab.methods.base import Method
from kdlab.methods.zoo_common import pair_shapes
from kdlab.registry import register


@dataclass
class CRDHparams:
    ce_weight: NonNegative = 1.0  # RepDistiller -r
    kl_weight: NonNegative = 0.0  # -a: 0 for CRD, 1 for CRD+KD
    crd_weight: NonNegative = 0.8  # -b
    temperature: Positive = 4.0  # --kd_T, for the KD term
    feat_dim: Width = 128  # --feat_dim
    nce_k: Count = 16384  # --nce_k: negatives per sample
    nce_t: Positive = 0.07  # --nce_t
    nce_m: UnitInterval = 0.5  # --nce_m: the memory's momentum
    negatives: Literal["other_classes", "any"] = "other_classes"  # official dataset: other classes' samples
    student_tap: str = "pool"  # the penultimate features (official feat[-1])
    teacher_tap: str = "pool"


class Embed(nn.Module):
    """Official ``Embed``: flatten, linear to ``feat_dim``, L2-normalise."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.linear(x.reshape(x.shape[0], -1)))


@register("method", "crd")
class CRD(Method):
    """Contrastive representation distillation: CE + 0.8 · NCE over a momentum memory of 16,384 negatives."""

    Hparams = CRDHparams
    per_sample_state = True  # a memory row per train sample

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if train_size is None:
            raise KdlabError("method crd keeps a memory row per train sample and needs the samples' indices; build "
                             "it with build_method(..., train_size=len(splits.train[0])) on a dataset that gives them")
        if hparams.nce_k > train_size - 1:
            raise KdlabError(f"method.nce_k: {hparams.nce_k} negatives per sample, but the train split has "
                             f"{train_size} samples; set nce_k to at most {train_size - 1}")
        [(s_shape, t_shape)] = pair_shapes("crd", (hparams.student_tap,), (hparams.teacher_tap,), student=student,
                                           teacher=teacher, input_shape=input_shape, maps=False)
        self.student_taps, self.teacher_taps = (hparams.student_tap,), (hparams.teacher_tap,)
        self.embed_s = Embed(math.prod(s_shape), hparams.feat_dim)
        self.embed_t = Embed(math.prod(t_shape), hparams.feat_dim)
        self.train_size = int(train_size)
        device = next(iter(student.parameters()), torch.zeros(())).device
        stdv = 1.0 / math.sqrt(hparams.feat_dim / 3)
        # memory_s holds student embeddings (official memory_v1), memory_t the teacher's (memory_v2).
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(train_size, hparams.feat_dim, device=device) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0, device=device))  # Z of (student, teacher) anchors; < 0: unset
        self.register_buffer("labels", torch.full((train_size,), -1, dtype=torch.long, device=device))
        self.register_buffer("sample_seed", torch.randint(0, 2**62, (1,)).to(device))

    def _generator(self, device: torch.device) -> torch.Generator:
        seed = int(self.sample_seed) * 1_000_003 + self.step + 0x9E3779B97F4A7C15 * self.micro_batch
        return torch.Generator(device=device).manual_seed(seed % 2**63)

    def contrast_index(self, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, K+1): each sample's own row, then its ``nce_k`` negatives."""
        excluded = None
        if self.hparams.negatives == "other_classes":
            excluded = self.labels.unsqueeze(0) == labels.unsqueeze(1)
        negatives = sample_negatives(indices, self.hparams.nce_k, self.train_size, self._generator(indices.device),
                                     excluded=excluded)
        return torch.cat([indices.unsqueeze(1), negatives], dim=1)

    def crd_loss(self, f_s: torch.Tensor, f_t: torch.Tensor, indices: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
        """Both directions' NCE loss on the memories as they are, then the memories' momentum update."""
        h = self.hparams
        e_s, e_t = self.embed_s(f_s.float()), self.embed_t(f_t.float())
        out_s = contrast_scores(e_s, self.memory_t, index, h.nce_t)  # student anchors, teacher memory
        out_t = contrast_scores(e_t, self.memory_s, index, h.nce_t)
        with torch.no_grad():
            for i, out in enumerate((out_s, out_t)):
                if self.z[i] < 0:  # set once, on the first batch (official ContrastMemory)
                    self.z[i] = out.mean() * self.train_size
        loss = nce_loss(out_s / self.z[0], self.train_size) + nce_loss(out_t / self.z[1], self.train_size)
        with torch.no_grad():
            self.memory_s.index_copy_(0, indices, momentum_rows(self.memory_s[indices], e_s, h.nce_m))
            self.memory_t.index_copy_(0, indices, momentum_rows(self.memory_t[indices], e_t, h.nce_m))
        return loss

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        if batch.indices is None:
            raise KdlabError("method crd: the batch has no sample indices (Batch.indices); CRD's memory needs each "
                             "sample's train-split position, so the dataset must supply them")
        indices = batch.indices.to(self.memory_s.device).long()
        with torch.no_grad():
            self.labels[indices] = batch.labels.to(self.labels.device).long()
            index = self.contrast_index(indices, self.labels[indices])
        # exp(·/0.07) overflows half precision: the contrast runs in float32 whatever the loop's autocast.
        with torch.autocast(indices.device.type, enabled=False):
            crd = self.crd_loss(student_out.features[h.student_tap], teacher_out.features[h.teacher_tap], indices,
                                index)
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "kl": h.kl_weight * kl(student_out.logits, teacher_out.logits, temperature=h.temperature),
                "crd": h.crd_weight * crd}

    def metrics(self) -> dict[str, float]:
        return {"z_student": float(self.z[0]), "z_teacher": float(self.z[1])}
