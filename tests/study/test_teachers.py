"""Teacher stage: size-suffixed names, early-stopped teachers, assistant chains, trajectories, members."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config import ConfigError, parse_experiment, split_sized_name
from kdlab.errors import KdlabError
from kdlab.methods.route_constrained import stage_index
from kdlab.store import Store
from kdlab.study.runner import Runner, kept_model_file

BASE = {
    "name": "teachers-test",
    "data": {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 200, "num_test": 60},
    "teacher": {"model": "mlp", "width": 32, "train": {"epochs": 4, "batch_size": 50, "device": "cpu",
                                                       "keep_epochs": [1, 2]}},
    "student": {"model": "mlp", "width": 8},
    "method": {"name": "kd", "temperature": 2.0},
    "train": {"epochs": 2, "batch_size": 50, "device": "cpu"},
    "seeds": [0],
}


def _cfg(**changes):
    cfg = copy.deepcopy(BASE)
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def test_sized_names_are_the_same_runs_as_explicit_options():
    _, sized = parse_experiment(_cfg(student={"model": "mlp-w8-d1"}))
    _, plain = parse_experiment(_cfg(student={"model": "mlp", "width": 8, "depth": 1}))
    assert sized[0].run_id == plain[0].run_id
    assert split_sized_name("resnet_cifar-d32-w4") == ("resnet_cifar", {"d": 32, "w": 4})
    _, grid = parse_experiment(_cfg(grid={"teacher.model": ["mlp-w16", "mlp-w64"]}))
    assert [s.config.teacher.options["width"] for s in grid] == [16, 64]
    assert [s.label for s in grid] == ["teacher.model=mlp-w16 seed=0", "teacher.model=mlp-w64 seed=0"]
    with pytest.raises(ConfigError, match="student.model.*sets width=8 but student.width is 4"):
        parse_experiment(_cfg(student={"model": "mlp-w8", "width": 4}))
    with pytest.raises(ConfigError, match="-wN"):
        parse_experiment(_cfg(student={"model": "mlp-x8"}))


def test_a_teacher_epoch_that_is_never_saved_fails_before_any_run():
    cfg = _cfg(teacher=dict(BASE["teacher"], epoch=3))
    with pytest.raises(ConfigError, match=r"teacher.epoch: epoch 3 is not kept.*keep_epochs \(now \[1, 2\]\)"):
        parse_experiment(cfg)
    with pytest.raises(ConfigError, match="keep_epochs"):
        parse_experiment(_cfg(teacher=dict(BASE["teacher"], train=dict(BASE["teacher"]["train"], keep_epochs=[9]))))


def test_early_stopped_teacher_loads_the_weights_of_its_epoch(tmp_path):
    base, specs = parse_experiment(_cfg(teacher=dict(BASE["teacher"], epoch=2)))
    runner = Runner(tmp_path, out=lambda line: None)
    runner.run(base, specs)
    (teacher_run,) = Store(tmp_path).runs(role="teacher")
    kept = load_file(str(Path(teacher_run.run_dir) / kept_model_file(2)))
    final = load_file(str(Path(teacher_run.run_dir) / "model.safetensors"))
    splits = runner.splits(specs[0].config)
    teacher = runner.teacher(specs[0].config, splits)
    loaded = teacher.state_dict()
    assert all(torch.equal(loaded[k], kept[k]) for k in kept)
    assert any(not torch.equal(kept[k], final[k]) for k in kept)  # epoch 2 is not the final teacher
    assert (Path(teacher_run.run_dir) / kept_model_file(1)).is_file()
    # The student run records the epoch it distilled from; the teacher run is shared with epoch=None students.
    assert Store(tmp_path).runs(experiment="teachers-test")[0].config["teacher"]["epoch"] == 2


def test_assistant_chain_trains_its_stages_in_order(tmp_path):
    chain = dict(BASE["teacher"], assistants=[{"model": "mlp", "width": 16, "train": {"epochs": 2, "batch_size": 50,
                                                                                     "device": "cpu"}}])
    base, specs = parse_experiment(_cfg(teacher=chain, method={"name": "takd", "temperature": 2.0}))
    Runner(tmp_path, out=lambda line: None).run(base, specs)
    store = Store(tmp_path)
    (teacher,) = store.runs(role="teacher")
    (assistant,) = store.runs(role="assistant")
    (student,) = store.runs(experiment="teachers-test")
    assert teacher.status == assistant.status == student.status == "finished"
    assert teacher.finished_at <= assistant.started_at and assistant.finished_at <= student.started_at
    assert assistant.config["method"]["name"] == "kd" and assistant.config["method"]["temperature"] == 2.0
    assert assistant.config["teacher"]["model"] == "mlp" and assistant.config["teacher"]["width"] == 32
    assert assistant.config["student"]["width"] == 16
    # The student distilled from the assistant: its teacher agreement is measured against the assistant.
    assert "test/agreement" in student.final


def test_route_constrained_moves_along_the_trajectory(tmp_path):
    assert [stage_index(p, 3) for p in (0.0, 0.32, 0.34, 0.66, 0.67, 0.99, 1.0)] == [0, 0, 1, 1, 2, 2, 2]
    cfg = _cfg(teacher=dict(BASE["teacher"], trajectory=True), method={"name": "route_constrained"},
               train={"epochs": 3, "batch_size": 50, "device": "cpu"})
    base, specs = parse_experiment(cfg)
    runner = Runner(tmp_path, out=lambda line: None)
    splits = runner.splits(specs[0].config)
    trajectory = runner.teacher(specs[0].config, splits)
    assert len(trajectory) == 3 and trajectory.active == 2  # epochs 1, 2, then the final weights
    from kdlab.engine.build import build_method, build_student

    method = build_method(specs[0].config.method, student=build_student(specs[0].config.student, splits),
                          teacher=trajectory, input_shape=(1, 12))
    seen = []
    for step in range(9):
        method.set_progress(step, 9)
        seen.append(trajectory.active)
    assert seen == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    summary = runner.run(base, specs)
    assert not summary.failed and len(summary.ran) == 1


def test_route_constrained_without_a_trajectory_is_refused_before_training(tmp_path):
    base, specs = parse_experiment(_cfg(method={"name": "route_constrained"}))
    with pytest.raises(KdlabError, match="teacher.trajectory"):
        Runner(tmp_path, out=lambda line: None).run(base, specs)
    assert Store(tmp_path).runs() == []


def test_members_train_each_teacher_once_and_feed_multi_teacher(tmp_path):
    members = [{"model": "mlp", "width": 32, "train": {"epochs": 2, "batch_size": 50, "device": "cpu"}},
               {"model": "mlp", "width": 16, "seed": 1, "train": {"epochs": 2, "batch_size": 50, "device": "cpu"}}]
    cfg = _cfg(teacher={"members": members}, method={"name": "multi_teacher", "rule": "mean_probs"},
               seeds=[0, 1])
    base, specs = parse_experiment(cfg)
    summary = Runner(tmp_path, out=lambda line: None).run(base, specs)
    assert not summary.failed
    store = Store(tmp_path)
    assert len(store.runs(role="teacher")) == 2  # one run per member, shared by both seeds
    assert {r.status for r in store.runs(experiment="teachers-test")} == {"finished"}


@pytest.mark.parametrize("student", [{"model": "mlp", "width": 8},
                                     {"model": "vit_tiny", "dim": 16, "depth": 1, "heads": 2, "patch_size": 4}])
def test_heterogeneous_pairs_distil_through_logits_and_adapters(tmp_path, student):
    terms = {"ce": 0.1, "kl": {"weight": 0.9, "temperature": 2.0},
             "hint": {"loss": "fitnet", "weight": 1.0, "student": "pool", "teacher": "pool"}}
    cfg = _cfg(teacher={"model": "cnn1d", "width": 16, "train": {"epochs": 1, "batch_size": 50, "device": "cpu"}},
               student=student, method={"name": "distill", "terms": terms}, train={"epochs": 1, "batch_size": 50,
                                                                                 "device": "cpu"})
    base, specs = parse_experiment(cfg)
    summary = Runner(tmp_path, out=lambda line: None).run(base, specs)
    assert not summary.failed and len(summary.ran) == 1
    (run,) = Store(tmp_path).runs(experiment="teachers-test")
    assert "test/agreement" in run.final
