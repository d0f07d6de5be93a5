"""timm and torchvision adapters (kdlab.models.vision_zoo): the vision tier, run in its own venv.

    make test-vision            (or: .venv-vision/bin/python -m pytest -m vision)

Without timm/torchvision (the default venv: torchvision from PyPI does not import beside torch 2.13) the whole
module skips at import. No test downloads: weights come from files and caches the tests write.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vision
try:  # a torchvision built for another torch raises RuntimeError at import ("torchvision::nms does not exist")
    import timm
    import torchvision
except (ImportError, RuntimeError) as exc:
    pytest.skip(f"timm/torchvision not importable ({type(exc).__name__}); run make test-vision",
                allow_module_level=True)

import torch
import yaml
from safetensors.torch import save_file

from kdlab.cli import main
from kdlab.config import ConfigError, parse_experiment
from kdlab.errors import KdlabError
from kdlab.models import Taps, tap_shapes
from kdlab.models.vision_zoo import IMAGENET_MEAN, IMAGENET_STD, check_name, timm_model, torchvision_model

SHAPE = (3, 32, 32)
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
DATA_MEAN, DATA_STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _timm(name="test_resnet", **options):
    return timm_model(input_shape=SHAPE, num_classes=7, mean=DATA_MEAN, std=DATA_STD, name=name, **options)


def _tv(name="resnet18", **options):
    return torchvision_model(input_shape=SHAPE, num_classes=7, mean=DATA_MEAN, std=DATA_STD, name=name, **options)


def _stats(model):
    return (tuple(round(v, 6) for v in model.normalize.mean.flatten().tolist()),
            tuple(round(v, 6) for v in model.normalize.std.flatten().tolist()))


def _raw_logits(model, x, mean, std):
    """The library's model alone on inputs normalised here, from the given statistics."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return model.net((x - m) / s)


@pytest.mark.parametrize("make", [_timm, _tv])
def test_forward_gives_num_classes_logits(make):
    torch.manual_seed(0)
    model = make().eval()
    assert model(torch.rand(2, *SHAPE)).shape == (2, 7)


def test_timm_normalises_inside_with_the_pretrained_config_stats():
    torch.manual_seed(0)
    model = _timm("resnet18", normalize="pretrained").eval()
    cfg = model.net.pretrained_cfg
    assert _stats(model) == (tuple(cfg["mean"]), tuple(cfg["std"])) == (IMAGENET_MEAN, IMAGENET_STD)
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _raw_logits(model, x, cfg["mean"], cfg["std"]), rtol=0, atol=1e-5)
        assert not torch.allclose(model(x), model.net(x), atol=1e-3)  # the normalisation does change the logits


def test_random_weights_take_the_dataset_stats_and_loaded_weights_the_pretrained_ones(tmp_path):
    torch.manual_seed(0)
    assert _stats(_timm()) == (DATA_MEAN, DATA_STD)  # auto, nothing loaded: as every kdlab model
    assert _stats(_tv()) == (DATA_MEAN, DATA_STD)
    file = tmp_path / "w.pth"
    torch.save(_timm().net.state_dict(), file)
    assert _stats(_timm(weights_file=str(file))) == ((0.5,) * 3, (0.5,) * 3)  # test_resnet's pretrained_cfg
    assert _stats(_timm(weights_file=str(file), normalize="data")) == (DATA_MEAN, DATA_STD)
    x = torch.rand(2, *SHAPE)
    model = _tv(normalize="pretrained").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _raw_logits(model, x, IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=1e-5)


def test_grey_scale_inputs_reach_timm_as_one_channel():
    model = timm_model(input_shape=(1, 28, 28), num_classes=10, mean=(0.13,), std=(0.31,), name="test_resnet",
                       normalize="pretrained").eval()
    first_conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1
    assert _stats(model) == ((0.5,), (0.5,))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(KdlabError, match="3-channel"):
        torchvision_model(input_shape=(1, 28, 28), num_classes=10, mean=(0.1,), std=(0.3,), name="resnet18")


def test_timm_taps_are_its_feature_info_modules_then_pool():
    model = _timm("resnet18")
    assert model.feature_stages == ("net.act1", "net.layer1", "net.layer2", "net.layer3", "net.layer4", "pool")
    assert [f"net.{f['module']}" for f in model.net.feature_info] == list(model.feature_stages[:-1])
    shapes = tap_shapes(model, list(model.feature_stages), torch.rand(2, *SHAPE))
    assert shapes == {"net.act1": (2, 64, 16, 16), "net.layer1": (2, 64, 8, 8), "net.layer2": (2, 128, 4, 4),
                      "net.layer3": (2, 256, 2, 2), "net.layer4": (2, 512, 1, 1), "pool": (2, 512)}
    channels = [f["num_chs"] for f in model.net.feature_info]
    assert [shapes[s][1] for s in model.feature_stages[:-1]] == channels


