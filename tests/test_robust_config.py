"""Config keys of the robustness line: the ``robust:`` section, ``teacher.method`` and ``data.labels_per_class``,
validated whole, and run identity unchanged for configs that do not use them."""
from __future__ import annotations

import copy

import pytest

from kdlab.config import (
    AttackConfig,
    RobustConfig,
    load_experiment,
    parse_experiment,
    quickstart_raw,
)
from kdlab.errors import ConfigError
from kdlab.plan import recipe_run_spec, teacher_run_spec

TEACHER = {"model": "mlp", "width": 16, "train": {"epochs": 2}}


def base(**changes) -> dict:
    raw = {"name": "r", "data": {"dataset": "digits"}, "student": {"model": "mlp", "width": 8},
           "method": {"name": "scratch"}, "train": {"epochs": 1}}
    raw.update(changes)
    return raw


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_experiment(raw)
    return info.value.problems


# --------------------------------------------------------------------------- run identity


def test_configs_without_the_new_keys_keep_their_run_ids():
    """The ids of the quickstart (and its teacher) as they were before these keys existed."""
    _, specs = load_experiment()
    assert specs[0].run_id == "quickstart-d3f30e5e1c" and specs[3].run_id == "quickstart-3344d2e273"
    assert teacher_run_spec(specs[3].config).run_id == "teacher-3b9bbddb8e"
    resolved = specs[3].resolved()
    assert "robust" not in resolved
    assert "labels_per_class" not in resolved["data"] and "drop_unlabelled" not in resolved["data"]
    assert "method" not in resolved["teacher"]


def test_a_robust_section_is_part_of_the_run_identity():
    plain = parse_experiment(base())[1][0]
    robust = parse_experiment(base(robust={}))[1][0]
    assert plain.run_id != robust.run_id
    assert robust.resolved()["robust"]["attacks"][0] == {"name": "pgd", "eps": None, "norm": "linf", "steps": 20,
                                                         "step_size": None, "restarts": 1, "loss": "ce", "seed": 0,
                                                         "label": None}


# --------------------------------------------------------------------------- the robust section


def test_robust_section_defaults_and_values():
    cfg = parse_experiment(base(robust={"eps": "8/255", "attacks": [{"name": "apgd", "steps": 50, "label": "a50"}],
                                        "eps_curve": [0.01, "4/255"], "subset": None, "faithfulness": True}))[0]
    r = cfg.robust
    assert isinstance(r, RobustConfig) and r.eps == "8/255" and r.subset is None and r.faithfulness
    assert r.attacks == [AttackConfig(name="apgd", steps=50, label="a50")]
    assert r.eps_curve == [0.01, "4/255"] and r.sanity_checks is True and r.delta == 0.1
    assert parse_experiment(base(robust={}))[0].robust == RobustConfig()


def test_robust_unknown_keys_say_did_you_mean():
    found = problems(base(robust={"attaks": [], "subset": 10}))
    assert any(p.startswith("robust.attaks: unknown key (did you mean 'attacks'?)") for p in found), found
    found = problems(base(robust={"attacks": [{"name": "pgd", "stepz": 3}]}))
    assert any("robust.attacks[0].stepz" in p and "did you mean 'steps'" in p for p in found), found
    found = problems(base(robust={"attacks": [{"name": "cw"}]}))
    assert any("robust.attacks[0].name" in p and "'pgd'" in p for p in found), found


def test_eps_in_pixel_units_names_the_key_and_suggests_the_fraction():
    found = problems(base(robust={"attacks": [{"name": "pgd", "eps": 8}]}))
    assert found == ["robust.attacks[0].eps: 8 is outside [0, 1] for norm linf; inputs are in [0, 1], so this "
                     "looks like pixel units (0-255): write 8/255"]
    assert problems(base(robust={"eps": 16}))[0].startswith("robust.eps: 16 is outside [0, 1]")
    assert "write 4/255" in problems(base(robust={"eps_curve": [0.01, 4]}))[0]
    assert "robust.eps: cannot parse '8//255'" in problems(base(robust={"eps": "8//255"}))[0]
    assert "robust.eps: " in problems(base(robust={"eps": -0.1}))[0]
    # An L2 radius may exceed 1; 8/255 and 0.031 both parse.
    parse_experiment(base(robust={"attacks": [{"name": "pgd", "norm": "l2", "eps": 1.5}]}))
    parse_experiment(base(robust={"eps": 0.031, "attacks": [{"name": "pgd", "eps": "8/255"}]}))


