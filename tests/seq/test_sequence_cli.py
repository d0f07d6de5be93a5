"""A GKD study through the command line: a tiny end-to-end run, the grid table, and bad input (exit code 2)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.store import Store

TINY = {
    "name": "gkd-tiny",
    "data": {"dataset": "reverse", "num_train": 96, "num_test": 16, "max_length": 5},
    "teacher": {"model": "tinygpt", "layers": 1, "width": 32, "heads": 2,
                "train": {"steps": 12, "batch_size": 32, "optimizer": "adamw", "lr": 0.003}},
    "student": {"model": "tinygpt", "layers": 1, "width": 16, "heads": 2},
    "method": {"name": "gkd", "sft_steps": 2},
    "train": {"steps": 6, "batch_size": 32, "optimizer": "adamw", "lr": 0.003},
    "seeds": [0],
    "grid": {"method.on_policy_fraction": [0.0, 1.0], "method.divergence": ["forward_kl", "reverse_kl"]},
}


def _run(tmp_path: Path, cfg: dict, *args: str) -> int:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet", *args])


def test_a_gkd_grid_runs_end_to_end_and_tabulates(tmp_path, capsys):
    assert _run(tmp_path, TINY) == 0
    runs = Store(tmp_path / "ws").runs(experiment="gkd-tiny")
    assert len(runs) == 4 and {r.status for r in runs} == {"finished"}
    for run in runs:
        for key in ("test/acc", "test/token_acc", "test/nll", "test/agreement", "test/sampled_acc"):
            assert key in run.final
    capsys.readouterr()
    assert main(["--workspace", str(tmp_path / "ws"), "plot", "gkd-grid", "gkd-tiny", "--out",
                 str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| forward_kl |" in out and "| reverse_kl |" in out and "λ=0 | λ=1" in out and "teacher" in out
    assert (tmp_path / "plots" / "gkd_grid.png").stat().st_size > 0


@pytest.mark.parametrize("change, fragment", [
    ({"data": {"dataset": "revers"}}, "did you mean reverse"),
    ({"data": {"dataset": "reverse", "num_train": 96, "num_test": 16, "context_length": 6}}, "data.context_length"),
    ({"student": {"model": "tinygpt", "layers": 1, "width": 16, "heads": 2, "context_length": 8}}, "context_length"),
    ({"method": {"name": "gkd", "on_policy_fraction": 1.5}}, "method.on_policy_fraction"),
    ({"method": {"name": "kd"}}, "classification method"),
])
def test_bad_sequence_input_exits_2_before_training(tmp_path, capsys, change, fragment):
    cfg = {**TINY, **change, "grid": {}}
    assert _run(tmp_path, cfg, "--dry-run") == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
