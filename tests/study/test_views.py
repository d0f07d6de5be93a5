"""Study views as registered views: the registry contract, the commands that iterate over them, the report
including the QAT table, and the report papercuts of issue 17 item 15 (each with a hand-made store)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from kdlab import registry
from kdlab.cli import build_parser, main
from kdlab.errors import KdlabError
from kdlab.report.table import Table
from kdlab.store import Store
from kdlab.study.views.base import Options, Selection, View, experiment_selection, get_view, view_names

DATA = {"dataset": "handmade"}
TEACHER = {"model": "bert_encoder", "width": 32, "seed": 0, "train": {"epochs": 1}}


def _add(store: Store, run_id: str, *, experiment: str, seed: int, config: dict, final: dict, role="student") -> None:
    store.ensure_experiment(experiment, {})
    assert store.claim(run_id, experiment=experiment, role=role, label=f"{run_id} seed={seed}", seed=seed,
                       group_key=run_id, config={**config, "seed": seed}) is None
    store.finish(run_id, final)


def test_every_registered_view_keeps_the_contract():
    names = registry.names("view")
    assert {"capacity_gap", "comparison", "deviations", "gkd_grid", "qat", "robustness"} <= set(names)
    for name in names:
        view = registry.get("view", name)
        assert isinstance(view, View) and view.name == name
        assert registry.summary("view", name)  # the line `kdlab plot --help` and the report heading show
        assert view.applies([]) is False  # no finished run: nothing to show
    assert get_view("capacity-gap") is registry.get("view", "capacity_gap")  # the CLI spelling
    with pytest.raises(KdlabError, match="unknown view 'qta'; did you mean qat"):
        get_view("qta")


def test_plot_and_compare_list_the_registered_views(capsys):
    plot = build_parser()._subparsers._group_actions[0].choices["plot"]
    text = plot.format_help()
    for name in view_names():
        assert name in text
    with pytest.raises(SystemExit) as exit_info:  # argparse: invalid choice, with the names
        main(["plot", "no-such-view", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "capacity-gap" in err and "qat" in err


def _qat_store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "ws")
    for bits, signals, accs in ((2, {"hidden_weight": 0.0}, (0.50, 0.54)), (2, {"hidden_weight": 1.0}, (0.60, 0.66))):
        for seed, acc in enumerate(accs):
            method = {"name": "qat_kd", "map_weight": 0.0, "output_weight": 0.0, "ce_weight": 0.0, **signals}
            config = {"name": "q", "data": DATA, "teacher": TEACHER, "method": method, "train": {"epochs": 1},
                      "student": {"model": "bert_encoder", "width": 16, "quant": {"weight_bits": bits}}}
            _add(store, f"q{signals['hidden_weight']:g}-{seed}", experiment="q", seed=seed, config=config,
                 final={"test/acc": acc})
    return store


def test_the_report_shows_every_view_that_applies_the_qat_table_included(tmp_path):
    from kdlab.study.report import study_blocks

    store = _qat_store(tmp_path)
    blocks, notes = study_blocks(store, "q", tmp_path / "figures", evaluate=False)
    headings = [b.text for b in blocks if hasattr(b, "level")]
    assert "Study views" in headings and any(h.startswith("QAT distillation") for h in headings)
    qat = next(b for b in blocks if isinstance(b, Table) and "distillation signals" in b.columns)
    assert [row[:3] for row in qat.rows] == [["2", "logits", "2"], ["2", "logits+hidden", "2"]]
    assert (tmp_path / "figures" / "qat.png").is_file()
    # The views that do not apply are absent; the one that evaluates models is named as skipped.
    assert not any(h.startswith(("Capacity gap", "GKD grid", "Robustness")) for h in headings)
    assert any("--no-eval" in note for note in notes)


def test_compare_prints_any_view_and_refuses_comparison_flags_elsewhere(tmp_path, capsys):
    _qat_store(tmp_path)
    ws = str(tmp_path / "ws")
    assert main(["--workspace", ws, "compare", "q", "--view", "qat", "--markdown"]) == 0
    assert "| 2 | logits+hidden | 2 |" in capsys.readouterr().out
    assert main(["--workspace", ws, "compare", "q", "--view", "qat", "--baseline", "x"]) == 2
    assert "--baseline" in capsys.readouterr().err
    assert main(["--workspace", ws, "compare", "--view", "qat"]) == 2  # a per-experiment view needs one name
    assert "exactly one experiment" in capsys.readouterr().err


def test_teacher_run_finder_is_the_one_lookup(tmp_path):
    from kdlab.study.teacher_runs import teacher_metric_values, teacher_run_finder

    store = _qat_store(tmp_path)
    _add(store, "teacher-a", experiment="teachers", role="teacher", seed=0, final={"test/acc": 0.9},
         config={"name": "teacher", "data": DATA, "teacher": None, "student": {k: v for k, v in TEACHER.items()
                                                                               if k != "seed"},
                 "method": {"name": "scratch"}, "train": TEACHER["train"]})
    find = teacher_run_finder(store)
    assert find(TEACHER, DATA).run_id == "teacher-a"  # by content: the "handmade" dataset has no recipe hash
    assert find({**TEACHER, "width": 64}, DATA) is None and find(None, DATA) is None
    assert find({"checkpoint": "t.safetensors"}, DATA) is None
    assert teacher_metric_values(store, store.runs(experiment="q"), "test/acc") == [0.9]  # once, not per student


# --------------------------------------------------------------------------- issue 17 item 15: report papercuts


def test_one_seed_prints_n1_and_a_dash_not_nan():
    from kdlab.store import RunRecord
    from kdlab.study.compare import compare_table, render_table

    def rec(group, acc):
        return RunRecord(run_id=group, experiment="e", role="student", label=f"m={group} seed=0", seed=0,
                         group_key=group, config={}, status="finished", final={"test/acc": acc})

    table = compare_table([rec("scratch", 0.5), rec("kd", 0.6)], metrics=("test/acc",), baseline="m=scratch")
    text = render_table(table)
    assert "nan" not in text
    row = next(line for line in text.splitlines() if line.startswith("m=kd"))
    assert row.split()[-2:] == ["(n=1)", "—"] and "+0.1000" in row
    assert "one paired seed gives no CI and no t-test" in text  # and the table says why


def test_the_deviation_view_refuses_sequence_runs_with_a_clear_line(tmp_path, capsys):
    from kdlab.config import parse_experiment

    raw = {"name": "seq", "data": {"dataset": "reverse", "num_train": 32, "num_test": 8, "max_length": 5},
           "teacher": {"model": "tinygpt", "layers": 1, "width": 16, "heads": 2, "train": {"steps": 2}},
           "student": {"model": "tinygpt", "layers": 1, "width": 8, "heads": 2},
           "method": {"name": "gkd"}, "train": {"steps": 2}, "seeds": [0]}
    _, (spec,) = parse_experiment(raw)
    store = Store(tmp_path / "ws")
    store.ensure_experiment("seq", {})
    store.claim(spec.run_id, experiment="seq", role="student", label=spec.label, seed=0, group_key=spec.group_key,
                config=spec.resolved())
    store.finish(spec.run_id, {"test/acc": 0.5})
    view = get_view("deviations")
    assert view.applies(store.runs(experiment="seq"))
    with pytest.raises(KdlabError, match="is a sequence task .*does not apply to sequence runs"):
        view.build(experiment_selection(store, "seq"), Options())
    assert main(["--workspace", str(tmp_path / "ws"), "analyze", "deviations", spec.run_id]) == 2
    err = capsys.readouterr().err
    assert "sequence task" in err and "flatten positions" not in err and len(err.strip().splitlines()) == 1


def test_the_deviation_scatter_title_fits_its_figure():
    from kdlab.report.plots import deviation_figure

    title = "tiny-0123456789 [method.name=kd method.temperature=4.0 method.alpha=0.9 seed=0] vs teacher run " \
            "teacher-abcdef0123 with a long description"
    figure = deviation_figure({"test": ([0.0, 1.0, 2.0], [0.1, 0.9, 2.2])}, {"test": {"slope": 1.0, "intercept": 0.0}},
                              title=title)
    renderer = figure.canvas.get_renderer()
    figure.canvas.draw()
    box = figure._suptitle.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= figure.bbox.x1  # wrapped, not cut at the edges
    assert "long description" in figure._suptitle.get_text()


def test_loss_term_curves_of_different_methods_say_they_are_weighted():
    from kdlab.store import RunRecord
    from kdlab.study.compare import compare_table
    from kdlab.study.report import WEIGHTED_NOTE, curve_titles

    def rec(run_id, method):
        return RunRecord(run_id=run_id, experiment="e", role="student", label=f"{run_id} seed=0", seed=0,
                         group_key=run_id, config={"method": method}, status="finished", final={})

    kd, scratch = rec("kd", {"name": "kd", "alpha": 0.9}), rec("scratch", {"name": "scratch"})
    rows = compare_table([kd, scratch], metrics=()).rows
    titles = curve_titles(rows, {"kd": kd, "scratch": scratch}, ["train/loss/ce", "val/acc"])
    assert titles["train/loss/ce"] != "train/loss/ce" and "weight" in titles["train/loss/ce"]
    assert titles["val/acc"] == "val/acc"
    assert "(1 − α)" in WEIGHTED_NOTE
    # One method only: its terms are on one scale, the title stays the key.
    assert curve_titles(rows[:1], {"kd": kd}, ["train/loss/ce"]) == {"train/loss/ce": "train/loss/ce"}


def test_compare_groups_by_the_config_when_a_row_has_no_group_key():
    from kdlab.store import RunRecord
    from kdlab.study.compare import compare_table

    def rec(run_id, seed, lr, label):
        return RunRecord(run_id=run_id, experiment="e", role="student", label=label, seed=seed, group_key="",
                         config={"train": {"lr": lr}, "seed": seed}, status="finished", final={"test/acc": lr})

    # Labels that a regex would split or merge wrongly: the config decides.
    rows = compare_table([rec("a", 0, 0.1, "x seed=0"), rec("b", 1, 0.1, "y seed=1"),
                          rec("c", 0, 0.2, "x seed=0")], metrics=("test/acc",)).rows
    assert sorted(row.run_ids for row in rows) == [("a", "b"), ("c",)]
    assert math.isclose(next(r for r in rows if r.run_ids == ("c",)).summaries["test/acc"].mean, 0.2)


def test_building_the_parser_imports_no_view():
    """The choices of `plot`/`compare --view` are read from the registry only when those commands parse."""
    import subprocess
    import sys

    code = ("import sys; from kdlab.cli import build_parser; build_parser().parse_args(['runs']); "
            "print(sorted(m for m in ('kdlab.study.views', 'torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
