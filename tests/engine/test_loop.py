"""The one training loop: resume equals uninterrupted, NaN handling, selection, steps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import NonFiniteLossError
from kdlab.methods.base import Method


def _splits(tmp_path):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 240, "num_test": 90,
                                      "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                        val_fraction=0.2, split_seed=0)


def _models(splits, seed=0):
    torch.manual_seed(123)
    teacher = build_model("mlp", {"width": 32}, splits)
    torch.manual_seed(seed)
    student = build_model("mlp", {"width": 8, "dropout": 0.1}, splits)  # dropout: the global RNG matters on resume
    return teacher, student


def _train(**overrides):
    base = dict(epochs=4, batch_size=32, lr=0.01, checkpoint_every=1, eval_every=1, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


class _Crash(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path):
    splits = _splits(tmp_path)
    train = _train()

    teacher, student = _models(splits)
    method = build_method(MethodConfig("kd", {"temperature": 3.0, "alpha": 0.7}), student=student, teacher=teacher)
    straight = fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
                   run_dir=tmp_path / "straight")
    straight_weights = {k: v.clone() for k, v in student.state_dict().items()}

    teacher, student = _models(splits)
    method = build_method(MethodConfig("kd", {"temperature": 3.0, "alpha": 0.7}), student=student, teacher=teacher)
    logged = []

    def crash_in_epoch_3(epoch, metrics):
        logged.append(epoch)
        if epoch == 3:  # after epoch 3's metrics, before its checkpoint: epoch 2 is the last on disk
            raise _Crash

    with pytest.raises(_Crash):
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
            run_dir=tmp_path / "killed", on_epoch=crash_in_epoch_3)
    assert json.loads((tmp_path / "killed/checkpoints/latest.json").read_text())["epoch"] == 2

    # A fresh process would rebuild everything from scratch with other random weights.
    torch.manual_seed(999)
    teacher2, _ = _models(splits)
    student2 = build_model("mlp", {"width": 8, "dropout": 0.1}, splits)
    method2 = build_method(MethodConfig("kd", {"temperature": 3.0, "alpha": 0.7}), student=student2, teacher=teacher2)
    resumed_epochs = []
    resumed = fit(student=student2, method=method2, teacher=teacher2, splits=splits, train=train, seed=5,
                  run_dir=tmp_path / "killed", on_epoch=lambda e, m: resumed_epochs.append(e))
    assert resumed_epochs == [3, 4]
    assert resumed.epochs_run == 2
    assert set(resumed.final) == set(straight.final)
    for key, value in straight.final.items():
        assert resumed.final[key] == pytest.approx(value, abs=1e-6), key
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(student2.state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_completed_run_is_not_retrained(tmp_path):
    splits = _splits(tmp_path)
    teacher, student = _models(splits)
    method = build_method(MethodConfig("scratch", {}), student=student, teacher=None)
    first = fit(student=student, method=method, teacher=None, splits=splits, train=_train(epochs=2), seed=0,
                run_dir=tmp_path / "run")
    again = fit(student=student, method=method, teacher=None, splits=splits, train=_train(epochs=2), seed=0,
                run_dir=tmp_path / "run")
    assert again.epochs_run == 0
    assert again.final["test/acc"] == pytest.approx(first.final["test/acc"])


class _Explodes(Method):
    """Cross-entropy plus a term that turns NaN from the 13th call on."""

    needs_teacher = False

    def __init__(self, hparams=None, *, student=None, teacher=None):
        super().__init__(hparams, student=student, teacher=teacher)
        self.calls = 0

    def loss_terms(self, batch, student_out, teacher_out):
        self.calls += 1
        ce = torch.nn.functional.cross_entropy(student_out.logits, batch.labels)
        bad = ce * (float("nan") if self.calls > 12 else 0.0)
        return {"ce": ce, "exploding": bad}


def test_nan_loss_names_the_term_and_epoch_and_keeps_last_checkpoint(tmp_path):
    splits = _splits(tmp_path)  # 192 train samples / 32 = 6 steps per epoch: NaN from step 13 = epoch 3
    _, student = _models(splits)
    with pytest.raises(NonFiniteLossError, match=r"'exploding'.*epoch 3"):
        fit(student=student, method=_Explodes(), teacher=None, splits=splits, train=_train(epochs=5), seed=0,
            run_dir=tmp_path / "run")
    pointer = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    assert pointer["epoch"] == 2
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run/checkpoints" / pointer["dir"] / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in weights.items() if v.is_floating_point())


def test_steps_budget_overrides_epochs(tmp_path):
    splits = _splits(tmp_path)  # 6 steps per epoch
    _, student = _models(splits)
    seen = []
    method = build_method(MethodConfig("scratch", {}), student=student, teacher=None)
    result = fit(student=student, method=method, teacher=None, splits=splits, train=_train(epochs=100, steps=8),
                 seed=0, on_epoch=lambda e, m: seen.append(e))
    assert seen == [1, 2]  # 8 steps = one full epoch + 2 steps
    assert result.final["selected_step"] == 8 and "selected_epoch" not in result.final  # issue 17 item 15


def test_best_val_selection_reports_the_best_epoch(tmp_path):
    splits = _splits(tmp_path)
    _, student = _models(splits)
    method = build_method(MethodConfig("scratch", {}), student=student, teacher=None)
    val_acc = {}
    result = fit(student=student, method=method, teacher=None, splits=splits,
                 train=_train(epochs=5, selection="best_val", lr=0.05), seed=0, run_dir=tmp_path / "run",
                 on_epoch=lambda e, m: val_acc.__setitem__(e, (m["val/acc"], m["val/nll"])))
    best = max(val_acc, key=lambda e: (val_acc[e][0], -val_acc[e][1]))
    assert result.final["selected_epoch"] == best
    assert result.final["val/acc"] == pytest.approx(val_acc[best][0])


def test_teacher_agreement_metrics_and_train_terms_are_reported(tmp_path):
    splits = _splits(tmp_path)
    teacher, student = _models(splits)
    method = build_method(MethodConfig("kd", {}), student=student, teacher=teacher)
    epochs = {}
    result = fit(student=student, method=method, teacher=teacher, splits=splits, train=_train(epochs=2), seed=0,
                 on_epoch=lambda e, m: epochs.__setitem__(e, m))
    assert {"train/loss/kd", "train/loss/ce", "train/loss", "lr", "val/acc", "val/agreement"} <= set(epochs[1])
    assert math.isclose(epochs[1]["train/loss"], epochs[1]["train/loss/kd"] + epochs[1]["train/loss/ce"])
    assert {"test/acc", "test/nll", "test/ece", "test/brier", "test/agreement", "test/kl_ts"} <= set(result.final)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training


class _ToyAdversary(Method):
    """CE for the student plus a discriminator on its logits; records which parameters each step moved."""

    needs_teacher = False

    def __init__(self, hparams=None, *, student=None, teacher=None, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher)
        self.discriminator = torch.nn.Linear(3, 1)
        self.seen_indices = []

    def make_batch(self, batch):
        self.seen_indices.append(batch.indices.clone())
        return batch

    def adversary_parameters(self):
        return list(self.discriminator.parameters())

    def adversary_loss(self, batch, student_out, teacher_out):
        assert not student_out.logits.requires_grad  # the student's outputs arrive detached
        real = self.discriminator(torch.nn.functional.one_hot(batch.labels, 3).float())
        fake = self.discriminator(student_out.logits.softmax(-1))
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        self.adversary_metrics = {"disc_acc": float(((real > 0).float().mean() + (fake < 0).float().mean()) / 2)}
        return {"disc": bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))}

    def loss_terms(self, batch, student_out, teacher_out):
        fake = self.discriminator(student_out.logits.softmax(-1))
        fool = torch.nn.functional.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
        return {"ce": torch.nn.functional.cross_entropy(student_out.logits, batch.labels), "fool": 0.1 * fool}


def test_adversary_extension_point_moves_only_its_own_parameters(tmp_path, monkeypatch):
    splits = _splits(tmp_path)
    _, student = _models(splits)
    method = _ToyAdversary(student=student)
    moved = []
    original_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        ids = {id(p) for group in self.param_groups for p in group["params"]}
        everything = {id(p): p for p in list(student.parameters()) + list(method.parameters())}
        before = {pid: p.detach().clone() for pid, p in everything.items()}
        out = original_step(self, *args, **kwargs)
        changed = {pid for pid, old in before.items() if not torch.equal(old, everything[pid])}
        moved.append((ids, changed))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    epochs = {}
    fit(student=student, method=method, teacher=None, splits=splits, train=_train(epochs=1), seed=0,
        on_epoch=lambda e, m: epochs.__setitem__(e, m))
    disc_ids = {id(p) for p in method.discriminator.parameters()}
    student_ids = {id(p) for p in student.parameters()}
    adversary_steps = [changed for ids, changed in moved if ids == disc_ids]
    student_steps = [changed for ids, changed in moved if ids == student_ids]
    assert adversary_steps and student_steps and len(adversary_steps) == len(student_steps)
    assert all(changed <= disc_ids for changed in adversary_steps)  # the discriminator step never moves the student
    assert all(changed <= student_ids for changed in student_steps)  # the student step never moves the discriminator
    assert 0.0 <= epochs[1]["adv/disc_acc"] <= 1.0 and "adv/disc" in epochs[1]
    seen = torch.cat(method.seen_indices)
    assert sorted(seen.tolist()) == list(range(len(splits.train[0])))  # every train sample once, by index


class _Counting(Method):
    """CE, and a ``metrics()`` reporting how many steps it has seen (the loop logs it per epoch)."""

    needs_teacher = False

    def __init__(self, *, student):
        super().__init__(None, student=student, teacher=None)
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0

    def loss_terms(self, batch, student_out, teacher_out):
        self.seen += 1
        return {"ce": torch.nn.functional.cross_entropy(student_out.logits, batch.labels)}

    def metrics(self):
        self.calls += 1
        return {"steps_seen": float(self.seen)}


def test_method_metrics_are_logged_once_per_epoch_as_method_keys(tmp_path):
    splits = _splits(tmp_path)
    _, student = _models(splits)
    method = _Counting(student=student)
    epochs = {}
    fit(student=student, method=method, teacher=None, splits=splits, train=_train(epochs=3, batch_size=64), seed=0,
        on_epoch=lambda e, m: epochs.__setitem__(e, m))
    per_epoch = math.ceil(len(splits.train[0]) / 64)
    assert [epochs[e]["method/steps_seen"] for e in (1, 2, 3)] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert method.calls == 3  # once per epoch, not per step
    # A method without metrics() logs no method/ keys.
    plain = build_method(MethodConfig("scratch", {}), student=student, teacher=None)
    logged = {}
    fit(student=student, method=plain, teacher=None, splits=splits, train=_train(epochs=1), seed=0,
        on_epoch=lambda e, m: logged.update(m))
    assert not any(key.startswith("method/") for key in logged)


def test_mtard_balance_state_is_logged(tmp_path):
    from kdlab.models import TeacherEnsemble

    splits = _splits(tmp_path)
    teacher, student = _models(splits)
    torch.manual_seed(7)
    robust = build_model("mlp", {"width": 16}, splits)
    ensemble = TeacherEnsemble([teacher, robust])
    method = build_method(MethodConfig("mtard", {"epsilon": 0.05, "step_size": 0.02, "steps": 2,
                                                 "temperature_lr": 0.1}), student=student, teacher=ensemble)
    epochs = {}
    fit(student=student, method=method, teacher=ensemble, splits=splits, train=_train(epochs=2), seed=0,
        on_epoch=lambda e, m: epochs.__setitem__(e, m))
    logged = epochs[2]
    assert {"method/weight_adv", "method/weight_nat", "method/temperature_adv", "method/temperature_nat"} <= set(logged)
    assert logged["method/weight_adv"] + logged["method/weight_nat"] == pytest.approx(1.0)
    assert logged["method/temperature_adv"] != 1.0 or logged["method/temperature_nat"] != 1.0  # balanced, moved


def test_a_step_budget_reports_the_selected_step_not_an_epoch(tmp_path):
    """Issue 17 item 15: a run trained for train.steps names the optimiser step whose weights were tested."""
    from kdlab.cli import main
    from kdlab.store import Store

    config = tmp_path / "steps.yaml"
    config.write_text("name: steps\ndata: {dataset: synthetic, num_train: 64, num_test: 32}\n"
                      "student: {model: mlp, width: 8, depth: 1}\nmethod: {name: scratch}\n"
                      "train: {steps: 5, batch_size: 16, device: cpu}\nseeds: [0]\n")
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]) == 0
    (record,) = Store(tmp_path / "ws").runs()
    assert record.final["selected_step"] == 5 and "selected_epoch" not in record.final
