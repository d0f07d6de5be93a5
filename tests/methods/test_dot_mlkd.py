"""DOT, MLKD and CTKD's instance-wise temperature (issue 21): defaults, terms against float64 references, the
optimiser hook through the loop, resume exact, bad input (one line, exit 2)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from kdlab import registry
from kdlab.cli import main
from kdlab.config import MethodConfig, TrainConfig
from kdlab.engine.build import build_method
from kdlab.engine.optim import DistillationOrientedTrainer
from kdlab.errors import KdlabError
from kdlab.methods.base import Batch, Outputs
from kdlab.methods.mlkd import mlkd_terms
from kdlab.store import Store

SHAPE = (3, 8, 8)
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "zoo"


def resnet(arch):
    return registry.get("model", arch)(input_shape=SHAPE, num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3)


def build(name, **options):
    torch.manual_seed(0)
    student, teacher = resnet("resnet8"), resnet("resnet14")
    return build_method(MethodConfig(name, options), student=student, teacher=teacher, input_shape=SHAPE), student


def logits(seed, n=6, c=4):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def kd_ref(s, t, T):
    total = 0.0
    for zs, zt in zip(s.tolist(), t.tolist()):
        p = [math.exp(v / T) for v in zt]
        q = [math.exp(v / T) for v in zs]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        total += sum(a * math.log(a / b) for a, b in zip(p, q))
    return total / len(s) * T * T


def ce_ref(s, y):
    return sum(-row[k] + math.log(sum(math.exp(v) for v in row)) for row, k in zip(s.tolist(), y.tolist())) / len(s)


def test_defaults_are_the_official_ones():
    """mdistiller CFG.KD + SOLVER.DOT.DELTA (DOT); the MLKD repository's CFG.KD and KD_ours.py temperatures."""
    h = registry.get("method", "dot").Hparams()
    assert (h.ce_weight, h.kd_weight, h.temperature, h.delta) == (0.1, 0.9, 4.0, 0.075)
    h = registry.get("method", "mlkd").Hparams()
    assert (h.ce_weight, h.kd_weight, h.temperatures) == (0.1, 0.9, (2.0, 3.0, 4.0, 5.0, 6.0))
    assert h.strong_view == "randaugment"  # get_cifar100_train_transform_strong: RandAugment(2, 10) + Cutout
    h = registry.get("method", "ctkd").Hparams()
    assert (h.temperature_module, h.instance_hidden) == ("global", 256)


# ---------------------------------------------------------------------------------------------------- DOT


def test_dot_terms_are_weighted_ce_and_kd_and_its_optimizer_has_the_two_momenta():
    method, student = build("dot")
    s, t, y = logits(1), 3 * logits(2), torch.tensor([0, 1, 2, 3, 0, 1])
    terms = method.loss_terms(Batch(s, y), Outputs(s), Outputs(t))
    assert list(terms) == ["ce", "kd"]
    assert terms["ce"].item() == pytest.approx(0.1 * ce_ref(s, y), rel=1e-10)
    assert terms["kd"].item() == pytest.approx(0.9 * kd_ref(s, t, 4.0), rel=1e-10)
    train = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt = method.make_optimizer(list(student.parameters()), train)
    assert isinstance(opt, DistillationOrientedTrainer) and opt.distill_terms == ("kd",)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.05, 5e-4)
    assert (group["momentum"], group["momentum_kd"]) == pytest.approx((0.825, 0.975))
    kd, _ = build("kd")
    assert kd.make_optimizer(list(student.parameters()), train) is None  # others: the one train names


@pytest.mark.parametrize("train, key", [(dict(optimizer="adam"), "train.optimizer"),
                                        (dict(optimizer="sgd", grad_clip=1.0), "train.grad_clip"),
                                        (dict(optimizer="sgd", nesterov=True), "train.nesterov"),
                                        (dict(optimizer="sgd", momentum=0.95), "method.delta")])
