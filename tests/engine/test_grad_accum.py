"""Gradient accumulation (``train.grad_accum_steps``): k micro-batches of b give the gradient of one batch of k·b.

Exactness is checked in float64 on the CPU against the plain loop on the big batch (same data order: the
epoch's permutation does not depend on the batch size), or, where the responses are sampled, against the
same responses trained on as one batch. Sequence losses averaged per token must divide by the response
tokens of the whole accumulated batch counted after generation (the bug class of counting before
generation or multiplying by k); each test asserts its micro-batches' counts differ, so a plain 1/k
average would fail it.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from kdlab import registry
from kdlab.cli import main
from kdlab.config import ConfigError, MethodConfig, TrainConfig, parse_experiment
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import _Fit, fit
from kdlab.engine.seed import epoch_generator
from kdlab.losses.sequence import response_units
from kdlab.methods.base import Batch

IGNORE = -100


def _double(splits):
    as64 = lambda pair: (pair[0].double() if pair[0].is_floating_point() else pair[0], pair[1])  # noqa: E731
    return dataclasses.replace(splits, train=as64(splits.train), val=as64(splits.val), test=as64(splits.test))


def _train(batch_size: int, accum: int = 1, **overrides) -> TrainConfig:
    base = dict(epochs=1, batch_size=batch_size, grad_accum_steps=accum, optimizer="sgd", momentum=0.0,
                lr=0.1, schedule="constant", device="cpu", checkpoint_every=1)
    base.update(overrides)
    return TrainConfig(**base)


def _gradients(run: _Fit, monkeypatch, *, record: list | None = None) -> list[torch.Tensor]:
    """The gradients the run's first optimiser step is given (read by a hook just before it)."""
    seen: list[list[torch.Tensor]] = []
    run.state.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([p.grad.clone() for p in run.main_parameters
                                                     if p.grad is not None]))
    if record is not None:
        make_batch = run.method.make_batch
        monkeypatch.setattr(run.method, "make_batch", lambda batch: record.append(make_batch(batch)) or record[-1])
    run.student.train()
    run.method.train()
    run.data.start_epoch(0, epoch_generator(run.seed, 0))
    run.step(0, {})
    return seen[0]


def _run(splits, student, method, teacher, train) -> _Fit:
    return _Fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=3,
                run_dir=None, resume=False, augment="none", progress=False, label="", teacher_cache_dir=None)


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- classification: kd


def _synthetic(tmp_path):
    return _double(build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 40,
                                              "num_test": 10}, root=None, cache_dir=tmp_path / "cache",
                                val_fraction=0.0, split_seed=0))


def _kd_models(splits):
    torch.manual_seed(1)
    teacher = build_model("mlp", {"width": 16}, splits).double()
    torch.manual_seed(2)
    student = build_model("mlp", {"width": 8}, splits).double()
    method = build_method(MethodConfig("kd", {"temperature": 3.0, "alpha": 0.7}), student=student, teacher=teacher)
    return teacher, student, method


def test_kd_accumulated_gradient_equals_one_big_batch(tmp_path, monkeypatch):
    splits = _synthetic(tmp_path)
    teacher, student, method = _kd_models(splits)
    big = _gradients(_run(splits, student, method, teacher, _train(12)), monkeypatch)
    teacher, student, method = _kd_models(splits)
    accumulated = _gradients(_run(splits, student, method, teacher, _train(4, 3)), monkeypatch)
    _assert_same(accumulated, big)


def test_partial_last_group_is_the_mean_over_its_samples(tmp_path, monkeypatch):
    """40 samples, micro-batches of 6: 7 micro-batches, k = 3 → steps of 18, 18 and 4 samples (one micro-
    batch of 4). The last step weighs its samples like one batch of 4 (the plain loop's last batch)."""
    splits = _synthetic(tmp_path)
    teacher, student, method = _kd_models(splits)
    run = _run(splits, student, method, teacher, _train(6, 3))
    assert (run.micro_batches, run.steps_per_epoch, run.total_steps) == (7, 3, 3)
    # A group of micro-batches of 6 and 4 samples: weights 6/10 and 4/10 (not 1/2 each).
    batches = [Batch(torch.zeros(6, 12), torch.zeros(6)), Batch(torch.zeros(4, 12), torch.zeros(4))]
    weights = run._accumulation_weights([(batch, None, None) for batch in batches])
    assert [float(w) for w in weights] == [0.6, 0.4]


