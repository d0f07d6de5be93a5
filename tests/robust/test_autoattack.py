"""Tests of kdlab.robust.autoattack (AutoAttack through the optional package pyautoattack) and its wiring into
the protocol, the ``robust:`` config section and ``kdlab eval``.

Every test but the first needs the package (``pip install 'kdlab[autoattack]'``) and is skipped without it;
the first checks the install hint with the import made to fail, so it runs either way.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.cli import main
from kdlab.config import AttackConfig, RobustConfig, parse_experiment
from kdlab.robust.section import check_robust as _check_robust
from kdlab.errors import KdlabError
from kdlab.models.mlp import mlp
from kdlab.robust import AttackSpec, apgd, robust_evaluate
from kdlab.robust.autoattack import STANDARD_COMPONENTS, autoattack, package_shape
from kdlab.study.runner import Runner

needs_package = pytest.mark.skipif(importlib.util.find_spec("pyautoattack") is None,
                                   reason="needs the autoattack extra (pip install 'kdlab[autoattack]')")
HINT = "install the autoattack extra: pip install 'kdlab[autoattack]'"


def toy_data(*, seed=0, n=150, features=16, classes=4):
    """Gaussian blobs inside [0, 1]^features as (N, 1, features), classes in turn."""
    generator = torch.Generator().manual_seed(seed)
    centers = 0.3 + 0.4 * torch.rand(classes, features, generator=generator)
    labels = torch.arange(n) % classes
    inputs = (centers[labels] + 0.05 * torch.randn(n, features, generator=generator)).clamp(0, 1)
    return inputs.reshape(n, 1, features), labels


@functools.lru_cache(maxsize=None)
def trained(classes=4):
    """An undefended MLP fit for 100 full-batch Adam steps on the blobs (clean accuracy ~1)."""
    inputs, labels = toy_data(classes=classes)
    torch.manual_seed(0)
    model = mlp(input_shape=(1, 16), num_classes=classes, mean=(0.5,), std=(0.25,), width=32, depth=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model


def accuracy(model, inputs, labels) -> float:
    with torch.no_grad():
        return (model.eval()(inputs).argmax(dim=1) == labels).double().mean().item()


def test_without_the_package_every_entry_point_gives_the_install_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # `import pyautoattack` now raises ImportError
    inputs, labels = toy_data(n=4)
    with pytest.raises(KdlabError, match=r"pip install 'kdlab\[autoattack\]'") as info:
        autoattack(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), inputs, labels, eps=0.1)
    assert "\n" not in str(info.value)
    problems: list[str] = []
    _check_robust(RobustConfig(attacks=[AttackConfig(name="autoattack")], sanity_checks=False), problems)
    assert problems == [f"robust.attacks[0]: autoattack needs the pyautoattack package; {HINT}"]
    # kdlab eval refuses before looking for the run.
    assert main(["--workspace", str(tmp_path), "eval", "any-run", "--attack", "autoattack"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--attack: autoattack needs the pyautoattack package; {HINT}" in err


def test_package_shape_folds_signals_into_images():
    assert package_shape((1, 40)) == (1, 5, 8)  # mnist1d
    assert package_shape((1, 8, 8)) == (1, 8, 8)  # digits: unchanged
    assert package_shape((16,)) == (1, 4, 4)
    assert package_shape((3, 7)) == (3, 1, 7)  # a prime length: one row


@needs_package
def test_standard_autoattack_stays_in_the_ball_and_records_each_component():
    model, (inputs, labels) = trained(), toy_data()
    x, y = inputs[:8], labels[:8]
    model.train()
    rng = torch.get_rng_state()
    result = autoattack(model, x, y, eps=0.05, seed=3)
    assert model.training and all(module.training for module in model.modules())  # modes given back
    assert torch.equal(torch.get_rng_state(), rng)  # the package reseeds the global RNG; restored
    adversarial = result.adversarial
    assert adversarial.shape == x.shape and adversarial.dtype == x.dtype and not adversarial.requires_grad
    assert (adversarial - x).abs().max() <= 0.05 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    # Cumulative per-component accuracies, in the standard order, non-increasing, the last that of the points.
    assert tuple(result.per_component) == STANDARD_COMPONENTS == ("apgd-ce", "apgd-t", "fab-t", "square")
    values = [result.clean_accuracy, *result.per_component.values()]
    assert values == sorted(values, reverse=True)
    assert result.clean_accuracy == accuracy(model, x, y) == 1.0
    assert result.robust_accuracy == result.per_component["square"] == accuracy(model, adversarial, y)
    assert 0 < result.robust_accuracy < 1  # the budget leaves a partial robust accuracy
    settings = result.settings
    assert settings["package"] == "pyautoattack 0.2.0" and settings["version"] == "standard"
    assert settings["components"] == list(STANDARD_COMPONENTS) and settings["seed"] == 3
    assert settings["apgd"]["n_iter"] == 100 and settings["square"]["n_queries"] == 5000
    assert settings["apgd_t"]["n_target_classes"] == 3 == settings["fab"]["n_target_classes"]  # C - 1 < 9
    assert settings["package_shape"] == [1, 4, 4]
    json.dumps(settings)  # saved with the results
    # Reproducible for a fixed seed.
    again = autoattack(model, x, y, eps=0.05, seed=3)
    assert torch.equal(again.adversarial, adversarial) and again.per_component == result.per_component


@needs_package
def test_autoattack_is_at_least_as_strong_as_our_apgd_ce():
    model, (inputs, labels) = trained(), toy_data()
    x, y = inputs[:16], labels[:16]
    ours = apgd(model, x, y, eps=0.06, steps=100, generator=torch.Generator().manual_seed(0))
    result = autoattack(model, x, y, eps=0.06)
    assert result.robust_accuracy <= accuracy(model, ours, y) + 1 / 16
    assert result.robust_accuracy < result.clean_accuracy
    # L2 (a custom version: the package's L2 Square needs images of at least 5x5).
    result = autoattack(model, x, y, eps=0.5, norm="l2", version="custom", attacks=["apgd-ce", "fab"])
    assert list(result.per_component) == ["apgd-ce", "fab"]
    assert (result.adversarial - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert result.per_component["fab"] == accuracy(model, result.adversarial, y) <= result.per_component["apgd-ce"]


@needs_package
def test_autoattack_refuses_bad_input():
    model, (inputs, labels) = trained(), toy_data(n=4)
    with pytest.raises(KdlabError, match="pixel units"):
        autoattack(model, inputs, labels, eps=8)
    with pytest.raises(KdlabError, match=r"inputs in \[0, 1\]"):
        autoattack(model, inputs * 255, labels, eps=8 / 255)
    with pytest.raises(KdlabError, match="version='custom' needs attacks"):
        autoattack(model, inputs, labels, eps=0.1, version="custom")
    with pytest.raises(KdlabError, match="only used with version='custom'"):
        autoattack(model, inputs, labels, eps=0.1, attacks=["apgd-ce"])
    with pytest.raises(KdlabError, match="attacks='pgd'"):
        autoattack(model, inputs, labels, eps=0.1, version="custom", attacks=["pgd"])
    with pytest.raises(KdlabError, match="version='fast'"):
        autoattack(model, inputs, labels, eps=0.1, version="fast")
    with pytest.raises(KdlabError, match="at least 5x5"):
        autoattack(model, inputs, labels, eps=0.5, norm="l2")
    three, (x3, y3) = trained(classes=3), toy_data(n=4, classes=3)
    with pytest.raises(KdlabError, match="3 classes, too few"):
        autoattack(three, x3, y3, eps=0.1)
    assert three.training  # given back its mode after the error


@needs_package
def test_protocol_adds_the_per_component_keys_and_the_settings():
    model, (inputs, labels) = trained(), toy_data()
    x, y = inputs[:12], labels[:12]
    specs = [AttackSpec("autoattack", "13/255"), AttackSpec("fgsm", "13/255")]
    results = robust_evaluate(model, x, y, specs, batch_size=5)  # 3 batches, the last one short
    key = "autoattack_linf_0.0510"
    components = [results[f"{key}/{name}"] for name in STANDARD_COMPONENTS]
    assert components == sorted(components, reverse=True) and components[0] <= results["clean/acc"]
    assert results[f"{key}/acc"] == components[-1]
    assert results["worst/acc"] <= results[f"{key}/acc"] <= results["fgsm_linf_0.0510/acc"]
    for metric in ("worst_class_acc", "nll", "ece"):
        assert f"{key}/{metric}" in results
    settings = results["settings"][key]
    assert settings["name"] == "autoattack" and settings["eps_text"] == "13/255" and settings["version"] == "standard"
    assert settings["steps"] is None and settings["autoattack"]["package"] == "pyautoattack 0.2.0"
    assert settings["autoattack"]["components"] == list(STANDARD_COMPONENTS)
    with pytest.raises(KdlabError, match="fixes its own steps"):
        AttackSpec("autoattack", 0.1, steps=10)
    with pytest.raises(KdlabError, match="fixes its own steps"):
        AttackSpec("autoattack", 0.1, loss="cw")


@needs_package
def test_config_section_and_kdlab_eval_produce_the_component_metrics(tmp_path, capsys):
    raw = {"name": "aa", "data": {"dataset": "synthetic", "num_classes": 4, "input_shape": [1, 16],
                                  "num_train": 80, "num_test": 20},
           "student": {"model": "mlp", "width": 8}, "method": {"name": "scratch"},
           "train": {"epochs": 1, "batch_size": 40, "device": "cpu"}, "seeds": [0],
           "robust": {"eps": "8/255", "subset": 6, "attacks": [{"name": "autoattack", "eps": "8/255"}],
                      "sanity_checks": False}}
    base, specs = parse_experiment(raw)
    runner = Runner(tmp_path / "ws", out=lambda text: None)
    assert not runner.run(base, specs).failed
    record = runner.store.run(specs[0].run_id)
    key = "robust/autoattack_linf_0.0314"
    for name in ("acc", *STANDARD_COMPONENTS):
        assert f"{key}/{name}" in record.final, name
    assert record.final[f"{key}/acc"] == record.final[f"{key}/square"]
    report = json.loads((Path(record.run_dir) / "robust.json").read_text())
    assert report["attacks"]["autoattack_linf_0.0314"]["autoattack"]["package"] == "pyautoattack 0.2.0"

    workspace = ["--workspace", str(tmp_path / "ws")]
    assert main([*workspace, "eval", record.run_id, "--attack", "autoattack", "--eps", "8/255", "--subset", "6",
                 "--no-sanity-checks"]) == 0
    final = runner.store.run(record.run_id).final
    for name in ("acc", *STANDARD_COMPONENTS):
        assert f"eval/autoattack_linf_0.0314/{name}" in final, name
    saved = json.loads((Path(record.run_dir) / "robust_evals.jsonl").read_text().splitlines()[-1])
    assert saved["attacks"]["autoattack_linf_0.0314"]["autoattack"]["version"] == "standard"
    capsys.readouterr()
    assert main([*workspace, "eval", record.run_id, "--attack", "autoattack", "--steps", "5"]) == 2
    assert "--attack: the standard AutoAttack fixes its own steps" in capsys.readouterr().err
