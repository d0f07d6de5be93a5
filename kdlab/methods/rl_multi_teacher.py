"""Reinforced multi-teacher KD: a policy network picks (or weighs) a teacher per sample, trained by REINFORCE.

After Yuan et al., "Reinforced Multi-Teacher Selection for Knowledge
Distillation", AAAI 2021 (arXiv 2012.06048): an agent sees, per training
sample, features of the teachers and of the student, and decides which
teachers the student distils from on that sample; it is trained by policy
gradient on a reward measured on the student. What is theirs and what is ours
is listed at the end.

Per sample i with label y_i and K ≥ 2 teachers (member logits z_k, student z_s):

    state  s_i = [c_1..c_K, ℓ_1..ℓ_K, ℓ_s, (κ_1..κ_K)]        (``policy_features``, all at T = 1)
             c_k = max_c softmax(z_k)_c        teacher k's confidence
             ℓ_k = −log softmax(z_k)_{y_i}     teacher k's cross-entropy with the label
             ℓ_s = −log softmax(z_s)_{y_i}     the student's cross-entropy with the label
             κ_k = KL(softmax(z_k) ‖ softmax(z_s))   (``kl_features``)
    policy π_φ: a two-layer tanh MLP on [c, log(1 + ℓ), log(1 + ℓ_s), log(1 + κ)], output h_i ∈ R^K
    action  mode "choice":  a_i ∼ Categorical(softmax(h_i)), w_i = onehot(a_i)       (one teacher per sample)
            mode "weights": w_i ∼ Dirichlet(α_i), α_i = softplus(h_i + softplus⁻¹(α_0)) + 10⁻³   (a point
                            of the simplex: soft weights, explored by sampling; α_0 = ``concentration``)
    student L = α · T² · KL(Σ_k w_ik p_T^k ‖ p_T^s) + (1 − α) · CE(y, p_1^s)   (mean over non-probe samples)

With a one-hot w_i the KD term is exactly Hinton KD from the chosen teacher.

The reward (one number per step, for the whole batch's actions). The method
keeps a held-out *probe*: ``probe_size`` samples (at most half the train
split) taken from the first batches it sees — at most half of each batch, so
no batch is emptied — whose inputs (as that step saw them, after any
``data.augment``) and labels it stores. Probe samples never
count in the student's loss (the loop still feeds them through the student in
train mode when they recur in a batch: their inputs touch BatchNorm's batch
statistics, their labels and targets never a gradient). With
``P(θ) = mean_{(x, y) ∈ probe} CE(y, student_θ(x))``, the student in eval mode:

    r_k = P(θ_k) − P(θ_{k+1})

where θ_k are the student's weights before optimiser step k and θ_{k+1} after
it: the drop of the probe loss caused by the step taken on batch k with the
actions sampled for batch k (positive = the step helped). It is computed at
the next step's adversary step (``adversary_loss``, which the loop runs before
the student's step, so the student there is θ_{k+1}); P(θ_{k+1}) is then kept
as the "before" of step k + 1, so each step costs one probe forward. The last
step's actions get no reward; steps before the probe is full get none either.

The policy update (the adversary optimiser, ``policy_lr``, one step per
student step, the main optimiser never touches φ):

    L_π = −mean_{i ∉ probe} Â_k · log π_φ(w_i | s_i),   Â_k = (r_k − b_k) / σ_k

REINFORCE with a baseline (Williams 1992; ``kdlab.methods.reinforce``): b_k
is the bias-corrected EMA of the earlier rewards r_0..r_{k−1} (``baseline_decay``;
0 before any), so it does not depend on batch k's actions and the estimator
stays unbiased. σ_k (``normalize_advantage``) is the bias-corrected EMA root
mean square of the advantages r − b *including* this one: a positive scale that
makes the step size independent of the reward's units (probe-loss drops are
~10⁻³ per step), at the price of a small bias of order 1 − ``baseline_decay``.
The mean over samples of a batch-level reward is the joint-action estimator
(log π of the batch's actions is Σ_i log π(w_i | s_i)) divided by the number
of non-probe samples. The log-probabilities are recomputed at the adversary step from the
stored states and actions with the same φ that sampled them (φ changes only
at adversary steps), so the update is on-policy. A non-finite reward raises
``NonFiniteLossError`` (a ``KdlabError``); the last good checkpoint is kept.

Randomness: actions come from the global RNG, which the loop checkpoints, so a
resumed run replays them; the pending (unrewarded) actions, the baseline, the
probe and the policy are buffers and parameters of this method, saved with it.

From the paper (checked against its abstract and published summaries): an RL
agent assigns teachers per training instance; its state combines per-teacher
prediction probabilities and cross-entropy losses (the paper also uses an
instance embedding, which we omit: kdlab's teachers expose logits only); it is
trained by policy gradient. Ours, not the paper's: the exact features above
(confidence instead of the full probability vector, the student's loss and
teacher–student KL added), a softmax "choice" / Dirichlet "weights" policy
instead of the paper's logistic per-teacher selection probabilities, the held-out
probe reward, the EMA baseline and the advantage normalisation.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Interval
import torch
from torch import nn

from kdlab.config.validate import Count, Positive, UnitInterval, Width
from kdlab.errors import KdlabError, NonFiniteLossError
from kdlab.losses import cross_entropy
from kdlab.methods.base import Method
from kdlab.methods.reinforce import categorical_log_prob, debiased, ema_update, reinforce_loss, sample_categorical
from kdlab.models.ensemble import TeacherEnsemble
from kdlab.registry import register


MODES = ("choice", "weights")
_PENDING = ("pending_features", "pending_weights", "pending_mask")  # per-batch buffers: their size varies


@dataclass
class RLMultiTeacherHparams:
    mode: Literal["choice", "weights"] = "choice"  # one sampled teacher per sample, or Dirichlet-sampled weights
    temperature: Positive = 4.0  # T of the KD term
    alpha: UnitInterval = 0.9  # weight of the KD term; 1 − α weighs the label term
    kl_features: bool = True  # add each teacher's KL(teacher ‖ student) at T = 1 to the policy's state
    hidden: Width = 32  # hidden units of the policy MLP
    policy_lr: Positive = 1e-3  # learning rate of the policy's own optimiser (train.optimizer, no weight decay)
    baseline_decay: Annotated[float, Interval(ge=0, lt=1)] = 0.9  # EMA decay of the reward baseline (and of the advantage scale), in [0, 1)
    normalize_advantage: bool = True  # divide r − b by its running RMS (reward units → unit scale)
    probe_size: Count = 64  # held-out probe samples for the reward (capped at half the train split)
    concentration: Positive = 1.0  # mode weights: initial Dirichlet α per teacher (1 = uniform on the simplex)


def policy_features(member_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, *,
                    kl_features: bool = True) -> torch.Tensor:
    """The policy's state per sample: (N, 2K + 1) or (N, 3K + 1), float32 (float64 stays), detached.

    ``member_logits`` (K, N, C), ``student_logits`` (N, C), ``labels`` (N,) int.
    Columns: K teacher confidences max_c p_k, K teacher cross-entropies −log p_k[y],
    the student's cross-entropy −log q[y], then (``kl_features``) K values
    KL(p_k ‖ q); every distribution at T = 1. All but the first K columns are in nats.
    """
    dtype = torch.promote_types(member_logits.dtype, torch.float32)
    log_p = torch.log_softmax(member_logits.detach().to(dtype), dim=-1)  # (K, N, C)
    log_q = torch.log_softmax(student_logits.detach().to(dtype), dim=-1)  # (N, C)
    index = labels.long().view(1, -1, 1).expand(log_p.shape[0], -1, 1)  # (K, N, 1)
    columns = [log_p.amax(dim=-1).exp().T, -log_p.gather(-1, index).squeeze(-1).T,
               -log_q.gather(-1, labels.long().view(-1, 1))]  # (N, K), (N, K), (N, 1)
    if kl_features:
        columns.append((log_p.exp() * (log_p - log_q)).sum(dim=-1).T)  # (N, K)
    return torch.cat(columns, dim=1)


def mixture_kd(student_logits: torch.Tensor, member_logits: torch.Tensor, weights: torch.Tensor, *,
               temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · KL(Σ_k w_ik p_T^k ‖ p_T^s), averaged over the samples where ``mask`` is True (all when None).

    ``member_logits`` (K, N, C), ``weights`` (N, K) rows on the simplex (one-hot:
    Hinton KD from one teacher, §2 of Hinton et al. 2015, exactly: log p̄ is
    logsumexp(log w + log p), and log 0 = −inf drops the others). Computed in at
    least float32; an all-False mask gives 0.
    """
    dtype = torch.promote_types(torch.promote_types(member_logits.dtype, student_logits.dtype), torch.float32)
    log_p = torch.log_softmax(member_logits.to(dtype) / temperature, dim=-1)  # (K, N, C)
    log_w = weights.to(dtype).T.log().unsqueeze(-1)  # (K, N, 1)
    log_mix = torch.logsumexp(log_w + log_p, dim=0)  # (N, C)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    per_sample = temperature**2 * (log_mix.exp() * (log_mix - log_q)).sum(dim=-1)  # (N,)
    if mask is None:
        return per_sample.mean()
    zero = torch.zeros((), dtype=dtype, device=per_sample.device)
    return torch.where(mask, per_sample, zero).sum() / mask.sum().clamp(min=1)