# ----------------------------------------------------------------------------- sequence methods


@pytest.fixture(scope="module")
def reverse():
    return build_splits("reverse", {"num_train": 24, "num_test": 4, "max_length": 5}, root=None,
                        cache_dir="/tmp/kdlab-test-accum", val_fraction=0.0, split_seed=0)


def _tinygpt(splits, width, seed):
    torch.manual_seed(seed)
    return registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                            layers=1, width=width, heads=2).double()


def _seq_method(splits, name, options):
    teacher = _tinygpt(splits, 16, 1) if name != "scratch" else None
    student = _tinygpt(splits, 8, 2)
    torch.manual_seed(0)
    method = build_method(MethodConfig(name, dict(options)), student=student, teacher=teacher,
                          input_shape=splits.input_shape, train_size=len(splits.train[0]), sequence=splits.sequence)
    return teacher, student, method


SEQUENCE_CASES = [
    ("gkd", {"on_policy_fraction": 0.0, "divergence": "jsd", "reduction": "token"}, "token"),
    ("gkd", {"on_policy_fraction": 0.0, "divergence": "forward_kl", "reduction": "sequence"}, "sequence"),
    ("scratch", {}, "token"),  # SFT cross-entropy
    ("policy_gradient_kd", {"sft_steps": 1}, "token"),  # its SFT warm-up: per-token cross-entropy
]


@pytest.mark.parametrize(("name", "options", "units"), SEQUENCE_CASES)
def test_off_policy_sequence_gradient_equals_one_big_batch(reverse, monkeypatch, name, options, units):
    splits = _double(reverse)
    teacher, student, method = _seq_method(splits, name, options)
    big = _gradients(_run(splits, student, method, teacher, _train(12, steps=2)), monkeypatch)
    teacher, student, method = _seq_method(splits, name, options)
    made: list[Batch] = []
    accumulated = _gradients(_run(splits, student, method, teacher, _train(4, 3, steps=2)), monkeypatch,
                             record=made)
    counts = [int(response_units(b.labels, units)) for b in made]
    assert len(made) == 3 and (units == "sequence" or len(set(counts)) > 1), counts  # 1/k would be wrong
    _assert_same(accumulated, big)


def _concatenated(batches: list[Batch], pad_id: int) -> Batch:
    """The micro-batches as one batch (right-padded to the widest; padding is never a response token)."""
    width = max(b.inputs.shape[1] for b in batches)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    return Batch(torch.cat([pad(b.inputs, pad_id) for b in batches]),
                 torch.cat([pad(b.labels, IGNORE) for b in batches]), extras=dict(batches[0].extras))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("name", ["gkd", "policy_gradient_kd"])
def test_on_policy_gradient_equals_one_batch_of_the_sampled_responses(reverse, monkeypatch, name, reduction):
    """λ = 1: the denominator is counted on the responses the student sampled, over all micro-batches."""
    splits = _double(reverse)
    options = ({"on_policy_fraction": 1.0, "divergence": "reverse_kl", "reduction": reduction} if name == "gkd"
               else {"reduction": reduction, "baseline": "none"})  # a baseline over the rows is per micro-batch
    teacher, student, method = _seq_method(splits, name, options)
    run = _run(splits, student, method, teacher, _train(4, 3, steps=2))
    made: list[Batch] = []
    before = {k: v.clone() for k, v in student.state_dict().items()}
    accumulated = _gradients(run, monkeypatch, record=made)
    student.load_state_dict(before)  # the reference runs on the weights the step's gradient was taken at
    assert len(made) == 3 and all(b.extras["source"] == "student" for b in made)
    # Sampled streams differ per micro-batch; counts before generation (the prompts' reference responses)
    # are not the counts trained on.
    assert len({tuple(b.inputs[0].tolist()) for b in made}) > 1 or len({b.inputs.shape for b in made}) > 1
    if reduction == "token":
        after = [int(response_units(b.labels)) for b in made]
        before = [int(response_units(run.data.batch(j)[2])) for j in range(3)]  # the reference responses'
        assert len(set(after)) > 1
        assert [a / sum(after) for a in after] != [b / sum(before) for b in before]  # counting before would fail

    whole = _concatenated(made, splits.sequence.pad_id)
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher_logits = teacher(whole.inputs)
    from kdlab.methods.base import Outputs

    terms = method.loss_terms(whole, Outputs(student(whole.inputs)), Outputs(teacher_logits))
    sum(terms.values()).backward()
    _assert_same(accumulated, [p.grad for p in student.parameters()])


