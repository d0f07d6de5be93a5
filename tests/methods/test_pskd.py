"""PS-KD: the α_t schedule and targets against the official formula, the per-sample memory, exact resume."""
from __future__ import annotations

import json

import pytest
import torch

from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.methods.base import Batch, Outputs
from kdlab.methods.pskd import ProgressiveTargets, pskd_alpha, pskd_targets


def _splits(tmp_path):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 240, "num_test": 90,
                                      "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                        val_fraction=0.2, split_seed=0)  # 192 train samples


def _student(splits, seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", {"width": 8, "dropout": 0.1}, splits)  # dropout: the global RNG matters on resume


def _pskd(student, splits, **options):
    return build_method(MethodConfig("pskd", options), student=student, teacher=None,
                        input_shape=tuple(splits.input_shape), train_size=len(splits.train[0]))


def _train(**overrides):
    base = dict(epochs=4, batch_size=32, lr=0.01, checkpoint_every=1, eval_every=1, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def test_alpha_schedule_matches_the_official_formula():
    # alpha_t = alpha_T * (epoch + 1) / E, epoch 0-based (PS-KD main.py): alpha_T = 0.8, E = 4
    assert [pskd_alpha(0.8, t, 4) for t in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # The loop's step -> epoch arithmetic: N = 10 samples, batches of 4 -> 3 steps per epoch; 12 steps -> E = 4.
    memory = ProgressiveTargets(0.8, train_size=10, num_classes=3, method="pskd")
    seen = [memory.schedule(step, 12, 4) for step in range(12)]
    assert [epoch for epoch, _, _ in seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert {epochs for _, epochs, _ in seen} == {4}
    assert [alpha for _, _, alpha in seen[::3]] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # A budget of 7 steps ends inside the third epoch: E = ceil(7 / 3) = 3, and that epoch gets alpha_T.
    assert ProgressiveTargets(0.8, train_size=10, num_classes=3, method="pskd").schedule(6, 7, 4) == \
        (2, 3, pytest.approx(0.8))


def test_targets_mix_onehot_and_previous_prediction():
    # y = 1, previous prediction (0.2, 0.5, 0.3), alpha = 0.4:
    # 0.6 * (0, 1, 0) + 0.4 * (0.2, 0.5, 0.3) = (0.08, 0.8, 0.12)
    previous = torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]])
    labels = torch.tensor([1, 1])
    targets = pskd_targets(labels, previous, 0.4, seen=torch.tensor([True, False]))
    torch.testing.assert_close(targets[0], torch.tensor([0.08, 0.8, 0.12]))
    torch.testing.assert_close(targets[1], torch.tensor([0.0, 1.0, 0.0]))  # nothing stored yet: the one-hot label


def test_first_epoch_is_cross_entropy_and_second_uses_first_epochs_predictions(tmp_path):
    # 6 samples, batches of 3: 2 steps per epoch; 4 steps -> E = 2, alpha_0 = 0.4, alpha_1 = 0.8.
    student = torch.nn.Linear(2, 3)
    method = build_method(MethodConfig("pskd", {"alpha_T": 0.8}), student=student, teacher=None,
                          input_shape=(2,), train_size=6)
    assert tuple(method.progressive.memory.shape) == (6, 3)  # C from probing the student
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    stored = {}
    epoch0 = [torch.tensor([4, 0, 2]), torch.tensor([1, 5, 3])]
    for step, index in enumerate(epoch0):
        logits = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        method.set_progress(step, 4)
        terms = method.loss_terms(Batch(torch.zeros(3, 2), labels[index], index), Outputs(logits), None)
        assert method.progressive.alpha == pytest.approx(0.4)
        ce = torch.nn.functional.cross_entropy(logits, labels[index])
        assert terms["pskd"].item() == pytest.approx(ce.item(), abs=1e-12)  # one-hot targets at epoch 0
        for row, i in enumerate(index.tolist()):
            stored[i] = logits[row].softmax(-1)
    epoch1 = [torch.tensor([3, 4, 1]), torch.tensor([0, 2, 5])]
    for step, index in enumerate(epoch1, start=2):
        logits = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        method.set_progress(step, 4)
        terms = method.loss_terms(Batch(torch.zeros(3, 2), labels[index], index), Outputs(logits), None)
        assert method.progressive.alpha == pytest.approx(0.8)
        expected = 0.0
        for row, i in enumerate(index.tolist()):
            target = 0.2 * torch.nn.functional.one_hot(labels[i], 3).double() + 0.8 * stored[i]
            expected += -(target * logits[row].log_softmax(-1)).sum().item()
        assert terms["pskd"].item() == pytest.approx(expected / 3, rel=1e-6)  # memory is float32
    for i in range(6):  # after epoch 1 the memory holds epoch 1's predictions, not epoch 0's
        assert not torch.allclose(method.progressive.memory[i].double(), stored[i], atol=1e-3)
    assert bool(method.progressive.seen.all())


def test_alpha_follows_the_epochs_of_a_real_run(tmp_path):
    splits = _splits(tmp_path)  # 192 samples in batches of 50: 4 steps per epoch, the last of 42
    student = _student(splits)
    method = _pskd(student, splits, alpha_T=0.9)
    alphas = []
    fit(student=student, method=method, teacher=None, splits=splits,
        train=_train(epochs=3, batch_size=50), seed=0, on_epoch=lambda e, m: alphas.append(method.progressive.alpha))
    assert alphas == pytest.approx([0.3, 0.6, 0.9])
    assert bool(method.progressive.seen.all())


def test_resume_matches_uninterrupted_run(tmp_path):
    splits = _splits(tmp_path)
    train = _train()

    student = _student(splits)
    method = _pskd(student, splits)
    straight = fit(student=student, method=method, teacher=None, splits=splits, train=train, seed=5,
                   run_dir=tmp_path / "straight")
    straight_weights = {k: v.clone() for k, v in student.state_dict().items()}
    straight_memory = method.progressive.memory.clone()

    class Crash(Exception):
        pass

    def crash_in_epoch_3(epoch, metrics):
        if epoch == 3:  # after epoch 3's metrics, before its checkpoint: epoch 2 is the last on disk
            raise Crash

    student = _student(splits)
    with pytest.raises(Crash):
        fit(student=student, method=_pskd(student, splits), teacher=None, splits=splits, train=train, seed=5,
            run_dir=tmp_path / "killed", on_epoch=crash_in_epoch_3)
    assert json.loads((tmp_path / "killed/checkpoints/latest.json").read_text())["epoch"] == 2

    student2 = _student(splits, seed=999)  # a fresh process: other weights, an empty memory
    method2 = _pskd(student2, splits)
    resumed_epochs = []
    resumed = fit(student=student2, method=method2, teacher=None, splits=splits, train=train, seed=5,
                  run_dir=tmp_path / "killed", on_epoch=lambda e, m: resumed_epochs.append(e))
    assert resumed_epochs == [3, 4]
    for key, value in straight.final.items():
        assert resumed.final[key] == pytest.approx(value, abs=1e-6), key
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(student2.state_dict()[name], tensor, rtol=0, atol=1e-6)
    torch.testing.assert_close(method2.progressive.memory, straight_memory, rtol=0, atol=1e-6)


def test_refuses_a_teacher_and_needs_indices_shape_and_train_size(tmp_path):
    student = torch.nn.Linear(2, 3)
    with pytest.raises(KdlabError, match="distils the student from itself"):
        build_method(MethodConfig("pskd", {}), student=student, teacher=torch.nn.Linear(2, 3), input_shape=(2,),
                     train_size=4)
    with pytest.raises(KdlabError, match="train_size"):
        build_method(MethodConfig("pskd", {}), student=student, teacher=None, input_shape=(2,))
    with pytest.raises(KdlabError, match="input shape"):
        build_method(MethodConfig("pskd", {}), student=student, teacher=None, train_size=4)
    with pytest.raises(KdlabError, match="alpha_T"):
        build_method(MethodConfig("pskd", {"alpha_T": 1.5}), student=student, teacher=None, input_shape=(2,),
                     train_size=4)
    method = build_method(MethodConfig("pskd", {}), student=student, teacher=None, input_shape=(2,), train_size=4)
    logits = torch.zeros(2, 3)
    with pytest.raises(KdlabError, match="Batch.indices"):
        method.loss_terms(Batch(torch.zeros(2, 2), torch.tensor([0, 1])), Outputs(logits), None)
