"""Tracking sinks: a run's per-epoch and final metrics also sent to TensorBoard or MLflow.

The results store stays the record; a sink is a copy for the tools people
already use. Configured by the ``tracking:`` section (``TrackingConfig``)::

    tracking: {tensorboard: true, mlflow: {uri: http://host:5000, experiment: my-study}}

* ``tensorboard``: event files in ``<run folder>/tensorboard`` (``tensorboard --logdir
  <workspace>/runs``), written with ``torch.utils.tensorboard`` (extra ``tensorboard``).
* ``mlflow``: one MLflow run per kdlab run (named by the run id, tagged ``kdlab.run_id``;
  a resumed run continues the same MLflow run), params = the flattened resolved config,
  metrics per epoch (step = epoch) and the final ones (``final/<key>``); a key that also
  groups others is logged as ``<key>/total`` (``train/loss/total`` beside ``train/loss/ce``). ``true`` or a mapping without
  ``uri`` uses a local file store, ``<workspace>/mlruns`` (extra ``mlflow``: mlflow-skinny).

A sink never changes results: it only reads the metrics after the loop computed
them, uses no random number generator of torch, NumPy or Python, and is not part
of the run id. A sink that fails while the run trains is closed with a warning;
the run goes on (its metrics are in the store either way). A missing package is
a ``KdlabError`` before any run starts (:func:`check_available`).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol

from kdlab.dotted import dotted_leaves
from kdlab.errors import KdlabError

TENSORBOARD_FOLDER = "tensorboard"
MLFLOW_FOLDER = "mlruns"
RUN_TAG = "kdlab.run_id"
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's allowed metric/param name characters
_MLFLOW_PARAM_CHARS = 500  # MLflow's limit on a param value's length
_MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit)


class Sink(Protocol):
    """What the runner calls; each method is called in this order, ``close`` exactly once."""

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None: ...

    def log_final(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...  # "finished", "failed" or "interrupted"


def _enabled(tracking) -> tuple[bool, Any]:
    """(tensorboard on, mlflow section or None) of a ``TrackingConfig`` (None: nothing)."""
    if tracking is None:
        return False, None
    mlflow = tracking.mlflow
    if mlflow is True:
        from kdlab.config import MlflowConfig

        mlflow = MlflowConfig()
    return bool(tracking.tensorboard), (mlflow or None)


def check_available(tracking) -> None:
    """Raise ``KdlabError`` with the install command when an enabled sink's package is missing."""
    tensorboard, mlflow = _enabled(tracking)
    if tensorboard:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise KdlabError("tracking.tensorboard: the tensorboard package is not installed; "
                             "pip install 'kdlab[tensorboard]' or set tracking.tensorboard: false") from None
    if mlflow is not None:
        try:
            import mlflow as _  # noqa: F401
        except ImportError:
            raise KdlabError("tracking.mlflow: the mlflow package is not installed; "
                             "pip install 'kdlab[mlflow]' or remove tracking.mlflow") from None


