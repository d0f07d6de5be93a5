"""`kdlab tune`: an Optuna study over a config's knobs, kept in the results database, resumable,
with the best trial's config written out; and its bad-input contract (exit code 2)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.config import load_experiment
from kdlab.store import Store
from kdlab.study import tune as tune_module

TINY = {
    "name": "tiny",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 150, "num_test": 30},
    "teacher": {"model": "mlp", "width": 16, "train": {"epochs": 1, "batch_size": 50, "device": "cpu"}},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "kd", "temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 1, "batch_size": 50, "device": "cpu"},
    "seeds": [0],
    "tune": {"space": {"method.temperature": {"low": 1, "high": 8, "log": True},
                       "method.alpha": {"low": 0.1, "high": 0.95},
                       "train.lr": {"choices": [0.003, 0.01]}}},
}


@pytest.fixture
def optuna():
    return pytest.importorskip("optuna")


def _write(tmp_path: Path, cfg: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kdlab(tmp_path, *args, workspace: str = "ws") -> int:
    return main(["--workspace", str(tmp_path / workspace), *args])


def _study(optuna, workspace: Path, name: str = "tiny-tune"):
    return optuna.load_study(study_name=name, storage=tune_module.storage_url(workspace))


def test_study_records_trials_and_runs_and_writes_a_best_config_that_reproduces(tmp_path, capsys, optuna):
    config = _write(tmp_path, TINY)
    assert _kdlab(tmp_path, "tune", str(config), "--trials", "3", "--quiet") == 0
    out = capsys.readouterr().out
    assert "never test" in out and "test acc" not in out  # tuning reports validation only
    study = _study(optuna, tmp_path / "ws")  # the study lives in the results database itself
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    store = Store(tmp_path / "ws")
    runs = {r.run_id: r for r in store.runs(experiment="tiny-tune")}
    assert len(runs) == 3 and {r.status for r in runs.values()} == {"finished"}
    for t in trials:
        (run_id,) = t.user_attrs["kdlab_runs"]
        record = runs[run_id]
        assert t.value == record.final["val/acc"]  # objective: the run's validation accuracy
        assert record.config["method"]["temperature"] == pytest.approx(t.params["method.temperature"])
        assert record.config["train"]["lr"] == t.params["train.lr"]
        assert 1 <= t.params["method.temperature"] <= 8 and 0.1 <= t.params["method.alpha"] <= 0.95
    best = max(trials, key=lambda t: t.value)
    assert f"best: trial {best.number}" in out

    path = tmp_path / "ws" / "tune" / "tiny-tune" / "best.yaml"
    assert str(path) in out and path.read_text().startswith("# Best trial")
    base, specs = load_experiment(path)
    assert base.name == "tiny-tune-best" and "tune" not in yaml.safe_load(path.read_text()) and len(specs) == 1
    assert specs[0].config.method.options["alpha"] == pytest.approx(best.params["method.alpha"])
    # `kdlab run best.yaml` trains the best trial's config again: the same validation accuracy.
    assert _kdlab(tmp_path, "run", str(path), "--quiet") == 0
    (again,) = store.runs(experiment="tiny-tune-best")
    assert again.final["val/acc"] == pytest.approx(best.value)


def test_a_stopped_study_resumes_to_the_total_and_retrains_nothing(tmp_path, capsys, optuna):
    config = _write(tmp_path, TINY)
    assert _kdlab(tmp_path, "tune", str(config), "--trials", "2", "--quiet") == 0
    store = Store(tmp_path / "ws")
    first = {r.run_id: r.started_at for r in store.runs(experiment="tiny-tune")}
    assert len(first) == 2
    capsys.readouterr()

    assert _kdlab(tmp_path, "tune", str(config), "--trials", "4", "--quiet") == 0  # --trials is the total
    out = capsys.readouterr().out
    assert "trial 2 " in out and "trial 3 " in out and "trial 0 " not in out.split("\n\n")[0]
    trials = _study(optuna, tmp_path / "ws").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    runs = store.runs(experiment="tiny-tune")
    assert len(runs) == 4
    assert {r.run_id: r.started_at for r in runs if r.run_id in first} == first  # the first two were not retrained

    # Nothing left to do at the same total; a resumed study samples what an uninterrupted one samples.
    assert _kdlab(tmp_path, "tune", str(config), "--trials", "4", "--quiet") == 0
    assert "trial 4" not in capsys.readouterr().out
    assert _kdlab(tmp_path, "tune", str(config), "--trials", "4", "--quiet", workspace="ws2") == 0
    straight = _study(optuna, tmp_path / "ws2").get_trials()
    assert [t.params for t in straight] == [t.params for t in trials]

    # A changed config is refused: its trials would not be comparable with the stored ones.
    capsys.readouterr()
    assert _kdlab(tmp_path, "tune", str(config), "--trials", "5", "--set", "train.batch_size=25") == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 50 -> 25" in err and "tune.study" in err


def test_a_killed_trial_is_retried_and_its_finished_run_is_reused(tmp_path, capsys, optuna):
    config = _write(tmp_path, TINY)
    assert _kdlab(tmp_path, "tune", str(config), "--trials", "1", "--quiet") == 0
    study = _study(optuna, tmp_path / "ws")
    (done,) = study.get_trials()
    store = Store(tmp_path / "ws")
    (record,) = store.runs(experiment="tiny-tune")
    # A trial left RUNNING by a killed process (its pid no longer the process that started it), with values
    # whose run had already finished (killed between the run's end and the trial's).
    study.enqueue_trial(done.params)
    killed = study.ask()
    for key, knob in tune_module.load_tune_config(config, trials=1)[2].space.items():
        knob.suggest(killed)
    killed.set_user_attr("kdlab_pid", os.getpid())
    killed.set_user_attr("kdlab_pid_start", -1)
    killed.set_user_attr("kdlab_host", socket.gethostname())
    capsys.readouterr()

    assert _kdlab(tmp_path, "tune", str(config), "--trials", "2", "--quiet") == 0
    out = capsys.readouterr().out
    assert f"trial {killed.number} was stopped" in out and "reused 1 finished run" in out and "KILLED" in out
    trials = _study(optuna, tmp_path / "ws").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]  # the killed trial does not count
    retry = trials[2]
    assert retry.user_attrs["kdlab_retry_of"] == killed.number and retry.params == done.params
    assert retry.value == done.value
    assert [(r.run_id, r.started_at) for r in store.runs(experiment="tiny-tune")] == [
        (record.run_id, record.started_at)]  # not retrained


def test_entry_names_integer_keys_and_named_choices_resolve_like_a_grid():
    cfg = dict(TINY, tune={"space": {"method.name": {"choices": ["scratch", "kd"]},
                                     "method.temperature": {"low": 1, "high": 4},
                                     "train.epochs": {"low": 1, "high": 3},
                                     "student.width": {"choices": {"narrow": 4, "wide": 8}}}})
    raw, _, settings = tune_module.load_tune_config(cfg, trials=1)
    knobs = settings.space
    assert knobs["train.epochs"].kind == "int" and knobs["method.temperature"].kind == "float"
    assert settings.metric == "val/acc" and settings.direction == "maximize" and settings.study == "tiny-tune"
    scratch = tune_module.best_config(raw, settings, {"method.name": "scratch", "method.temperature": 3.0,
                                                      "train.epochs": 2, "student.width": "wide"})
    assert scratch["method"]["name"] == "scratch" and "temperature" not in scratch["method"]  # as in a grid
    assert scratch["train"]["epochs"] == 2 and scratch["student"]["width"] == 8
    kd = tune_module.best_config(raw, settings, {"method.name": "kd", "method.temperature": 3.0,
                                                 "train.epochs": 1, "student.width": "narrow"})
    assert kd["method"]["temperature"] == 3.0 and kd["student"]["width"] == 4
    assert tune_module.load_tune_config(cfg, trials=1, metric="val/nll")[2].direction == "minimize"


def _error(tmp_path, capsys, cfg: dict, *fragments, args=("--trials", "2")):
    assert _kdlab(tmp_path, "tune", str(_write(tmp_path, cfg)), *args) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "ws").exists()  # refused before any study, run or workspace exists
    return err


def test_bad_space_exits_2_naming_the_key_before_any_trial(tmp_path, capsys, optuna):
    space = dict(TINY["tune"]["space"], **{"method.temprature": {"low": 1, "high": 4}})
    _error(tmp_path, capsys, dict(TINY, tune={"space": space}),
           "tune.space.method.temprature", "did you mean 'temperature'")
    _error(tmp_path, capsys, dict(TINY, tune={"space": {"method.alpha": {"low": 0.9, "high": 0.1}}}),
           "tune.space.method.alpha", "low 0.9 is above high 0.1")
    _error(tmp_path, capsys, dict(TINY, tune={"space": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}),
           "tune.space.train.lr", "log: true needs low > 0")
    _error(tmp_path, capsys, dict(TINY, tune={"space": {"train.epochs": {"low": 1, "hihg": 3}}}),
           "tune.space.train.epochs.hihg", "did you mean 'high'")
    _error(tmp_path, capsys, dict(TINY, tune={"space": {"train.optimizer": {"choices": ["adam", "adamm"]}}}),
           "tune.space.train.optimizer", "'adamm'")
    _error(tmp_path, capsys, TINY, "tune.metric", "test split", args=("--trials", "2", "--metric", "test/acc"))
    _error(tmp_path, capsys, dict(TINY, grid={"method.name": ["scratch", "kd"]}), "grid:", "tune.space")
    _error(tmp_path, capsys, {k: v for k, v in TINY.items() if k != "tune"}, "no tune: section")
    _error(tmp_path, capsys, TINY, "--trials", args=())


def test_without_optuna_exits_2_with_the_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    assert _kdlab(tmp_path, "tune", str(_write(tmp_path, TINY)), "--trials", "2") == 2
    assert "pip install 'kdlab[tune]'" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


@pytest.mark.integration
def test_a_killed_tune_resumes_its_trial_from_the_run_checkpoint(tmp_path, optuna):
    """SIGKILL `kdlab tune` inside a trial's run; the next `kdlab tune` retries the trial and the run resumes."""
    cfg = dict(TINY, teacher=None, method={"name": "scratch"},
               train={"epochs": 400, "batch_size": 10, "checkpoint_every": 1, "device": "cpu"},
               tune={"space": {"train.lr": {"choices": [0.003, 0.01]}}})
    config = _write(tmp_path, cfg)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "kdlab.cli", "--workspace", str(tmp_path / "ws"), "tune", str(config),
           "--trials", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    pointers = []
    while time.time() < deadline and not pointers:
        pointers = list((tmp_path / "ws").glob("runs/*/checkpoints/latest.json"))
        time.sleep(0.05)
    assert pointers, proc.communicate()
    # Kill at once: with device-resident data a tiny epoch takes milliseconds, so a fixed pause could
    # outlast the whole run (400 epochs keep a margin either way).
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(pointers[0].read_text())["epoch"]
    assert 1 <= killed_at < 400
    assert [t.state.name for t in _study(optuna, tmp_path / "ws").get_trials()] == ["RUNNING"]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "trial 0 was stopped" in done.stdout and "resuming student" in done.stdout
    trials = _study(optuna, tmp_path / "ws").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].params == trials[0].params
    (record,) = Store(tmp_path / "ws").runs(experiment="tiny-tune")
    assert record.status == "finished" and record.final["selected_epoch"] == 400
