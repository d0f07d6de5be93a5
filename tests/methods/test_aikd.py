"""AI-KD: its terms against their formulas, the same-architecture rule, and a run through fit()."""
from __future__ import annotations

import math

import pytest
import torch

from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.methods.base import Batch, Outputs


def _splits(tmp_path):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 240, "num_test": 90,
                                      "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                        val_fraction=0.2, split_seed=0)


def _aikd(student, teacher, splits, **options):
    return build_method(MethodConfig("aikd", options), student=student, teacher=teacher,
                        input_shape=tuple(splits.input_shape), train_size=len(splits.train[0]))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_terms_match_their_formulas_on_a_hand_built_batch():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    T, w_kd, w_adv = 2.0, 0.5, 0.3
    method = build_method(MethodConfig("aikd", {"temperature": T, "kd_weight": w_kd, "adversarial_weight": w_adv,
                                                "alpha_T": 0.8}),
                          student=student, teacher=teacher, input_shape=(4,), train_size=4)
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0, -2.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    labels, indices = torch.tensor([0, 2]), torch.tensor([3, 1])
    batch = Batch(torch.zeros(2, 4), labels, indices)
    method.set_progress(0, 4)  # 4 samples in batches of 2: 2 steps per epoch, E = 2; step 0 is in epoch 0

    with torch.no_grad():
        d_real = method.discriminator(t.float().softmax(-1)).double().tolist()
        d_fake = method.discriminator(s.float().softmax(-1)).double().tolist()
    adversary = method.adversary_loss(batch, Outputs(s), Outputs(t))
    # D minimises −log σ(D(p_pre)) − log(1 − σ(D(p_S))), each averaged over the batch; 1 − σ(x) = σ(−x)
    expected_disc = -sum(_log_sigmoid(r) for r in d_real) / 2 - sum(_log_sigmoid(-f) for f in d_fake) / 2
    assert adversary["disc"].item() == pytest.approx(expected_disc, rel=1e-5)
    expected_acc = (sum(r >= 0 for r in d_real) + sum(f < 0 for f in d_fake)) / 4
    assert method.adversary_metrics["disc_acc"] == pytest.approx(expected_acc)

    terms = method.loss_terms(batch, Outputs(s), Outputs(t))
    assert list(terms) == ["pskd", "kd", "adv"]
    # epoch 0: the PS-KD target is the one-hot label, so the term is cross-entropy
    ce = sum(-s[n].log_softmax(-1)[labels[n]].item() for n in range(2)) / 2
    assert terms["pskd"].item() == pytest.approx(ce, rel=1e-9)
    # λ_kd · T² · KL(p_pre^T ‖ p_S^T), mean over the batch
    kl = 0.0
    for n in range(2):
        p = [math.exp(v / T) for v in t[n].tolist()]
        q = [math.exp(v / T) for v in s[n].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl += sum(a * math.log(a / b) for a, b in zip(p, q))
    assert terms["kd"].item() == pytest.approx(w_kd * T * T * kl / 2, rel=1e-9)
    # λ_adv · mean −log σ(D(p_S)): the non-saturating generator loss
    assert terms["adv"].item() == pytest.approx(w_adv * -sum(_log_sigmoid(f) for f in d_fake) / 2, rel=1e-5)

    # Epoch 1 (step 2): the PS-KD term uses the predictions stored at epoch 0, α_1 = 0.8.
    s2 = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 0.5]], dtype=torch.float64)
    method.set_progress(2, 4)
    terms = method.loss_terms(batch, Outputs(s2), Outputs(t))
    target = 0.2 * torch.nn.functional.one_hot(labels, 3).double() + 0.8 * s.softmax(-1)
    expected = -(target * s2.log_softmax(-1)).sum(-1).mean().item()
    assert terms["pskd"].item() == pytest.approx(expected, rel=1e-6)


def test_teacher_of_another_architecture_is_refused(tmp_path):
    splits = _splits(tmp_path)
    student = build_model("mlp", {"width": 8}, splits)
    with pytest.raises(KdlabError, match="pre-trained model of the student's architecture"):
        _aikd(student, build_model("mlp", {"width": 16}, splits), splits)
    with pytest.raises(KdlabError, match="needs a teacher"):
        _aikd(student, None, splits)
    _aikd(student, build_model("mlp", {"width": 8}, splits), splits)  # the same architecture is accepted


def test_fit_trains_student_and_discriminator_apart_and_never_the_teacher(tmp_path, monkeypatch):
    splits = _splits(tmp_path)
    torch.manual_seed(1)
    teacher = build_model("mlp", {"width": 8}, splits)  # stands in for the pre-trained model
    torch.manual_seed(0)
    student = build_model("mlp", {"width": 8}, splits)
    method = _aikd(student, teacher, splits)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    disc_before = {k: v.clone() for k, v in method.discriminator.state_dict().items()}

    moved = []
    original_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        ids = {id(p) for group in self.param_groups for p in group["params"]}
        everything = {id(p): p for p in [*student.parameters(), *method.parameters(), *teacher.parameters()]}
        before = {pid: p.detach().clone() for pid, p in everything.items()}
        out = original_step(self, *args, **kwargs)
        moved.append((ids, {pid for pid, old in before.items() if not torch.equal(old, everything[pid])}))
        if ids == disc_ids:
            assert self.param_groups[0]["lr"] == pytest.approx(1e-3)  # discriminator_lr, not train.lr
        return out

    disc_ids = {id(p) for p in method.discriminator.parameters()}
    student_ids = {id(p) for p in student.parameters()}
    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    epochs = {}
    fit(student=student, method=method, teacher=teacher, splits=splits,
        train=TrainConfig(epochs=2, batch_size=32, lr=0.05, schedule="constant", device="cpu"), seed=0,
        on_epoch=lambda e, m: epochs.__setitem__(e, m))

    adversary_steps = [changed for ids, changed in moved if ids == disc_ids]
    student_steps = [changed for ids, changed in moved if ids == student_ids]
    assert len(adversary_steps) == len(student_steps) == 12 and len(moved) == 24  # 192 / 32 = 6 steps × 2 epochs
    assert all(changed and changed <= disc_ids for changed in adversary_steps)  # D's step moves only D
    assert all(changed and changed <= student_ids for changed in student_steps)  # the student's never moves D
    for name, tensor in teacher_before.items():
        assert torch.equal(teacher.state_dict()[name], tensor), name  # the pre-trained model never changes
    assert any(not torch.equal(method.discriminator.state_dict()[k], v) for k, v in disc_before.items())
    for metrics in epochs.values():
        assert {"train/loss/pskd", "train/loss/kd", "train/loss/adv", "adv/disc", "adv/disc_acc"} <= set(metrics)
        assert 0.0 <= metrics["adv/disc_acc"] <= 1.0
    assert bool(method.progressive.seen.all())  # every train sample's prediction is in the memory
