"""The capacity-gap report: a tiny real teacher × student study through the CLI, checked against
numbers computed by hand from the store, and hand-made stores for the descriptors and pooling rules."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats as scipy_stats

from kdlab.cli import main
from kdlab.errors import KdlabError
from kdlab.store import Store
from kdlab.study.capacity import capacity_table
from kdlab.study.views.capacity import render_capacity

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STUDY = {
    "name": "cap",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 200, "num_test": 60},
    "teacher": {"model": "mlp", "width": 32, "train": {"epochs": 2, "batch_size": 50, "lr": 0.05, "device": "cpu"}},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "kd", "temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 2, "batch_size": 50, "lr": 0.05, "device": "cpu"},
    "seeds": [0, 1],
    "grid": {"teacher.width": [8, 32], "student.width": [2, 4], "method.name": ["scratch", "kd"]},
}


def _half_width(values: list[float]) -> float:
    return float(scipy_stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("capacity")
    config = tmp / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    workspace = tmp / "ws"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 18 tiny runs: thread start-up and contention cost more than they save
    try:
        assert main(["--workspace", str(workspace), "run", str(config), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return workspace


def test_cells_gains_and_teachers_match_the_store(study):
    store = Store(study)
    runs = store.runs(experiment="cap", role="student")
    assert len(runs) == 16 and {r.status for r in runs} == {"finished"}
    table = capacity_table(store, "cap")
    assert table.methods == ("kd",)
    assert [t.name for t in table.teachers] == ["mlp width=8", "mlp width=32"]
    assert [s.name for s in table.students] == ["mlp width=2", "mlp width=4"]

    def acc(method, teacher_width, student_width):
        return {r.seed: r.final["test/acc"] for r in runs if r.config["method"]["name"] == method
                and r.config["teacher"]["width"] == teacher_width and r.config["student"]["width"] == student_width}

    for student_width in (2, 4):
        # Scratch: one run per teacher of the grid for each seed; the baseline of a seed is their mean.
        by_teacher = [acc("scratch", w, student_width) for w in (8, 32)]
        scratch = {seed: statistics.mean(d[seed] for d in by_teacher) for seed in (0, 1)}
        base = table.scratch[("kd", f"mlp width={student_width}")]
        assert base.n == 2 and base.mean == pytest.approx(statistics.mean(scratch.values()), abs=1e-12)
        for teacher_width in (8, 32):
            kd = acc("kd", teacher_width, student_width)
            cell = table.cells[("kd", f"mlp width={teacher_width}", f"mlp width={student_width}")]
            assert cell.seeds == (0, 1) and len(cell.run_ids) == 2
            assert cell.summary.mean == pytest.approx(statistics.mean(kd.values()), abs=1e-12)
            if len(set(kd.values())) > 1:
                assert cell.summary.half_width == pytest.approx(_half_width(list(kd.values())), rel=1e-9)
            differences = [kd[seed] - scratch[seed] for seed in (0, 1)]
            assert cell.gain.n == 2
            assert cell.gain.mean == pytest.approx(statistics.mean(differences), abs=1e-12)
            if len(set(differences)) > 1:
                assert cell.gain.half_width == pytest.approx(_half_width(differences), rel=1e-9)

    teachers = store.runs(role="teacher")
    assert len(teachers) == 2
    for record in teachers:
        info = table.teacher(f"mlp width={record.config['student']['width']}")
        assert info.run_id == record.run_id
        assert info.accuracy == record.final["test/acc"] and info.params == record.final["params"]
    assert table.teachers[0].params < table.teachers[1].params

    text = render_capacity(table)
    for name in ("mlp width=8", "mlp width=32", "mlp width=2", "mlp width=4", "scratch (no teacher)", "Δ "):
        assert name in text
    assert f"{table.teachers[1].accuracy:.4f}" in text
    cell = table.cells[("kd", "mlp width=32", "mlp width=4")]
    assert f"Δ {cell.gain.mean:+.4f}" in text
    markdown = render_capacity(table, fmt="markdown")
    assert "| mlp width=32 |" in markdown and "### method kd" in markdown


def test_cli_compare_capacity_and_plot(study, tmp_path, capsys):
    assert main(["--workspace", str(study), "compare", "cap", "--capacity"]) == 0
    out = capsys.readouterr().out
    assert "method kd" in out and "mlp width=32" in out and "mlp width=2" in out

    out_dir = tmp_path / "figures"
    assert main(["--workspace", str(study), "plot", "capacity-gap", "cap", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "### method kd" in out and "| mlp width=32 |" in out  # the view's table first, as Markdown
    printed = [line for line in out.splitlines() if line.endswith((".png", ".svg"))]  # then the figure paths
    names = ["capacity_gap_heatmap.png", "capacity_gap_heatmap.svg", "capacity_gap_lines.png", "capacity_gap_lines.svg"]
    assert sorted(Path(p).name for p in printed) == sorted(names)
    for name in names:
        path = out_dir / name
        data = path.read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        else:
            assert b"<svg" in data
        assert str(path) in printed
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no partial files left

    # Default folder: <workspace>/plots/<experiment>/.
    assert main(["--workspace", str(study), "plot", "capacity-gap", "cap"]) == 0
    capsys.readouterr()
    assert (study / "plots" / "cap" / "capacity_gap_lines.svg").is_file()


def test_cli_errors_are_one_line_exit_2(study, capsys):
    assert main(["--workspace", str(study), "plot", "capacity-gap", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and err[0].startswith("kdlab: error:")
    assert main(["--workspace", str(study), "compare", "nope", "--capacity"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["--workspace", str(study), "compare", "--capacity"]) == 2
    assert "exactly one experiment" in capsys.readouterr().err
    assert main(["--workspace", str(study), "compare", "teachers", "--capacity"]) == 2  # no student runs
    assert "no finished student runs" in capsys.readouterr().err
    assert main(["--workspace", str(study), "plot", "capacity-gap", "cap", "--method", "dkd"]) == 2
    assert "methods: kd" in capsys.readouterr().err


# --------------------------------------------------------------------------- hand-made stores

DATA = {"dataset": "handmade", "val_fraction": 0.1}  # not a registered dataset: teachers are found by content
TRAIN = {"epochs": 20, "lr": 0.01, "keep_epochs": [10]}


def _model(width: int, **extra) -> dict:
    return {"model": "cnn1d", "checkpoint": None, "train": None, "seed": 0, "width": width, "depth": 3, **extra}


def _teacher(width: int, **extra) -> dict:
    return {**_model(width), "train": TRAIN, **extra}


def _add(store: Store, run_id: str, *, experiment: str, role: str, seed: int, config: dict, final: dict) -> None:
    store.ensure_experiment(experiment, {})
    assert store.claim(run_id, experiment=experiment, role=role, label=run_id, seed=seed, group_key=run_id,
                       config={**config, "seed": seed}) is None
    store.finish(run_id, final)


def _student(store, run_id, seed, teacher, method, acc, width=8):
    config = {"name": "hand", "data": DATA, "teacher": teacher, "student": _model(width), "method": method,
              "train": {"epochs": 5}}
    _add(store, run_id, experiment="hand", role="student", seed=seed, config=config,
         final={"test/acc": acc, "val/acc": acc, "params": 100.0 * width})


@pytest.fixture()
def hand_store(tmp_path) -> Store:
    store = Store(tmp_path / "ws")
    for width, acc, params in ((64, 0.80, 1000.0), (128, 0.90, 4000.0)):
        config = {"name": "teacher", "data": DATA, "teacher": None, "student": _model(width),
                  "method": {"name": "scratch"}, "train": TRAIN}
        _add(store, f"teacher-w{width}", experiment="teachers", role="teacher", seed=0, config=config,
             final={"test/acc": acc, "params": params})
    store.log_epoch("teacher-w128", 10, {"val/acc": 0.70})
    kd, scratch = {"name": "kd", "temperature": 4.0}, {"name": "scratch", "label_smoothing": 0.0}
    t64, t128 = _teacher(64), _teacher(128)
    early = _teacher(128, epoch=10)
    chain = _teacher(128, assistants=[_teacher(32)])
    # Scratch runs under two teacher sections: seed 0 differs (0.50 / 0.52), seed 1 agrees.
    _student(store, "s-t64-0", 0, t64, scratch, 0.50)
    _student(store, "s-t128-0", 0, t128, scratch, 0.52)
    _student(store, "s-t64-1", 1, t64, scratch, 0.60)
    _student(store, "s-t128-1", 1, t128, scratch, 0.60)
    _student(store, "ls-0", 0, t64, {"name": "scratch", "label_smoothing": 0.1}, 0.99)  # not the baseline
    for name, teacher, accs in (("t64", t64, (0.55, 0.66)), ("early", early, (0.53, 0.62)),
                                ("chain", chain, (0.56, 0.64))):
        for seed, acc in enumerate(accs):
            _student(store, f"kd-{name}-{seed}", seed, teacher, kd, acc)
    return store


def test_descriptors_pooling_and_teacher_lookup(hand_store):
    table = capacity_table(hand_store, "hand")
    assert table.methods == ("kd",)
    assert [t.name for t in table.teachers] == [
        "cnn1d width=64", "cnn1d width=128 epoch=10", "cnn1d width=128 → TA cnn1d width=32"]
    assert [s.name for s in table.students] == ["cnn1d width=8"]
    t64, early, chain = table.teachers
    assert (t64.accuracy, t64.params, t64.run_id) == (0.80, 1000.0, "teacher-w64")
    assert early.accuracy is None and early.params == 4000.0  # test/acc was not logged at epoch 10
    assert (chain.accuracy, chain.params) == (0.90, 4000.0)  # the chain's first (largest) teacher
    assert capacity_table(hand_store, "hand", metric="val/acc").teacher("cnn1d width=128 epoch=10").accuracy == 0.70

    base = table.scratch[("kd", "cnn1d width=8")]
    assert base.n == 2 and base.mean == pytest.approx((0.51 + 0.60) / 2)  # seed 0: mean of 0.50 and 0.52
    cell = table.cells[("kd", "cnn1d width=64", "cnn1d width=8")]
    assert cell.summary.mean == pytest.approx(0.605)
    assert cell.gain.mean == pytest.approx(0.05)
    assert cell.gain.half_width == pytest.approx(_half_width([0.04, 0.06]))
    assert table.notes and "label_smoothing=0.1" in table.notes[0]

    text = render_capacity(table)
    assert "cnn1d width=128 → TA cnn1d width=32" in text and "0.6050 ± " in text and "Δ +0.0500 ± " in text
    line = next(line for line in text.splitlines() if line.startswith("cnn1d width=128 epoch=10"))
    assert line.split()[3] == "-" and "4,000" in line  # unknown accuracy, known size


def test_unknown_experiment_and_metric(hand_store):
    with pytest.raises(KdlabError, match="did you mean hand"):
        capacity_table(hand_store, "hnad")
    with pytest.raises(KdlabError, match="metric 'test/nll'"):
        capacity_table(hand_store, "hand", metric="test/nll")
