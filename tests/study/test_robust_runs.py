"""Robust evaluation in runs: the ``robust:`` section's metrics and files, ``kdlab eval`` and its bad input,
``data.labels_per_class`` in the runner, and a teacher trained by ``teacher.method``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdlab.cli import main
from kdlab.config import AttackConfig, RobustConfig, load_experiment, parse_experiment
from kdlab.plan import teacher_run_spec
from kdlab.data import build_splits
from kdlab.store import Store
from kdlab.study.robust_eval import REPORT_FILE, robust_report, attack_subset
from kdlab.study.runner import Runner

DATA = {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 150, "num_test": 40}
TEACHER = {"model": "mlp", "width": 16, "train": {"epochs": 2, "batch_size": 50, "device": "cpu"}}
ROBUST = {"eps": "8/255", "subset": 30, "faithfulness": True, "faithfulness_steps": 3,
          "attacks": [{"name": "pgd", "steps": 3, "label": "pgd3"}, {"name": "fgsm", "eps": 0.05}],
          "eps_curve": [0.01, "8/255", 0.1]}


def _raw(**changes) -> dict:
    raw = {"name": "rob", "data": dict(DATA), "teacher": dict(TEACHER), "student": {"model": "mlp", "width": 8},
           "method": {"name": "kd"}, "train": {"epochs": 1, "batch_size": 50, "device": "cpu"}, "seeds": [0],
           "robust": dict(ROBUST)}
    raw.update(changes)
    return raw


def _run(tmp_path, raw) -> tuple[Store, list]:
    base, specs = parse_experiment(raw)
    runner = Runner(tmp_path / "ws", out=lambda text: None)
    summary = runner.run(base, specs)
    assert not summary.failed, summary.failed
    return runner.store, specs


def test_robust_section_adds_metrics_and_saves_the_settings(tmp_path):
    store, specs = _run(tmp_path, _raw())
    record = store.run(specs[0].run_id)
    final = record.final
    for key in ("robust/clean/acc", "robust/pgd3/acc", "robust/fgsm_linf_0.0500/acc", "robust/worst/acc",
                "robust/pgd3/worst_class_acc", "robust/pgd3/nll", "robust/pgd3/ece", "robust/curve/0.0314",
                "robust/faith/agreement", "robust/faith/adv_disagreement", "robust/faith/relcal_emp",
                "robust/faith/relcal_cert", "robust/faith/relcal_cert_rate", "robust/sanity_warnings"):
        assert key in final, key
    assert final["robust/n"] == 30
    assert final["robust/worst/acc"] <= min(final["robust/pgd3/acc"], final["robust/fgsm_linf_0.0500/acc"])
    assert final["robust/pgd3/acc"] <= final["robust/clean/acc"]
    assert final["robust/faith/relcal_cert"] >= final["robust/faith/relcal_emp"] - 1e-6  # bound ≥ attack
    on_disk = json.loads((Path(record.run_dir) / "final.json").read_text())
    assert on_disk["robust/pgd3/acc"] == final["robust/pgd3/acc"]
    report = json.loads((Path(record.run_dir) / REPORT_FILE).read_text())
    pgd = report["attacks"]["pgd3"]
    assert pgd["eps_text"] == "8/255" and pgd["eps"] == pytest.approx(8 / 255) and pgd["steps"] == 3
    assert pgd["step_size"] == pytest.approx(2.5 * (8 / 255) / 3) and pgd["eps_display"] == "8/255 (0.0314)"
    assert report["attacks"]["fgsm_linf_0.0500"]["eps_text"] == "0.05"
    assert report["subset"] == {"n": 30, "of": 40, "seed": 0, "requested": 30}
    assert [point[0] for point in report["curve"]["points"]] == pytest.approx([0.01, 8 / 255, 0.1])
    assert isinstance(report["warnings"], list) and final["robust/sanity_warnings"] == len(report["warnings"])
    assert report["sanity_checks"]["attack"] == "pgd3"
    # The robust numbers are part of the run's config (and id), and the teacher run has none.
    assert record.config["robust"]["attacks"][0]["label"] == "pgd3"
    teacher = store.run(teacher_run_spec(specs[0].config).run_id)
    assert not any(key.startswith("robust/") for key in teacher.final)


def test_robust_report_is_deterministic_and_skips_faithfulness_without_a_teacher(tmp_path):
    splits = build_splits("synthetic", {k: v for k, v in DATA.items() if k != "dataset"}, root=None,
                          cache_dir=tmp_path, val_fraction=0.0, split_seed=0)
    from kdlab.engine.build import build_model

    torch.manual_seed(0)
    model = build_model("mlp", {"width": 8}, splits)
    _, specs = parse_experiment(_raw(teacher=None, method={"name": "scratch"}))
    robust = specs[0].config.robust
    first = robust_report(model, None, splits, robust)
    again = robust_report(model, None, splits, robust)
    assert first["results"] == again["results"]
    assert first["faithfulness"] == {"skipped": "the run has no teacher"}
    assert not any(key.startswith("robust/faith/") for key in first["metrics"])
    # The subset: a fixed draw, sorted; None (or more than the split) is everything.
    _, _, index = attack_subset(splits, 30, 0)
    assert torch.equal(index, attack_subset(splits, 30, 0)[2]) and bool((index[1:] > index[:-1]).all())
    assert len(attack_subset(splits, None, 0)[2]) == 40 == len(attack_subset(splits, 1000, 0)[2])


def test_a_model_that_does_not_normalise_inside_is_warned_about(tmp_path):
    splits = build_splits("synthetic", {k: v for k, v in DATA.items() if k != "dataset"}, root=None,
                          cache_dir=tmp_path, val_fraction=0.0, split_seed=0)
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    robust = RobustConfig(eps=0.05, attacks=[AttackConfig(name="fgsm")], subset=10, sanity_checks=False)
    with pytest.warns(UserWarning, match="normalis"):
        report = robust_report(bare, None, splits, robust)
    assert any("no mean/std normalisation" in line for line in report["warnings"])


# --------------------------------------------------------------------------- kdlab eval


def _cli(tmp_path, *args) -> int:
    return main(["--workspace", str(tmp_path / "ws"), *args])


def test_kdlab_eval_prints_writes_and_stores_the_numbers(tmp_path, capsys):
    raw = _raw()
    raw.pop("robust")
    store, specs = _run(tmp_path, raw)
    run_id = specs[0].run_id
    assert _cli(tmp_path, "eval", run_id, "--attack", "pgd", "--eps", "8/255", "--steps", "4", "--subset", "20",
                "--faithfulness", "--faithfulness-steps", "2") == 0
    out = capsys.readouterr().out
    assert "eps 8/255 (0.0314), 4 steps" in out and "clean" in out and "pgd_linf_0.0314" in out
    assert "faithfulness at eps 8/255 (0.0314)" in out and "certified (IBP)" in out
    lines = (Path(store.run(run_id).run_dir) / "robust_evals.jsonl").read_text().splitlines()
    saved = json.loads(lines[-1])
    assert saved["attacks"]["pgd_linf_0.0314"]["eps_text"] == "8/255" and saved["subset"]["n"] == 20
    final = store.run(run_id).final
    assert "eval/pgd_linf_0.0314/acc" in final and "eval/faith/adv_disagreement" in final and "test/acc" in final
    # A teacher run too (here without faithfulness); a second eval appends.
    teacher_id = teacher_run_spec(specs[0].config).run_id
    assert _cli(tmp_path, "eval", teacher_id, "--attack", "fgsm", "--eps", "0.031", "--subset", "0",
                "--no-sanity-checks") == 0
    out = capsys.readouterr().out
    assert "fgsm linf eps 0.031" in out and "40 of 40" in out
    # --workspace also after the subcommand.
    assert main(["eval", run_id, "--workspace", str(tmp_path / "ws"), "--attack", "apgd", "--eps", "0.05",
                 "--steps", "3", "--subset", "10", "--no-sanity-checks"]) == 0
    assert len((Path(store.run(run_id).run_dir) / "robust_evals.jsonl").read_text().splitlines()) == 2


def test_kdlab_eval_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    raw = _raw(teacher=None, method={"name": "scratch"})
    raw.pop("robust")
    _, specs = _run(tmp_path, raw)
    run_id = specs[0].run_id

    def error(*args) -> str:
        assert _cli(tmp_path, "eval", *args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    assert "--eps: 8 is outside [0, 1] for norm linf" in error(run_id, "--eps", "8") and "write 8/255" in \
        error(run_id, "--eps", "8")
    assert "--eps: cannot parse 'eight'" in error(run_id, "--eps", "eight")
    assert "--eps: 510/255 is outside [0, 1] for norm linf (inputs are in [0, 1]); give e.g. 8/255" in \
        error(run_id, "--eps", "510/255")
    assert "no-such-run" in error("no-such-run", "--eps", "8/255")
    assert "--attack: fgsm is one step" in error(run_id, "--attack", "fgsm", "--steps", "3")
    assert "--steps: steps=0" in error(run_id, "--steps", "0")
    assert "--subset -3" in error(run_id, "--subset", "-3")
    with pytest.raises(SystemExit) as info:  # argparse refuses an unknown attack name, also with code 2
        _cli(tmp_path, "eval", run_id, "--attack", "cw")
    assert info.value.code == 2


# --------------------------------------------------------------------------- labels_per_class and teacher.method


def test_labels_per_class_hides_train_labels_only_deterministically(tmp_path):
    runner = Runner(tmp_path / "ws", out=lambda text: None)
    data = dict(DATA, labels_per_class=5)
    cfg = parse_experiment(_raw(data=data, method={"name": "awr_kd"}))[0]
    splits = runner.splits(cfg)
    full = runner.splits(parse_experiment(_raw())[0])
    labels = splits.train[1]
    assert len(labels) == len(full.train[1])
    assert [int((labels == c).sum()) for c in range(3)] == [5, 5, 5] and int((labels == -1).sum()) == len(labels) - 15
    kept = labels >= 0
    assert torch.equal(labels[kept], full.train[1][kept])  # the kept labels are the true ones
    assert torch.equal(splits.val[1], full.val[1]) and torch.equal(splits.test[1], full.test[1])
    assert torch.equal(runner.splits(cfg).train[1], labels)  # the same samples every time (data.split_seed)
    other = parse_experiment(_raw(data=dict(data, split_seed=1), method={"name": "awr_kd"}))[0]
    assert not torch.equal(runner.splits(other).train[1], labels)
    dropped = runner.splits(parse_experiment(_raw(data=dict(data, drop_unlabelled=True)))[0])
    assert len(dropped.train[1]) == 15 and bool((dropped.train[1] >= 0).all())
    assert dropped.mean != full.mean  # statistics of the kept samples only


def test_low_label_awr_run_with_a_labelled_only_teacher(tmp_path):
    raw = _raw(data=dict(DATA, labels_per_class=5), method={"name": "awr_kd", "epsilon": 0.05, "step_size": 0.02,
                                                           "steps": 2})
    raw.pop("robust")
    store, specs = _run(tmp_path, raw)
    teacher = store.run(teacher_run_spec(specs[0].config).run_id)
    assert teacher.config["data"]["drop_unlabelled"] is True and teacher.config["data"]["labels_per_class"] == 5
    assert 0.0 <= store.run(specs[0].run_id).final["test/acc"] <= 1.0


def test_a_teacher_trained_by_adversarial_training(tmp_path):
    teacher = dict(TEACHER, method={"name": "adversarial_training", "epsilon": 0.05, "step_size": 0.02, "steps": 2})
    raw = _raw(teacher=teacher, method={"name": "ard", "epsilon": 0.05, "step_size": 0.02, "steps": 2})
    raw.pop("robust")
    store, specs = _run(tmp_path, raw)
    recipe = store.run(teacher_run_spec(specs[0].config).run_id)
    assert recipe.status == "finished" and recipe.config["method"]["name"] == "adversarial_training"
    assert recipe.config["method"]["epsilon"] == 0.05
    metrics = [json.loads(line) for line in (Path(recipe.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert "train/loss/ce" in metrics[0]


def test_shipped_robust_configs_parse():
    for path in sorted(Path(__file__).parents[2].glob("configs/robust/*.yaml")):
        _, specs = load_experiment(path)
        assert specs and all(spec.config.robust is not None for spec in specs), path


@pytest.mark.integration
def test_shipped_robust_study_runs_end_to_end_shortened(tmp_path, capsys):
    """configs/robust/digits.yaml through `kdlab run` (students 1 epoch, 1 seed, 40 test samples, short attacks):
    every arm finishes with robust metrics, the distilled ones with faithfulness, and MTARD logs its balance."""
    config = Path(__file__).parents[2] / "configs" / "robust" / "digits.yaml"
    overrides = ["train.epochs=1", "robust.subset=40", "robust.faithfulness_steps=2",
                 "robust.attacks=[{name: pgd, steps: 3, label: pgd20}, {name: apgd, steps: 4, label: apgd50}]"]
    args = ["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet", "--seeds", "0"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    capsys.readouterr()
    store = Store(tmp_path / "ws")
    runs = store.runs(experiment="robust-digits")
    assert len(runs) == 11 and all(r.status == "finished" for r in runs)  # the 11 arms of the config
    for record in runs:
        assert {"robust/clean/acc", "robust/pgd20/acc", "robust/apgd50/acc", "robust/worst/acc"} <= set(record.final)
        has_teacher = record.config["teacher"] is not None
        assert ("robust/faith/adv_disagreement" in record.final) == has_teacher, record.label
    mtard = next(r for r in runs if "mtard" in r.label)
    assert "method/weight_adv" in store.epoch_metrics(mtard.run_id)[1]
    teachers = store.runs(experiment="teachers")
    assert sorted(t.config["method"]["name"] for t in teachers) == ["adversarial_training", "scratch"]
    assert main(["--workspace", str(tmp_path / "ws"), "compare", "robust-digits", "--metrics",
                 "robust/pgd20/acc,robust/faith/relcal_emp"]) == 0
    assert "variant=mtard" in capsys.readouterr().out
