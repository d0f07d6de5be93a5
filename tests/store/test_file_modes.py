"""Every file a run and a report write gets the user's umask (0644 under umask 022), not mkstemp's 0600."""
from __future__ import annotations

import os
import stat

import pytest
import yaml

from kdlab.cli import main

TINY = {
    "name": "modes",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 8], "num_train": 60, "num_test": 30},
    "student": {"model": "mlp", "width": 4},
    "method": {"name": "scratch"},
    "train": {"epochs": 1, "batch_size": 20, "device": "cpu"},
    "seeds": [0],
}


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_a_run_and_its_report_are_written_0644_under_umask_022(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(TINY))
    workspace = tmp_path / "ws"
    previous = os.umask(0o022)
    try:
        assert main(["--workspace", str(workspace), "run", str(config), "--quiet"]) == 0
        assert main(["--workspace", str(workspace), "report", "--no-eval", "--out", str(tmp_path / "r.html")]) == 0
    finally:
        os.umask(previous)
    (run_dir,) = (workspace / "runs").iterdir()
    written = [run_dir / name for name in ("config.yaml", "final.json", "model.safetensors", "env.json")]
    written += [tmp_path / "r.html", tmp_path / "r.md"]
    written += [p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes
