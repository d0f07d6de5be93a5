"""Teacher placement (issue 19): teacher.dtype / teacher.device, the teacher frozen and in inference mode, the older
train.teacher_dtype kept as an alias with its run ids, bad placements one line before any work."""
from __future__ import annotations

import pytest
import torch
import yaml

from kdlab.cli import main
from kdlab.config import MethodConfig, TeacherConfig, TrainConfig, load_experiment
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.engine.teacher import Placement, cache_precision, place_teacher


def _splits(tmp_path):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 64, "num_test": 32,
                                      "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                        val_fraction=0.25, split_seed=0)


def _models(splits):
    torch.manual_seed(123)
    teacher = build_model("mlp", {"width": 32}, splits)
    torch.manual_seed(0)
    student = build_model("mlp", {"width": 8}, splits)
    return teacher, student


def _fit(tmp_path, placement: Placement | None, *, watch=None, **train):
    splits = _splits(tmp_path)
    teacher, student = _models(splits)
    if placement is not None:
        teacher.kdlab_placement = placement
    if watch is not None:
        teacher.register_forward_hook(watch)
    method = build_method(MethodConfig("kd", {"temperature": 2.0, "alpha": 0.5}), student=student, teacher=teacher)
    epochs = []
    config = TrainConfig(**{**dict(epochs=1, batch_size=16, lr=0.01, device="cpu", schedule="constant"), **train})
    fit(student=student, method=method, teacher=teacher, splits=splits, train=config, seed=0,
        on_epoch=lambda epoch, metrics: epochs.append(metrics))
    return epochs[-1], teacher, student


def test_a_bf16_teacher_gives_the_fp32_loss_to_bf16_tolerance(tmp_path):
    fp32, _, _ = _fit(tmp_path, None)
    bf16, teacher, _ = _fit(tmp_path, Placement(dtype="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())  # held in bf16 itself, no copy
    assert bf16["train/loss"] != fp32["train/loss"]  # it did run in bf16
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=2e-2)  # bf16: 8 mantissa bits
    # The older spelling keeps its meaning: a bf16 copy for training, the float32 teacher kept.
    legacy, teacher, _ = _fit(tmp_path, None, teacher_dtype="bf16")
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert legacy["train/loss"] == pytest.approx(bf16["train/loss"], rel=1e-6)


def test_teacher_forwards_run_in_inference_mode_and_its_parameters_get_no_gradient(tmp_path):
    seen = []
    def watch(module, inputs, output):
        seen.append(torch.is_inference_mode_enabled())

    metrics, teacher, student = _fit(tmp_path, Placement(device="cpu", dtype="fp32"), watch=watch)
    assert len(seen) >= 4 and all(seen)  # training batches and the agreement predictions
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert 0 <= metrics["val/agreement"] <= 1


def test_the_teachers_outputs_reach_the_loss_as_float32_on_the_students_device(tmp_path):
    from kdlab.engine.speed import TappedForward, teacher_network

    teacher = torch.nn.Linear(4, 3)
    teacher.kdlab_placement = Placement(device="cpu", dtype="bf16")
    placed = place_teacher(teacher, TrainConfig(), torch.device("cpu"))
    assert placed.placed and placed.input_dtype == torch.bfloat16 and not placed.training_copy
    forward = TappedForward(teacher_network(teacher, placed), input_dtype=placed.input_dtype, device=placed.device,
                            output_device=torch.device("cpu"))
    logits, _ = forward(torch.randn(2, 4))
    assert logits.dtype == torch.float32
    # Token ids stay integers (a bf16 language-model teacher's inputs).
    embedding = torch.nn.Embedding(10, 3).to(torch.bfloat16)
    out, _ = TappedForward(embedding, input_dtype=torch.bfloat16)(torch.tensor([[1, 2]]))
    assert out.dtype == torch.float32


def test_an_fp16_teacher_on_the_cpu_is_refused_when_placed(tmp_path):
    from kdlab.errors import KdlabError

    teacher = torch.nn.Linear(2, 2)
    teacher.kdlab_placement = Placement(device="cpu", dtype="fp16")
    with pytest.raises(KdlabError, match="teacher.dtype: fp16 on the CPU"):
        place_teacher(teacher, TrainConfig(), torch.device("cpu"))


def test_cache_keys_are_unchanged_for_unplaced_teachers():
    assert cache_precision(torch.nn.Linear(1, 1), TrainConfig(teacher_dtype="bf16")) == "fp32/bf16"
    placed = torch.nn.Linear(1, 1)
    placed.kdlab_placement = Placement(dtype="bf16")
    assert cache_precision(placed, TrainConfig()) == "fp32/bf16"  # the same computation as the copy


# --------------------------------------------------------------------------- the config


def _write(tmp_path, **teacher):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "data": {"dataset": "synthetic"},
                                    "teacher": {"model": "mlp", **teacher}, "student": {"model": "mlp"}}))
    return path


def test_new_keys_keep_run_ids_and_join_them_when_set(tmp_path):
    _, [plain] = load_experiment(_write(tmp_path))
    _, [explicit] = load_experiment(_write(tmp_path), overrides=["teacher.device=null", "teacher.dtype=null"])
    assert plain.run_id == explicit.run_id and "device" not in plain.resolved()["teacher"]
    _, [bf16] = load_experiment(_write(tmp_path, dtype="bf16"))
    assert bf16.run_id != plain.run_id and bf16.config.teacher.dtype == "bf16"
    assert isinstance(bf16.config.teacher, TeacherConfig)


@pytest.mark.parametrize("teacher, train, expected", [
    ({"device": "tpu"}, {}, "teacher.device: unknown device 'tpu'"),
    ({"dtype": "fp16", "device": "cpu"}, {}, "teacher.dtype: fp16 on the CPU is not supported"),
    ({"dtype": "fp32"}, {"teacher_dtype": "bf16"}, "train.teacher_dtype: bf16 disagrees with teacher.dtype: fp32"),
    ({"dtype": "int8"}, {}, "teacher.dtype"),
])
def test_bad_placements_are_one_line_exit_2(tmp_path, capsys, teacher, train, expected):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "data": {"dataset": "synthetic"},
                                    "teacher": {"model": "mlp", **teacher}, "student": {"model": "mlp"},
                                    "train": {"device": "cpu", **train}}))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_cuda_teacher_without_cuda_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = _write(tmp_path, device="cuda")
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 2
    assert "teacher.device: cuda requested but CUDA is not available" in capsys.readouterr().err


def test_generation_methods_sample_the_teacher_in_inference_mode(monkeypatch):
    """GKD's SeqKD responses (and any generation method's teacher samples) come from an inference-mode teacher."""
    from kdlab.methods.gkd import GKD
    from kdlab.seq import sampling

    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    seen = {}
    monkeypatch.setattr(sampling, "generate",
                        lambda net, *args, **kwargs: seen.setdefault(id(net), torch.is_inference_mode_enabled()))
    method = GKD(GKD.Hparams(), student=student, teacher=teacher)
    monkeypatch.setattr(method, "generation_options", lambda prompts: {})
    prompts, lengths = torch.zeros(1, 3, dtype=torch.long), torch.tensor([3])
    for role in ("teacher", "student"):
        method.generate(role, prompts, lengths, temperature=0.0, generator=None)
    assert seen == {id(teacher): True, id(student): False}
