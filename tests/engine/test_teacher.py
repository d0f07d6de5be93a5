"""engine/teacher.py: every kind of teacher section becomes a module in one place."""
from __future__ import annotations

import pytest
import torch

from kdlab.config import DataConfig, MethodConfig, TeacherConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_model, model_spec
from kdlab.engine.checkpoint import save_model
from kdlab.engine.teacher import teacher_module
from kdlab.models.ensemble import TeacherEnsemble
from kdlab.models.trajectory import TeacherTrajectory
from kdlab.plan import assistant_run_spec, recipe_run_spec

DATA = DataConfig(dataset="synthetic", options={"num_classes": 3, "input_shape": (1, 12), "num_train": 60,
                                                "num_test": 30})
METHOD = MethodConfig("kd", {})


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return build_splits("synthetic", DATA.options, root=None, cache_dir=tmp_path_factory.mktemp("cache"),
                        val_fraction=0.1, split_seed=0)


def _recorder(splits):
    calls = []

    def load_run(section, role, epoch):
        spec = assistant_run_spec(section, DATA, METHOD) if role == "assistant" else recipe_run_spec(section, DATA)
        calls.append((spec.run_id, role, epoch))
        return build_model(spec.config.student.model, spec.config.student.options, splits)

    return calls, load_run


def test_a_recipe_is_its_run_at_the_end_or_at_an_epoch(splits):
    calls, load_run = _recorder(splits)
    recipe = TeacherConfig(model="mlp", options={"width": 16}, train=TrainConfig(epochs=4, keep_epochs=(2,)))
    teacher_module(recipe, splits, load_run=load_run)
    recipe.epoch = 2
    teacher_module(recipe, splits, load_run=load_run)
    assert [(role, epoch) for _, role, epoch in calls] == [("teacher", None), ("teacher", 2)]
    assert calls[0][0] == calls[1][0]  # one run; the epoch picks a file of it
    untrained = teacher_module(recipe, splits)
    assert isinstance(untrained, torch.nn.Module) and len(calls) == 2


def test_a_trajectory_is_the_kept_epochs_in_order_then_the_end(splits):
    calls, load_run = _recorder(splits)
    t = TeacherConfig(model="mlp", options={"width": 16}, trajectory=True,
                    train=TrainConfig(epochs=5, keep_epochs=(3, 1, 5)))
    net = teacher_module(t, splits, load_run=load_run)
    assert isinstance(net, TeacherTrajectory)
    assert [epoch for _, _, epoch in calls] == [1, 3, None]
    untrained = teacher_module(t, splits)
    assert isinstance(untrained, TeacherTrajectory) and len(untrained.stages) == len(net.stages) == 3


def test_members_assistants_and_files(splits, tmp_path):
    calls, load_run = _recorder(splits)
    file = tmp_path / "t.safetensors"
    network = build_model("mlp", {"width": 8}, splits)
    save_model(file, network, model_spec("mlp", {"width": 8}, splits))
    chain = TeacherConfig(model="mlp", options={"width": 32},
                        assistants=[TeacherConfig(model="mlp", options={"width": 16})])
    t = TeacherConfig(members=[TeacherConfig(checkpoint=str(file)), chain])
    net = teacher_module(t, splits, load_run=load_run)
    assert isinstance(net, TeacherEnsemble)
    assert [role for _, role, _ in calls] == ["assistant"]
    untrained = teacher_module(t, splits)
    assert isinstance(untrained, TeacherEnsemble) and len(calls) == 1
    # The untrained chain has the last assistant's shape.
    shapes = [p.shape for p in untrained.members[1].parameters()]
    assert shapes == [p.shape for p in build_model("mlp", {"width": 16}, splits).parameters()]