def test_robust_attack_settings_are_checked_whole():
    found = problems(base(robust={"subset": 0, "delta": 2.0, "attacks": [
        {"name": "fgsm", "steps": 3}, {"name": "apgd", "step_size": 0.1}, {"name": "pgd", "restarts": 0},
        {"name": "pgd", "steps": 20, "label": "clean"}]}))
    assert any(p.startswith("robust.subset: must be an integer >= 1") for p in found)
    assert any(p.startswith("robust.delta:") for p in found)
    assert any(p.startswith("robust.attacks[0]: fgsm is one step") for p in found)
    assert any(p.startswith("robust.attacks[1]: apgd chooses its own step size") for p in found)
    assert any(p.startswith("robust.attacks[2]: restarts=0") for p in found)
    assert any(p.startswith("robust.attacks[3].label: 'clean'") for p in found)
    duplicate = problems(base(robust={"attacks": [{"name": "pgd", "steps": 5}, {"name": "pgd", "steps": 10}]}))
    assert duplicate == ["robust.attacks[1]: same metric label 'pgd_linf_0.0314' as robust.attacks[0]; set "
                         "robust.attacks[1].label to tell them apart"]
    assert "eps_curve and sanity_checks need an attack" in problems(base(robust={"attacks": []}))[0]


# --------------------------------------------------------------------------- teacher.method


def test_teacher_method_trains_the_recipe_teacher():
    teacher = dict(TEACHER, method={"name": "adversarial_training", "epsilon": 0.1, "steps": 3})
    _, specs = parse_experiment(base(teacher=teacher, method={"name": "ard"}))
    t = specs[0].config.teacher
    assert t.method.name == "adversarial_training" and t.method.options["epsilon"] == 0.1
    assert t.method.options["step_size"] == pytest.approx(2 / 255)  # defaults filled in (part of the identity)
    recipe = teacher_run_spec(specs[0].config)
    assert recipe.config.method.name == "adversarial_training" and recipe.config.method.options["steps"] == 3
    clean = teacher_run_spec(parse_experiment(base(teacher=TEACHER, method={"name": "kd"}))[1][0].config)
    assert clean.config.method.name == "scratch" and clean.run_id != recipe.run_id
    assert specs[0].resolved()["teacher"]["method"]["name"] == "adversarial_training"


def test_teacher_method_in_members_and_its_bad_input():
    robust = dict(TEACHER, method={"name": "trades", "beta": 3.0})
    cfg = parse_experiment(base(teacher={"members": [TEACHER, robust]}, method={"name": "mtard"}))[0]
    assert cfg.teacher.members[0].method is None and cfg.teacher.members[1].method.name == "trades"
    assert recipe_run_spec(cfg.teacher.members[1], cfg.data).config.method.options["beta"] == 3.0
    found = problems(base(teacher=dict(TEACHER, method={"name": "kd"}), method={"name": "kd"}))
    assert found == ["teacher.method.name: method 'kd' needs a teacher of its own; a recipe teacher trains "
                     "without one (e.g. scratch, adversarial_training, trades)"]
    found = problems(base(teacher=dict(TEACHER, method={"name": "adversarial_training", "epsilonn": 1}),
                          method={"name": "kd"}))
    assert any("teacher.method.epsilonn" in p and "did you mean 'epsilon'" in p for p in found), found
    found = problems(base(teacher={"checkpoint": "t.safetensors", "method": "trades"}, method={"name": "kd"}))
    assert "teacher.method: only a recipe teacher" in found[0]
    found = problems(base(student={"model": "mlp", "method": {"name": "kd"}}))
    assert found[0].startswith("student.method: the student trains with the top-level method section")


# --------------------------------------------------------------------------- labels_per_class


def test_labels_per_class_only_for_methods_that_use_unlabelled_samples():
    found = problems(base(data={"dataset": "digits", "labels_per_class": 10}, method={"name": "adversarial_training"}))
    assert found == ["data.labels_per_class: method 'adversarial_training' cannot use unlabelled samples (their "
                     "labels are -1); set data.drop_unlabelled: true to train on the labelled ones only, or use a "
                     "method that uses them (awr_kd)"]
    ok = parse_experiment(base(data={"dataset": "digits", "labels_per_class": 10, "drop_unlabelled": True}))
    assert ok[1][0].resolved()["data"]["labels_per_class"] == 10
    awr = parse_experiment(base(data={"dataset": "digits", "labels_per_class": 10}, teacher=TEACHER,
                                method={"name": "awr_kd"}))[1][0]
    # The recipe teacher sees the same labels: it trains on the labelled samples only.
    recipe = teacher_run_spec(awr.config)
    assert recipe.config.data.labels_per_class == 10 and recipe.config.data.drop_unlabelled is True
    assert problems(base(data={"dataset": "digits", "drop_unlabelled": True})) == [
        "data.drop_unlabelled: only applies with data.labels_per_class; set both or neither"]
    assert problems(base(data={"dataset": "digits", "labels_per_class": 0, "drop_unlabelled": True}))[0] == \
        "data.labels_per_class: must be an integer >= 1 or null, got 0"


def test_grid_over_labels_per_class_changes_ids_and_scratch_refusal_is_per_point():
    raw = base(data={"dataset": "digits", "drop_unlabelled": True, "labels_per_class": 10},
               grid={"data.labels_per_class": [10, 50]})
    _, specs = parse_experiment(copy.deepcopy(raw))
    assert [s.config.data.labels_per_class for s in specs] == [10, 50] and specs[0].run_id != specs[1].run_id
    assert quickstart_raw()  # untouched by the above
