"""Data-parallel training (torchrun, gloo on the CPU): two processes equal one with the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kdlab.engine import distributed

ROOT = Path(__file__).resolve().parents[2]


def test_shard_weights_make_the_rank_average_the_global_mean():
    # Reference: the plain mean over the whole global batch, in float64. DDP averages the ranks'
    # weighted means; shard() must make that average equal it, for even, uneven and starved splits.
    values = torch.randn(11, dtype=torch.float64)
    for total, world in ((8, 2), (7, 2), (11, 3), (1, 2), (2, 3)):
        index = torch.arange(total)
        pieces = [distributed.shard(index, rank, world) for rank in range(world)]
        averaged = sum(weight * values[local].mean() for local, weight in pieces) / world
        assert torch.allclose(averaged, values[:total].mean(), atol=1e-12), (total, world)
        kept = torch.cat([local for local, weight in pieces if weight > 0])
        assert kept.tolist() == list(range(total))  # each sample on exactly one rank, in order


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(rank: int, world: int, port: int, **extra) -> dict[str, str]:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


# One fit() on tiny synthetic data; every rank writes its final student weights. No dropout and no
# BatchNorm: both are per-rank under DDP (their own random masks, their own batch statistics).
_CHILD = textwrap.dedent("""
    import sys, torch
    from kdlab.config import MethodConfig, TrainConfig
    from kdlab.data import build_splits
    from kdlab.engine import distributed
    from kdlab.engine.build import build_method, build_model
    from kdlab.engine.loop import fit
    from safetensors.torch import save_file

    out, cache = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    ctx = distributed.init_from_environment() if len(sys.argv) > 3 else None
    splits = build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 249, "num_test": 30,
                                        "separation": 2.0}, root=None, cache_dir=cache, val_fraction=0.2, split_seed=0)
    torch.manual_seed(123)
    teacher = build_model("mlp", {"width": 32}, splits)
    torch.manual_seed(0)
    student = build_model("mlp", {"width": 8}, splits)
    method = build_method(MethodConfig("kd", {"temperature": 3.0, "alpha": 0.7}), student=student, teacher=teacher)
    train = TrainConfig(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", momentum=0.9, device="cpu")
    logged = []
    result = fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
                 on_epoch=lambda epoch, metrics: logged.append(metrics["train/loss"]))
    print("TRAIN", len(splits.train[0]), "FINAL", len(result.final), "LOSS", *logged)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out)
    distributed.shutdown()
""")


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.integration
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "single.st"), str(tmp_path / "cache")],
                            env=_env(0, 1, 0), capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    train_size = int(single.stdout.split()[1])
    assert train_size % 32 % 2 == 1  # the last global batch splits unevenly: the weighted shares are exercised

    port = _free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / f"rank{r}.st"), str(tmp_path / "cache"),
                               "ddp"], env=_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in ranks]
    for p, (_, err) in zip(ranks, outputs):
        assert p.returncode == 0, err
    assert "FINAL 0" in outputs[1][0] and "FINAL 0" not in outputs[0][0]  # only rank 0 evaluates
    # The logged train loss is the global batch's (not the sum over ranks).
    single_loss = [float(v) for v in single.stdout.split("LOSS")[1].split()]
    ddp_loss = [float(v) for v in outputs[0][0].split("LOSS")[1].split()]
    assert len(ddp_loss) == len(single_loss) == 2
    assert ddp_loss == pytest.approx(single_loss, rel=1e-4)

    reference = _weights(tmp_path / "single.st")
    for r in range(2):
        got = _weights(tmp_path / f"rank{r}.st")
        assert got.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.integration
def test_unreachable_rendezvous_is_a_clear_error_not_a_hang(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: t\ndata: {dataset: synthetic}\nstudent: {model: mlp}\nmethod: {name: scratch}\n"
                      "train: {epochs: 1, device: cpu}\n")
    started = time.monotonic()
    # Rank 1 of 2 with nobody listening at the master's port: the store connection times out.
    done = subprocess.run([sys.executable, "-m", "kdlab", "--workspace", str(tmp_path / "ws"), "run", str(config)],
                          env=_env(1, 2, _free_port(), KDLAB_DIST_TIMEOUT="2"), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "rendezvous at 127.0.0.1" in done.stderr and "KDLAB_DIST_TIMEOUT" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "ws" / "kdlab.db").exists()  # nothing written before the group formed


@pytest.mark.integration
def test_torchrun_cli_runs_a_study_and_only_rank_0_writes(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: ddp\ndata: {dataset: synthetic, num_train: 300, num_test: 60}\n"
                      "teacher: {model: mlp, width: 16, train: {epochs: 1, batch_size: 32, device: cpu}}\n"
                      "student: {model: mlp, width: 8}\nmethod: {name: kd, temperature: 3.0}\n"
                      "train: {epochs: 2, batch_size: 32, device: cpu}\nseeds: [0]\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "kdlab"]
    ddp = subprocess.run(base + ["--workspace", str(tmp_path / "ddp"), "run", str(config)], env=env,
                         capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert ddp.stdout.count("ran 1, skipped 0") == 1  # one report, from rank 0
    from kdlab.store import Store

    records = Store(tmp_path / "ddp").runs()
    assert sorted((r.role, r.status) for r in records) == [("student", "finished"), ("teacher", "finished")]
    run_id = next(r.run_id for r in records if r.role == "student")
    assert (tmp_path / "ddp" / "runs" / run_id / "model.safetensors").is_file()
    logged = [json.loads(line)["epoch"] for line in
              (tmp_path / "ddp" / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # one line per epoch: a second writer would have doubled them
