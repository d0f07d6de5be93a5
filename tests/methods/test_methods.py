"""Methods: each against its formula on a hand-checked batch, and a contract over the registry."""
from __future__ import annotations

import math

import pytest
import torch

from kdlab import registry
from kdlab.config import MethodConfig, entry_parameters
from kdlab.engine.build import build_method
from kdlab.methods.base import Batch, Method, Outputs


def test_kd_matches_hinton_formula_on_a_hand_worked_batch():
    # One sample, 2 classes, T = 2, α = 0.5.
    # student logits (0, 2) -> p_T = softmax(0, 1) = (0.26894142, 0.73105858); teacher logits (2, 0) -> (0.73105858, 0.26894142)
    # KL(teacher‖student) = 0.731·ln(0.731/0.269) + 0.269·ln(0.269/0.731) = (0.731 − 0.269)·1 = 0.46211716
    # soft term = α·T²·KL = 0.5·4·0.46211716 = 0.92423431
    # CE at T=1 with label 0: −ln softmax(0, 2)[0] = ln(1 + e²) = 2.12692801; hard term = 0.5·2.12692801 = 1.06346401
    student = torch.tensor([[0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0]])
    method = build_method(MethodConfig("kd", {"temperature": 2.0, "alpha": 0.5}), student=torch.nn.Identity(),
                          teacher=torch.nn.Identity())
    terms = method.loss_terms(Batch(inputs=student, labels=torch.tensor([0])), Outputs(student), Outputs(teacher))
    assert terms["kd"].item() == pytest.approx(0.92423431, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(1.06346401, abs=1e-6)


def test_kd_against_float64_reference_on_random_batch():
    torch.manual_seed(0)
    s, t = torch.randn(16, 7, dtype=torch.float64), torch.randn(16, 7, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (16,))
    T, alpha = 3.5, 0.8
    method = build_method(MethodConfig("kd", {"temperature": T, "alpha": alpha}), student=torch.nn.Identity(),
                          teacher=torch.nn.Identity())
    terms = method.loss_terms(Batch(s, y), Outputs(s), Outputs(t))
    expected_soft = 0.0
    expected_ce = 0.0
    for n in range(16):
        ps = [math.exp(v / T) for v in s[n].tolist()]
        pt = [math.exp(v / T) for v in t[n].tolist()]
        zs, zt = sum(ps), sum(pt)
        expected_soft += sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt))
        expected_ce += -s[n, y[n]].item() + math.log(sum(math.exp(v) for v in s[n].tolist()))
    assert terms["kd"].item() == pytest.approx(alpha * T * T * expected_soft / 16, rel=1e-9)
    assert terms["ce"].item() == pytest.approx((1 - alpha) * expected_ce / 16, rel=1e-9)


def test_scratch_is_cross_entropy_with_label_smoothing():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    method = build_method(MethodConfig("scratch", {"label_smoothing": 0.3}), student=torch.nn.Identity(), teacher=None)
    terms = method.loss_terms(Batch(logits, torch.tensor([0])), Outputs(logits), None)
    logp = torch.log_softmax(logits, -1)[0]
    expected = -(0.7 * logp[0] + 0.1 * logp.sum())  # (1−ε)·onehot + ε/C over C = 3 classes
    assert terms["ce"].item() == pytest.approx(expected.item(), abs=1e-6)


def _teacher_for(method_name, make):
    """Methods that distil from several networks get them in the module they expect."""
    from kdlab.models.ensemble import TeacherEnsemble
    from kdlab.models.trajectory import TeacherTrajectory

    if method_name in ("multi_teacher", "rl_multi_teacher"):
        return TeacherEnsemble([make(16), make(12)])
    if method_name == "mtard":
        return TeacherEnsemble([make(16), make(12)])  # [clean, robust], in that order
    if method_name == "route_constrained":
        return TeacherTrajectory([make(16), make(16)])
    if method_name == "aikd":
        return make(6)  # a pre-trained model of the student's own architecture
    return make(16)


MAP_METHODS = ("ab", "ft", "kdsvd", "nst", "ofd", "reviewkd", "vid")  # feature-map methods (vision zoo, issue 21)
IMAGE_METHODS = ("mlkd",)  # its default strong view is RandAugment, which reads images
SMALL_DATA = {"crd": {"nce_k": 4}}  # options for the 8-sample batch below (CRD: at most train_size − 1 negatives)


