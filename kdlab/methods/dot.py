"""DOT — Zhao, Cui, Song & Liang (ICCV 2023, arXiv:2307.08436), "DOT: A Distillation-Oriented Trainer".

KD's loss (Hinton et al. 2015) trained by an optimiser with one momentum per loss (the paper's DOT update):

    L_task = ce_weight · CE(y, p_s)           L_kd = kd_weight · T²·KL(p_t^T ‖ p_s^T)
    v_task ← (β − Δ)·v_task + ∇L_task + wd·θ   v_kd ← (β + Δ)·v_kd + ∇L_kd
    θ ← θ − lr·(v_task + v_kd)

The larger distillation momentum lets the KD gradient dominate the update where the two conflict, which
the paper finds breaks the trade-off between the two losses. β and the weight decay are ``train.momentum``
and ``train.weight_decay`` (``train.optimizer: sgd``); the update is ``kdlab.engine.optim.dot_update``, the
optimiser ``DistillationOrientedTrainer``, supplied through ``Method.make_optimizer``.

As mdistiller (``mdistiller/engine/dot.py``, ``trainer.py`` class ``DOT``, ``configs/cifar100/dot/*.yaml``,
``engine/cfg.py``): Δ = 0.075 (``SOLVER.DOT.DELTA``) around β = 0.9, task momentum β − Δ and KD momentum
β + Δ; the KD distiller's T = 4, CE weight 0.1 and KD weight 0.9 (``CFG.KD``).
"""
from __future__ import annotations

from dataclasses import dataclass

from kdlab.config.validate import NonNegative, Positive, UnitInterval
from kdlab.engine import distributed
from kdlab.engine.optim import DistillationOrientedTrainer
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Method
from kdlab.registry import register


def train_problems(train, delta: float) -> list[str]:
    """Why a train section cannot run DOT's optimiser (config check and build alike)."""
    found = []
    if train.optimizer != "sgd":
        found.append(f"train.optimizer: method dot is SGD with two momenta; set train.optimizer: sgd "
                     f"(not {train.optimizer})")
    elif train.nesterov:
        found.append("train.nesterov: method dot's momenta are plain (heavy-ball) momentum; set train.nesterov: false")
    elif not 0.0 <= train.momentum - delta <= train.momentum + delta < 1.0:
        found.append(f"method.delta: train.momentum {train.momentum} ± {delta} must stay in [0, 1); lower method.delta")
    if train.grad_clip is not None:
        found.append("train.grad_clip: method dot steps the task and distillation gradients apart, not their "
                     "norm together; set train.grad_clip: null")
    if train.precision == "fp16":
        found.append("train.precision: method dot takes its gradients apart without fp16's loss scaling; use "
                     "bf16 or fp32")
    if getattr(train, "fused_optimizer", False):
        found.append("train.fused_optimizer: method dot has its own update; set train.fused_optimizer: false")
    return found


@dataclass
class DOTHparams:
    ce_weight: NonNegative = 0.1  # mdistiller CFG.KD.LOSS.CE_WEIGHT
    kd_weight: NonNegative = 0.9  # CFG.KD.LOSS.KD_WEIGHT
    temperature: Positive = 4.0  # CFG.KD.TEMPERATURE
    delta: UnitInterval = 0.075  # Δ: task momentum β − Δ, distillation momentum β + Δ (SOLVER.DOT.DELTA)

    @staticmethod
    def check_config(cfg, errors: list[str]) -> None:
        delta = cfg.method.options.get("delta", DOTHparams.delta)
        if isinstance(delta, (int, float)):
            errors.extend(train_problems(cfg.train, float(delta)))


@register("method", "dot")
class DOT(Method):
    """KD trained by the distillation-oriented trainer: momentum β − Δ for CE, β + Δ for KD."""

    Hparams = DOTHparams

    def make_optimizer(self, params, train):
        problems = train_problems(train, self.hparams.delta)
        if problems:
            raise KdlabError(problems[0])
        if distributed.current() is not None:
            raise KdlabError("method dot takes its two losses' gradients apart, which torchrun's gradient "
                             "averaging does not; run it in one process (kdlab run without torchrun)")
        return DistillationOrientedTrainer(params, lr=train.lr, momentum=train.momentum, delta=self.hparams.delta,
                                           weight_decay=train.weight_decay, distill_terms=("kd",))

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        return {"ce": h.ce_weight * cross_entropy(student_out.logits, batch.labels),
                "kd": h.kd_weight * kl(student_out.logits, teacher_out.logits, temperature=h.temperature)}
