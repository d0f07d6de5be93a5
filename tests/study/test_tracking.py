"""Tracking sinks: enabling TensorBoard or MLflow leaves results bit-identical, the run id unchanged, and the
sink holds exactly the metrics the store recorded."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdlab.cli import main
from kdlab.config import load_experiment
from kdlab.errors import KdlabError
from kdlab.store import Store
from kdlab.study import tracking

TINY = {
    "name": "tracked",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 120, "num_test": 40},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "scratch"},
    "train": {"epochs": 2, "batch_size": 40, "device": "cpu"},
    "seeds": [0],
}


def _run(tmp: Path, workspace: Path, cfg: dict):
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(workspace), "run", str(path), "--quiet"]) == 0
    (record,) = Store(workspace).runs(experiment=cfg["name"])
    assert record.status == "finished"
    return record


def _same_results(plain, tracked) -> None:
    assert plain.run_id == tracked.run_id  # tracking is not part of the run's identity
    assert plain.final.keys() == tracked.final.keys()
    for key in plain.final:
        if key != "train_seconds":
            assert plain.final[key] == tracked.final[key], key
    a, b = load_file(plain.run_dir / "model.safetensors"), load_file(tracked.run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tracking_keeps_run_ids_and_is_left_out_of_the_resolved_config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(TINY))
    _, plain = load_experiment(path)
    _, tracked = load_experiment(path, ["tracking.tensorboard=true", "tracking.mlflow={uri: file:///x}"])
    assert tracked[0].config.tracking.tensorboard is True
    assert tracked[0].config.tracking.mlflow.uri == "file:///x"
    assert plain[0].run_id == tracked[0].run_id and plain[0].group_key == tracked[0].group_key
    assert "tracking" not in tracked[0].resolved()


def test_unknown_tracking_key_is_a_config_error(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, tracking={"tensorbord": True})))
    with pytest.raises(KdlabError, match="tracking.tensorbord: unknown key.*did you mean 'tensorboard'"):
        load_experiment(path)


def test_missing_package_is_a_one_line_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from kdlab.config import TrackingConfig

    with pytest.raises(KdlabError, match=r"pip install 'kdlab\[tensorboard\]'"):
        tracking.check_available(TrackingConfig(tensorboard=True))


def test_mlflow_names_split_a_key_that_also_groups_others():
    assert tracking.mlflow_metric_names(["train/loss", "train/loss/ce", "val/acc", "a b:c"]) == \
        ["train/loss/total", "train/loss/ce", "val/acc", "a b_c"]


def test_a_failing_sink_is_dropped_and_the_run_goes_on():
    class Broken:
        closed = None

        def log_epoch(self, epoch, metrics):
            raise OSError("disk full")

        def close(self, status):
            Broken.closed = status

    lines = []
    sinks = tracking.Sinks([Broken()], out=lines.append)
    sinks.log_epoch(1, {"a": 1.0})
    sinks.log_epoch(2, {"a": 1.0})  # dropped: not called again
    assert len(lines) == 1 and "disk full" in lines[0] and Broken.closed == "failed"
    assert sinks.sinks == []


@pytest.mark.integration
def test_tensorboard_events_hold_the_stored_metrics_and_change_nothing(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = _run(tmp_path, tmp_path / "plain", TINY)
    tracked = _run(tmp_path, tmp_path / "tb", dict(copy.deepcopy(TINY), tracking={"tensorboard": True}))
    _same_results(plain, tracked)
    folder = tracked.run_dir / tracking.TENSORBOARD_FOLDER
    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    stored = Store(tmp_path / "tb").epoch_metrics(tracked.run_id)
    for key in ("train/loss", "train/loss/ce", "val/acc"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == sorted(stored)
        # float32 in the event file
        assert [s.value for s in scalars] == pytest.approx([stored[e][key] for e in sorted(stored)], rel=1e-6)
    (final,) = events.Scalars("final/test/acc")
    assert final.value == pytest.approx(tracked.final["test/acc"], rel=1e-6)


@pytest.mark.integration
def test_mlflow_local_store_holds_the_stored_metrics_and_resume_reuses_the_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    plain = _run(tmp_path, tmp_path / "plain", TINY)
    workspace = tmp_path / "ml"
    tracked = _run(tmp_path, workspace, dict(copy.deepcopy(TINY), tracking={"mlflow": True}))
    _same_results(plain, tracked)
    client = MlflowClient(tracking_uri=(workspace / tracking.MLFLOW_FOLDER).as_uri())
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == tracked.run_id and run.data.tags[tracking.RUN_TAG] == tracked.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["student.width"] == "8" and run.data.params["method.name"] == "scratch"
    stored = Store(workspace).epoch_metrics(tracked.run_id)
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [(m.step, m.value) for m in history] == [(e, stored[e]["val/acc"]) for e in sorted(stored)]
    assert run.data.metrics["final/test/acc"] == tracked.final["test/acc"]
    total = client.get_metric_history(run.info.run_id, "train/loss/total")  # train/loss beside train/loss/ce
    assert [m.value for m in total] == [stored[e]["train/loss"] for e in sorted(stored)]
    # The same kdlab run opened again (as on resume) continues its MLflow run rather than adding one.
    again = tracking.open_sinks(load_experiment(None, ["tracking.mlflow=true"])[0].tracking,
                                run_dir=tracked.run_dir, workspace=workspace, run_id=tracked.run_id,
                                experiment="tracked", label="x", config={})
    again.close("finished")
    assert len(client.search_runs([experiment.experiment_id])) == 1
