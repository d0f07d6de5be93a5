"""Options added after an entry's first runs keep those runs' ids: at their default they are not in the run id.

A method hyperparameter declared with ``OMIT_DEFAULT`` metadata, and a factory option marked
``NotInRunId(at_default=True)``, are left out of the resolved config while at their default, and are part of it
(and of the id) once set to anything else. An option marked plain ``NotInRunId`` is never part of it.
"""
from kdlab.runs import identity_free_options, parse_experiment

BASE = {"name": "ids", "data": {"dataset": "mnist1d"}, "student": {"model": "cnn1d"},
        "teacher": {"model": "cnn1d", "width": 16, "train": {"epochs": 1}}, "train": {"epochs": 1}, "seeds": [0]}


def _spec(method: dict):
    _, specs = parse_experiment({**BASE, "method": method})
    return specs[0]


def test_later_hyperparameter_at_its_default_is_not_in_the_id():
    plain = _spec({"name": "ctkd"})
    explicit = _spec({"name": "ctkd", "temperature_module": "global", "instance_hidden": 256})
    instance = _spec({"name": "ctkd", "temperature_module": "instance"})
    assert "temperature_module" not in plain.resolved()["method"]
    assert "lambda_epochs" in plain.resolved()["method"]  # an original hyperparameter stays, at its default too
    assert explicit.run_id == plain.run_id
    assert instance.resolved()["method"]["temperature_module"] == "instance"
    assert instance.run_id != plain.run_id


def test_marked_options_of_each_kind():
    gkd = {key: at_default for key, at_default, _ in identity_free_options("method", "gkd")}
    assert gkd == {"fused": True, "teacher_targets": True, "teacher_targets_k": True}
    prompts = {key: at_default for key, at_default, _ in identity_free_options("dataset", "prompts")}
    assert prompts == {"data_files": True, "num_test_prompts": True, "num_train_prompts": True}
    assert dict((k, a) for k, a, _ in identity_free_options("dataset", "cifar10")) == {"download": False}
    assert identity_free_options("method", "no_such_method") == ()


def test_a_method_revision_above_one_joins_the_id_and_one_keeps_it(monkeypatch):
    from kdlab import registry

    kd = registry.get("method", "kd")
    assert kd.revision == 1
    before = _spec({"name": "kd"})
    assert "method_revision" not in before.identity()
    before_id, before_group = before.run_id, before.group_key  # ids are computed when read
    scratch_id = _spec({"name": "scratch"}).run_id
    monkeypatch.setattr(kd, "revision", 2)  # a fix changed what kd computes
    after = _spec({"name": "kd"})
    assert after.identity()["method_revision"] == {"method": 2}
    assert after.run_id != before_id and after.group_key != before_group
    assert _spec({"name": "scratch"}).run_id == scratch_id  # kd is not in this run
    monkeypatch.setattr(kd, "revision", 1)
    assert _spec({"name": "kd"}).run_id == before_id