def test_dot_refuses_a_train_section_it_cannot_step(train, key):
    method, student = build("dot")
    with pytest.raises(KdlabError, match=key):
        method.make_optimizer(list(student.parameters()), TrainConfig(**train))


def _splits(tmp_path):
    from kdlab.data import build_splits

    return build_splits("synthetic", {"num_classes": 4, "input_shape": SHAPE, "num_train": 80, "num_test": 16},
                        root=None, cache_dir=tmp_path / "cache", val_fraction=0.2, split_seed=0)


class _Crash(Exception):
    pass


def _resume_exact(tmp_path, name, options, train):
    """A run killed in epoch 3 (epoch 2 on disk) and resumed in a fresh build ends where the uninterrupted one does."""
    from kdlab.engine.build import build_model
    from kdlab.engine.loop import fit

    splits = _splits(tmp_path)

    def fresh(seed):
        torch.manual_seed(123)
        teacher = build_model("resnet14", {}, splits)
        torch.manual_seed(seed)
        student = build_model("resnet8", {}, splits)
        method = build_method(MethodConfig(name, dict(options)), student=student, teacher=teacher, input_shape=SHAPE)
        return teacher, student, method

    teacher, student, method = fresh(0)
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5, run_dir=tmp_path / "a")
    expected = {**{f"s.{k}": v.clone() for k, v in student.state_dict().items()},
                **{f"m.{k}": v.clone() for k, v in method.state_dict().items()}}

    def crash_in_epoch_3(epoch, metrics):
        if epoch == 3:
            raise _Crash

    teacher, student, method = fresh(0)
    with pytest.raises(_Crash):
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
            run_dir=tmp_path / "b", on_epoch=crash_in_epoch_3)
    teacher, student, method = fresh(7)  # a new process: other initial weights, all restored from the checkpoint
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5, run_dir=tmp_path / "b")
    got = {**{f"s.{k}": v for k, v in student.state_dict().items()},
           **{f"m.{k}": v for k, v in method.state_dict().items()}}
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    return got


def test_dot_resumes_exactly_with_both_momentum_buffers(tmp_path):
    import json

    train = TrainConfig(epochs=4, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                        checkpoint_every=1, eval_every=1, device="cpu")
    _resume_exact(tmp_path, "dot", {}, train)
    state = json.loads(next((tmp_path / "b" / "checkpoints").glob("epoch-0004/state.json")).read_text())
    names = {key.split(".", 2)[2] for key in state["tensors"] if key.startswith("optimizer.")}
    assert names == {"momentum_buffer", "distill_momentum_buffer"}  # both buffers were saved and restored


def test_dot_through_the_loop_differs_from_sgd_on_the_summed_loss(tmp_path):
    """The loop hands DOT the terms apart (its step is not plain SGD on ce + kd, which delta 0 would be)."""
    from kdlab.engine.build import build_model
    from kdlab.engine.loop import fit

    splits = _splits(tmp_path)
    train = TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9, device="cpu")
    finals = {}
    for delta in (0.0, 0.075):
        torch.manual_seed(123)
        teacher = build_model("resnet14", {}, splits)
        torch.manual_seed(0)
        student = build_model("resnet8", {}, splits)
        method = build_method(MethodConfig("dot", {"delta": delta}), student=student, teacher=teacher,
                              input_shape=SHAPE)
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5)
        finals[delta] = [p.detach().clone() for p in student.parameters()]
    torch.manual_seed(123)
    teacher = build_model("resnet14", {}, splits)
    torch.manual_seed(0)
    student = build_model("resnet8", {}, splits)
    kd = build_method(MethodConfig("kd", {"alpha": 0.9, "temperature": 4.0}), student=student, teacher=teacher)
    fit(student=student, method=kd, teacher=teacher, splits=splits, train=train, seed=5)
    plain = [p.detach() for p in student.parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(finals[0.0], plain))  # Δ = 0: SGD on the sum
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(finals[0.075], plain))


# ---------------------------------------------------------------------------------------------------- MLKD


