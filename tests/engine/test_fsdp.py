"""Sharded students (train.sharding: fsdp, FSDP2 on gloo): two processes equal one; resume is exact."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from kdlab.config import parse_experiment
from kdlab.errors import ConfigError
from tests.engine.test_distributed import ROOT, _env, _free_port, _weights
from tests.test_config import single


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_experiment(raw)
    return info.value.problems


def test_fsdp_is_refused_in_one_line_before_any_work(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _problems(single(train__sharding="fsdp")) == [
        "train.sharding: fsdp needs several processes: start the run with torchrun --nproc_per_node N -m kdlab "
        "run, or set train.sharding: ddp"]
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert _problems(single(train__sharding="fsdp", train__batch_size=64, teacher__train__batch_size=63)) == [
        "train.batch_size: 64 does not split over 3 processes; the global batch must be a multiple of torchrun's "
        "--nproc_per_node"]
    for method, why in (("adversarial_kd", "its adversary's step"), ("dot", "its own optimiser")):
        (problem,) = _problems(single(train__sharding="fsdp", train__batch_size=63, teacher__train__batch_size=63,
                                      train__optimizer="sgd", method={"name": method}))
        assert problem.startswith(f"train.sharding: fsdp does not take method {method} ({why}"), problem
    assert _problems(single(train__sharding="fsdp", train__batch_size=63, teacher__train__batch_size=63, train__compile=True)) == [
        "train.compile does not combine with train.sharding: fsdp; drop one of them"]
    parse_experiment(single(train__sharding="fsdp", train__batch_size=63, teacher__train__batch_size=63))  # a plain KD run shards
    monkeypatch.setenv("WORLD_SIZE", "1")
    parse_experiment(single(train__batch_size=64))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _problems(single(teacher__train__batch_size=63)) == [
        "teacher.train.batch_size: 63 does not split over 2 processes; the global batch must be a multiple of "
        "torchrun's --nproc_per_node"]  # one process: nothing to split, plain ddp default


def test_sharding_keeps_run_ids_at_its_default():
    plain, ddp = parse_experiment(single()), parse_experiment(single(train__sharding="ddp"))
    assert [s.run_id for s in plain[1]] == [s.run_id for s in ddp[1]]

# One fit() of a tiny GPT student (its blocks in a ModuleList: one FSDP unit each) under GKD with on-policy
# greedy generation on every step (collective decoding steps, rows finishing at different steps), Adam
# (sharded optimiser state), clipping (a global norm over shards), 2 epochs, a checkpoint per epoch. argv: out, run dir, world, epoch to stop after
# (0: none; the processes die right after that epoch's checkpoint).
_CHILD = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    from kdlab import registry
    from kdlab.config import MethodConfig, TrainConfig
    from kdlab.data import build_splits
    from kdlab.engine import distributed, loop
    from kdlab.engine.build import build_method
    from safetensors.torch import save_file

    out, run_dir, world, stop = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    ctx = distributed.init_from_environment() if world > 1 else None
    splits = build_splits("reverse", {"num_train": 24, "num_test": 4, "max_length": 4}, root=None,
                          cache_dir=str(run_dir.parent / "cache"), val_fraction=0.25, split_seed=0)
    def tinygpt(width, seed, layers):
        torch.manual_seed(seed)
        return registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                                layers=layers, width=width, heads=2)
    teacher, student = tinygpt(16, 1, 1), tinygpt(8, 2, 2)
    torch.manual_seed(0)
    method = build_method(MethodConfig("gkd", {"on_policy_fraction": 1.0, "sampling_temperature": 0.0}),
                          student=student, teacher=teacher, input_shape=splits.input_shape,
                          train_size=len(splits.train[0]), sequence=splits.sequence)
    train = TrainConfig(epochs=2, batch_size=6, lr=0.01, optimizer="adam", schedule="constant", device="cpu",
                        checkpoint_every=1, grad_clip=0.05, sharding="fsdp" if world > 1 else "ddp")
    save = loop._Fit.checkpoint
    def checkpoint(self):
        save(self)
        if self.state.epoch == stop:  # killed right after the checkpoint
            distributed.barrier(ctx)
            os._exit(3)
    loop._Fit.checkpoint = checkpoint
    result = loop.fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
                      run_dir=run_dir, resume=True)
    print("FINAL", sorted(result.final))
    if ctx is None or ctx.is_main:
        save_file({k: v.clone() for k, v in student.state_dict().items()}, out)
        tied = student.lm_head.weight is student.embed.token.weight
        print("TIED", tied)
    distributed.shutdown()
""")


