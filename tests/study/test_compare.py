"""Comparison tables from hand-made run records with known numbers."""
from __future__ import annotations

import random

import pytest

from kdlab.errors import KdlabError
from kdlab.store import RunRecord
from kdlab.study.compare import compare_table, render_table, strip_seed

T_975_2 = 4.302653  # t quantile for 3 seeds at 95%


def run(run_id, label, seed, group_key, final, *, experiment="sweep", status="finished"):
    return RunRecord(
        run_id=run_id, experiment=experiment, role="student", label=label, seed=seed,
        group_key=group_key, config={}, status=status, final=final,
    )


def records():
    return [
        # kd: three seeds; nll missing in one seed; ece absent everywhere.
        run("kd1", "method.name=kd seed=1", 1, "gkd", {"test/acc": 0.90, "test/nll": 0.30}),
        run("kd2", "method.name=kd seed=2", 2, "gkd", {"test/acc": 0.91, "test/nll": 0.32}),
        run("kd3", "method.name=kd seed=3", 3, "gkd", {"test/acc": 0.92}),
        run("kd4", "method.name=kd seed=4", 4, "gkd", {"test/acc": 0.10}, status="failed"),
        # ce: one finished seed, one still running.
        run("ce1", "method.name=ce seed=1", 1, "gce", {"test/acc": 0.85, "test/nll": 0.40}),
        run("ce2", "method.name=ce seed=2", 2, "gce", {}, status="running"),
        # never finished: no row at all.
        run("dkd1", "method.name=dkd seed=1", 1, "gdkd", {}, status="interrupted"),
    ]


def test_strip_seed():
    assert strip_seed("method.name=kd seed=1") == "method.name=kd"
    assert strip_seed("a=1 b=2 seed=12") == "a=1 b=2"
    assert strip_seed("seed=-3") == "(base)"
    assert strip_seed("seed=3") == "(base)"
    assert strip_seed("reseed=3") == "reseed=3"  # only a whole trailing seed=N
    assert strip_seed("seed=1 lr=0.1") == "seed=1 lr=0.1"


def test_groups_finished_runs_with_known_numbers():
    table = compare_table(records(), metrics=("test/acc", "test/nll", "test/ece"))
    assert [row.label for row in table.rows] == ["method.name=ce", "method.name=kd"]
    ce, kd = table.rows
    assert ce.n == 1 and ce.run_ids == ("ce1",)
    assert kd.n == 3 and kd.run_ids == ("kd1", "kd2", "kd3")
    acc = kd.summaries["test/acc"]
    assert acc.mean == pytest.approx(0.91) and acc.std == pytest.approx(0.01)
    assert acc.half_width == pytest.approx(T_975_2 * 0.01 / 3**0.5, rel=1e-6)
    assert kd.summaries["test/nll"].n == 2 and kd.summaries["test/nll"].mean == pytest.approx(0.31)
    assert kd.summaries["test/ece"] is None


def test_text_rendering():
    table = compare_table(records(), metrics=("test/acc", "test/nll", "test/ece"))
    # acc half width = 4.302653 * 0.01 / sqrt(3) = 0.024841; nll over its 2 seeds:
    # 12.706205 * sqrt(0.0002) / sqrt(2) = 0.127062. Labels left, numbers right.
    text = render_table(table)
    lines = text.splitlines()
    assert lines[0] == "config          n         test/acc               test/nll  test/ece"
    assert lines[1] == "--------------  -  ---------------  ---------------------  --------"
    assert lines[2] == "method.name=ce  1     0.8500 ± n/a           0.4000 ± n/a         -"
    assert lines[3] == "method.name=kd  3  0.9100 ± 0.0248  0.3100 ± 0.1271 (n=2)         -"
    assert lines[4] == ""
    assert lines[5].startswith("mean ± 95% Student-t CI half-width over n seeds")
    assert len(lines) == 6 and text.endswith("\n")


def test_markdown_rendering_and_escaping():
    table = compare_table(
        [
            run("a", "x|y seed=1", 1, "g1", {"test/acc": 0.5}),
            run("b", "plain seed=1", 1, "g2", {"test/acc": 0.25}, experiment="other"),
        ],
        metrics=("test/acc",),
        confidence=0.9,
    )
    lines = render_table(table, fmt="markdown", digits=2).splitlines()
    assert lines[:4] == [
        "| experiment | config | n | test/acc |",
        "|---|---|---:|---:|",
        "| other | plain | 1 | 0.25 ± n/a |",
        "| sweep | x\\|y | 1 | 0.50 ± n/a |",
    ]
    assert lines[5].startswith("mean ± 90% Student-t CI")


