"""The kdlab command end to end, on a tiny synthetic study, and its bad-input contract (exit code 2)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli import main
from kdlab.store import Store

TINY = {
    "name": "tiny",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 200, "num_test": 60},
    "teacher": {"model": "mlp", "width": 32, "train": {"epochs": 3, "batch_size": 50, "device": "cpu"}},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "kd", "temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 2, "batch_size": 50, "device": "cpu"},
    "seeds": [0, 1],
    "grid": {"method.name": ["scratch", "kd"]},
}


def _write(tmp_path: Path, cfg: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kdlab(tmp_path, *args) -> int:
    return main(["--workspace", str(tmp_path / "ws"), *args])


def test_list_prints_every_name_with_its_summary(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "kd " in out and "Hinton KD" in out and "scratch" in out
    assert main(["list", "models", "resnet*"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "resnet20" in names and "cnn1d" not in names


def test_run_compare_show_and_skip_finished(tmp_path, capsys):
    config = _write(tmp_path, TINY)
    assert _kdlab(tmp_path, "run", str(config), "--quiet") == 0
    out = capsys.readouterr().out
    assert "method.name=kd" in out and "method.name=scratch" in out
    assert "last epoch" in out and "kdlab.db" in out
    store = Store(tmp_path / "ws")
    students = store.runs(experiment="tiny")
    assert len(students) == 4 and {r.status for r in students} == {"finished"}
    teachers = store.runs(role="teacher")
    assert len(teachers) == 1 and teachers[0].status == "finished"  # one teacher shared by four students
    for record in students:
        folder = Path(record.run_dir)
        assert (folder / "model.safetensors").is_file() and (folder / "final.json").is_file()
        assert yaml.safe_load((folder / "config.yaml").read_text())["seed"] == record.seed
        assert "torch" in json.loads((folder / "env.json").read_text())
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
        assert 0.0 <= record.final["test/acc"] <= 1.0 and "test/agreement" in record.final
    scratch = [r for r in students if r.config["method"]["name"] == "scratch"]
    assert "temperature" not in scratch[0].config["method"]

    # Running again skips every finished run and trains nothing.
    assert _kdlab(tmp_path, "run", str(config), "--quiet") == 0
    assert "ran 0, skipped 4" in capsys.readouterr().out

    assert _kdlab(tmp_path, "compare", "tiny", "--markdown") == 0
    table = capsys.readouterr().out
    assert table.count("| method.name=") == 2 and "±" in table
    assert _kdlab(tmp_path, "show", students[0].run_id) == 0
    shown = capsys.readouterr().out
    assert "final metrics" in shown and "test/acc" in shown and "dataset: synthetic" in shown


def test_seeds_and_set_override_the_config(tmp_path, capsys):
    config = _write(tmp_path, TINY)
    assert _kdlab(tmp_path, "run", str(config), "--quiet", "--seeds", "3", "--set", "train.epochs=1") == 0
    store = Store(tmp_path / "ws")
    runs = store.runs(experiment="tiny")
    assert {r.seed for r in runs} == {3}
    assert all(r.config["train"]["epochs"] == 1 for r in runs)


def test_dry_run_prints_parameters_and_tap_shapes(tmp_path, capsys):
    config = _write(tmp_path, TINY)
    assert _kdlab(tmp_path, "run", str(config), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "layer1 (2, 8)" in out and "layer1 (2, 32)" in out
    assert Store(tmp_path / "ws").runs() == []  # nothing trained, nothing claimed


def _expect_error(tmp_path, capsys, cfg_or_args, *fragments):
    args = cfg_or_args if isinstance(cfg_or_args, list) else ["run", str(_write(tmp_path, cfg_or_args)), "--quiet"]
    assert _kdlab(tmp_path, *args) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_bad_input_exits_2_with_the_key_and_the_fix(tmp_path, capsys):
    bad = dict(TINY, student={"model": "mlpp"})
    _expect_error(tmp_path, capsys, bad, "student.model", "mlpp", "did you mean mlp")
    bad = dict(TINY, train={"epochs": "many"})
    _expect_error(tmp_path, capsys, bad, "train.epochs", "'many'")
    bad = dict(TINY, data={"dataset": "cifar10", "root": str(tmp_path / "nowhere")})
    _expect_error(tmp_path, capsys, bad, "nowhere", "cifar-10")
    _expect_error(tmp_path, capsys, ["run", str(tmp_path / "missing.yaml")], "missing.yaml", "does not exist")
    _expect_error(tmp_path, capsys, ["show", "no-such-run"], "no-such-run")
    assert Store(tmp_path / "ws").runs() == []


def test_bad_teacher_checkpoints_are_refused_before_any_run(tmp_path, capsys):
    from kdlab.engine.checkpoint import save_model

    # A kdlab checkpoint for 5 classes against a 3-class dataset.
    wrong = torch.nn.Linear(12, 5)
    save_model(tmp_path / "five.safetensors", wrong, {"model": "mlp", "options": {}, "num_classes": 5,
                                                       "input_shape": [1, 12]})
    cfg = dict(TINY, teacher={"checkpoint": str(tmp_path / "five.safetensors")})
    _expect_error(tmp_path, capsys, cfg, "5 classes", "3")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    cfg = dict(TINY, teacher={"checkpoint": str(tmp_path / "corrupt.safetensors"), "model": "mlp"})
    _expect_error(tmp_path, capsys, cfg, "corrupt.safetensors", "safetensors")
    # Right classes, wrong architecture options: the state dict does not fit.
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    cfg = dict(TINY, teacher={"checkpoint": str(tmp_path / "plain.safetensors"), "model": "mlp", "width": 32})
    _expect_error(tmp_path, capsys, cfg, "plain.safetensors", "does not match")
    assert Store(tmp_path / "ws").runs(experiment="tiny") == []


def test_unwritable_workspace_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    assert main(["--workspace", str(blocker / "ws"), "run", str(_write(tmp_path, TINY)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "workspace" in err and len(err.strip().splitlines()) == 1


def test_distill_from_python_with_plain_modules():
    import kdlab

    torch.manual_seed(0)
    x = torch.rand(300, 10)
    y = (x[:, 0] > x[:, 1]).long()
    teacher = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    kdlab.distill(teacher, None, (x, y), method="scratch", epochs=20, lr=0.01, batch_size=50, device="cpu")
    student = torch.nn.Linear(10, 2)
    metrics = kdlab.distill(student, teacher, {"train": (x[:240], y[:240]), "test": (x[240:], y[240:])},
                            method="kd", temperature=2.0, alpha=0.9, epochs=15, batch_size=50, device="cpu")
    assert metrics["test/acc"] > 0.8 and metrics["test/agreement"] > 0.8
    with pytest.raises(Exception, match="temprature"):
        kdlab.distill(student, teacher, (x, y), method="kd", temprature=2.0)


@pytest.mark.integration
def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL a CLI run after its first checkpoint; the next `kdlab run` resumes it and finishes."""
    cfg = dict(TINY, seeds=[0], grid={}, teacher=None, method={"name": "scratch"},
               train={"epochs": 400, "batch_size": 20, "checkpoint_every": 1, "device": "cpu"})
    config = _write(tmp_path, cfg)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "kdlab.cli", "--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    pointers = []
    while time.time() < deadline and not pointers:
        pointers = list((tmp_path / "ws").glob("runs/*/checkpoints/latest.json"))
        time.sleep(0.05)
    assert pointers, proc.communicate()
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path / "ws")
    (record,) = store.runs(experiment="tiny")
    assert record.status == "interrupted"  # its process is dead (read so at once); the next run reclaims it
    killed_at = json.loads(pointers[0].read_text())["epoch"]
    assert 1 <= killed_at < 400
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    record = Store(tmp_path / "ws").run(record.run_id)
    assert record.status == "finished" and record.final["selected_epoch"] == 400
    epochs = [json.loads(line)["epoch"] for line in (Path(record.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 401))  # lines after the checkpoint were dropped before resuming


def test_run_from_python_with_a_dict_config(tmp_path):
    import kdlab

    cfg = dict(TINY, grid={}, seeds=[0], method={"name": "kd", "temperature": 2.0})
    records = kdlab.run(cfg, workspace=tmp_path / "ws")
    assert len(records) == 1 and records[0].status == "finished"
    again = kdlab.run(cfg, workspace=tmp_path / "ws", overrides=["train.epochs=1"])
    assert again[0].run_id != records[0].run_id and again[0].config["train"]["epochs"] == 1


def test_bad_tap_is_refused_before_any_run_is_claimed(tmp_path, capsys):
    cfg = dict(TINY, grid={}, method={"name": "distill", "terms": {
        "ce": 1.0, "fitnet": {"weight": 1.0, "student": "layer9", "teacher": "pool"}}})
    _expect_error(tmp_path, capsys, cfg, "method.terms.fitnet.student", "layer9")
    assert Store(tmp_path / "ws").runs() == []  # neither the teacher nor any student was started


def test_compare_plot_writes_a_png(tmp_path, capsys):
    config = _write(tmp_path, dict(TINY, seeds=[0, 1]))
    assert _kdlab(tmp_path, "run", str(config), "--quiet") == 0
    png = tmp_path / "bars.png"
    assert _kdlab(tmp_path, "compare", "tiny", "--baseline", "method.name=scratch", "--plot", str(png)) == 0
    out = capsys.readouterr().out
    assert "paired" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
