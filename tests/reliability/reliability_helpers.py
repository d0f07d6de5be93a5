"""Shared pieces of the reliability tests: a tiny study and a way to run the CLI in a child process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

# A study small enough to train in seconds on one busy core; long enough (many short epochs, a
# checkpoint after each) that a SIGKILL lands mid-training.
TINY = {
    "name": "crash",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 200, "num_test": 60},
    "student": {"model": "mlp", "width": 8, "dropout": 0.1},
    "method": {"name": "scratch"},
    "train": {"epochs": 20, "batch_size": 10, "checkpoint_every": 1, "device": "cpu"},
    "seeds": [0],
}


def write_config(folder: Path, cfg: dict, name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def child_env(**extra: str) -> dict:
    # One intra-op thread in every child: the same reduction order in every process, so a resumed
    # run can be compared bit for bit with an uninterrupted one.
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)


def kdlab_command(workspace: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kdlab.cli", "--workspace", str(workspace), *args]


def run_kdlab(workspace: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(kdlab_command(workspace, *args), env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
