"""Method multi_teacher and TeacherEnsemble: taps give each member's logits; the terms match direct forwards."""
from __future__ import annotations

import pytest
import torch

from kdlab import registry
from kdlab.api import parse_method
from kdlab.config import MethodConfig
from kdlab.engine.build import build_method
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, multi_teacher_kl
from kdlab.methods.base import Batch, Outputs
from kdlab.models import Taps, TeacherEnsemble

RULES = ("fixed", "mean_probs", "mean_logits", "entropy", "confidence")


def mlp(width):
    return registry.get("model", "mlp")(input_shape=(1, 5), num_classes=3, mean=(0.0,), std=(1.0,), width=width)


def ensemble(*widths):
    return TeacherEnsemble([mlp(w) for w in widths])


def run_through_taps(method, student, teacher, inputs, labels):
    """The contract test's (and the loop's) path: taps on both models, then ``loss_terms``."""
    with Taps(student, method.student_taps) as s_taps:
        student_out = Outputs(student(inputs), dict(s_taps.captured))
    with Taps(teacher, method.teacher_taps, detach=True) as t_taps, torch.no_grad():
        teacher_out = Outputs(teacher(inputs), dict(t_taps.captured))
    return method.loss_terms(Batch(inputs, labels), student_out, teacher_out), student_out, teacher_out


def test_ensemble_forward_is_the_mean_of_member_logits_and_taps_give_each_member():
    torch.manual_seed(0)
    teacher = ensemble(16, 8, 4)
    x = torch.rand(6, 1, 5)
    direct = [m(x) for m in teacher.members]
    assert teacher.feature_stages == ("members.0", "members.1", "members.2")
    with Taps(teacher, teacher.feature_stages) as taps:
        out = teacher(x)
        for k, name in enumerate(teacher.feature_stages):
            assert torch.equal(taps[name], direct[k])
    assert torch.allclose(out, torch.stack(direct).mean(0))
    assert len(teacher) == 3 and list(teacher.state_dict())[0].startswith("members.0.")


def test_ensemble_validation():
    with pytest.raises(KdlabError, match="at least one teacher"):
        TeacherEnsemble([])
    with pytest.raises(KdlabError, match=r"members\[1\]: expected a torch nn.Module"):
        TeacherEnsemble([mlp(4), "resnet20"])
    wrong = TeacherEnsemble([mlp(4), registry.get("model", "mlp")(input_shape=(1, 5), num_classes=4, mean=(0.0,),
                                                                   std=(1.0,), width=4)])
    with pytest.raises(KdlabError, match="same classes"):
        wrong(torch.rand(2, 1, 5))


@pytest.mark.parametrize("rule", RULES)
def test_kd_term_matches_multi_teacher_kl_of_direct_member_forwards(rule):
    torch.manual_seed(1)
    student, teacher = mlp(6), ensemble(16, 12)
    options = {"rule": rule, "temperature": 3.0, "alpha": 0.7, "weight_temperature": 0.5}
    if rule == "fixed":
        options["weights"] = (1.0, 3.0)
    method = build_method(MethodConfig("multi_teacher", options), student=student, teacher=teacher,
                          input_shape=(1, 5))
    assert method.teacher_taps == ("members.0", "members.1")
    inputs, labels = torch.rand(8, 1, 5), torch.randint(0, 3, (8,))
    terms, student_out, _ = run_through_taps(method, student, teacher, inputs, labels)
    assert list(terms) == ["kd", "ce"]
    with torch.no_grad():
        members = [m(inputs) for m in teacher.members]
    expected = 0.7 * multi_teacher_kl(student_out.logits, members, rule=rule, weights=options.get("weights"),
                                      temperature=3.0, labels=labels, weight_temperature=0.5)
    assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.3 * cross_entropy(student_out.logits, labels).item(), rel=1e-6)
    # It is not KD from the ensemble's mean-logit output (except by accident of the rule).
    if rule == "mean_probs":
        from kdlab.losses import kl

        mean_logit_kd = 0.7 * kl(student_out.logits, torch.stack(members).mean(0), temperature=3.0)
        assert abs(terms["kd"].item() - mean_logit_kd.item()) > 1e-6
    (terms["kd"] + terms["ce"]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_plain_teacher_is_refused():
    with pytest.raises(KdlabError, match="^method multi_teacher needs several teachers: give teacher.members$"):
        build_method(MethodConfig("multi_teacher", {}), student=mlp(6), teacher=mlp(16), input_shape=(1, 5))


@pytest.mark.parametrize("options, message", [
    ({"rule": "fixed"}, "rule 'fixed' needs weights"),
    ({"rule": "fixed", "weights": (1.0, 2.0, 3.0)}, "got 3 weights for 2 teachers"),
    ({"rule": "entropy", "weights": (1.0, 2.0)}, "only rule 'fixed' takes weights"),
    ({"weight_temperature": 0.0}, "weight_temperature"),
    ({"temperature": -1.0}, "method.temperature"),
    ({"alpha": 1.5}, "method.alpha"),
])
def test_bad_hyperparameters_fail_at_build(options, message):
    with pytest.raises(KdlabError, match=message):
        build_method(MethodConfig("multi_teacher", options), student=mlp(6), teacher=ensemble(8, 8),
                     input_shape=(1, 5))


def test_config_coerces_weights_and_rejects_unknown_rules():
    cfg = parse_method("multi_teacher", {"rule": "fixed", "weights": [1, 3]})
    assert cfg.options["weights"] == (1.0, 3.0)
    with pytest.raises(KdlabError, match="'median' is not allowed"):
        parse_method("multi_teacher", {"rule": "median"})


def test_distill_end_to_end_through_the_training_loop():
    import kdlab

    torch.manual_seed(2)
    x = torch.rand(96, 1, 5)
    y = (x[:, 0, 0] > 0.5).long() + (x[:, 0, 1] > 0.5).long()  # 3 classes
    teacher, student = ensemble(8, 8), mlp(6)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    metrics = kdlab.distill(student, teacher, (x, y), method="multi_teacher", rule="entropy", epochs=1,
                            batch_size=32, device="cpu")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # teachers stay fixed
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))
    assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
