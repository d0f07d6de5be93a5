"""Speed options: compiled = eager (with feature taps, no recompiles), bf16 close to fp32, channels-last,
fused optimiser, bfloat16 teacher, device-resident batches; and the new keys keep old run ids."""
from __future__ import annotations

import logging

import pytest
import torch

from kdlab.config import MethodConfig, TrainConfig, load_experiment
from kdlab.data import build_splits
from kdlab.data.resident import ResidentData
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import _autocast, fit
from kdlab.engine.optim import build_optimizer
from kdlab.engine.speed import TappedForward, compile_forward, use_channels_last
from kdlab.errors import KdlabError
from kdlab.methods.base import Batch, Outputs


def _image_splits(tmp_path, classes=4):
    return build_splits("synthetic", {"num_classes": classes, "input_shape": (3, 8, 8), "num_train": 96,
                                      "num_test": 16, "separation": 3.0}, root=None, cache_dir=tmp_path / "data",
                        val_fraction=0.0, split_seed=0)


def _resnets(splits):
    torch.manual_seed(0)
    teacher = build_model("resnet_cifar", {"depth": 8, "width_multiplier": 1}, splits).eval()
    student = build_model("resnet_cifar", {"depth": 8, "width_multiplier": 1, "stem_width": 8}, splits)
    return teacher, student


def _hint_method(student, teacher, splits, tap="stage2"):
    terms = {"ce": 0.1, "kl": {"weight": 0.9, "temperature": 4.0},
             "hint": {"loss": "fitnet", "weight": 1.0, "student": tap, "teacher": tap}}
    return build_method(MethodConfig("distill", {"terms": terms}), student=student, teacher=teacher,
                        input_shape=tuple(splits.input_shape))


def _step_loss(method, student_fwd, teacher_fwd, inputs, labels, precision="fp32"):
    with _autocast(torch.device("cpu"), precision):
        with torch.no_grad():
            teacher_out = Outputs(*teacher_fwd(inputs))
        student_out = Outputs(*student_fwd(inputs))
        terms = method.loss_terms(Batch(inputs, labels), student_out, teacher_out)
    return sum(terms.values()), terms


@pytest.mark.integration
def test_compiled_kd_step_equals_eager_and_does_not_recompile(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    splits = build_splits("synthetic", {"num_classes": 4, "input_shape": (1, 16), "num_train": 64, "num_test": 8,
                                        "separation": 3.0}, root=None, cache_dir=tmp_path / "data",
                          val_fraction=0.0, split_seed=0)
    torch.manual_seed(0)
    teacher = build_model("cnn1d", {"width": 8}, splits).eval()
    student = build_model("cnn1d", {"width": 4}, splits)  # tiny: inductor's compile time grows with the kernels
    method = _hint_method(student, teacher, splits, tap="block2")
    s_fwd = TappedForward(student, method.student_taps)
    t_fwd = TappedForward(teacher, method.teacher_taps, detach=True)
    s_compiled, t_compiled = compile_forward(s_fwd), compile_forward(t_fwd)
    x, y = splits.train
    eager_loss, eager_terms = _step_loss(method, s_fwd, t_fwd, x[:16], y[:16])
    eager_grads = torch.autograd.grad(eager_loss, list(student.parameters()))
    compiled_loss, compiled_terms = _step_loss(method, s_compiled, t_compiled, x[:16], y[:16])
    compiled_grads = torch.autograd.grad(compiled_loss, list(student.parameters()))
    assert set(compiled_terms) == {"ce", "kl", "hint"}  # the tapped features came out of the compiled graph
    for name in eager_terms:
        assert torch.allclose(compiled_terms[name], eager_terms[name], rtol=1e-4, atol=1e-5), name
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    for start in (16, 32, 48):  # new batches of the same shape: no new graph, no recompilation
        _step_loss(method, s_compiled, t_compiled, x[start:start + 16], y[start:start + 16])
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["recompiles"].values()) == 0 if "recompiles" in counters else True
    assert not counters["graph_break"]  # the hooks were traced, not broken out of the graph


