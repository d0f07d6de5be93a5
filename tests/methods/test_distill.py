"""The composed ``distill`` method: terms against their losses, adapters, schedules, build-time errors, a fit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.checkpoint import load_latest_checkpoint
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.losses import attention_transfer, cross_entropy, dkd, fitnet, kl, pkt, rkd, similarity_preserving
from kdlab.methods.base import Batch, Outputs
from kdlab.models import Taps

INPUT_SHAPE = (1, 40)


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def logits_batch(seed=0, n=12, classes=6):
    """Student/teacher logits and labels; the labels are not the teacher's argmax (so labels matter)."""
    s = randn(n, classes, seed=seed, dtype=torch.float64)
    t = 2.0 * randn(n, classes, seed=seed + 1, dtype=torch.float64)
    y = (t.argmax(dim=1) + 1) % classes
    return Batch(s, y), Outputs(s), Outputs(t)


def distill(terms, *, student=None, teacher=None, input_shape=None):
    return build_method(MethodConfig("distill", {"terms": terms}), student=student or nn.Identity(),
                        teacher=teacher or nn.Identity(), input_shape=input_shape)


def cnn_pair():
    """cnn1d teacher (width 16) and student (width 4) on (1, 40): block2 is (16, 20) vs (4, 20), pool 16 vs 4."""
    cnn = registry.get("model", "cnn1d")
    torch.manual_seed(0)
    teacher = cnn(input_shape=INPUT_SHAPE, num_classes=5, mean=(0.0,), std=(1.0,), width=16)
    student = cnn(input_shape=INPUT_SHAPE, num_classes=5, mean=(0.0,), std=(1.0,), width=4)
    return student, teacher