def test_torchvision_taps_are_its_stages_then_pool():
    model = _tv("resnet18")
    assert model.feature_stages == ("net.layer1", "net.layer2", "net.layer3", "net.layer4", "pool")
    shapes = tap_shapes(model, list(model.feature_stages), torch.rand(2, *SHAPE))
    assert shapes == {"net.layer1": (2, 64, 8, 8), "net.layer2": (2, 128, 4, 4), "net.layer3": (2, 256, 2, 2),
                      "net.layer4": (2, 512, 1, 1), "pool": (2, 512)}
    mobile = _tv("mobilenet_v3_small")
    assert mobile.feature_stages[0] == "net.features.0" and mobile.feature_stages[-1] == "pool"
    assert len(mobile.feature_stages) == len(mobile.net.features) + 1


def test_pool_is_the_classifier_input_and_survives_a_deepcopy():
    torch.manual_seed(0)
    model = _timm().eval()
    twin = copy.deepcopy(model)  # teacher bf16 copies are deep copies: the probe hook must follow the copy
    x = torch.rand(2, *SHAPE)
    for net in (model, twin):
        with torch.no_grad(), Taps(net, ["pool"]) as taps:
            logits = net(x)
            torch.testing.assert_close(net.net.get_classifier()(taps["pool"]), logits)


def test_a_weights_file_loads_and_a_head_of_another_class_count_is_left_new(tmp_path):
    torch.manual_seed(0)
    source = _timm().eval()
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": source.net.state_dict()}, pth)
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(st))
    x = torch.rand(2, *SHAPE)
    for file in (pth, st):
        torch.manual_seed(1)
        loaded = _timm(weights_file=str(file), normalize="data").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    # an ImageNet-style state dict (1000 classes) starts a 7-class model: every weight but the head's
    imagenet = timm.create_model("test_resnet", num_classes=1000)
    torch.save(imagenet.state_dict(), pth)
    tuned = _timm(weights_file=str(pth))
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(tuned.net.state_dict()[key], value), key
    assert tuned.net.fc.out_features == 7
    tv_source = torchvision.models.resnet18(num_classes=1000)
    torch.save(tv_source.state_dict(), pth)
    assert torch.equal(_tv(weights_file=str(pth)).net.layer1[0].conv1.weight, tv_source.layer1[0].conv1.weight)


def test_bad_weights_files_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(KdlabError, match=r"weights file .*nope\.pth does not exist"):
        _timm(weights_file=str(tmp_path / "nope.pth"))
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "other.pth")
    with pytest.raises(KdlabError, match=r"other\.pth does not fit this architecture") as err:
        _timm(weights_file=str(tmp_path / "other.pth"))
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(KdlabError, match=r"cannot read weights file .*junk\.pth"):
        _tv(weights_file=str(tmp_path / "junk.pth"))


def test_pretrained_loads_from_the_local_caches_only(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(KdlabError, match=r"timm:test_resnet are not in the local cache .*weights_file"):
        _timm(pretrained=True)
    with pytest.raises(KdlabError, match=r"torchvision:resnet18 \(resnet18-.*\.pth\) are not in"):
        _tv(pretrained=True)
    # timm's own cache: the Hugging Face hub layout (refs/main -> snapshots/<rev>/model.safetensors)
    torch.manual_seed(0)
    weights = timm.create_model("test_resnet", num_classes=1000)
    repo = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.state_dict().items()}, str(repo / "snapshots/abc/model.safetensors"))
    model = _timm(pretrained=True)
    own = model.net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in weights.state_dict().items() if not k.startswith("fc."))
    assert _stats(model) == ((0.5,) * 3, (0.5,) * 3)
    # torchvision's: torch.hub's checkpoints folder, under the weights' own file name
    tv_weights = torchvision.models.ResNet18_Weights.DEFAULT
    source = torchvision.models.resnet18()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / Path(tv_weights.url).name)
    model = _tv(pretrained=True)
    assert torch.equal(model.net.conv1.weight, source.conv1.weight) and model.net.fc.out_features == 7
    assert _stats(model) == (IMAGENET_MEAN, IMAGENET_STD)


def test_unknown_names_get_a_did_you_mean_from_the_library():
    with pytest.raises(KdlabError, match=r"unknown timm model 'resnet19'; did you mean .*resnet18"):
        check_name("timm", "resnet19")
    with pytest.raises(KdlabError, match=r"unknown torchvision model 'resnt50'; did you mean resnet50"):
        check_name("torchvision", "resnt50")
    check_name("timm", "resnet18.a1_in1k")  # a pretrained tag after the architecture is fine


def _config(**overrides):
    raw = {"name": "vz", "data": {"dataset": "synthetic", "input_shape": list(SHAPE), "num_train": 32, "num_test": 16},
           "teacher": {"model": "timm:test_resnet", "train": {"epochs": 1}}, "student": {"model": "torchvision:resnet18"},
           "method": {"name": "kd"}, "train": {"epochs": 1}}
    raw.update(overrides)
    return raw