def test_bf16_autocast_losses_finite_and_close_to_fp32(tmp_path):
    splits = _image_splits(tmp_path)
    teacher, student = _resnets(splits)
    method = _hint_method(student, teacher, splits)
    s_fwd, t_fwd = TappedForward(student, method.student_taps), TappedForward(teacher, method.teacher_taps, detach=True)
    x, y = splits.train
    fp32, fp32_terms = _step_loss(method, s_fwd, t_fwd, x[:32], y[:32])
    bf16, bf16_terms = _step_loss(method, s_fwd, t_fwd, x[:32], y[:32], precision="bf16")
    assert torch.isfinite(bf16)
    # bfloat16 keeps 8 significant bits (relative rounding 2^-8 ≈ 0.4% per op); a few percent after a network
    for name in fp32_terms:
        assert float(bf16_terms[name]) == pytest.approx(float(fp32_terms[name]), rel=5e-2, abs=1e-3), name
    bf16.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_bf16_teacher_and_channels_last_keep_the_loss(tmp_path):
    splits = _image_splits(tmp_path)
    teacher, student = _resnets(splits)
    method = _hint_method(student, teacher, splits)
    x, y = splits.train
    reference, _ = _step_loss(method, TappedForward(student, method.student_taps),
                              TappedForward(teacher, method.teacher_taps, detach=True), x[:32], y[:32])
    import copy

    teacher_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    assert use_channels_last(student, (3, 8, 8), role="student")
    conv_weights = [m.weight for m in student.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    loss, _ = _step_loss(method, TappedForward(student, method.student_taps, channels_last=True),
                         TappedForward(teacher_bf16, method.teacher_taps, detach=True, input_dtype=torch.bfloat16),
                         x[:32], y[:32])
    assert float(loss) == pytest.approx(float(reference), rel=3e-2)


def test_channels_last_on_non_images_is_a_logged_no_op(tmp_path, caplog):
    model = torch.nn.Conv1d(1, 2, 3)
    with caplog.at_level(logging.WARNING):
        assert not use_channels_last(model, (1, 40), role="student")
    assert "not images" in caplog.text


def test_fused_optimizer_matches_default(tmp_path):
    torch.manual_seed(0)
    nets = [torch.nn.Linear(6, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(8, 6)
    for optimizer_name in ("adam", "sgd", "adamw"):
        for fused, net in zip((False, True), nets):
            optimizer = build_optimizer(net.parameters(), TrainConfig(optimizer=optimizer_name, lr=0.1,
                                                                      fused_optimizer=fused, weight_decay=0.01))
            assert optimizer.defaults.get("fused") == (True if fused else None)
            for _ in range(3):
                optimizer.zero_grad()
                net(x).square().mean().backward()
                optimizer.step()
        for a, b in zip(*(n.parameters() for n in nets)):
            assert torch.allclose(a, b, atol=1e-6)


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    splits = _image_splits(tmp_path)
    teacher, student = _resnets(splits)
    method = build_method(MethodConfig("kd", {}), student=student, teacher=teacher)
    with pytest.raises(KdlabError, match="train.precision: fp16 .* needs a CUDA device"):
        fit(student=student, method=method, teacher=teacher, splits=splits,
            train=TrainConfig(epochs=1, device="cpu", precision="fp16"), seed=0)


def test_resident_batches_are_deterministic_by_seed(tmp_path):
    splits = _image_splits(tmp_path)
    x, y = splits.train

    def epoch_batches(seed, per_sample):
        data = ResidentData(x, y, device=torch.device("cpu"), batch_size=32, augment="crop_flip",
                            per_sample=per_sample, seed=seed)
        data.start_epoch(1, torch.Generator().manual_seed(seed))
        return [data.batch(i) for i in range(3)]

    for per_sample in (False, True):
        first, again, other = epoch_batches(0, per_sample), epoch_batches(0, per_sample), epoch_batches(1, per_sample)
        for (i1, a1, l1), (i2, a2, l2) in zip(first, again):
            assert torch.equal(i1, i2) and torch.equal(a1, a2) and torch.equal(l1, l2)
            assert torch.equal(l1, y[i1])
        assert not torch.equal(first[0][1], other[0][1])
    # Every sample shows up once per epoch, as the crop of itself (the unpadded centre is a crop offset 4).
    index = torch.cat([b[0] for b in epoch_batches(0, True)])
    assert torch.equal(index.sort().values, torch.arange(len(x)))


def test_speed_keys_keep_run_ids(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: t\ndata: {dataset: synthetic}\nteacher: {model: mlp}\nstudent: {model: mlp}\n")
    _, [plain] = load_experiment(path)
    _, [explicit] = load_experiment(path, overrides=["train.teacher_cache=false", "train.compile=false",
                                                     "train.channels_last=false", "train.fused_optimizer=false",
                                                     "train.teacher_dtype=same"])
    assert plain.run_id == explicit.run_id and "teacher_cache" not in plain.resolved()["train"]
    _, [cached] = load_experiment(path, overrides=["train.teacher_cache=true"])
    assert cached.run_id != plain.run_id


def test_config_refuses_teacher_cache_for_methods_that_make_teacher_inputs(tmp_path):
    from kdlab.errors import ConfigError

    path = tmp_path / "exp.yaml"
    path.write_text("name: t\ndata: {dataset: synthetic}\nteacher: {model: mlp}\nstudent: {model: mlp}\n"
                    "method: {name: ard}\ntrain: {teacher_cache: true}\n")
    with pytest.raises(ConfigError, match="train.teacher_cache: method 'ard'"):
        load_experiment(path)


def test_compile_unavailable_is_a_clear_error(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(KdlabError, match="train.compile: torch.compile is not supported"):
        compile_forward(torch.nn.Linear(2, 2))