def test_rows_sorted_by_experiment_then_label_and_independent_of_input_order():
    base = [
        run("b1", "lr=0.1 seed=1", 1, "gb", {"test/acc": 0.2}, experiment="beta"),
        run("a1", "lr=0.2 seed=1", 1, "ga2", {"test/acc": 0.4}, experiment="alpha"),
        run("a2", "lr=0.1 seed=1", 1, "ga1", {"test/acc": 0.3}, experiment="alpha"),
        run("a3", "lr=0.1 seed=2", 2, "ga1", {"test/acc": 0.5}, experiment="alpha"),
    ]
    expected = [("alpha", "lr=0.1", ("a2", "a3")), ("alpha", "lr=0.2", ("a1",)), ("beta", "lr=0.1", ("b1",))]
    shuffled = list(base)
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        rows = compare_table(shuffled, metrics=("test/acc",)).rows
        assert [(row.experiment, row.label, row.run_ids) for row in rows] == expected
    # Same group_key in two experiments stays two rows.
    twin = [run("x", "p seed=1", 1, "g", {}, experiment="e1"), run("y", "p seed=1", 1, "g", {}, experiment="e2")]
    assert len(compare_table(twin).rows) == 2


def test_equal_labels_keep_first_seen_order():
    rows = compare_table(
        [run("s1", "same seed=1", 1, "second", {}), run("f1", "same seed=1", 1, "first", {})]
    ).rows
    assert [row.group_key for row in rows] == ["second", "first"]


def test_a_label_shared_by_two_configurations_names_each_and_a_shared_baseline_is_refused():
    runs = [run("a1", "m=kd seed=1", 1, "aaaaaaaa11", {"test/acc": 0.9}),
            run("b1", "m=kd seed=1", 1, "bbbbbbbb22", {"test/acc": 0.8}),
            run("c1", "m=x seed=1", 1, "cccccccc33", {"test/acc": 0.7}),
            run("o1", "m=kd seed=1", 1, "dddddddd44", {"test/acc": 0.6}, experiment="other")]
    table = compare_table(runs, metrics=["test/acc"], baseline="m=kd [config bbbbbbbb]")
    assert [row.label for row in table.rows] == ["m=kd",  # experiment "other": its only m=kd keeps its label
                                                 "m=kd [config aaaaaaaa]", "m=kd [config bbbbbbbb]", "m=x"]
    assert table.deltas["m=kd [config aaaaaaaa]"].mean == pytest.approx(0.1)
    assert table.deltas["m=x"].mean == pytest.approx(-0.1)
    with pytest.raises(KdlabError, match=r"--baseline 'm=kd' is not a row of this table; rows: .*\[config aaaaaaaa\]"):
        compare_table(runs[:3], baseline="m=kd")


def test_default_metrics_and_empty_table():
    table = compare_table([run("r", "only seed=1", 1, "g", {"test/acc": 0.5}, status="failed")])
    assert table.metrics == ("test/acc", "test/nll", "test/ece", "test/agreement") and table.rows == ()
    text = render_table(table)
    assert text.splitlines()[0].split() == ["config", "n", "test/acc", "test/nll", "test/ece", "test/agreement"]
    assert "(no finished runs)" in text


def test_bad_options():
    with pytest.raises(KdlabError, match="unknown table format 'html'; formats are: text, markdown"):
        render_table(compare_table([]), fmt="html")
    with pytest.raises(KdlabError, match="confidence"):
        compare_table([], confidence=1.5)


def test_baseline_adds_paired_differences_by_seed():
    from kdlab.store.database import RunRecord
    from kdlab.study.compare import compare_table, render_table

    def rec(label, seed, acc, group):
        return RunRecord(run_id=f"{group}-{seed}", experiment="e", role="student", label=f"{label} seed={seed}",
                         seed=seed, group_key=group, config={}, status="finished", final={"test/acc": acc})

    # kd − scratch per seed: 0.02, 0.04, 0.03 → mean 0.03, s = 0.01, t_{0.975,2} = 4.302653 → ± 0.024841
    records = [rec("m=scratch", s, a, "g1") for s, a in [(0, 0.90), (1, 0.80), (2, 0.85)]]
    records += [rec("m=kd", s, a, "g2") for s, a in [(2, 0.88), (0, 0.92), (1, 0.84)]]
    table = compare_table(records, metrics=("test/acc",), baseline="m=scratch")
    delta = table.deltas["m=kd"]
    assert delta.mean == pytest.approx(0.03) and delta.half_width == pytest.approx(0.024841, abs=1e-6)
    text = render_table(table)
    assert "+0.0300 ± 0.0248" in text and "(baseline)" in text and "paired" in text
    with pytest.raises(KdlabError, match="not a row"):
        compare_table(records, metrics=("test/acc",), baseline="m=nothing")