def test_mlkd_terms_equal_the_official_total_with_the_strong_view_as_the_weak_one():
    """KD_ours.forward_train with image_strong = image_weak, transcribed in float64 (masks as fractions: its
    losses reduce before the mask multiplies them)."""
    import numpy as np

    def softmax(z, T):
        e = np.exp((z - z.max(axis=1, keepdims=True)) / T)
        return e / e.sum(axis=1, keepdims=True)

    def bc_ref(s, t, T):  # bc_loss: ‖P_t P_tᵀ − P_s P_sᵀ‖² / B
        p, q = softmax(t.numpy(), T), softmax(s.numpy(), T)
        return float(((p @ p.T - q @ q.T) ** 2).sum()) / len(p)

    def cc_ref(s, t, T):  # cc_loss: ‖P_tᵀ P_t − P_sᵀ P_s‖² / C
        p, q = softmax(t.numpy(), T), softmax(s.numpy(), T)
        return float(((p.T @ p - q.T @ q) ** 2).sum()) / p.shape[1]

    method, _ = build("mlkd", strong_view="weak")
    s, t, y = logits(3, n=7, c=5), 2 * logits(4, n=7, c=5), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    terms = method.loss_terms(Batch(s, y), Outputs(s), Outputs(t))
    p = softmax(t.numpy(), 1.0)
    conf, class_conf = p.max(axis=1), p.sum(axis=0)
    m = float(np.mean(conf <= np.percentile(conf, 50)))
    m_c = float(np.mean(class_conf <= np.percentile(class_conf, 50)))
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)  # the official order
    assert list(terms) == ["ce", "instance", "batch", "class"]
    assert terms["ce"].item() == pytest.approx(0.1 * 2 * ce_ref(s, y), rel=1e-10)
    assert terms["instance"].item() == pytest.approx(0.9 * sum((m + 1) * kd_ref(s, t, T) for T in temps), rel=1e-10)
    assert terms["batch"].item() == pytest.approx(0.9 * sum(m * bc_ref(s, t, T) for T in temps), rel=1e-10)
    assert terms["class"].item() == pytest.approx(0.9 * sum(m_c * cc_ref(s, t, T) for T in temps), rel=1e-10)
    # two real views: the strong one enters the unmasked instance term and CE only (official)
    s2, t2 = logits(5, n=7, c=5), 2 * logits(6, n=7, c=5)
    two = mlkd_terms(s, t, s2, t2, y, temperatures=temps, ce_weight=0.1, kd_weight=0.9)
    assert two["instance"].item() == pytest.approx(0.9 * sum(m * kd_ref(s, t, T) + kd_ref(s2, t2, T) for T in temps),
                                                   rel=1e-10)
    assert two["batch"].item() == pytest.approx(terms["batch"].item(), rel=1e-12)
    assert two["ce"].item() == pytest.approx(0.1 * (ce_ref(s, y) + ce_ref(s2, y)), rel=1e-10)


def test_mlkd_gradients_reach_the_student():
    method, _ = build("mlkd", strong_view="weak")
    s = logits(7).requires_grad_()
    terms = method.loss_terms(Batch(s, torch.tensor([0, 1, 2, 3, 0, 1])), Outputs(s), Outputs(2 * logits(8)))
    for name in ("instance", "batch", "class"):
        (g,) = torch.autograd.grad(terms[name], s, retain_graph=True)
        assert g.abs().sum() > 0, name


