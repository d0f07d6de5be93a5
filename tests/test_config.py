"""Experiment configs: parsing, validation messages, grids, run identity, overrides and YAML files."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from kdlab.config import (
    TrainConfig,
    apply_overrides,
    load_experiment,
    load_yaml,
    parse_experiment,
    parse_override,
    quickstart_raw,
    to_dict,
)
from kdlab.dotted import set_path
from kdlab.errors import ConfigError, KdlabError
from kdlab.plan import teacher_run_spec


def quick(**changes) -> dict:
    """The quickstart raw config with ``{"a.b": value}``-style changes (given as ``a__b=value``)."""
    raw = copy.deepcopy(quickstart_raw())
    for key, value in changes.items():
        set_path(raw, key.replace("__", "."), value)
    return raw


def single(**changes) -> dict:
    """The quickstart without its grid: KD only, 3 seeds."""
    raw = quick(**changes)
    raw.pop("grid")
    return raw


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_experiment(raw)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def ids(specs) -> list[str]:
    return [s.run_id for s in specs]


def method_of(spec) -> str:
    return spec.config.method.name


# --------------------------------------------------------------------------- the quickstart


def test_quickstart_expands_to_two_grid_points_times_three_seeds_in_order():
    base, specs = load_experiment()
    assert base.name == "quickstart" and base.grid == {"method.name": ["scratch", "kd"]}
    assert [(s.point, s.seed) for s in specs] == [
        ({"method.name": m}, seed) for m in ("scratch", "kd") for seed in (0, 1, 2)
    ]
    assert [method_of(s) for s in specs] == ["scratch"] * 3 + ["kd"] * 3
    assert [s.label for s in specs][:2] == ["method.name=scratch seed=0", "method.name=scratch seed=1"]
    assert len(set(ids(specs))) == 6
    assert ids(parse_experiment(quickstart_raw())[1]) == ids(specs)  # stable across calls


def test_resolved_config_has_every_default_one_seed_and_no_grid():
    _, specs = parse_experiment({"student": {"model": "mlp"}, "method": {"name": "scratch"}})
    (spec,) = specs
    out = spec.resolved()
    assert set(out) == {"name", "data", "teacher", "student", "method", "train", "seed"}
    assert out["seed"] == 0 and out["teacher"] is None and out["name"] == "experiment"
    # Keys added later (OMIT_DEFAULT: the speed options) are left out at their default, keeping old run ids.
    assert set(out["train"]) == {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("omit_default")}
    assert out["train"]["epochs"] == 30 and out["train"]["optimizer"] == "adam"
    assert out["train"]["milestones"] == [0.5, 0.75]  # a list: plain YAML/JSON, no Python tuples
    assert out["data"]["dataset"] == "mnist1d" and out["data"]["val_fraction"] == 0.1
    # The registry entries' own defaults are named too (the saved config must say what ran).
    assert out["student"]["model"] == "mlp"
    assert out["student"]["width"] == 128 and out["student"]["depth"] == 2
    assert out["method"] == {"name": "scratch", "label_smoothing": 0.0}
    assert "num_samples" in out["data"]
    assert yaml.safe_load(yaml.safe_dump(out)) == out  # the runner saves it with safe_dump


def test_explicit_default_gives_the_same_run_as_omitting_it():
    plain = single()
    explicit = single(student__depth=3, method__alpha=0.9, data__num_samples=5000)
    assert ids(parse_experiment(plain)[1]) == ids(parse_experiment(explicit)[1])


def test_integer_for_a_float_is_converted():
    _, as_int = parse_experiment(single(train__lr=1, method__temperature=4))
    _, as_float = parse_experiment(single(train__lr=1.0, method__temperature=4.0))
    assert as_int[0].config.train.lr == 1.0 and isinstance(as_int[0].config.train.lr, float)
    assert ids(as_int) == ids(as_float)


# --------------------------------------------------------------------------- validation messages


@pytest.mark.parametrize("key, value, expected", [
    ("bogus", 1, ["bogus: unknown key", "allowed keys: data, grid, imports, method"]),
    ("train.foo", 1, ["train.foo: unknown key", "lr", "epochs"]),
    ("train.epoch", 3, ["train.epoch: unknown key (did you mean 'epochs'?)"]),
    ("student.widht", 8, ["student.widht: unknown key (did you mean 'width'?)", "model 'cnn1d'"]),
    ("teacher.widht", 8, ["teacher.widht: unknown key (did you mean 'width'?)"]),
    ("method.temprature", 2.0, ["method.temprature: unknown key (did you mean 'temperature'?)", "alpha"]),
    ("data.num_sample", 10, ["data.num_sample: unknown key (did you mean 'num_samples'?)", "dataset 'mnist1d'"]),
    ("train.lr", "fast", ["train.lr: expected a number, got 'fast'"]),
    ("train.epochs", 2.5, ["train.epochs: expected an integer, got 2.5"]),
    ("train.epochs", True, ["train.epochs: expected an integer, got True"]),
    ("train.nesterov", "yes", ["train.nesterov: expected true or false, got 'yes'"]),
    ("train.optimizer", "rmsprop", ["train.optimizer: 'rmsprop' is not allowed", "'sgd', 'adam', 'adamw'"]),
    ("train.milestones", [0.5, "late"], ["train.milestones[1]: expected a number, got 'late'"]),
    ("train.milestones", 0.5, ["train.milestones: expected list of float, got 0.5"]),
    ("teacher.train.lr", "slow", ["teacher.train.lr: expected a number, got 'slow'"]),
    ("student.width", "wide", ["student.width: expected an integer, got 'wide'"]),
    ("student.widths", [8, "x"], ["student.widths[1]: expected an integer, got 'x'"]),
    ("method.alpha", "half", ["method.alpha: expected a number, got 'half'"]),
    ("data.num_samples", "many", ["data.num_samples: expected an integer, got 'many'"]),
    ("student.model", "resnet2", ["student.model: unknown model 'resnet2'; did you mean", "resnet20",
                                  "known models: bert_encoder, cnn1d"]),
    ("method.name", "kdd", ["method.name: unknown method 'kdd'; did you mean kd"]),
    ("data.dataset", "mnist1", ["data.dataset: unknown dataset 'mnist1'; did you mean", "mnist1d"]),
    ("student.num_classes", 10, ["student.num_classes: set by kdlab"]),
    ("teacher.input_shape", [1, 40], ["teacher.input_shape: set by kdlab"]),
    ("data.cache_dir", "/tmp/x", ["data.cache_dir: unknown key"]),
    ("student.train", {"epochs": 3}, ["student.train:", "top-level train"]),
    ("seeds", 3, ["seeds: expected list of int, got 3"]),
    ("data", "mnist1d", ["data: expected a mapping, got 'mnist1d'"]),
])
def test_each_problem_names_its_key_and_value(key, value, expected):
    raw = single()
    set_path(raw, key, value)
    found = problems(raw)
    assert len(found) == 1, found
    for text in expected:
        assert text in found[0], (text, found[0])


def test_every_problem_is_reported_at_once():
    raw = quick(
        bogus=1,
        train__lr="fast",
        train__epochs=2.5,
        train__nesterov="yes",
        train__optimizer="rmsprop",
        student__widht=8,
        student__num_classes=10,
        method__temprature=2.0,
        data__val_fraction=1.0,
    )
    found = problems(raw)
    assert len(found) >= 3
    for path in ("bogus", "train.lr", "train.epochs", "train.nesterov", "train.optimizer", "student.widht",
                 "student.num_classes", "method.temprature", "data.val_fraction"):
        assert any(p.startswith(path + ":") for p in found), (path, found)
    assert len(found) == len(set(found))  # the same problem is not repeated once per grid point


def test_config_errors_are_user_errors():
    with pytest.raises(KdlabError):
        parse_experiment(quick(train__lr="fast"))
    with pytest.raises(ConfigError, match="config: expected a mapping"):
        parse_experiment(["not", "a", "mapping"])


@pytest.mark.parametrize("key, value, expected", [
    ("train.epochs", 0, "train.epochs: must be ≥ 1, got 0"),
    ("train.steps", 0, "train.steps: must be ≥ 1 or null, got 0"),
    ("train.batch_size", 0, "train.batch_size: must be ≥ 1, got 0"),
    ("train.lr", 0, "train.lr: must be a positive finite number, got 0.0"),
    ("train.lr", -0.1, "train.lr: must be a positive finite number, got -0.1"),
    ("train.lr", float("nan"), "train.lr: must be a positive finite number, got nan"),
    ("train.eval_every", 0, "train.eval_every: must be ≥ 1, got 0"),
    ("train.checkpoint_every", -1, "train.checkpoint_every: must be ≥ 1, got -1"),
    ("teacher.train.epochs", 0, "teacher.train.epochs: must be ≥ 1, got 0"),
    ("data.val_fraction", 1.0, "data.val_fraction: must be in [0, 1), got 1.0"),
    ("data.val_fraction", -0.1, "data.val_fraction: must be in [0, 1), got -0.1"),
    ("seeds", [], "seeds: give at least one seed"),
])
def test_range_checks(key, value, expected):
    raw = single()
    set_path(raw, key, value)
    found = problems(raw)
    assert len(found) == 1 and found[0].startswith(expected), found


@pytest.mark.parametrize("key, value", [
    ("train.epochs", 1), ("train.steps", 1), ("train.steps", None), ("train.lr", 1e-6),
    ("data.val_fraction", 0.0), ("data.val_fraction", 0.99), ("seeds", [7]),
])
def test_range_boundaries_are_accepted(key, value):
    raw = single()
    set_path(raw, key, value)
    parse_experiment(raw)


def test_best_val_selection_needs_a_validation_split():
    found = problems(single(train__selection="best_val", data__val_fraction=0))
    assert found == ["train.selection: best_val needs a validation split; set data.val_fraction > 0"]
    parse_experiment(single(train__selection="best_val", data__val_fraction=0.1))
    parse_experiment(single(train__selection="last", data__val_fraction=0))


def test_a_method_that_needs_a_teacher_refuses_teacher_null():
    found = problems(single(teacher=None))
    assert len(found) == 1 and found[0].startswith("teacher:") and "'kd'" in found[0]
    # The grid's kd runs need it too.
    assert any("'kd' needs a teacher" in p for p in problems(quick(teacher=None)))
    # Scratch does not.
    _, specs = parse_experiment(single(teacher=None, method={"name": "scratch"}))
    assert len(specs) == 3 and teacher_run_spec(specs[0].config) is None


def test_teacher_given_only_as_a_checkpoint_is_accepted():
    _, specs = parse_experiment(single(teacher={"checkpoint": "teacher.safetensors"}))
    teacher = specs[0].config.teacher
    assert teacher.model is None and teacher.checkpoint == "teacher.safetensors"
    assert teacher.options == {}
    assert teacher_run_spec(specs[0].config) is None


def test_teacher_options_without_a_model_are_rejected():
    found = problems(single(teacher={"checkpoint": "t.safetensors", "width": 64}))
    assert len(found) == 1 and found[0].startswith("teacher:") and "width" in found[0]
    assert "teacher.model" in found[0]


def test_teacher_without_model_or_checkpoint_is_rejected():
    found = problems(single(teacher={"seed": 1}))
    assert found == ["teacher: give teacher.model (a training recipe), teacher.checkpoint (a file) "
                     "or teacher.members (several teachers)"]


# --------------------------------------------------------------------------- grids


@pytest.mark.parametrize("grid, expected", [
    ({"train.lr": 0.1}, "grid.train.lr: expected a non-empty list of values (or a mapping name: value), got 0.1"),
    ({"train.lr": []}, "grid.train.lr: expected a non-empty list of values (or a mapping name: value), got []"),
    ({"seeds": [[0], [1]]}, "grid.seeds: cannot be swept"),
    ([1, 2], "grid: expected a mapping"),
])
def test_bad_grids_are_rejected(grid, expected):
    found = problems(quick(grid=grid))
    assert any(p.startswith(expected) for p in found), found


def test_grid_over_an_unknown_key_names_the_key():
    found = problems(quick(grid={"train.foo": [1, 2]}))
    assert len(found) == 1  # reported once, not once per grid point
    assert found[0].startswith("train.foo: unknown key") and "grid point" in found[0]


def test_a_bad_value_in_one_grid_point_is_reported_with_the_point():
    found = problems(quick(grid={"train.optimizer": ["adam", "rmsprop"]}))
    assert len(found) == 1
    assert "train.optimizer: 'rmsprop' is not allowed" in found[0]
    assert "grid point {'train.optimizer': 'rmsprop'}" in found[0]
    found = problems(quick(grid={"student.model": ["cnn1d", "resnet2"]}))
    assert len(found) == 1 and "student.model: unknown model 'resnet2'" in found[0]


def test_grid_switching_the_method_accepts_and_drops_the_other_methods_keys():
    _, specs = parse_experiment(quick())  # method.temperature/alpha set, grid over [scratch, kd]
    for spec in specs:
        method = spec.resolved()["method"]
        if method_of(spec) == "scratch":
            assert method == {"name": "scratch", "label_smoothing": 0.0}
        else:
            assert method == {"name": "kd", "temperature": 4.0, "alpha": 0.9}


def test_a_key_no_selectable_entry_takes_is_still_rejected():
    # Without kd in the grid, method.temperature belongs to nothing this experiment can run.
    found = problems(single(method={"name": "scratch", "temperature": 2.0}))
    assert found == [p for p in found if p.startswith("method.temperature: unknown key")] and found
    found = problems(quick(method__label_smooth=0.1))
    assert all(p.startswith("method.label_smooth: unknown key") for p in found) and found


def test_grid_switching_the_model_drops_options_of_the_other_model():
    _, specs = parse_experiment(quick(grid={"student.model": ["cnn1d", "mlp"]}, student__kernel_size=3,
                                      student__dropout=0.1, seeds=[0]))
    cnn, mlp = (s.resolved()["student"] for s in specs)
    assert cnn["model"] == "cnn1d" and cnn["kernel_size"] == 3 and "dropout" not in cnn
    assert mlp["model"] == "mlp" and mlp["dropout"] == 0.1 and "kernel_size" not in mlp


def test_runs_that_resolve_alike_run_once():
    raw = quick(grid={"method.name": ["scratch", "kd"], "method.temperature": [2, 4]}, seeds=[0, 1])
    _, specs = parse_experiment(raw)
    assert len(specs) == 6
    scratch = [s for s in specs if method_of(s) == "scratch"]
    kd = [s for s in specs if method_of(s) == "kd"]
    assert [s.seed for s in scratch] == [0, 1]
    assert sorted((s.config.method.options["temperature"], s.seed) for s in kd) == [
        (2.0, 0), (2.0, 1), (4.0, 0), (4.0, 1)]
    assert len(set(ids(specs))) == 6
    # The scratch runs do not depend on the temperature: the same ids as with no temperature grid.
    _, plain = parse_experiment(quick(seeds=[0, 1]))
    assert {s.run_id for s in scratch} == {s.run_id for s in plain if method_of(s) == "scratch"}
    # Order: grid points as written (first occurrence), then seeds.
    assert [(method_of(s), s.seed) for s in specs[:2]] == [("scratch", 0), ("scratch", 1)]


# --------------------------------------------------------------------------- run identity


def test_run_id_changes_with_any_value_and_group_key_ignores_the_seed():
    _, specs = parse_experiment(single())
    assert len({s.group_key for s in specs}) == 1
    assert len({s.run_id for s in specs}) == 3
    for key, value in [("train.lr", 0.02), ("student.width", 16), ("data.split_seed", 1),
                       ("method.temperature", 2.0), ("teacher.width", 32), ("train.selection", "best_val")]:
        raw = single()
        set_path(raw, key, value)
        _, changed = parse_experiment(raw)
        assert not set(ids(changed)) & set(ids(specs)), key
        assert changed[0].group_key != specs[0].group_key, key


def test_run_id_starts_with_the_experiment_name_slug():
    _, specs = parse_experiment(single(name="My Sweep #2"))
    assert specs[0].run_id.startswith("my-sweep--2-")
    assert len({s.run_id.rsplit("-", 1)[1] for s in specs}) == 3


def test_run_id_is_the_same_in_another_process():
    _, specs = load_experiment()
    code = ("import json; from kdlab.config import load_experiment; "
            "print(json.dumps([(s.run_id, s.group_key) for s in load_experiment()[1]]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert [tuple(x) for x in json.loads(out.stdout)] == [(s.run_id, s.group_key) for s in specs]


def test_to_dict_round_trips_to_the_same_runs():
    for raw in (quick(), quick(grid={"method.name": ["scratch", "kd"], "method.temperature": [2, 4]})):
        base, specs = parse_experiment(raw)
        flat = to_dict(base)
        assert flat["student"]["width"] == 8 and "options" not in flat["student"]  # options flattened
        assert flat["method"]["temperature"] == 4.0 and "options" not in flat["method"]
        again = yaml.safe_load(yaml.safe_dump(flat))  # and it survives YAML
        assert ids(parse_experiment(again)[1]) == ids(specs)


def test_a_saved_resolved_config_reproduces_its_run():
    for spec in parse_experiment(quick())[1]:
        saved = yaml.safe_load(yaml.safe_dump(spec.resolved()))
        saved["seeds"] = [saved.pop("seed")]
        (again,) = parse_experiment(saved)[1]
        assert again.run_id == spec.run_id


# --------------------------------------------------------------------------- teacher runs


def test_every_student_of_a_study_shares_one_teacher_run():
    _, specs = parse_experiment(quick())
    _, other_students = parse_experiment(quick(student__width=16, train__lr=0.05, method__alpha=0.5))
    teachers = {teacher_run_spec(s.config).run_id for s in specs + other_students}
    assert len(teachers) == 1
    teacher = teacher_run_spec(specs[0].config)
    assert teacher.config.method.name == "scratch" and teacher.config.teacher is None
    assert teacher.config.student.model == "cnn1d" and teacher.config.student.options["width"] == 64
    assert teacher.config.train.epochs == 30
    assert teacher.run_id not in ids(specs)


@pytest.mark.parametrize("key, value", [
    ("teacher.width", 32), ("data.split_seed", 1), ("teacher.train.lr", 0.02), ("teacher.seed", 1),
    ("data.val_fraction", 0.2),
])
def test_the_teacher_run_changes_with_what_shapes_the_teacher(key, value):
    base = teacher_run_spec(parse_experiment(single())[1][0].config)
    raw = single()
    set_path(raw, key, value)
    changed = teacher_run_spec(parse_experiment(raw)[1][0].config)
    assert changed.run_id != base.run_id


def test_teacher_without_a_train_section_gets_the_default_recipe():
    raw = single()
    del raw["teacher"]["train"]
    _, specs = parse_experiment(raw)
    assert specs[0].config.teacher.train == TrainConfig()


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("text, expected", [
    ("train.lr=0.05", ("train.lr", 0.05)),
    ("train.lr=3e-4", ("train.lr", 3e-4)),  # not the string '3e-4' (PyYAML's YAML 1.1 reading)
    ("train.epochs=3", ("train.epochs", 3)),
    ("seeds=[0, 1, 2]", ("seeds", [0, 1, 2])),
    ("teacher=null", ("teacher", None)),
    ("train.nesterov=true", ("train.nesterov", True)),
    ("train.optimizer=sgd", ("train.optimizer", "sgd")),
    ("name=my run", ("name", "my run")),
    ("name='007'", ("name", "007")),
    ("method={name: scratch}", ("method", {"name": "scratch"})),
    ("name=a=b", ("name", "a=b")),
    (" student.width =16", ("student.width", 16)),
    ("name=", ("name", "")),
])
def test_parse_override_reads_the_value_as_yaml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.lr", "=0.1", " =0.1"])
def test_malformed_override_is_an_error(text):
    with pytest.raises(KdlabError, match="--set"):
        parse_override(text)
    with pytest.raises(KdlabError):
        load_experiment(overrides=[text])


def test_apply_overrides_creates_sections_and_leaves_the_input_alone():
    raw = {"train": {"lr": 0.01}}
    out = apply_overrides(raw, ["teacher.train.epochs=3", "train.lr=0.5", "train.lr=0.2"])
    assert out == {"train": {"lr": 0.2}, "teacher": {"train": {"epochs": 3}}}  # the last one wins
    assert raw == {"train": {"lr": 0.01}}
    with pytest.raises(KdlabError, match="train.lr"):
        apply_overrides(raw, ["train.lr.x=1"])  # lr is a value, not a section


def test_overrides_beat_the_file_and_seeds_beat_both(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(quick()))
    _, specs = load_experiment(path, ["train.lr=0.5", "student.depth=2", "seeds=[4, 5]"])
    assert {s.config.train.lr for s in specs} == {0.5}
    assert {s.config.student.options["depth"] for s in specs} == {2}
    assert [s.seed for s in specs] == [4, 5, 4, 5]
    _, specs = load_experiment(path, ["seeds=[4, 5]"], seeds=[9])
    assert [s.seed for s in specs] == [9, 9]
    _, specs = load_experiment(path, ["teacher=null", "grid={}", "method={name: scratch}"])
    assert len(specs) == 3 and all(s.config.teacher is None for s in specs)


def test_an_override_into_a_bad_value_is_a_config_error():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got 'many'"):
        load_experiment(overrides=["train.epochs=many"])


# --------------------------------------------------------------------------- YAML files


def test_load_yaml_errors(tmp_path):
    with pytest.raises(KdlabError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {lr: 0.1}\n  epochs: 3\n")
    with pytest.raises(KdlabError, match=r"bad.yaml is not valid YAML at line 3"):
        load_yaml(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(KdlabError, match="mapping at the top level, got list"):
        load_yaml(listed)
    with pytest.raises(KdlabError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")


def test_load_yaml_reads_scientific_notation_as_numbers(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train: {lr: 1e-3, weight_decay: 5E-4, gamma: 1.5e-1}\ngrid: {train.lr: [1e-2, 3e-4]}\n")
    raw = load_yaml(path)
    assert raw["train"] == {"lr": 1e-3, "weight_decay": 5e-4, "gamma": 0.15}
    assert raw["grid"] == {"train.lr": [1e-2, 3e-4]}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(empty) == {}


def test_named_grid_values_label_the_runs():
    raw = {
        "name": "named",
        "teacher": {"model": "cnn1d", "width": 16},
        "method": {"name": "distill"},
        "seeds": [0],
        "grid": {"method.terms": {"plain_kl": {"ce": 0.1, "kl": {"weight": 0.9}},
                                  "tvd": {"ce": 0.1, "tvd": {"weight": 0.9}}}},
    }
    _, specs = parse_experiment(raw)
    assert [s.label for s in specs] == ["method.terms=plain_kl seed=0", "method.terms=tvd seed=0"]
    assert specs[1].resolved()["method"]["terms"] == {"ce": 0.1, "tvd": {"weight": 0.9}}
    assert specs[0].run_id != specs[1].run_id


def test_later_yaml_documents_extend_the_first(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "name: multi\nteacher: {model: cnn1d, width: 16}\nstudent: {model: cnn1d, width: 4}\n"
        "seeds: [0, 1]\ngrid: {method.name: [scratch, kd]}\n"
        "---\n"
        "variant: wide\nmethod: {name: kd, temperature: 2.0}\nteacher: {width: 32}\n"
    )
    base, specs = load_experiment(path, seeds=[0])
    assert base.name == "multi"
    assert [s.label for s in specs] == ["method.name=scratch seed=0", "method.name=kd seed=0", "variant=wide seed=0"]
    extra = specs[-1].config
    assert extra.teacher.options["width"] == 32 and extra.method.options["temperature"] == 2.0
    assert extra.student.options["width"] == 4 and extra.name == "multi"
    path.write_text("name: multi\nmethod: {name: scratch}\n---\ntrain: {epochs: zero}\n")
    with pytest.raises(ConfigError, match=r"\(document 2\) train.epochs"):
        load_experiment(path)
