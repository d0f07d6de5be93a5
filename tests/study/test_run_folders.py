"""Run folders: no link followed, damaged files named in one line, leftovers cleaned, held runs told apart,
and each run's intra-op thread count fixed by its config."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli import main
from kdlab.config import parse_experiment
from kdlab.engine.checkpoint import save_checkpoint
from kdlab.store import Store
from kdlab.study import runner as runner_module
from kdlab.study.runner import Runner

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "name": "folders",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 60, "num_test": 30},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "scratch"},
    "train": {"epochs": 2, "batch_size": 30, "checkpoint_every": 1, "device": "cpu"},
    "seeds": [0],
}


def _setup(tmp_path, cfg=TINY):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _, specs = parse_experiment(cfg)
    run_dir = tmp_path / "ws" / "runs" / specs[0].run_id
    return config, specs[0], run_dir


def _run(tmp_path, config, *extra):
    return main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet", *extra])


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


def _finished_once(tmp_path, config, capsys):
    assert _run(tmp_path, config) == 0
    capsys.readouterr()


# ---------------------------------------------------------------------------- links (issue 17 item 6)


def test_a_linked_metrics_file_is_never_truncated_or_appended(tmp_path, capsys):
    config, spec, run_dir = _setup(tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep this\nand this partial")  # a resume would trim the unterminated last line
    run_dir.mkdir(parents=True)
    os.symlink(outside, run_dir / "metrics.jsonl")
    assert _run(tmp_path, config) == 2
    _one_error_line(capsys, str(run_dir / "metrics.jsonl"), "symbolic link")
    assert outside.read_text() == "keep this\nand this partial"
    assert Store(tmp_path / "ws").run(spec.run_id).status == "interrupted"  # resumable once the link is gone
    (run_dir / "metrics.jsonl").unlink()
    assert _run(tmp_path, config) == 0


def test_a_pointer_to_a_checkpoint_outside_the_run_folder_is_refused(tmp_path, capsys):
    config, spec, run_dir = _setup(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    save_checkpoint(elsewhere, 1, {"student.w": torch.ones(1)}, {"step": 2})
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/latest.json").write_text(json.dumps({"epoch": 1, "dir": str(elsewhere / "epoch-0001")}))
    assert _run(tmp_path, config) == 2
    _one_error_line(capsys, "latest.json", "--no-resume")


def test_no_resume_removes_a_linked_checkpoint_folder_itself_never_its_target(tmp_path, capsys):
    config, spec, run_dir = _setup(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    run_dir.mkdir(parents=True)
    os.symlink(target, run_dir / "checkpoints")
    assert _run(tmp_path, config, "--no-resume") == 0
    assert (target / "keep.txt").read_text() == "mine"
    assert not (run_dir / "checkpoints").is_symlink() and (run_dir / "checkpoints/latest.json").is_file()


def test_a_linked_run_folder_is_refused(tmp_path, capsys):
    config, spec, run_dir = _setup(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    run_dir.parent.mkdir(parents=True)
    os.symlink(target, run_dir)
    assert _run(tmp_path, config) == 2
    _one_error_line(capsys, str(run_dir), "symbolic link")
    assert list(target.iterdir()) == []


# ---------------------------------------------------------------------------- damaged files (item 7)


@pytest.mark.parametrize("damage", ["pointer", "state_without_rng", "state_epoch_99"])
def test_a_damaged_checkpoint_is_one_line_and_no_resume_recovers(tmp_path, capsys, damage):
    config, spec, run_dir = _setup(tmp_path, dict(TINY, train={**TINY["train"], "epochs": 3}))
    _finished_once(tmp_path, config, capsys)
    store = Store(tmp_path / "ws")
    with store._write() as db:  # back to "interrupted" after epoch 3's checkpoint, as a crash would leave it
        db.execute("UPDATE runs SET status = 'interrupted' WHERE run_id = ?", (spec.run_id,))
    folder = run_dir / "checkpoints/epoch-0003"
    state = json.loads((folder / "state.json").read_text())
    if damage == "pointer":
        (run_dir / "checkpoints/latest.json").write_text("\x00garbage")
    elif damage == "state_without_rng":
        del state["rng"]
        (folder / "state.json").write_text(json.dumps(state))
    else:
        (folder / "state.json").write_text(json.dumps({**state, "epoch": 99}))
    assert _run(tmp_path, config) == 2
    _one_error_line(capsys, "checkpoint", "--no-resume")
    assert _run(tmp_path, config, "--no-resume") == 0
    assert Store(tmp_path / "ws").run(spec.run_id).status == "finished"


def test_bad_metric_lines_are_named_and_skipped_on_resume(tmp_path, capsys):
    config, spec, run_dir = _setup(tmp_path)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('[1, 2]\n{"epoch": "one"}\n"text"\nnot json\n')
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config)]) == 0
    out = capsys.readouterr().out
    for number in (1, 2, 3, 4):
        assert f"metrics.jsonl: line {number} is not a metrics record" in out
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


# ---------------------------------------------------------------------------- leftovers, held runs (item 11)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temporary_files_of_dead_writers_are_cleaned_when_the_run_is_opened(tmp_path, capsys):
    config, spec, run_dir = _setup(tmp_path)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    dead = checkpoints / f".tmp-epoch-0001-{_dead_pid()}"
    dead.mkdir()
    (dead / "weights.safetensors").write_bytes(b"half")
    live = checkpoints / f".tmp-epoch-0001-{os.getppid()}"  # a live process's: not ours to remove
    live.mkdir()
    leftovers = [run_dir / ".final.json.k2j4_x9.tmp", checkpoints / ".latest.json.a8fz0q1.tmp"]
    for path in leftovers:
        path.write_text("{")
    assert _run(tmp_path, config) == 0
    assert not dead.exists() and live.is_dir()
    assert not any(path.exists() for path in leftovers)


def test_runs_held_by_another_live_process_are_not_counted_as_finished(tmp_path, capsys):
    config, spec, run_dir = _setup(tmp_path, dict(TINY, seeds=[0, 1]))
    base, specs = parse_experiment(yaml.safe_load(config.read_text()))
    store = Store(tmp_path / "ws")
    store.ensure_experiment(base.name, {})
    holder = (f"import sys, time; from kdlab.store import Store; s = Store(sys.argv[1]); "
              f"print(s.claim({specs[1].run_id!r}, experiment={base.name!r}, role='student', label='x', seed=1, "
              f"group_key='g', config={{}}), flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "ws")], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == "None"
        summary = Runner(tmp_path / "ws", out=lambda text: None).run(base, specs)
        assert summary.ran == [specs[0].run_id] and summary.held == [specs[1].run_id] and summary.skipped == []
        assert _run(tmp_path, config) == 1 - 1  # nothing failed; the line says which runs are held
        out = capsys.readouterr().out
        assert "skipped 1 already finished, 1 held by another live process, failed 0" in out
    finally:
        proc.kill()
        proc.wait()


def test_a_study_summary_from_the_store_counts_running_rows_as_held():
    from types import SimpleNamespace

    from kdlab.study.workers import summarize

    specs = [SimpleNamespace(run_id="a"), SimpleNamespace(run_id="b")]
    records = {"a": SimpleNamespace(status="running"),
               "b": SimpleNamespace(status="finished", finished_at=1.0, started_at=0.5)}
    summary = summarize(records, specs, since=5.0)
    assert summary.held == ["a"] and summary.skipped == ["b"]


# ---------------------------------------------------------------------------- threads (item 2)


def test_each_run_computes_on_its_configured_thread_count_and_restores_the_process_one(tmp_path, monkeypatch):
    seen = []
    real_fit = runner_module.fit

    def recording_fit(**kwargs):
        seen.append(torch.get_num_threads())
        return real_fit(**kwargs)

    monkeypatch.setattr(runner_module, "fit", recording_fit)
    base, specs = parse_experiment(dict(TINY, seeds=[0, 1]))
    specs[1] = dataclasses.replace(specs[1], config=copy.deepcopy(specs[1].config))
    specs[1].config.train.threads = 2  # the config key train.threads
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        Runner(tmp_path / "ws", out=lambda text: None).run(base, specs)
        assert seen == [1, 2]  # the default is 1, whatever the process uses
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