def _images(n=6, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_mlkd_strong_view_is_randaugment_of_the_batch_and_both_networks_see_it():
    from kdlab.data.randaugment import randaugment

    method, student = build("mlkd")
    teacher = method._teacher
    teacher.eval()
    x, y = _images(), torch.tensor([0, 1, 2, 3, 0, 1])
    method.set_progress(3, 10)
    batch = method.make_batch(Batch(x.clone(), y))
    strong = batch.extras["strong"]
    assert torch.equal(batch.inputs, x)  # the loop's forwards keep the weak view
    expected_view = randaugment(x, generator=torch.Generator().manual_seed(
        (int(method.augment_seed) * 1_000_003 + 3) % 2**63))
    assert torch.equal(strong, expected_view) and not torch.equal(strong, x)
    s_weak, t_weak = student(x), teacher(x).detach()
    terms = method.loss_terms(batch, Outputs(s_weak), Outputs(t_weak))
    with torch.no_grad():
        t_strong = teacher(strong)
    expected = mlkd_terms(s_weak, t_weak, student(strong), t_strong, y, temperatures=(2.0, 3.0, 4.0, 5.0, 6.0),
                          ce_weight=0.1, kd_weight=0.9)
    for name in expected:
        assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-6), name
    assert teacher.training is False and student.training is True
    # the strong forward carries gradient to the student even with the weak logits detached
    terms = method.loss_terms(batch, Outputs(s_weak.detach()), Outputs(t_weak))
    student.zero_grad()
    (terms["ce"] + terms["instance"]).backward()
    assert next(student.parameters()).grad.abs().sum() > 0


def test_mlkd_strong_views_differ_by_step_and_micro_batch_and_repeat_after_a_restore():
    method, _ = build("mlkd")
    x, y = _images(), torch.tensor([0, 1, 2, 3, 0, 1])

    def view(step, micro=0):
        method.set_progress(step, 10)
        method.micro_batch = micro
        return method.make_batch(Batch(x.clone(), y)).extras["strong"]

    first = view(2)
    assert torch.equal(view(2), first) and not torch.equal(view(3), first) and not torch.equal(view(2, 1), first)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert "augment_seed" in state
    other, _ = build("mlkd")
    torch.manual_seed(99)
    other.augment_seed.random_(0, 2**62)  # a new process draws another seed, then the checkpoint restores it
    other.load_state_dict(state)
    other.set_progress(2, 10)
    assert torch.equal(other.make_batch(Batch(x.clone(), y)).extras["strong"], first)


def test_mlkd_strong_view_refuses_inputs_randaugment_cannot_read():
    torch.manual_seed(0)
    shape = (2, 8, 8)
    student = registry.get("model", "resnet8")(input_shape=shape, num_classes=4, mean=(0.0,) * 2, std=(1.0,) * 2)
    teacher = registry.get("model", "resnet14")(input_shape=shape, num_classes=4, mean=(0.0,) * 2, std=(1.0,) * 2)
    with pytest.raises(KdlabError, match=r"method.strong_view: randaugment needs 1- or 3-channel"):
        build_method(MethodConfig("mlkd", {}), student=student, teacher=teacher, input_shape=shape)
    build_method(MethodConfig("mlkd", {"strong_view": "weak"}), student=student, teacher=teacher, input_shape=shape)


def test_mlkd_resumes_exactly_with_its_strong_views(tmp_path):
    train = TrainConfig(epochs=4, batch_size=16, lr=0.01, checkpoint_every=1, eval_every=1, device="cpu")
    got = _resume_exact(tmp_path, "mlkd", {}, train)
    assert "m.augment_seed" in got


# ---------------------------------------------------------------------------------------------------- CTKD instance


