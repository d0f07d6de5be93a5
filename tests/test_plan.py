"""The run graph: student runs, the teacher/assistant/member/trajectory runs they read, in dependency order."""
from __future__ import annotations

import copy

from kdlab.config import parse_experiment, quickstart_raw
from kdlab.plan import TEACHER_EXPERIMENT, RunInput, build_plan, teacher_run_spec


def _raw(**sections) -> dict:
    raw = copy.deepcopy(quickstart_raw())
    raw.pop("grid", None)
    raw["seeds"] = [0, 1]
    raw.update(sections)
    return raw


def _plan(raw):
    base, specs = parse_experiment(raw)
    return build_plan(base, specs), specs


def test_recipe_teacher_runs_once_before_every_student():
    plan, specs = _plan(_raw())
    order = plan.order()
    assert [n.role for n in order] == ["teacher", "student", "student"]
    teacher = order[0]
    assert teacher.experiment == TEACHER_EXPERIMENT and teacher.inputs == ()
    assert teacher.run_id == teacher_run_spec(specs[0].config).run_id
    for node in plan.students():
        assert node.inputs == (RunInput(teacher.run_id, "teacher", None),)
    assert [len(w) for w in plan.waves()] == [1, 2]


def test_assistant_chain_is_a_path_of_runs():
    raw = _raw(method={"name": "takd", "temperature": 3.0, "alpha": 0.5})
    raw["teacher"] = dict(raw["teacher"], assistants=[{"model": "cnn1d", "width": 16, "train": {"epochs": 1}},
                                                      {"model": "cnn1d", "width": 8, "train": {"epochs": 1}}])
    plan, _ = _plan(raw)
    roles = [n.role for n in plan.order()]
    assert roles == ["teacher", "assistant", "assistant", "student", "student"]
    teacher, first, second = plan.order()[:3]
    assert first.inputs == (RunInput(teacher.run_id, "teacher"),)
    assert second.inputs == (RunInput(first.run_id, "assistant"),)
    assert plan.students()[0].inputs == (RunInput(second.run_id, "assistant"),)
    # Every stage is KD with the student method's temperature and alpha (Mirzadeh et al.).
    assert second.spec.config.method.name == "kd"
    assert second.spec.config.method.options["temperature"] == 3.0
    assert len(plan.waves()) == 4


def test_assistants_of_a_non_kd_method_train_with_kd_defaults():
    raw = _raw(method={"name": "scratch"})
    raw["teacher"] = dict(raw["teacher"], assistants=[{"model": "cnn1d", "width": 16}])
    plan, _ = _plan(raw)
    assistant = [n for n in plan.order() if n.role == "assistant"][0]
    assert assistant.spec.config.method.options == {}  # the kd defaults fill in when the run is built


def test_members_and_trajectory_edges():
    raw = _raw(method={"name": "multi_teacher"})
    teacher = raw["teacher"]
    raw["teacher"] = {"members": [dict(teacher, seed=0), dict(teacher, seed=1)]}
    plan, _ = _plan(raw)
    members = plan.students()[0].inputs
    assert [e.kind for e in members] == ["member", "member"] and len({e.run_id for e in members}) == 2
    assert [n.role for n in plan.upstream()] == ["teacher", "teacher"]

    raw = _raw(method={"name": "route_constrained"})
    raw["teacher"] = dict(teacher, trajectory=True, train=dict(teacher.get("train") or {}, epochs=4,
                                                                keep_epochs=[1, 2]))
    plan, _ = _plan(raw)
    edges = plan.students()[0].inputs
    assert [(e.kind, e.epoch) for e in edges] == [("trajectory", 1), ("trajectory", 2), ("trajectory", 4)]
    assert len(plan.upstream()) == 1


def test_checkpoint_teacher_and_no_teacher_read_no_runs(tmp_path):
    plan, _ = _plan(_raw(teacher=None, method={"name": "scratch"}))
    assert [n.role for n in plan.order()] == ["student", "student"] and plan.waves() == [plan.order()]