def test_micro_batches_sample_from_their_own_streams(reverse):
    _, _, method = _seq_method(_double(reverse), "gkd", {"on_policy_fraction": 1.0})
    draws = []
    for micro in (0, 1):
        method.micro_batch = micro
        draws.append([torch.rand(4, generator=method.step_generator(torch.device("cpu"), s)) for s in (0, 1)])
    assert torch.equal(draws[0][0], draws[1][0])  # the step's on/off-policy draw: one per optimiser step
    assert not torch.equal(draws[0][1], draws[1][1])  # sampling: its own stream per micro-batch


# ----------------------------------------------------------------------------- config, end to end, resume


TINY = {"name": "tiny", "data": {"dataset": "synthetic", "num_train": 64, "num_test": 32},
        "student": {"model": "mlp", "width": 8, "depth": 1}, "method": {"name": "scratch"},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu"}, "seeds": [0]}


def _with_train(**train):
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(train)
    return raw


def test_config_bounds_and_run_ids(tmp_path, capsys):
    _, default_runs = parse_experiment(_with_train())
    _, one_runs = parse_experiment(_with_train(grad_accum_steps=1))
    _, two_runs = parse_experiment(_with_train(grad_accum_steps=2))
    assert "grad_accum_steps" not in default_runs[0].resolved()["train"]  # run ids of older configs kept
    assert one_runs[0].run_id == default_runs[0].run_id != two_runs[0].run_id
    assert two_runs[0].config.train.grad_accum_steps == 2
    for bad in (0, -1, 1.5, True, "2", 1 << 17):
        with pytest.raises(ConfigError) as info:
            parse_experiment(_with_train(grad_accum_steps=bad))
        assert any(p.startswith("train.grad_accum_steps") for p in info.value.problems), info.value.problems
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_with_train(grad_accum_steps=0)))
    code = main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--dry-run"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "train.grad_accum_steps: must be ≥ 1" in lines[0], lines
    assert "Traceback" not in "\n".join(lines)


def test_tiny_gkd_run_with_accumulation_counts_optimiser_steps(reverse, tmp_path):
    """24 prompts, micro-batches of 5, k = 2: 5 micro-batches → 3 optimiser steps per epoch (the last of one)."""
    teacher, student, method = _seq_method(reverse, "gkd", {"on_policy_fraction": 0.5})
    teacher, student = teacher.float(), student.float()
    seen = []
    original = method.set_progress
    method.set_progress = lambda step, total: (seen.append((step, total)), original(step, total))
    result = fit(student=student, method=method, teacher=teacher, splits=reverse,
                 train=_train(5, 2, epochs=2, lr=0.01, optimizer="adam"), seed=0, run_dir=tmp_path / "run")
    assert result.epochs_run == 2
    assert seen == [(s, 6) for s in range(6)]
    state = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    assert state["epoch"] == 2
    assert "test/acc" in result.final


class _Crash(Exception):
    pass