def test_ctkd_instance_gives_one_temperature_per_sample_and_ascends_the_kd_loss():
    from kdlab.losses.ctkd import kl_at_instance_temperatures

    method, student = build("ctkd", temperature_module="instance", instance_hidden=8)
    assert not hasattr(method, "tau") and sum(p.numel() for p in method.parameters()) == 8 * 8 + 8 + 8 + 1
    method.steps_per_epoch = 4
    s, t, y = logits(9).float().requires_grad_(), 3 * logits(10).float(), torch.tensor([0, 1, 2, 3, 0, 1])
    method.set_progress(12, 100)  # epoch 4: λ = (1 − cos(4π/10)) / 2
    temps = method.temperature(t, s)
    assert temps.shape == (6,) and bool(((temps > 1) & (temps < 21)).all())
    terms = method.loss_terms(Batch(s, y), Outputs(s), Outputs(t))
    h = method.hparams
    raw = method.temperature_net(t, s).detach()
    assert terms["kl"].item() == pytest.approx(
        0.9 * kl_at_instance_temperatures(s.detach(), t, 1 + 20 * torch.sigmoid(raw)).item(), rel=1e-6)
    # the module ascends: its gradient is −λ times the plain derivative of the KD term
    net = method.temperature_net
    plain = h.kl_weight * kl_at_instance_temperatures(s.detach(), t, 1 + 20 * torch.sigmoid(net(t, s)))
    d_plain = torch.autograd.grad(plain, list(net.parameters()))
    d_ours = torch.autograd.grad(terms["kl"], list(net.parameters()), retain_graph=True)
    lam = (1 - math.cos(math.pi * 4 / 10)) / 2
    for a, b in zip(d_ours, d_plain):
        torch.testing.assert_close(a, -lam * b, rtol=1e-5, atol=1e-7)
    (g_s,) = torch.autograd.grad(terms["kl"], s)  # the student descends the loss; nothing reaches it via the MLP
    (g_plain,) = torch.autograd.grad(h.kl_weight * kl_at_instance_temperatures(s, t, 1 + 20 * torch.sigmoid(raw)), s)
    torch.testing.assert_close(g_s, g_plain)
    assert math.isfinite(method.metrics()["temperature"])


def test_ctkd_instance_resumes_exactly_with_its_module(tmp_path):
    train = TrainConfig(epochs=4, batch_size=16, lr=0.01, checkpoint_every=1, eval_every=1, device="cpu")
    got = _resume_exact(tmp_path, "ctkd", {"temperature_module": "instance", "instance_hidden": 16,
                                           "lambda_epochs": 3}, train)
    assert any(k.startswith("m.temperature_net.") for k in got)


# ---------------------------------------------------------------------------------------------------- CLI


def _tiny(tmp_path, name, **method):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg["data"].update(num_train=64, num_test=16)
    cfg["teacher"]["train"].update(epochs=1, device="cpu")
    cfg["train"].update(epochs=1, batch_size=16, device="cpu")
    cfg["method"].update(method)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name, term", [("dot", "kd"), ("mlkd", "class")])
def test_cli_one_epoch(tmp_path, name, term):
    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "run", str(_tiny(tmp_path, name)), "--quiet"]) == 0
    (run,) = [r for r in Store(ws).runs() if r.config["method"]["name"] == name]
    assert run.status == "finished" and math.isfinite(run.final["test/acc"])
    assert f'"train/loss/{term}"' in (run.run_dir / "metrics.jsonl").read_text()


@pytest.mark.parametrize("name, method, train, key", [
    ("dot", {}, {"optimizer": "adam"}, "train.optimizer"),
    ("dot", {}, {"grad_clip": 1.0}, "train.grad_clip"),
    ("mlkd", {"temperatures": []}, {}, "method.temperatures"),
    ("mlkd", {"strong_view": "strong"}, {}, "method.strong_view"),
    ("ctkd", {"temperature_module": "per_class"}, {}, "method.temperature_module")])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, name, method, train, key):
    path = _tiny(tmp_path, name, **method)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].update(train)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "ws" / "runs").exists() or not any((tmp_path / "ws" / "runs").iterdir())


def test_cli_mlkd_randaugment_on_vectors_is_one_line_exit_2(tmp_path, capsys):
    cfg = {"name": "mlkd1d", "data": {"dataset": "mnist1d"}, "student": {"model": "cnn1d", "width": 4},
           "teacher": {"model": "cnn1d", "width": 8, "train": {"epochs": 1}}, "method": {"name": "mlkd"},
           "train": {"epochs": 1, "device": "cpu"}}
    path = tmp_path / "mlkd1d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "method.strong_view: randaugment needs image inputs" in err and "set method.strong_view: weak" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    cfg["method"]["strong_view"] = "weak"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--dry-run"]) == 0