def test_configs_name_models_as_lib_colon_name():
    base, specs = parse_experiment(_config())
    assert (base.student.model, base.student.options["name"]) == ("torchvision", "resnet18")
    assert (base.teacher.model, base.teacher.options["name"]) == ("timm", "test_resnet")
    assert base.student.options["pretrained"] is False and base.student.options["normalize"] == "auto"
    _, specs = parse_experiment(_config(grid={"student.model": ["timm:test_resnet", "torchvision:resnet18"]}))
    assert [(s.config.student.model, s.config.student.options["name"]) for s in specs] == [
        ("timm", "test_resnet"), ("torchvision", "resnet18")]


def test_bad_vision_configs_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        parse_experiment(_config(student={"model": "timm:resnet19"},
                                 teacher={"model": "torchvision:resnet18", "weights_file": str(tmp_path / "t.pth"),
                                          "train": {"epochs": 1}}))
    problems = err.value.problems
    assert any(p.startswith("student.model: unknown timm model 'resnet19'; did you mean") for p in problems)
    assert any(p.startswith("teacher.weights_file: weights file") and "t.pth" in p for p in problems)
    with pytest.raises(ConfigError, match=r"student.normalize: 'imagenet' is not one of auto, pretrained, data"):
        parse_experiment(_config(student={"model": "timm:test_resnet", "normalize": "imagenet"}))
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_config(student={"model": "timm:mobilenetv3_smal_050"})))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config)]) == 2
    assert "did you mean mobilenetv3_small_050" in capsys.readouterr().err
    assert not (tmp_path / "ws" / "runs").exists()


@pytest.mark.integration
def test_kd_and_fitnet_with_timm_and_torchvision_models_from_a_config(tmp_path):
    """teacher timm:resnet18 (1-epoch recipe) → student torchvision:mobilenet_v3_small by KD and by a FitNet hint."""
    raw = _config(teacher={"model": "timm:resnet18", "train": {"epochs": 1, "batch_size": 16}},
                  student={"model": "torchvision:mobilenet_v3_small"},
                  train={"epochs": 1, "batch_size": 16, "device": "cpu"},
                  grid={"method": {"kd": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
                                   "fitnet": {"name": "distill", "terms": {
                                       "ce": 1.0, "hint": {"loss": "fitnet", "weight": 100.0, "adapter": "conv",
                                                           "student": "net.features.3", "teacher": "net.layer2"}}}}})
    config = tmp_path / "vision.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "kdlab.cli", "--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]
    dry = subprocess.run(cmd[:-1] + ["--dry-run"], capture_output=True, text=True, timeout=600, env=ENV)
    assert dry.returncode == 0, dry.stderr
    assert "net.features.3 (2, 24, 4, 4)" in dry.stdout and "net.layer2 (2, 128, 4, 4)" in dry.stdout
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr
    finals = [json.loads(p.read_text()) for p in (tmp_path / "ws").glob("runs/*/final.json")]
    assert len(finals) == 3, done.stdout  # the teacher's recipe run and the two students


def test_a_teacher_with_its_own_trained_weights_is_used_as_it_is(tmp_path, capsys):
    """as_is: true — no recipe run; the teacher's logits are those of the file's weights; a head that does not fit
    the data, as_is without weights, and as_is beside teacher.train are refused in one line before any work."""
    torch.manual_seed(0)
    trained = timm_model(input_shape=SHAPE, num_classes=3, name="test_resnet")
    save_file({k: v.contiguous() for k, v in trained.net.state_dict().items()}, str(tmp_path / "t3.safetensors"))
    save_file({k: v.contiguous() for k, v in _timm().net.state_dict().items()}, str(tmp_path / "t7.safetensors"))
    teacher = {"model": "timm:test_resnet", "weights_file": str(tmp_path / "t3.safetensors"), "as_is": True,
               "normalize": "pretrained"}
    raw = _config(data={"dataset": "synthetic", "input_shape": list(SHAPE), "num_classes": 3, "num_train": 32,
                        "num_test": 16}, teacher=teacher, student={"model": "timm:test_resnet"},
                  train={"epochs": 1, "batch_size": 16, "device": "cpu"})
    base, _ = parse_experiment(raw)
    assert base.teacher.train is None
    config = tmp_path / "as_is.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]) == 0
    from kdlab.store import Store
    assert [r.role for r in Store(tmp_path / "ws").runs()] == ["student"]  # no teacher run
    built = timm_model(input_shape=SHAPE, num_classes=3, **base.teacher.options)
    x = torch.rand(2, *SHAPE)
    trained.eval(), built.eval()
    with torch.no_grad():
        torch.testing.assert_close(built.net(x), trained.net(x))  # the file's weights, head included

    for teacher_options, fragment in (
            ({**teacher, "weights_file": str(tmp_path / "t7.safetensors")}, "does not fit this dataset's classes"),
            ({"model": "timm:test_resnet", "as_is": True}, "teacher.as_is: a model used as it is needs its weights"),
            ({**teacher, "train": {"epochs": 1}}, "teacher.train: a teacher with as_is: true is used as it is")):
        config.write_text(yaml.safe_dump({**raw, "teacher": teacher_options}))
        assert main(["--workspace", str(tmp_path / "ws2"), "run", str(config), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / "ws2" / "runs").exists() or not list((tmp_path / "ws2" / "runs").iterdir())