class PolicyNet(nn.Module):
    """The selector: features (N, F) → h (N, K); the loss columns enter as log(1 + x) (nats can be large)."""

    def __init__(self, num_features: int, num_teachers: int, hidden: int):
        super().__init__()
        self.num_teachers = num_teachers
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, num_teachers))
        nn.init.zeros_(self.net[-1].weight)  # a uniform policy at the start: every teacher equally likely
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        k = self.num_teachers
        x = torch.cat([features[:, :k], torch.log1p(features[:, k:].clamp(min=0))], dim=1)
        return self.net(x.to(self.net[0].weight.dtype))


def _check(h: RLMultiTeacherHparams) -> None:
    def number(name, ok, what):
        value = getattr(h, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or not ok(value):
            raise KdlabError(f"method.{name}: must be {what}, got {value!r}")

    if h.mode not in MODES:
        raise KdlabError(f"method.mode: {h.mode!r} is not one of {', '.join(MODES)}")
    number("temperature", lambda v: v > 0, "a finite number > 0")
    number("alpha", lambda v: 0 <= v <= 1, "in [0, 1]")
    number("policy_lr", lambda v: v > 0, "a finite number > 0")
    number("baseline_decay", lambda v: 0 <= v < 1, "in [0, 1)")
    number("concentration", lambda v: v > 0, "a finite number > 0")
    for name in ("hidden", "probe_size"):
        value = getattr(h, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise KdlabError(f"method.{name}: must be an integer >= 1, got {value!r}")


@register("method", "rl_multi_teacher")
class RLMultiTeacher(Method):
    """Multi-teacher KD with a REINFORCE-trained per-sample teacher selector; reward = held-out probe loss drop."""

    Hparams = RLMultiTeacherHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        h = hparams
        if not isinstance(teacher, TeacherEnsemble) or len(teacher) < 2:
            got = f"{len(teacher)} member" if isinstance(teacher, TeacherEnsemble) else "a single network"
            raise KdlabError(f"teacher.members: method rl_multi_teacher selects among several teachers but got {got}; "
                             "list at least 2 teachers under teacher.members")
        _check(h)
        if input_shape is None or train_size is None:
            raise KdlabError("method rl_multi_teacher keeps a held-out probe batch: build it with "
                             "build_method(..., input_shape=splits.input_shape, train_size=len(splits.train[0]))")
        self.probe_size = min(int(h.probe_size), int(train_size) // 2)  # the rest of the split trains
        if self.probe_size < 1:
            raise KdlabError(f"method.probe_size: the train split has {train_size} sample(s); rl_multi_teacher "
                             "needs at least 2 (half at most go to the held-out probe)")
        self.teacher_taps = tuple(teacher.feature_stages)  # "members.0", ..., one per teacher
        k = len(teacher)
        num_features = (3 if h.kl_features else 2) * k + 1
        self.policy = PolicyNet(num_features, k, int(h.hidden))
        # c0 = softplus⁻¹(α_0) = log(e^α₀ − 1), written stably: the Dirichlet's α when the policy outputs 0.
        self._concentration_shift = h.concentration + math.log(-math.expm1(-h.concentration))
        self.adversary_lr = float(h.policy_lr)
        self.adversary_every = 1  # the reward of step k is read at step k + 1: every step
        self.adversary_steps = 1
        self.__dict__["_student"] = student  # a plain reference: the student is not part of the method's state
        # The held-out probe (filled from the first batches) and which train samples it holds.
        self.register_buffer("probe_inputs", torch.zeros(self.probe_size, *input_shape))
        self.register_buffer("probe_labels", torch.zeros(self.probe_size, dtype=torch.long))
        self.register_buffer("probe_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("is_probe", torch.zeros(int(train_size), dtype=torch.bool))
        # REINFORCE state: the baseline's and the advantage scale's EMAs, the rewards seen, the last reward
        # (float32, not float64: MPS has no float64, and the probe losses are float32 anyway).
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("advantage_square", torch.zeros(()))
        self.register_buffer("reward_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_reward", torch.zeros(()))  # 0 until the first reward
        # The last batch's states and actions, awaiting their reward, and the probe loss before their step.
        self.register_buffer("pending_features", torch.zeros(0, num_features))
        self.register_buffer("pending_weights", torch.zeros(0, k))
        self.register_buffer("pending_mask", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("pending_probe_loss", torch.zeros(()))
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool))
        # This epoch's selection statistics (logged by metrics(); reset at each epoch's first step).
        self.register_buffer("selection_sum", torch.zeros(k), persistent=False)
        self.register_buffer("selection_count", torch.zeros(()), persistent=False)
        self._probe_loss_now: torch.Tensor | None = None  # P(θ_k), set by this step's adversary_loss
        self._full = False  # cache of probe_count == probe_size (reset when a state is loaded)

    # -- the policy --------------------------------------------------------------------------------------

    def _concentrations(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(h + self._concentration_shift) + 1e-3

    def act(self, features: torch.Tensor) -> torch.Tensor:
        """Sampled teacher weights (N, K) for states ``features`` (one-hot in mode choice); global RNG, no grad."""
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
            h = self.policy(features)
            if self.hparams.mode == "choice":
                choice = sample_categorical(torch.softmax(h.float(), dim=-1))
                return torch.nn.functional.one_hot(choice, h.shape[-1]).float()
            w = torch.distributions.Dirichlet(self._concentrations(h.float()), validate_args=False).sample()
            w = w.clamp(min=1e-6)  # a finite log-density: small α can underflow a coordinate to 0
            return w / w.sum(dim=-1, keepdim=True)

    def log_probs(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """log π_φ(w_i | s_i) per sample (N,), differentiable in the policy's parameters."""
        with torch.autocast(features.device.type, enabled=False):
            h = self.policy(features).float()
            if self.hparams.mode == "choice":
                return categorical_log_prob(h, weights.argmax(dim=-1))
            return torch.distributions.Dirichlet(self._concentrations(h), validate_args=False).log_prob(weights)

    # -- the held-out probe and the reward ---------------------------------------------------------------

    def make_batch(self, batch):
        """Fill the probe from the first batches (up to half of each); the batch itself is returned unchanged."""
        if batch.indices is not None and not self._probe_full():
            count = int(self.probe_count)
            fresh = (~self.is_probe[batch.indices]).nonzero().flatten()
            take = fresh[:min(self.probe_size - count, len(batch.indices) // 2)]
            self.probe_inputs[count:count + len(take)] = batch.inputs[take].to(self.probe_inputs.dtype)
            self.probe_labels[count:count + len(take)] = batch.labels[take]
            self.is_probe[batch.indices[take]] = True
            self.probe_count += len(take)
        return batch

    def _probe_full(self) -> bool:
        """Whether the probe holds all its samples (read from the device until it does, then cached)."""
        if not self._full:
            self._full = int(self.probe_count) >= self.probe_size
        return self._full

    @torch.no_grad()
    def probe_loss(self) -> torch.Tensor:
        """P(θ): the student's mean cross-entropy on the probe, in eval mode (float32 scalar, no grad)."""
        student = self._student
        was_training = student.training
        student.eval()  # no BatchNorm statistic updates or dropout: P is a function of the weights alone
        try:
            logits = student(self.probe_inputs)
        finally:
            student.train(was_training)
        return cross_entropy(logits.float(), self.probe_labels)

    def _advantage(self, reward: float) -> float:
        """Â = (r − b)/σ from the EMA state, then fold r into the baseline (b uses earlier rewards only)."""
        h = self.hparams
        decay, count = h.baseline_decay, int(self.reward_count)
        advantage = reward - float(debiased(self.baseline, decay, count))
        self.baseline.copy_(ema_update(self.baseline, reward, decay))
        self.advantage_square.copy_(ema_update(self.advantage_square, advantage**2, decay))
        self.reward_count += 1
        self.last_reward.fill_(reward)
        if h.normalize_advantage:
            scale = math.sqrt(float(debiased(self.advantage_square, decay, count + 1)))
            advantage = advantage / scale if scale > 0 else 0.0
        return advantage

    def adversary_parameters(self):
        return list(self.policy.parameters())

    def adversary_loss(self, batch, student_out, teacher_out):
        """The policy's REINFORCE step for the previous batch's actions (see the module docstring)."""
        self._probe_loss_now = None
        zero = sum(p.sum() for p in self.policy.parameters()) * 0.0  # no update, but a graph to backprop
        self.adversary_metrics = {}
        if not self._probe_full():  # still filling: no reward can be measured yet
            return {"policy": zero}
        after = self.probe_loss()
        self._probe_loss_now = after  # the "before" of this step's actions
        if not bool(self.has_pending):
            return {"policy": zero}
        self.has_pending.fill_(False)
        reward = float(self.pending_probe_loss - after)
        if not math.isfinite(reward):
            raise NonFiniteLossError(
                f"method rl_multi_teacher: the reward became non-finite ({reward}; probe loss before "
                f"{float(self.pending_probe_loss)}, after {float(after)}) at step {self.step}; lower train.lr "
                "or set train.grad_clip")
        advantage = self._advantage(reward)
        log_probs = self.log_probs(self.pending_features, self.pending_weights)
        self.adversary_metrics = {"reward": reward, "advantage": advantage}
        return {"policy": reinforce_loss(log_probs, advantage, 0.0, mask=self.pending_mask)}

    # -- the student's loss ------------------------------------------------------------------------------

    def set_progress(self, step, total_steps):
        super().set_progress(step, total_steps)
        if self.steps_per_epoch and step % self.steps_per_epoch == 0:  # an epoch's first step
            self.selection_sum.zero_()
            self.selection_count.zero_()

    def loss_terms(self, batch, student_out, teacher_out):
        h = self.hparams
        if batch.indices is None:
            raise KdlabError("method rl_multi_teacher needs the batch's train-split indices (Batch.indices) to keep "
                             "its held-out probe samples out of the loss; the training loop passes them")
        members = torch.stack([teacher_out.features[name] for name in self.teacher_taps])  # (K, N, C)
        features = policy_features(members, student_out.logits, batch.labels, kl_features=h.kl_features)
        features = features.to(self.pending_features.dtype)
        weights = self.act(features)  # (N, K)
        train_mask = ~self.is_probe[batch.indices]  # probe samples never reach the student's loss
        # Keep the states and actions for their REINFORCE update at the next step's adversary step.
        self.pending_features, self.pending_weights, self.pending_mask = features, weights, train_mask
        if self._probe_loss_now is not None:
            self.pending_probe_loss.copy_(self._probe_loss_now)
            self.has_pending.fill_(True)
        self._probe_loss_now = None
        self.selection_sum += (weights * train_mask.unsqueeze(1)).sum(dim=0)
        self.selection_count += train_mask.sum()
        kd = mixture_kd(student_out.logits, members, weights, temperature=h.temperature, mask=train_mask)
        return {
            "kd": h.alpha * kd,
            "ce": (1.0 - h.alpha) * cross_entropy(student_out.logits, batch.labels, mask=train_mask),
        }

    def metrics(self) -> dict[str, float]:
        """This epoch's mean weight per teacher (choice: its selection frequency), the last reward and baseline."""
        freq = (self.selection_sum / self.selection_count.clamp(min=1)).tolist()
        out = {f"select_{k}": float(v) for k, v in enumerate(freq)}
        decay = self.hparams.baseline_decay
        out["reward"] = float(self.last_reward)
        out["baseline"] = float(debiased(self.baseline, decay, int(self.reward_count)))
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The pending buffers hold one batch: resize them to the saved batch before copying into them.
        for name in _PENDING:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                current = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))
        self._probe_loss_now, self._full = None, False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
