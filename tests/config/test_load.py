"""Loading configs: files that are not configs, --variant/--point, --set per document, cross-field checks."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from kdlab import registry
from kdlab.cli import main
from kdlab.config import ConfigError, KdlabError, load_experiment, parse_experiment

TINY = {"name": "tiny", "data": {"dataset": "synthetic", "num_train": 64, "num_test": 32},
        "student": {"model": "mlp", "width": 8, "depth": 1}, "method": {"name": "scratch"},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu"}, "seeds": [0]}


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_experiment(raw)
    return info.value.problems


def cli_error(tmp_path, capsys, *argv) -> list[str]:
    code = main(["--workspace", str(tmp_path / "ws"), "run", *argv, "--dry-run"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "ws").exists(), lines
    return lines


# ----------------------------------------------------------------------------- files that are not configs


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
    (b"name: x\0\n", "is binary"),
    ("name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"[" * 3000 + b"]" * 3000, "config file"),
])
def test_a_file_that_is_not_a_config_is_one_line(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    (line,) = cli_error(tmp_path, capsys, str(path))
    assert line.startswith(f"kdlab: error: config file {path}") and fragment in line, line


def test_an_empty_path_and_a_directory_are_one_line(tmp_path, capsys):
    assert cli_error(tmp_path, capsys, "") == ["kdlab: error: config path is empty; give the path of a YAML config "
                                                "(see configs/), or no path for the built-in quickstart"]
    (line,) = cli_error(tmp_path, capsys, str(tmp_path))
    assert line == f"kdlab: error: config file {tmp_path} is a directory; give the path of a YAML file (see configs/)"


def test_a_misspelt_section_key_suggests_the_section_key():
    (found,) = problems(dict(TINY, data={**TINY["data"], "val_fractoin": 0.2}))
    assert found.startswith("data.val_fractoin: unknown key (did you mean 'val_fraction'?)"), found


def test_experiment_names_are_bounded():
    (found,) = problems(dict(TINY, name="n" * 300))
    assert found.startswith("name: must be at most 64 long, got 300"), found
    parse_experiment(dict(TINY, name="n" * 64))


# ----------------------------------------------------------------------------- cross-field checks


@pytest.mark.parametrize(("device", "fragment"), [
    ("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device"), ("cpu:1", "unknown device"),
    ("cuda:99", "cuda:99 requested but"),
])
def test_devices_this_machine_lacks_are_refused(device, fragment):
    (found,) = problems(dict(TINY, train={**TINY["train"], "device": device}))
    assert found.startswith("train.device: ") and fragment in found, found


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where CUDA is")
def test_fp16_on_a_cpu_only_machine_is_refused():
    assert problems(dict(TINY, train={**TINY["train"], "device": "auto", "precision": "fp16"})) == [
        "train.precision: fp16 needs a CUDA device but training runs on the CPU; use bf16 or fp32"]


@pytest.mark.parametrize("data", [{"dataset": "mnist1d"}, {"dataset": "synthetic", "input_shape": [1, 16]},
                                  {"dataset": "addition"}])
def test_crop_flip_on_data_that_is_not_images_is_refused(data):
    found = problems(dict(TINY, data={**data, "augment": "crop_flip"}))
    assert any(p.startswith("data.augment: crop_flip needs image inputs") for p in found), found


def test_crop_flip_on_images_is_accepted():
    parse_experiment(dict(TINY, data={"dataset": "synthetic", "input_shape": [3, 8, 8], "augment": "crop_flip"}))


@pytest.mark.parametrize("method", ["gkd", "policy_gradient_kd"])
def test_sft_steps_that_leave_no_distillation_step_are_refused(method):
    raw = {"data": {"dataset": "addition"}, "student": {"model": "tinygpt"},
           "teacher": {"model": "tinygpt", "train": {"epochs": 1}}, "method": {"name": method, "sft_steps": 10},
           "train": {"steps": 10}}
    assert problems(raw) == ["method.sft_steps: 10 warm-up steps leave none of train.steps (10) for distillation; "
                             "lower method.sft_steps or raise train.steps"]
    raw["train"]["steps"] = 11
    parse_experiment(raw)


def test_the_teacher_rule_is_one_rule_for_the_config_and_the_builder():
    from kdlab.config import MethodConfig
    from kdlab.engine.build import build_method

    (config_line,) = problems(dict(TINY, method={"name": "kd"}))
    with pytest.raises(KdlabError) as info:
        build_method(MethodConfig(name="kd"), student=torch.nn.Linear(2, 2), teacher=None)
    assert str(info.value) == config_line == registry.get("method", "kd").teacher_problem("kd", False)


def test_every_problem_of_every_grid_point_and_document_at_once(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, grid={"train.lr": [-1.0, float("nan")]}))
                    + "---\nvariant: b\ntrain: {momentum: 2.0}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    found = info.value.problems
    assert any(p.startswith("(document 1) train.lr: must be a positive finite number, got -1.0") for p in found)
    assert any(p.startswith("(document 1) train.lr: must be a positive finite number, got nan") for p in found)
    assert any(p.startswith("(document 2) train.momentum: must be in [0, 1), got 2.0") for p in found), found


# ----------------------------------------------------------------------------- --variant, --point, --set


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, teacher={"model": "mlp", "width": 16, "depth": 1, "train": {"epochs": 1}},
                                        grid={"method.name": ["scratch", "kd"]}))
                    + "---\nvariant: self\nteacher: null\nmethod: {name: pskd}\n")
    return path


def test_variant_picks_one_document(study):
    _, specs = load_experiment(study, variant="self")
    assert [s.label for s in specs] == ["variant=self seed=0"]
    _, specs = load_experiment(study, variant="base")
    assert [s.label for s in specs] == ["method.name=scratch seed=0", "method.name=kd seed=0"]
    with pytest.raises(KdlabError, match=r"^--variant 'x': no such document; the variants are base, self$"):
        load_experiment(study, variant="x")


def test_point_picks_grid_points(study):
    _, specs = load_experiment(study, points=["method.name=kd"])
    assert [s.label for s in specs] == ["method.name=kd seed=0"]
    _, specs = load_experiment(study, points=["variant=self"])
    assert [s.label for s in specs] == ["variant=self seed=0"]
    with pytest.raises(KdlabError, match=r"no grid point has method.name='dkd'; its values are kd, scratch$"):
        load_experiment(study, points=["method.name=dkd"])
    with pytest.raises(KdlabError, match=r"'seed' is not a grid key; the grid keys are method.name, variant$"):
        load_experiment(study, points=["seed=0"])


def test_variant_and_point_on_the_command_line(study, tmp_path, capsys):
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(study), "--dry-run", "--variant", "self"]) == 0
    assert "1 runs" in capsys.readouterr().out
    assert cli_error(tmp_path / "x", capsys, str(study), "--point", "method.name=zz") == [
        "kdlab: error: --point 'method.name=zz': no grid point has method.name='zz'; its values are kd, scratch"]


def test_set_applies_to_the_documents_that_take_the_key(study):
    # The second document has no teacher and trains pskd: teacher.* and kd's temperature are not its keys.
    _, specs = load_experiment(study, ["teacher.train.epochs=2", "method.temperature=2.0", "method.alpha_T=0.5"])
    by_label = {s.label: s.config for s in specs}
    assert by_label["method.name=kd seed=0"].teacher.train.epochs == 2
    assert by_label["method.name=kd seed=0"].method.options["temperature"] == 2.0
    assert by_label["variant=self seed=0"].teacher is None
    assert by_label["variant=self seed=0"].method.options == {"alpha_T": 0.5}
    # A key no document takes is still applied (and so reported), not silently dropped.
    with pytest.raises(ConfigError, match="method.temprature: unknown key"):
        load_experiment(study, ["method.temprature=2.0"])


# ----------------------------------------------------------------------------- crafted model files


def _model_file(path, metadata, tensors=None):
    from safetensors.torch import save_file

    save_file(tensors or {"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(("metadata", "fragment"), [
    ({"kdlab_model": "{not json"}, "its kdlab metadata is not JSON"),
    ({"kdlab_model": "[1, 2]"}, "names no model"),
    ({"kdlab_model": json.dumps({"options": {}})}, "names no model"),
    ({"kdlab_model": json.dumps({"model": "mlp", "options": {"width": 200000}})}, "width: must be ≤ 65536"),
    ({"kdlab_model": json.dumps({"model": "mlp", "options": {"bogus": 1}})}, "bogus: unknown key"),
])
def test_crafted_model_metadata_is_one_line_before_anything_is_built(tmp_path, metadata, fragment):
    from kdlab.engine.checkpoint import MODEL_METADATA_KEY, read_model_file

    metadata = {MODEL_METADATA_KEY: metadata.pop("kdlab_model")}
    path = _model_file(tmp_path / "m.safetensors", metadata)
    with pytest.raises(KdlabError) as info:
        read_model_file(path)
    assert str(info.value).startswith(f"checkpoint {path}") and fragment in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_boolean_and_integer_weights_are_refused(tmp_path):
    from kdlab.engine.checkpoint import load_into, read_model_file

    path = _model_file(tmp_path / "b.safetensors", {}, {"weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(KdlabError, match="holds booleans"):
        read_model_file(path)
    with pytest.raises(KdlabError, match=r"weight holds torch.int64 values where the model has floating-point"):
        load_into(torch.nn.Linear(2, 2, bias=False), {"weight": torch.ones(2, 2, dtype=torch.int64)}, source="f")


def test_options_marked_not_in_run_id_leave_ids_unchanged():
    """``download`` fetches the same files: run ids (pinned from before the option existed) do not move."""
    from kdlab.config import parse_experiment

    pinned = {"cifar10": "c-ee179fa1cc", "cifar100": "c-2a872b4965", "mnist": "c-40e17440b3",
              "fashion_mnist": "c-3116bd155f"}
    for dataset, run_id in pinned.items():
        for download in (None, False, True):
            data = {"dataset": dataset, "root": "/nonexistent"}
            if download is not None:
                data["download"] = download
            raw = {"name": "c", "data": data, "student": {"model": "mlp"}, "method": {"name": "scratch"},
                   "seeds": [0]}
            spec = parse_experiment(raw)[1][0]
            assert spec.run_id == run_id and "download" not in spec.resolved()["data"]
            assert spec.config.data.options["download"] is (download is True)  # the factory still gets it