@pytest.mark.parametrize("name", registry.names("method"))
def test_method_contract(name):
    """Every registered method: a docstring, typed hyperparameters with defaults, finite terms that backprop."""
    cls = registry.get("method", name)
    assert issubclass(cls, Method)
    assert registry.summary("method", name)
    params = entry_parameters("method", name)
    assert all(annotation is not None for annotation, _ in params.values())
    torch.manual_seed(0)
    if "classification" not in cls.data_kinds:
        return _sequence_contract(cls)
    mlp = registry.get("model", "mlp")
    student = mlp(input_shape=(1, 5), num_classes=3, mean=(0.0,), std=(1.0,), width=6)
    teacher = _teacher_for(name, lambda width: mlp(input_shape=(1, 5), num_classes=3, mean=(0.0,), std=(1.0,),
                                                    width=width)) if cls.needs_teacher else None
    shape = (1, 5)
    if name in MAP_METHODS + IMAGE_METHODS:  # (C, H, W) stage maps or images: CIFAR ResNets on 8×8 images
        shape = (3, 8, 8)
        student, teacher = (registry.get("model", arch)(input_shape=shape, num_classes=3, mean=(0.0,) * 3,
                                                        std=(1.0,) * 3) for arch in ("resnet8", "resnet14"))
    method = cls(cls.Hparams(**SMALL_DATA.get(name, {})), student=student, teacher=teacher, input_shape=shape,
                 train_size=8)
    inputs = torch.rand(8, *shape)
    labels = torch.randint(0, 3, (8,))
    if cls.uses_unlabelled:  # the low-label regime: hidden labels are -1
        labels[::2] = -1
    indices = torch.arange(8)  # train-split positions (per-sample memories, e.g. PS-KD)
    from kdlab.models import Taps

    # As the loop does: make_batch (adversarial inputs for the robustness methods, generated ones for
    # DFAD, the data batch for the rest), then the forwards on the batch's inputs.
    method.set_progress(5, 10)  # mid-training: ramped terms (e.g. faithful_kd's ε and κ) are switched on
    batch = method.make_batch(Batch(inputs, labels, indices))
    assert batch.inputs.shape[1:] == inputs.shape[1:]
    if batch.inputs is not inputs and cls.teacher_in_loop is False:  # adversarial inputs: in [0, 1]
        assert 0.0 <= float(batch.inputs.min()) and float(batch.inputs.max()) <= 1.0
    with Taps(student, method.student_taps) as s_taps:
        student_out = Outputs(student(batch.inputs), dict(s_taps.captured))
    teacher_out = None
    if teacher is not None and cls.teacher_in_loop:
        with Taps(teacher, method.teacher_taps, detach=True) as t_taps, torch.no_grad():
            teacher_out = Outputs(teacher(batch.inputs), dict(t_taps.captured))
    for p in student.parameters():  # nothing before the loss may leave gradients behind (attacks use autograd.grad)
        assert p.grad is None
    terms = method.loss_terms(batch, student_out, teacher_out)
    assert terms and all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if callable(getattr(method, "metrics", None)):  # logged by the loop as method/<name>
        assert all(isinstance(v, float) and math.isfinite(v) for v in method.metrics().values())


def _sequence_contract(cls):
    """A sequence method on tinygpt models and a canonical-layout batch (prompt, response, EOS, pad)."""
    from kdlab.data import build_splits

    splits = build_splits("reverse", {"num_train": 16, "num_test": 4}, root=None, cache_dir="/tmp",
                          val_fraction=0.0, split_seed=0)
    tinygpt = registry.get("model", "tinygpt")
    student = tinygpt(input_shape=splits.input_shape, num_classes=splits.num_classes, layers=1, width=16, heads=2)
    teacher = tinygpt(input_shape=splits.input_shape, num_classes=splits.num_classes, layers=1, width=24,
                      heads=2) if cls.needs_teacher else None
    method = cls(cls.Hparams(), student=student, teacher=teacher, input_shape=splits.input_shape, train_size=16)
    method.sequence = splits.sequence
    tokens, labels = splits.train
    batch = method.make_batch(Batch(tokens[:8], labels[:8], torch.arange(8)))
    teacher_out = Outputs(teacher(batch.inputs).detach()) if teacher is not None else None
    terms = method.loss_terms(batch, Outputs(student(batch.inputs)), teacher_out)
    assert terms and all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
