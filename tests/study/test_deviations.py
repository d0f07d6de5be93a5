"""`kdlab analyze deviations` end to end on tiny synthetic studies: files, numbers that must match the stored run,
and the one-line errors for runs it cannot analyse."""
from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.errors import KdlabError
from kdlab.store import Store
from kdlab.study.deviations import analyze_deviations, deviation_frame

TINY = {
    "name": "tiny",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 200, "num_test": 60},
    "teacher": {"model": "mlp", "width": 32, "train": {"epochs": 3, "batch_size": 50, "device": "cpu"}},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "kd", "temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 2, "batch_size": 50, "device": "cpu"},
    "seeds": [0],
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _kdlab(workspace: Path, *args) -> int:
    return main(["--workspace", str(workspace), *args])


def _run(tmp: Path, workspace: Path, cfg: dict) -> str:
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _kdlab(workspace, "run", str(path), "--quiet") == 0
    (record,) = Store(workspace).runs(experiment=cfg["name"])
    assert record.status == "finished"
    return record.run_id


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One workspace: a kd student of a recipe teacher, a scratch run without teacher, a kd student of a checkpoint."""
    tmp = tmp_path_factory.mktemp("deviations")
    workspace = tmp / "ws"
    kd = _run(tmp, workspace, TINY)
    lone = _run(tmp, workspace, dict(TINY, name="lone", teacher=None, method={"name": "scratch"}))
    (teacher,) = Store(workspace).runs(role="teacher")
    ckpt = _run(tmp, workspace, dict(TINY, name="ckpt",
                                     teacher={"checkpoint": str(Path(teacher.run_dir) / "model.safetensors")}))
    return {"workspace": workspace, "kd": kd, "lone": lone, "ckpt": ckpt, "teacher": teacher.run_id, "tmp": tmp}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_writes_png_and_json_and_prints_slopes(study, capsys):
    workspace, run_id = study["workspace"], study["kd"]
    capsys.readouterr()
    assert _kdlab(workspace, "analyze", "deviations", run_id) == 0
    out = capsys.readouterr().out
    folder = Path(Store(workspace).run(run_id).run_dir)
    png, report = folder / "deviations.png", folder / "deviations.json"
    width, height = _png_size(png)
    assert width >= 600 and height >= 300 and png.stat().st_size > 10_000  # two panels, points drawn
    result = json.loads(report.read_text())
    assert result["run_id"] == run_id and result["teacher"] == f"run {study['teacher']}"
    assert set(result["splits"]) == {"train", "test"}
    assert result["splits"]["train"]["n"] == 180 and result["splits"]["test"]["n"] == 60  # 10% of train is val
    for split in ("train", "test"):
        summary = result["splits"][split]
        assert sum(b["n"] for b in summary["buckets"]) == summary["n"]
        assert summary["fit"]["low"] <= summary["fit"]["slope"] <= summary["fit"]["high"]
        assert f"{split:<5} slope {summary['fit']['slope']:.3f} ± {summary['fit']['half_width']:.3f}" in out
    assert "teacher p" in out and str(png) in out and str(report) in out


def test_it_uses_the_runs_own_teacher_weights_and_test_split(study):
    # The training loop stored test agreement with the teacher; the analysis must reproduce it exactly.
    store = Store(study["workspace"])
    for key in ("kd", "ckpt"):
        record = store.run(study[key])
        result = analyze_deviations(store, record.run_id, splits=("test",), plot=False)
        assert result["splits"]["test"]["agreement"] == pytest.approx(record.final["test/agreement"], abs=1e-9)
        assert result["plot"] is None
    assert result["teacher"].startswith("checkpoint ")


def test_out_folder_and_unique_prefix(study, capsys):
    out = study["tmp"] / "elsewhere"
    prefix = study["kd"][:-3]
    assert _kdlab(study["workspace"], "analyze", "deviations", prefix, "--out", str(out)) == 0
    assert _png_size(out / "deviations.png")[0] > 0 and (out / "deviations.json").is_file()
    assert json.loads((out / "deviations.json").read_text())["run_id"] == study["kd"]


def test_run_without_teacher_exits_2_with_one_line(study, capsys):
    capsys.readouterr()
    assert _kdlab(study["workspace"], "analyze", "deviations", study["lone"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error:") and "no teacher" in err[0], err
    folder = Path(Store(study["workspace"]).run(study["lone"]).run_dir)
    assert not (folder / "deviations.png").exists()


def test_unfinished_or_unknown_runs_are_refused(study, capsys):
    store = Store(study["workspace"])
    finished = store.run(study["kd"])
    store.ensure_experiment("half", {})
    store.claim("half-0000000000", experiment="half", role="student", label="seed=0", seed=0,
                group_key="x", config=finished.config)
    with pytest.raises(KdlabError, match="is running, not finished"):
        analyze_deviations(store, "half-0000000000")
    assert _kdlab(study["workspace"], "analyze", "deviations", "no-such-run") == 2
    assert "no-such-run" in capsys.readouterr().err
    with pytest.raises(KdlabError, match="splits"):
        analyze_deviations(store, study["kd"], splits=("holdout",))


def test_dataframe_only_with_pandas(study, monkeypatch):
    result = analyze_deviations(study["workspace"], study["kd"], plot=False, n_buckets=4)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(KdlabError, match="pandas is not installed"):
        deviation_frame(result)
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda rows: rows  # stands in for pandas.DataFrame(list of row dicts)
    monkeypatch.setitem(sys.modules, "pandas", fake)
    rows = deviation_frame(result)
    assert len(rows) == 2 * 4 and {r["split"] for r in rows} == {"train", "test"}
    assert sum(r["n"] for r in rows if r["split"] == "test") == 60