def forward(method, student, teacher, *, n=8, seed=3):
    """One step's inputs to ``loss_terms``, tapped as the training loop taps them."""
    inputs = torch.rand(n, *INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % 5
    with Taps(student, method.student_taps) as s_taps:
        student_out = Outputs(student(inputs), dict(s_taps.captured))
    with Taps(teacher, method.teacher_taps, detach=True) as t_taps, torch.no_grad():
        teacher_out = Outputs(teacher(inputs), dict(t_taps.captured))
    return Batch(inputs, labels), student_out, teacher_out


# --------------------------------------------------------------------------- logit and label terms


def test_composed_ce_and_kl_equal_their_losses_and_the_kd_method():
    batch, s_out, t_out = logits_batch()
    method = distill({"ce": 0.3, "kl": {"weight": 0.7, "temperature": 3}})
    terms = method.loss_terms(batch, s_out, t_out)
    assert list(terms) == ["ce", "kl"]
    ce_direct = cross_entropy(s_out.logits, batch.labels)
    kl_direct = kl(s_out.logits, t_out.logits, temperature=3.0)
    assert terms["ce"].item() == pytest.approx(0.3 * ce_direct.item(), rel=1e-12)
    assert terms["kl"].item() == pytest.approx(0.7 * kl_direct.item(), rel=1e-12)
    # Hinton KD with α = 0.7, T = 3: kd = α·KL_T, ce = (1 − α)·CE; so with the ce weight set to 1 − α = 0.3,
    # Σ distill terms = 0.7·KL_T + 0.3·CE = α·KL_T + (1 − α)·CE = Σ kd terms, term by term.
    kd = build_method(MethodConfig("kd", {"alpha": 0.7, "temperature": 3.0}), student=nn.Identity(),
                      teacher=nn.Identity()).loss_terms(batch, s_out, t_out)
    assert terms["kl"].item() == pytest.approx(kd["kd"].item(), rel=1e-12)
    assert terms["ce"].item() == pytest.approx(kd["ce"].item(), rel=1e-12)
    assert sum(terms.values()).item() == pytest.approx(sum(kd.values()).item(), rel=1e-12)


def test_default_terms_are_kd_with_alpha_09_and_t4():
    batch, s_out, t_out = logits_batch(seed=5)
    terms = build_method(MethodConfig("distill", {}), student=nn.Identity(),
                         teacher=nn.Identity()).loss_terms(batch, s_out, t_out)
    assert terms["ce"].item() == pytest.approx(0.1 * cross_entropy(s_out.logits, batch.labels).item(), rel=1e-12)
    assert terms["kl"].item() == pytest.approx(0.9 * kl(s_out.logits, t_out.logits, temperature=4.0).item(),
                                               rel=1e-12)


def test_dkd_term_receives_the_batch_labels():
    batch, s_out, t_out = logits_batch(seed=2)
    method = distill({"dkd": {"weight": 0.5, "temperature": 4, "alpha": 1.5, "beta": 2.0}})
    value = method.loss_terms(batch, s_out, t_out)["dkd"]
    expected = dkd(s_out.logits, t_out.logits, labels=batch.labels, temperature=4.0, alpha=1.5, beta=2.0)
    assert value.item() == pytest.approx(0.5 * expected.item(), rel=1e-12)
    # With other labels DKD is another number: the labels given are the batch's.
    other = dkd(s_out.logits, t_out.logits, labels=t_out.logits.argmax(1), temperature=4.0, alpha=1.5, beta=2.0)
    assert abs(other.item() - expected.item()) > 1e-3


def test_one_loss_twice_under_two_names():
    batch, s_out, t_out = logits_batch(seed=4)
    method = distill({"soft": {"loss": "kl", "weight": 0.25, "temperature": 4},
                      "sharp": {"loss": "kl", "weight": 2.0, "temperature": 1},
                      "labels": {"loss": "cross_entropy", "weight": 1.0, "label_smoothing": 0.1}})
    terms = method.loss_terms(batch, s_out, t_out)
    assert list(terms) == ["soft", "sharp", "labels"]
    assert terms["soft"].item() == pytest.approx(0.25 * kl(s_out.logits, t_out.logits, temperature=4.0).item(),
                                                 rel=1e-12)
    assert terms["sharp"].item() == pytest.approx(2.0 * kl(s_out.logits, t_out.logits, temperature=1.0).item(),
                                                  rel=1e-12)
    assert terms["labels"].item() == pytest.approx(
        cross_entropy(s_out.logits, batch.labels, label_smoothing=0.1).item(), rel=1e-12)


# --------------------------------------------------------------------------- feature terms and adapters


def test_fitnet_builds_a_trainable_adapter_owned_by_the_method():
    student, teacher = cnn_pair()
    method = distill({"ce": 1.0, "hint": {"loss": "fitnet", "weight": 3.0, "student": "block2", "teacher": "block2"}},
                     student=student, teacher=teacher, input_shape=INPUT_SHAPE)
    assert method.student_taps == ("block2",) and method.teacher_taps == ("block2",)
    adapter = method.adapters["hint"]
    assert (adapter.student_shape, adapter.teacher_shape) == ((4, 20), (16, 20))  # per-sample, no batch dim
    assert any(isinstance(m, nn.Conv1d) for m in adapter.modules())
    owned = list(method.parameters())
    assert owned and {id(p) for p in owned} == {id(p) for p in adapter.parameters()}
    assert not {id(p) for p in owned} & {id(p) for p in student.parameters()}
    assert all(key.startswith("adapters.hint.") for key in method.state_dict())

    batch, s_out, t_out = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, t_out)
    s_feat, t_feat = s_out.features["block2"], t_out.features["block2"]
    assert s_feat.shape == (8, 4, 20) and t_feat.shape == (8, 16, 20)
    expected = 3.0 * fitnet(adapter(s_feat), t_feat)
    assert terms["hint"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(cross_entropy(s_out.logits, batch.labels).item(), rel=1e-6)
    terms["hint"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in owned)
    assert student.block2[0].weight.grad.abs().sum() > 0


def test_fitnet_on_pooled_vectors_gets_a_linear_adapter():
    student, teacher = cnn_pair()
    method = distill({"hint": {"loss": "fitnet", "student": "pool", "teacher": "pool"}},
                     student=student, teacher=teacher, input_shape=INPUT_SHAPE)
    linear = method.adapters["hint"].body[-1]
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (16, 4)
    batch, s_out, t_out = forward(method, student, teacher)
    expected = fitnet(linear(s_out.features["pool"]), t_out.features["pool"])
    assert method.loss_terms(batch, s_out, t_out)["hint"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(("loss", "fn", "tap"), [
    ("rkd", rkd, "pool"),
    ("attention_transfer", attention_transfer, "block2"),
    ("pkt", pkt, "pool"),
    ("similarity_preserving", similarity_preserving, "block3"),
])
def test_relational_terms_take_mismatched_widths_without_an_adapter(loss, fn, tap):
    student, teacher = cnn_pair()
    method = distill({"rel": {"loss": loss, "weight": 2.0, "student": tap, "teacher": tap}},
                     student=student, teacher=teacher, input_shape=INPUT_SHAPE)
    assert len(method.adapters) == 0 and list(method.parameters()) == []
    batch, s_out, t_out = forward(method, student, teacher)
    s_feat, t_feat = s_out.features[tap], t_out.features[tap]
    assert s_feat.shape[1] == 4 and t_feat.shape[1] == 16
    value = method.loss_terms(batch, s_out, t_out)["rel"]
    assert value.dim() == 0 and torch.isfinite(value)
    assert value.item() == pytest.approx(2.0 * fn(s_feat, t_feat).item(), rel=1e-6)
    value.backward()
    assert student.block1[0].weight.grad.abs().sum() > 0


def test_an_explicit_adapter_on_a_relational_term_is_built():
    student, teacher = cnn_pair()
    method = distill({"rel": {"loss": "rkd", "student": "pool", "teacher": "pool", "adapter": "linear"}},
                     student=student, teacher=teacher, input_shape=INPUT_SHAPE)
    assert isinstance(method.adapters["rel"].body[-1], nn.Linear)


# --------------------------------------------------------------------------- schedules


def test_linear_warmup_schedule_follows_set_progress():
    batch, s_out, t_out = logits_batch(seed=6)
    method = distill({"kl": {"weight": 2.0, "schedule": "linear_warmup", "warmup": 0.5, "temperature": 2},
                      "ce": 1.0})
    base = kl(s_out.logits, t_out.logits, temperature=2.0).item()
    ce = cross_entropy(s_out.logits, batch.labels).item()
    for step, factor in [(0, 0.0), (10, 0.5), (20, 1.0), (40, 1.0)]:  # of 40 steps; warm-up ends at step 20
        method.set_progress(step, 40)
        terms = method.loss_terms(batch, s_out, t_out)
        assert terms["kl"].item() == pytest.approx(2.0 * factor * base, rel=1e-12, abs=0.0)
        assert terms["ce"].item() == pytest.approx(ce, rel=1e-12)  # a constant term is untouched
    method.set_progress(0, 40)
    assert method.loss_terms(batch, s_out, t_out)["kl"].item() == 0.0


def test_cosine_schedule_anneals_to_final_weight():
    batch, s_out, t_out = logits_batch(seed=7)
    method = distill({"kl": {"weight": 3.0, "schedule": "cosine", "final_weight": 1.0}})
    base = kl(s_out.logits, t_out.logits).item()
    for step, weight in [(0, 3.0), (5, 2.0), (10, 1.0)]:
        method.set_progress(step, 10)
        assert method.loss_terms(batch, s_out, t_out)["kl"].item() == pytest.approx(weight * base, rel=1e-12)


# --------------------------------------------------------------------------- build-time errors


FEATURE = {"loss": "fitnet", "student": "block2", "teacher": "block2"}

BAD_TERMS = [
    # (terms, the key the message must start with, a further fragment it must contain)
    ({"hint": {**FEATURE, "student": "blok2"}}, "method.terms.hint.student", "block1, block2, block3, pool"),
    ({"hint": {**FEATURE, "teacher": "stage9"}}, "method.terms.hint.teacher", "block1, block2, block3, pool"),
    ({"fitnet": 1.0}, "method.terms.fitnet.student", "needs the student tap"),
    ({"hint": {"loss": "fitnet", "student": "pool"}}, "method.terms.hint.teacher", "needs the teacher tap"),
    ({"kl": {"weight": 1.0, "student": "pool"}}, "method.terms.kl.student", "works on logits"),
    ({"kl": {"weight": 1.0, "adapter": "linear"}}, "method.terms.kl.adapter", "works on logits"),
    ({"kl": {"temprature": 4}}, "method.terms.kl.temprature", "its options: temperature, reduction"),
    ({"kll": 1.0}, "method.terms.kll", "did you mean kl"),
    ({"hint": {**FEATURE, "loss": "fitnett"}}, "method.terms.hint.loss", "did you mean fitnet"),
    ({"kl": {"weight": "0.9"}}, "method.terms.kl.weight", "expected a number"),
    ({"kl": {"weight": True}}, "method.terms.kl.weight", "expected a number"),
    ({"kl": "heavy"}, "method.terms.kl", "expected a weight or a mapping"),
    ({"kl": {"schedule": "cosin"}}, "method.terms.kl.schedule", "constant, linear_warmup, cosine"),
    ({"kl": {"schedule": "linear_warmup", "warmup": "10%"}}, "method.terms.kl.warmup", "expected a number"),
    ({"kl": {"schedule": "cosine", "final_weight": None}}, "method.terms.kl.final_weight", "expected a number"),
    ({"hint": {**FEATURE, "adapter": "identity"}}, "method.terms.hint.adapter", "(4, 20)"),
    ({"hint": {**FEATURE, "adapter": "bogus"}}, "method.terms.hint.adapter", "unknown kind 'bogus'"),
    ({"hint": {**FEATURE, "student": "pool"}}, "method.terms.hint.adapter", "a vector has no spatial layout"),
    ({}, "method.terms", "at least one term"),
]


@pytest.mark.parametrize(("terms", "key", "fragment"), BAD_TERMS, ids=[b[1] + ":" + b[2][:12] for b in BAD_TERMS])
def test_bad_terms_fail_at_build_time_with_one_line_naming_the_key(terms, key, fragment):
    student, teacher = cnn_pair()
    with pytest.raises(KdlabError) as info:
        distill(terms, student=student, teacher=teacher, input_shape=INPUT_SHAPE)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(key + ":"), message
    assert fragment in message, message


# Every number of a term is bounded by the coercer at config validation (before any work), with the key path:
# the term's own numbers (weight, final_weight >= 0; warmup in [0, 1]) and the loss's options, bounded on the
# loss's signature (temperature > 0, DKD's alpha/beta >= 0, ...) or typed by their default (NaN, inf refused).
BAD_NUMBERS = [
    ({"kl": {"weight": float("nan")}}, "method.terms.kl.weight", "finite number"),
    ({"kl": {"weight": -1.0}}, "method.terms.kl.weight", "≥ 0"),
    ({"ce": float("inf")}, "method.terms.ce.weight", "finite number"),
    ({"kl": {"schedule": "cosine", "final_weight": -0.5}}, "method.terms.kl.final_weight", "≥ 0"),
    ({"kl": {"temperature": float("nan")}}, "method.terms.kl.temperature", "finite number > 0"),
    ({"kl": {"temperature": -4}}, "method.terms.kl.temperature", "> 0"),
    ({"kl": {"temperature": 0}}, "method.terms.kl.temperature", "> 0"),
    ({"reverse_kl": {"temperature": float("inf")}}, "method.terms.reverse_kl.temperature", "finite number > 0"),
    ({"dkd": {"alpha": -1}}, "method.terms.dkd.alpha", "≥ 0"),
    ({"dkd": {"beta": float("nan")}}, "method.terms.dkd.beta", "finite number"),
    ({"skew_kl": {"skew": 1.5}}, "method.terms.skew_kl.skew", "in [0, 1]"),
    ({"ce": {"label_smoothing": -0.1}}, "method.terms.ce.label_smoothing", "in [0, 1]"),
    ({"rkd": {"student": "pool", "teacher": "pool", "angle_weight": float("inf")}}, "method.terms.rkd.angle_weight",
     "finite number"),
    ({"kl": {"reduction": 3}}, "method.terms.kl.reduction", "expected a string"),
]


@pytest.mark.parametrize(("terms", "key", "fragment"), BAD_NUMBERS, ids=[b[1] + ":" + b[2] for b in BAD_NUMBERS])
def test_bad_term_numbers_are_refused_at_config_validation_naming_the_key(terms, key, fragment):
    from kdlab.config import parse_experiment
    from kdlab.errors import ConfigError

    raw = {"teacher": {"model": "mlp"}, "method": {"name": "distill", "terms": terms}}
    with pytest.raises(ConfigError) as info:
        parse_experiment(raw)
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(key + ":") and fragment in info.value.problems[0], info.value.problems


def test_term_numbers_within_their_bounds_are_accepted():
    from kdlab.config import parse_experiment

    terms = {"ce": 0.0, "kl": {"weight": 0.9, "temperature": 4}, "dkd": {"alpha": 0, "beta": 8, "temperature": 1e-3}}
    parse_experiment({"teacher": {"model": "mlp"}, "method": {"name": "distill", "terms": terms}})


def test_identity_adapter_between_equal_shapes_is_allowed():
    student, teacher = cnn_pair()
    method = distill({"hint": {"loss": "fitnet", "student": "block2", "teacher": "block2", "adapter": "identity"}},
                     student=teacher, teacher=teacher, input_shape=INPUT_SHAPE)
    assert method.adapters["hint"].is_identity and list(method.parameters()) == []


# --------------------------------------------------------------------------- end to end


def test_fit_optimises_and_checkpoints_the_methods_adapter(tmp_path):
    splits = build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 96, "num_test": 32},
                          root=None, cache_dir=tmp_path / "cache", val_fraction=0.25, split_seed=0)
    torch.manual_seed(0)
    teacher = build_model("mlp", {"width": 16}, splits)
    student = build_model("mlp", {"width": 8}, splits)
    method = build_method(
        MethodConfig("distill", {"terms": {"ce": 0.5, "kl": {"weight": 0.5, "temperature": 2},
                                           "hint": {"loss": "fitnet", "student": "pool", "teacher": "pool"}}}),
        student=student, teacher=teacher, input_shape=tuple(splits.input_shape))
    linear = method.adapters["hint"].body[-1]
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (16, 8)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    logged = {}
    fit(student=student, method=method, teacher=teacher, splits=splits, seed=0, run_dir=tmp_path / "run",
        train=TrainConfig(epochs=1, batch_size=24, lr=0.01, device="cpu"),
        on_epoch=lambda epoch, metrics: logged.update(metrics))
    assert {"train/loss/ce", "train/loss/kl", "train/loss/hint"} <= set(logged)
    after = method.state_dict()
    assert set(before) == {"adapters.hint.body.0.weight", "adapters.hint.body.0.bias"}
    for key in before:
        assert not torch.equal(before[key], after[key]), f"{key} was not optimised"
    tensors, state = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["epoch"] == 1
    for key, value in after.items():
        assert torch.equal(tensors[f"method.{key}"], value)
    assert any(k.startswith("student.") for k in tensors)
