"""Tests of kdlab.robust.protocol: result keys, worst case, settings, ε-curves and gradient-masking checks."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.metrics import ece, nll
from kdlab.models.mlp import mlp
from kdlab.robust import AttackSpec, eps_curve, gradient_masking_checks, robust_evaluate, sanity_checks


def toy_data(*, seed=0, n=150, features=8, classes=3):
    """Gaussian blobs inside [0, 1]^features, classes in turn."""
    generator = torch.Generator().manual_seed(seed)
    centers = 0.3 + 0.4 * torch.rand(classes, features, generator=generator)
    labels = torch.arange(n) % classes
    inputs = (centers[labels] + 0.05 * torch.randn(n, features, generator=generator)).clamp(0, 1)
    return inputs, labels


@functools.lru_cache(maxsize=None)
def trained(seed=0):
    """An undefended MLP fit for 100 full-batch Adam steps on the blobs (clean accuracy ~1)."""
    inputs, labels = toy_data()
    torch.manual_seed(seed)
    model = mlp(input_shape=(8,), num_classes=3, mean=(0.5,), std=(0.25,), width=32, depth=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model


# ---------------------------------------------------------------------------
# AttackSpec
# ---------------------------------------------------------------------------


def test_attack_spec_parses_eps_and_keeps_its_text():
    spec = AttackSpec("pgd", "8/255")
    assert spec.eps == 8 / 255 and spec.eps_text == "8/255"
    assert spec.label == "pgd_linf_0.0314"
    assert spec.to_dict() == {"name": "pgd", "eps": 8 / 255, "eps_text": "8/255", "norm": "linf", "steps": 10,
                              "step_size": 2.5 * (8 / 255) / 10, "restarts": 1, "loss": "ce", "seed": 0}
    spec = AttackSpec("pgd", 0.031)
    assert spec.eps == 0.031 and spec.eps_text == "0.031"
    assert AttackSpec("apgd", "0.5", norm="l2").to_dict()["steps"] == 100
    assert AttackSpec("fgsm", 0.1).to_dict()["step_size"] == 0.1


def test_attack_spec_rejects_bad_settings():
    with pytest.raises(KdlabError, match="pixel units"):
        AttackSpec("pgd", 8)
    with pytest.raises(KdlabError, match="norm"):
        AttackSpec("pgd", 0.1, norm="l1")
    with pytest.raises(KdlabError, match="steps"):
        AttackSpec("pgd", 0.1, steps=0)
    with pytest.raises(KdlabError, match="fgsm is one step"):
        AttackSpec("fgsm", 0.1, steps=10)
    with pytest.raises(KdlabError, match="apgd chooses its own step size"):
        AttackSpec("apgd", 0.1, step_size=0.01)


# ---------------------------------------------------------------------------
# robust_evaluate
# ---------------------------------------------------------------------------


def test_robust_evaluate_keys_and_orderings():
    model, (inputs, labels) = trained(), toy_data()
    model.train()
    specs = [AttackSpec("fgsm", "0.05"), AttackSpec("pgd", "0.05", steps=5), AttackSpec("pgd", "0.05", steps=10)]
    results = robust_evaluate(model, inputs, labels, specs, batch_size=64)  # 3 batches, the last one short
    assert model.training
    attacks = ["fgsm_linf_0.0500", "pgd_linf_0.0500_steps5", "pgd_linf_0.0500_steps10"]
    expected = {"n", "num_classes", "settings"} | {
        f"{prefix}/{metric}" for prefix in ["clean", "worst", *attacks] for metric in
        ("acc", "worst_class_acc", "nll", "ece")}
    assert set(results) == expected
    assert results["n"] == 150 and results["num_classes"] == 3
    assert results["settings"]["pgd_linf_0.0500_steps5"]["eps_text"] == "0.05"
    assert results["settings"]["fgsm_linf_0.0500"] == specs[0].to_dict()
    assert results["clean/acc"] > 0.95
    for key in attacks:
        assert 0 <= results[f"{key}/acc"] <= results["clean/acc"]
        assert results["worst/acc"] <= results[f"{key}/acc"]
        assert results[f"{key}/worst_class_acc"] <= results[f"{key}/acc"]
        assert results[f"{key}/nll"] > results["clean/nll"]
    assert 0 < results["worst/acc"] < results["clean/acc"]  # the budget leaves a partial robust accuracy

    # Hand check of the clean numbers against kdlab.metrics.
    with torch.no_grad():
        logits = model.eval()(inputs)
    assert results["clean/nll"] == pytest.approx(nll(logits, labels))
    assert results["clean/ece"] == pytest.approx(ece(logits, labels))
    per_class = [(logits.argmax(1) == labels)[labels == c].double().mean().item() for c in range(3)]
    assert results["clean/worst_class_acc"] == pytest.approx(min(per_class))


def test_worst_case_uses_the_clean_logits_when_eps_is_zero():
    # ε = 0: every attack returns the inputs, so the per-sample worst input is the clean one
    # (the clean input if it is misclassified, else the last attack's = clean).
    model, (inputs, labels) = trained(), toy_data()
    results = robust_evaluate(model, inputs, labels, [AttackSpec("pgd", 0.0), AttackSpec("apgd", 0.0, steps=5)])
    for metric in ("acc", "worst_class_acc", "nll", "ece"):
        assert results[f"worst/{metric}"] == pytest.approx(results[f"clean/{metric}"])


def test_robust_evaluate_is_reproducible_and_checks_its_arguments():
    model, (inputs, labels) = trained(), toy_data()
    specs = [AttackSpec("pgd", 0.05, steps=3, seed=4)]
    assert robust_evaluate(model, inputs, labels, specs) == robust_evaluate(model, inputs, labels, specs)
    with pytest.raises(KdlabError, match="identical settings"):
        robust_evaluate(model, inputs, labels, specs * 2)
    with pytest.raises(KdlabError, match="unknown attack 'pdg'"):
        robust_evaluate(model, inputs, labels, [AttackSpec("pdg", 0.05)])
    with pytest.raises(KdlabError, match="AttackSpec"):
        robust_evaluate(model, inputs, labels, [{"name": "pgd"}])
    with pytest.raises(KdlabError, match=r"inputs in \[0, 1\]"):
        robust_evaluate(model, inputs * 255, labels, specs)
    with pytest.warns(UserWarning, match="normalises inside forward"):
        robust_evaluate(nn.Linear(8, 3), inputs, labels, specs)


def test_eps_curve_decreases_for_a_normal_model():
    model, (inputs, labels) = trained(), toy_data()
    curve = eps_curve(model, inputs, labels, AttackSpec("pgd", "8/255", steps=5), [0, "2/255", 0.05, 0.3])
    assert [eps for eps, _ in curve] == [0.0, 2 / 255, 0.05, 0.3]
    accuracies = [acc for _, acc in curve]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[0] > 0.95 and accuracies[-1] == 0.0


# ---------------------------------------------------------------------------
# Gradient-masking checks
# ---------------------------------------------------------------------------


def test_sanity_checks_flag_a_synthetic_gradient_masking_case():
    # Hand-made numbers in the pattern of a masked model (Athalye et al. 2018).
    warnings = sanity_checks(
        curve=[(0.0, 0.90), (0.03, 0.40), (0.1, 0.55), (0.5, 0.50)],   # rises from ε=0.03 to 0.1
        steps_curve=[(10, 0.40), (20, 0.48)],                          # rises with more steps
        strength_pairs=[("fgsm", 0.30, "pgd", 0.40)],                  # pgd weaker than fgsm
        large_eps_acc=0.50, num_classes=10,                            # ε = 0.5 leaves 50%
        transfer_acc=0.20, whitebox_acc=0.40,                          # transfer beats white-box
    )
    assert len(warnings) == 5
    for fragment in ("rises with eps", "rises with more steps", "stronger attack pgd", "very large eps",
                     "transfer attack"):
        assert sum(fragment in w for w in warnings) == 1, fragment


def test_sanity_checks_read_pairs_from_results():
    results = {
        "fgsm_linf_0.0314/acc": 0.30, "pgd_linf_0.0314/acc": 0.35, "apgd_linf_0.0314/acc": 0.25,
        "settings": {
            "fgsm_linf_0.0314": {"name": "fgsm", "eps": 0.0314, "norm": "linf", "steps": 1, "restarts": 1,
                                 "loss": "ce"},
            "pgd_linf_0.0314": {"name": "pgd", "eps": 0.0314, "norm": "linf", "steps": 10, "restarts": 1, "loss": "ce"},
            "apgd_linf_0.0314": {"name": "apgd", "eps": 0.0314, "norm": "linf", "steps": 100, "restarts": 1,
                                 "loss": "ce"},
        },
    }
    warnings = sanity_checks(results=results)
    assert len(warnings) == 1 and "stronger attack pgd_linf_0.0314" in warnings[0]  # fgsm 0.30 < pgd 0.35


def test_sanity_checks_are_silent_on_a_normal_case():
    assert sanity_checks() == []
    assert sanity_checks(
        curve=[(0.0, 0.90), (0.03, 0.40), (0.1, 0.105), (0.5, 0.0)],
        steps_curve=[(10, 0.40), (20, 0.395)],                 # within tolerance
        strength_pairs=[("fgsm", 0.40, "pgd", 0.30)],
        large_eps_acc=0.40, num_classes=2,                     # ≤ chance + 5% for two classes
        transfer_acc=0.60, whitebox_acc=0.40,
    ) == []


def test_gradient_masking_checks_silent_on_an_undefended_model():
    model, (inputs, labels) = trained(), toy_data()
    assert gradient_masking_checks(model, inputs, labels, AttackSpec("pgd", 0.05, steps=10),
                                   source_model=trained(1)) == []


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, logits):
        return logits * self.factor


def test_gradient_masking_checks_flag_saturated_logits():
    # Scaling the logits by 1e4 saturates float32 softmax: the cross-entropy gradient is exactly 0
    # on confidently correct samples, so gradient attacks stall (the failure mode of defensive
    # distillation; Athalye et al. 2018). Crafted on an unscaled copy, transfer still succeeds.
    model = nn.Sequential(trained(), Scale(1e4))
    inputs, labels = toy_data()
    warnings = gradient_masking_checks(model, inputs, labels, AttackSpec("pgd", 0.1, steps=5),
                                       source_model=trained(1))
    assert any("very large eps" in w for w in warnings), warnings
    assert any("transfer attack" in w for w in warnings), warnings