def _launch(tmp_path, name: str, world: int, stop: int = 0, run: str | None = None, *, child: str = _CHILD,
            extra: tuple[str, ...] = (), timeout: int = 300) -> list[str]:
    """``world`` gloo processes of ``child`` (argv: out, run dir, world, stop epoch, *extra); their stdouts."""
    port = _free_port()
    args = [str(tmp_path / f"{name}.st"), str(tmp_path / (run or name)), str(world), str(stop), *extra]
    procs = [subprocess.Popen([sys.executable, "-c", child, *args], env=_env(r, world, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == (3 if stop else 0), err[-3000:]
    return [out for out, _ in outs]


@pytest.mark.integration
def test_two_sharded_processes_equal_one_and_resume_exactly_with_any_process_count(tmp_path):
    _launch(tmp_path, "single", 1)
    outs = _launch(tmp_path, "sharded", 2)
    assert "TIED True" in outs[0]  # a plain module again after fit, its tied weights one parameter
    assert "'val/acc'" in outs[0] and "FINAL []" in outs[1]  # every rank evaluates; rank 0 returns the metrics
    reference, sharded = _weights(tmp_path / "single.st"), _weights(tmp_path / "sharded.st")
    assert sharded.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], atol=1e-5, rtol=1e-5, msg=key)

    _launch(tmp_path, "killed", 2, stop=1)  # dies after epoch 1's checkpoint
    shutil.copytree(tmp_path / "killed", tmp_path / "killed1")
    _launch(tmp_path, "resumed", 2, run="killed")
    resumed = _weights(tmp_path / "resumed.st")
    for key in sharded:
        assert torch.equal(resumed[key], sharded[key]), key  # exact: the same ranks, the same state
    _launch(tmp_path, "resumed1", 1, run="killed1")  # the 2-process checkpoint, continued by one process
    resumed1 = _weights(tmp_path / "resumed1.st")
    for key in reference:
        torch.testing.assert_close(resumed1[key], reference[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.integration
def test_torchrun_cli_trains_a_sharded_student_and_rank_0_saves_the_whole_model(tmp_path):
    from safetensors.torch import load_file

    from kdlab.store import Store

    config = tmp_path / "c.yaml"
    config.write_text("name: fsdp\ndata: {dataset: synthetic, num_train: 200, num_test: 40}\n"
                      "teacher: {model: mlp, width: 16, train: {epochs: 1, batch_size: 32, device: cpu}}\n"
                      "student: {model: mlp, width: 8}\nmethod: {name: kd, temperature: 3.0}\n"
                      "train: {epochs: 2, batch_size: 32, device: cpu, sharding: fsdp, selection: best_val}\n"
                      "seeds: [0]\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "kdlab", "--workspace", str(tmp_path / "ws"), "run", str(config)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    records = Store(tmp_path / "ws").runs()
    assert sorted((r.role, r.status) for r in records) == [("student", "finished"), ("teacher", "finished")]
    student = next(r for r in records if r.role == "student")
    assert "test/acc" in student.final and "selected_epoch" in student.final
    weights = load_file(str(tmp_path / "ws" / "runs" / student.run_id / "model.safetensors"))
    assert tuple(weights["layer1.1.weight"].shape)[0] == 8 and tuple(weights["layer2.0.weight"].shape) == (8, 8)  # whole