def test_resume_with_accumulation_matches_uninterrupted(tmp_path):
    splits = build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 100,
                                        "num_test": 30}, root=None, cache_dir=tmp_path / "cache",
                          val_fraction=0.2, split_seed=0)
    train = _train(8, 3, epochs=3, optimizer="adam", lr=0.01, schedule="cosine")

    def models():
        torch.manual_seed(1)
        teacher = build_model("mlp", {"width": 16}, splits)
        torch.manual_seed(2)
        student = build_model("mlp", {"width": 8, "dropout": 0.1}, splits)
        return teacher, student, build_method(MethodConfig("kd", {}), student=student, teacher=teacher)

    teacher, student, method = models()
    straight = fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
                   run_dir=tmp_path / "straight")
    weights = {k: v.clone() for k, v in student.state_dict().items()}

    def crash(epoch, metrics):
        if epoch == 2:
            raise _Crash

    teacher, student, method = models()
    with pytest.raises(_Crash):
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
            run_dir=tmp_path / "killed", on_epoch=crash)
    torch.manual_seed(99)
    teacher, student, method = models()
    resumed = fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
                  run_dir=tmp_path / "killed")
    assert resumed.epochs_run == 2
    for key, value in straight.final.items():
        assert resumed.final[key] == pytest.approx(value, abs=1e-6), key
    for name, tensor in weights.items():
        torch.testing.assert_close(student.state_dict()[name], tensor, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- torchrun (two gloo processes)

_CHILD = """
import sys, torch
from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine import distributed
from kdlab.engine.build import build_method
from kdlab.engine.loop import fit
from safetensors.torch import save_file

out, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
ctx = distributed.init_from_environment() if len(sys.argv) > 4 else None
splits = build_splits("reverse", {"num_train": 40, "num_test": 4, "max_length": 5}, root=None,
                      cache_dir="/tmp/kdlab-test-accum", val_fraction=0.0, split_seed=0)
torch.manual_seed(2)
student = registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                           layers=1, width=8, heads=2)
method = build_method(MethodConfig("scratch", {}), student=student, teacher=None, input_shape=splits.input_shape,
                      train_size=40, sequence=splits.sequence)
train = TrainConfig(steps=2, batch_size=batch, grad_accum_steps=accum, lr=0.5, optimizer="sgd", momentum=0.0,
                    schedule="constant", device="cpu")
fit(student=student, method=method, teacher=None, splits=splits, train=train, seed=5)
save_file({k: v.clone().contiguous() for k, v in student.state_dict().items()}, out)
distributed.shutdown()
"""


@pytest.mark.integration
def test_torchrun_accumulation_matches_one_process_with_the_global_batch(tmp_path):
    """SFT per token: 2 ranks × 2 micro-batches of 8 (4 per rank) = one process's batches of 16."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]

    def env(rank, world, port):
        return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(root))

    single = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "single.st"), "16", "1"],
                            env=env(0, 1, 0), capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / f"rank{r}.st"), "8", "2", "ddp"],
                              env=env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in ranks:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    reference = load_file(str(tmp_path / "single.st"))
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.st"))
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)


def test_cli_runs_a_tiny_gkd_study_with_accumulation(tmp_path):
    """`kdlab run` end to end with train.grad_accum_steps: 2 (on-policy GKD after an SFT warm-up)."""
    from kdlab.store import Store

    cfg = {"name": "accum-tiny", "data": {"dataset": "reverse", "num_train": 48, "num_test": 8, "max_length": 4},
           "teacher": {"model": "tinygpt", "layers": 1, "width": 16, "heads": 2,
                       "train": {"steps": 4, "batch_size": 16, "optimizer": "adamw", "lr": 0.003}},
           "student": {"model": "tinygpt", "layers": 1, "width": 8, "heads": 2},
           "method": {"name": "gkd", "sft_steps": 1, "on_policy_fraction": 1.0, "reduction": "token"},
           "train": {"steps": 3, "batch_size": 8, "grad_accum_steps": 2, "optimizer": "adamw", "lr": 0.003},
           "seeds": [0]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 0
    runs = Store(tmp_path / "ws").runs(experiment="accum-tiny")
    assert len(runs) == 1 and runs[0].status == "finished" and "test/acc" in runs[0].final