class TensorBoardSink:
    """Scalars ``<key>`` at step = epoch; final metrics as ``final/<key>`` at the last step."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=int(epoch))
        self.writer.flush()  # a crash loses at most the epoch being written

    def log_final(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"final/{key}", float(value), global_step=int(step))

    def close(self, status: str) -> None:
        self.writer.close()


def mlflow_name(key: str) -> str:
    """A metric or param name MLflow accepts (other characters become ``_``)."""
    return _MLFLOW_BAD.sub("_", key)


def mlflow_metric_names(keys: list[str]) -> list[str]:
    """MLflow names of metric ``keys``; a key that is also a group of others (``train/loss`` beside
    ``train/loss/ce``) becomes ``train/loss/total``: MLflow's file store keeps a metric per file, with
    ``/`` as folders, so one name cannot be both."""
    names = [mlflow_name(key) for key in keys]
    groups = {name.rsplit("/", i)[0] for name in names for i in range(1, name.count("/") + 1)}
    return [f"{name}/total" if name in groups else name for name in names]




class MlflowSink:
    """One MLflow run per kdlab run: params from the resolved config, metrics at step = epoch."""

    STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def __init__(self, section, *, workspace: Path, run_id: str, experiment: str, label: str, config: dict):
        import mlflow.entities
        from mlflow.tracking import MlflowClient

        uri = section.uri or (Path(workspace).absolute() / MLFLOW_FOLDER).as_uri()
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked for it; it is the dependency-free local default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._entities = mlflow.entities
        self.client = MlflowClient(tracking_uri=uri)
        name = section.experiment or experiment
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except Exception:  # another worker process created it meanwhile
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
        previous = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'",
                                           max_results=1)
        if previous:  # a resumed kdlab run continues its MLflow run
            self.run_id = previous[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_id, tags={RUN_TAG: run_id, "kdlab.label": label})
            self.run_id = run.info.run_id
            params = [self._entities.Param(mlflow_name(k), str(v)[:_MLFLOW_PARAM_CHARS])
                      for k, v in dotted_leaves(config).items()]
            for start in range(0, len(params), _MLFLOW_BATCH):
                self.client.log_batch(self.run_id, params=params[start:start + _MLFLOW_BATCH])
        self.uri = uri

    def _log(self, metrics: Mapping[str, float], step: int, prefix: str = "") -> None:
        import time

        now = int(time.time() * 1000)
        names = mlflow_metric_names([prefix + key for key in metrics])
        rows = [self._entities.Metric(name, float(value), now, int(step)) for name, value in zip(names, metrics.values())]
        for start in range(0, len(rows), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[start:start + _MLFLOW_BATCH])

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._log(metrics, epoch)

    def log_final(self, metrics: Mapping[str, float], step: int) -> None:
        self._log(metrics, step, prefix="final/")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "FAILED"))


class Sinks:
    """The enabled sinks of one run; a sink that raises is closed and dropped with a warning."""

    def __init__(self, sinks: list, out=print):
        self.sinks = list(sinks)
        self.out = out

    def _each(self, what: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, what)(*args)
            except Exception as error:  # a tracking failure must not fail (or change) the run
                self.out(f"  tracking: {type(sink).__name__}.{what} failed ({type(error).__name__}: {error}); "
                         "that sink is off for this run, the store has every metric")
                self.sinks.remove(sink)
                if what != "close":
                    try:
                        sink.close("failed")
                    except Exception:
                        pass

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._each("log_epoch", epoch, metrics)

    def log_final(self, metrics: Mapping[str, float], step: int) -> None:
        self._each("log_final", metrics, step)

    def close(self, status: str) -> None:
        self._each("close", status)
        self.sinks = []


def open_sinks(tracking, *, run_dir: Path, workspace: Path, run_id: str, experiment: str, label: str,
               config: dict, out=print) -> Sinks:
    """The sinks ``tracking`` enables for one run (none: an empty ``Sinks`` that does nothing)."""
    tensorboard, mlflow = _enabled(tracking)
    sinks: list = []
    if tensorboard or mlflow is not None:
        check_available(tracking)
    with warnings.catch_warnings():  # their import-time deprecation chatter is not the user's business
        warnings.simplefilter("ignore", DeprecationWarning)
        makers = []
        if tensorboard:
            makers.append(lambda: TensorBoardSink(Path(run_dir) / TENSORBOARD_FOLDER))
        if mlflow is not None:
            makers.append(lambda: MlflowSink(mlflow, workspace=Path(workspace), run_id=run_id, experiment=experiment,
                                             label=label, config=config))
        for make in makers:
            try:
                sinks.append(make())
            except Exception as error:  # e.g. an unreachable tracking server: the run still trains
                out(f"  tracking: could not open a sink for {run_id} ({type(error).__name__}: {error}); "
                    "the run goes on without it")
    return Sinks(sinks, out=out)
