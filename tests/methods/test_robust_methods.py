"""Adversarial-robustness methods: the shared inner maximisation, each loss against an independent float64
formula on a hand-built batch, the attack's train/eval mode, MTARD's balance rules, SRST-AWR's weights,
the low-label helper, and one short training run per method through the loop."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.data.lowlabel import keep_labels_per_class
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.methods import robust_common
from kdlab.methods.adversarial_training import AdversarialTraining  # noqa: F401  (registration)
from kdlab.methods.ard import ARD  # noqa: F401
from kdlab.methods.awr_kd import AWRKD, awr_weights
from kdlab.methods.base import Batch, Outputs
from kdlab.methods.mtard import MTARD, entropy_balance_step, normalization_balance_step
from kdlab.methods.robust_common import perturb
from kdlab.methods.rslad import RSLAD  # noqa: F401
from kdlab.methods.trades import Trades  # noqa: F401
from kdlab.models import TeacherEnsemble

ROBUST = ("adversarial_training", "trades", "ard", "rslad", "mtard", "awr_kd")
# The student's mode during the inner maximisation in each paper's official code.
PAPER_MODES = {"adversarial_training": "train", "trades": "eval", "ard": "train", "rslad": "eval",
               "mtard": "eval", "awr_kd": "eval"}

# ---------------------------------------------------------------------------------------------------------
# Independent float64 reference, in plain Python (no kdlab, no torch.nn.functional)
# ---------------------------------------------------------------------------------------------------------

W_S = [[1.0, -0.5, 0.3, 0.0], [0.2, 0.8, -1.0, 0.5], [-0.7, 0.1, 0.4, -0.3]]
B_S = [0.1, -0.2, 0.05]
W_T = [[2.0, 0.5, -0.3, 1.0], [-1.0, 1.5, 0.2, -0.4], [0.3, -0.8, 1.2, 0.6]]
B_T = [0.0, 0.3, -0.1]
W_R = [[0.5, -0.2, 0.1, 0.3], [0.1, 0.6, -0.4, 0.2], [-0.3, 0.2, 0.5, -0.1]]  # a second (robust) teacher
B_R = [0.05, 0.0, -0.05]
X = [[0.2, 0.9, 0.0, 0.5], [1.0, 0.3, 0.7, 0.1], [0.6, 0.6, 0.4, 0.8]]
DELTA = [[0.05, -0.05, 0.05, -0.05], [-0.05, 0.05, -0.05, 0.05], [0.05, 0.05, -0.05, -0.05]]
X_ADV = [[min(1.0, max(0.0, a + d)) for a, d in zip(row, drow)] for row, drow in zip(X, DELTA)]
Y = [0, 2, 1]


def ref_logits(w, b, x):
    return [sum(wi * xi for wi, xi in zip(row, x)) + bc for row, bc in zip(w, b)]


def ref_softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def ref_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def ref_ce(z, y, smoothing=0.0):
    logp = [math.log(v) for v in ref_softmax(z)]
    return -(1 - smoothing) * logp[y] - smoothing / len(z) * sum(logp)


def mean(values):
    return sum(values) / len(values)


def linear(w, b):
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(b, dtype=torch.float64))
    return layer


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.fixture
def fixed_attack(monkeypatch):
    """Replace the inner maximisation by a fixed x' (X_ADV); record what the method asked for."""
    calls = []

    def fake(model, inputs, objective, **options):
        calls.append({"mode": model.training, "objective": objective, "inputs": inputs.clone(), **options})
        return tensor(X_ADV)

    monkeypatch.setattr(robust_common, "perturb", fake)
    return calls


def run_step(method, student, labels=Y):
    """The loop's order: make_batch → student forward on batch.inputs (train mode) → loss_terms."""
    student.train()
    batch = method.make_batch(Batch(tensor(X), torch.tensor(labels), torch.arange(len(labels))))
    return method.loss_terms(batch, Outputs(student(batch.inputs)), None), batch


def build(name, options, student, teacher):
    return build_method(MethodConfig(name, options), student=student, teacher=teacher, input_shape=(4,))


# ---------------------------------------------------------------------------------------------------------
# perturb: the shared inner maximisation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["uniform", "normal_0.001", "zero"])
@pytest.mark.parametrize("start_mode", ["train", "eval"])
def test_perturb_stays_in_ball_and_box_restores_mode_and_leaves_no_parameter_grads(init, start_mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train(start_mode == "train")
    x = torch.rand(16, 6)
    x[0] = 0.0  # edges of the image range: the box must bind there
    x[1] = 1.0
    y = torch.randint(0, 3, (16,))
    eps = 0.1
    x_adv = perturb(model, x, lambda z: nn.functional.cross_entropy(z, y), eps=eps, step_size=0.04, steps=5,
                    init=init, model_mode="eval")
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not x_adv.requires_grad
    assert model.training == (start_mode == "train")
    assert all(p.grad is None for p in model.parameters())


def test_perturb_raises_the_objective_and_is_reproducible_with_a_generator():
    torch.manual_seed(1)
    model = nn.Linear(5, 3)
    x, y = torch.rand(32, 5) * 0.8 + 0.1, torch.randint(0, 3, (32,))

    def objective(z):
        return nn.functional.cross_entropy(z, y)

    runs = [perturb(model, x, objective, eps=0.05, step_size=0.02, steps=4, init="uniform",
                    generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        assert objective(model(runs[0])) > objective(model(x))
    # steps = 0 with the zero start is the identity; under an outer no_grad it still works.
    with torch.no_grad():
        assert torch.equal(perturb(model, x, objective, eps=0.05, step_size=0.02, steps=0, init="zero"), x)
        perturb(model, x, objective, eps=0.05, step_size=0.02, steps=1, init="zero")


def test_perturb_rejects_bad_options():
    model, x = nn.Linear(2, 2), torch.rand(3, 2)
    with pytest.raises(KdlabError, match="attack init"):
        perturb(model, x, lambda z: z.sum(), eps=0.1, step_size=0.1, steps=1, init="gaussian")
    with pytest.raises(KdlabError, match="attack mode"):
        perturb(model, x, lambda z: z.sum(), eps=0.1, step_size=0.1, steps=1, model_mode="test")


def test_kl_scale_is_one_over_classes_for_paper():
    assert robust_common.kl_scale("paper", 10) == pytest.approx(0.1)
    assert robust_common.kl_scale("batchmean", 10) == 1.0
    with pytest.raises(KdlabError, match="kl_reduction"):
        robust_common.kl_scale("mean", 10)


# ---------------------------------------------------------------------------------------------------------
# The student's mode during each method's inner maximisation (the trap)
# ---------------------------------------------------------------------------------------------------------


class Recorder(nn.Module):
    """A network that records its ``training`` flag at every forward."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.net(x)


def _teacher_for(name):
    if name == "mtard":
        return TeacherEnsemble([linear(W_T, B_T), linear(W_R, B_R)])
    return None if name in ("adversarial_training", "trades") else linear(W_T, B_T)


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("override", [False, True])
def test_attack_mode_defaults_to_the_papers_and_is_restored(name, override):
    expected = PAPER_MODES[name]
    options = {"steps": 2}
    if override:
        expected = "eval" if expected == "train" else "train"
        options["attack_mode"] = expected
    student = Recorder(linear(W_S, B_S))
    method = build(name, options, student, _teacher_for(name))
    assert method.hparams.attack_mode == (expected if override else PAPER_MODES[name])
    student.train()
    batch = method.make_batch(Batch(tensor(X), torch.tensor(Y), torch.arange(3)))
    # Every student forward inside make_batch (attack steps, and the KL target where there is one) ran in
    # the attack's mode; the student is back in train mode for the loop's forward.
    assert len(student.modes) >= 2 and set(student.modes) == {expected == "train"}
    assert student.training
    assert all(p.grad is None for p in student.parameters())
    assert (batch.inputs - tensor(X)).abs().max() <= method.hparams.epsilon + 1e-12
    assert torch.equal(batch.extras["clean"], tensor(X))


# ---------------------------------------------------------------------------------------------------------
# Each loss against its formula (fixed x' injected), float64
# ---------------------------------------------------------------------------------------------------------


def test_adversarial_training_is_ce_on_the_adversarial_batch(fixed_attack):
    student = linear(W_S, B_S)
    method = build("adversarial_training", {}, student, None)
    terms, batch = run_step(method, student)
    expected = mean([ref_ce(ref_logits(W_S, B_S, xa), y) for xa, y in zip(X_ADV, Y)])  # Madry Eq. 2.1, outer
    assert list(terms) == ["ce"]
    assert terms["ce"].item() == pytest.approx(expected, rel=1e-12)
    call = fixed_attack[0]
    assert call["init"] == "uniform" and call["model_mode"] == "train" and call["steps"] == 10
    assert call["eps"] == pytest.approx(8 / 255) and call["step_size"] == pytest.approx(2 / 255)
    # The objective is the student's CE with the label.
    z = tensor([ref_logits(W_S, B_S, x) for x in X])
    assert call["objective"](z).item() == pytest.approx(mean([ref_ce(r.tolist(), y) for r, y in zip(z, Y)]))


def test_trades_matches_eq5_of_the_official_code(fixed_attack):
    student = linear(W_S, B_S)
    method = build("trades", {"beta": 6.0}, student, None)
    terms, _ = run_step(method, student)
    clean = [ref_logits(W_S, B_S, x) for x in X]
    adv = [ref_logits(W_S, B_S, x) for x in X_ADV]
    ce = mean([ref_ce(z, y) for z, y in zip(clean, Y)])
    robust = mean([ref_kl(ref_softmax(c), ref_softmax(a)) for c, a in zip(clean, adv)])  # batchmean, Eq. 5
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert terms["robust"].item() == pytest.approx(6.0 * robust, rel=1e-12)
    call = fixed_attack[0]
    assert call["init"] == "normal_0.001" and call["model_mode"] == "eval"
    # Inner objective: summed KL(f(x) ‖ f(x')) to the clean prediction (computed before the attack).
    assert call["objective"](tensor(adv)).item() == pytest.approx(3 * robust, rel=1e-12)
    # The gradient flows through both arguments of the outer KL (f(x) is not detached).
    terms["robust"].backward()
    assert student.weight.grad is not None and torch.isfinite(student.weight.grad).all()


@pytest.mark.parametrize("kl_reduction, scale", [("paper", 1 / 3), ("batchmean", 1.0)])
def test_ard_matches_the_official_loss(fixed_attack, kl_reduction, scale):
    student, teacher = linear(W_S, B_S), linear(W_T, B_T)
    T, alpha = 2.0, 0.7
    method = build("ard", {"temperature": T, "alpha": alpha, "kl_reduction": kl_reduction}, student, teacher)
    terms, _ = run_step(method, student)
    kd = mean([ref_kl(ref_softmax(ref_logits(W_T, B_T, x), T), ref_softmax(ref_logits(W_S, B_S, xa), T))
               for x, xa in zip(X, X_ADV)])  # teacher on clean x, student on x'
    ce = mean([ref_ce(ref_logits(W_S, B_S, x), y) for x, y in zip(X, Y)])  # student on clean x
    # paper: nn.KLDivLoss() averages over N·C elements = batchmean KL / C (C = 3 here).
    assert terms["kd"].item() == pytest.approx(alpha * T * T * kd * scale, rel=1e-12)
    assert terms["ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-12)
    call = fixed_attack[0]
    assert call["init"] == "uniform" and call["model_mode"] == "train"
    # ARD's inner max is the student's CE with the true label, not a KL to the teacher.
    z = tensor([ref_logits(W_S, B_S, x) for x in X_ADV])
    assert call["objective"](z).item() == pytest.approx(mean([ref_ce(r.tolist(), y) for r, y in zip(z, Y)]))


def test_ard_defaults_are_the_official_cifar_arguments():
    h = registry.get("method", "ard").Hparams()
    assert (h.temperature, h.alpha, h.kl_reduction, h.steps) == (30.0, 1.0, "paper", 10)


@pytest.mark.parametrize("kl_reduction, scale", [("paper", 1 / 3), ("batchmean", 1.0)])
def test_rslad_matches_the_official_loss(fixed_attack, kl_reduction, scale):
    student, teacher = linear(W_S, B_S), linear(W_T, B_T)
    method = build("rslad", {"kl_reduction": kl_reduction}, student, teacher)
    terms, _ = run_step(method, student)
    soft = [ref_softmax(ref_logits(W_T, B_T, x)) for x in X]  # robust soft labels on the clean x
    adv = mean([ref_kl(p, ref_softmax(ref_logits(W_S, B_S, xa))) for p, xa in zip(soft, X_ADV)])
    nat = mean([ref_kl(p, ref_softmax(ref_logits(W_S, B_S, x))) for p, x in zip(soft, X)])
    assert terms["adv"].item() == pytest.approx(5 / 6 * adv * scale, rel=1e-12)
    assert terms["nat"].item() == pytest.approx(1 / 6 * nat * scale, rel=1e-12)
    call = fixed_attack[0]
    assert call["init"] == "normal_0.001" and call["model_mode"] == "eval"
    # Inner objective: summed KL(T(x) ‖ S(x')) to the teacher's clean soft labels.
    z = tensor([ref_logits(W_S, B_S, x) for x in X_ADV])
    assert call["objective"](z).item() == pytest.approx(3 * adv, rel=1e-12)


def _mtard_reference(t_adv, t_nat, weights, scale):
    """w_adv·KL(softmax(T_adv(x')/τ_adv) ‖ softmax(S(x'))) + w_nat·KL(softmax(T_nat(x)/τ_nat) ‖ softmax(S(x)))."""
    adv = mean([ref_kl(ref_softmax(ref_logits(W_R, B_R, xa), t_adv), ref_softmax(ref_logits(W_S, B_S, xa)))
                for xa in X_ADV])
    nat = mean([ref_kl(ref_softmax(ref_logits(W_T, B_T, x), t_nat), ref_softmax(ref_logits(W_S, B_S, x)))
                for x in X])
    return weights[0] * adv * scale, weights[1] * nat * scale, adv * scale, nat * scale


def _mtard(options, student):
    teacher = TeacherEnsemble([linear(W_T, B_T), linear(W_R, B_R)])  # [clean, robust]
    return build("mtard", options, student, teacher)


def test_mtard_fixed_weights_match_the_formula(fixed_attack):
    student = linear(W_S, B_S)
    options = {"balance": "none", "weight_adv": 0.3, "weight_nat": 0.7, "temperature_adv": 2.0,
               "temperature_nat": 1.5}
    method = _mtard(options, student)
    terms, batch = run_step(method, student)
    adv, nat, _, _ = _mtard_reference(2.0, 1.5, (0.3, 0.7), 1 / 3)
    assert terms["adv"].item() == pytest.approx(adv, rel=1e-6)  # buffers are float32
    assert terms["nat"].item() == pytest.approx(nat, rel=1e-6)
    # The robust teacher sees x', the clean teacher x.
    assert torch.allclose(batch.extras["teacher_adv"], linear(W_R, B_R)(tensor(X_ADV)))
    assert torch.allclose(batch.extras["teacher_nat"], linear(W_T, B_T)(tensor(X)))
    call = fixed_attack[0]
    assert call["init"] == "normal_0.001" and call["model_mode"] == "eval"
    z = tensor([ref_logits(W_S, B_S, x) for x in X_ADV])
    assert call["objective"](z).item() == pytest.approx(mean([ref_ce(r.tolist(), y) for r, y in zip(z, Y)]))
    # balance none: nothing moves.
    assert method.metrics() == pytest.approx({"weight_adv": 0.3, "weight_nat": 0.7, "temperature_adv": 2.0,
                                              "temperature_nat": 1.5})


def test_mtard_needs_exactly_a_clean_and_a_robust_teacher():
    for teacher, got in ((linear(W_T, B_T), "one teacher network"),
                         (TeacherEnsemble([linear(W_T, B_T)] * 3), "3 teachers")):
        with pytest.raises(KdlabError, match=f"exactly two teachers, got {got}.*teacher.members: \\[clean, robust\\]"):
            build("mtard", {}, linear(W_S, B_S), teacher)


def test_normalization_balance_on_hand_numbers():
    # ℓ̂ = (0.8, 0.4): the robust teacher's loss fell less, so it gets more weight.
    # target = ℓ̂/Σℓ̂ = (2/3, 1/3); w_adv = 0.5 − 0.025·(0.5 − 2/3) = 0.5 + 0.025/6.
    w = normalization_balance_step(torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.8, 0.4]).double(),
                                   torch.tensor([1.0, 1.0]).double(), 0.025)
    assert w.tolist() == pytest.approx([0.5 + 0.025 / 6, 0.5 - 0.025 / 6], abs=1e-15)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-15)
    # References other than 1: ℓ̂ = (0.3/0.6, 0.5/0.5) = (0.5, 1): the clean teacher moves up.
    w = normalization_balance_step(torch.tensor([0.5, 0.5]).double(), torch.tensor([0.3, 0.5]).double(),
                                   torch.tensor([0.6, 0.5]).double(), 0.1)
    assert w.tolist() == pytest.approx([0.5 - 0.1 * (0.5 - 1 / 3), 0.5 + 0.1 * (0.5 - 1 / 3)], abs=1e-15)
    # Clip at 0 then renormalise: an over-long step (lr 2) gives 2·target − w = (1.7, −0.7) → (1, 0).
    w = normalization_balance_step(torch.tensor([0.1, 0.9]).double(), torch.tensor([0.9, 0.1]).double(),
                                   torch.tensor([1.0, 1.0]).double(), 2.0)
    assert w.tolist() == pytest.approx([1.0, 0.0], abs=1e-15)


def test_entropy_balance_on_hand_numbers():
    def step(taus, entropies, low=1.0, high=10.0):
        return entropy_balance_step(torch.tensor(taus).double(), torch.tensor(entropies).double(), 0.001, low,
                                    high).tolist()

    # The robust teacher is the more uncertain: sharpen it (τ_adv − η), soften the clean one (τ_nat + η).
    assert step([5.0, 5.0], [2.0, 1.0]) == pytest.approx([4.999, 5.001], abs=1e-12)
    assert step([5.0, 5.0], [1.0, 2.0]) == pytest.approx([5.001, 4.999], abs=1e-12)
    assert step([5.0, 5.0], [1.5, 1.5]) == pytest.approx([5.0, 5.0], abs=1e-12)  # sign(0) = 0
    # Clipping to [τ_min, τ_max]: at the floor and at the ceiling.
    assert step([1.0, 10.0], [2.0, 1.0]) == pytest.approx([1.0, 10.0], abs=1e-12)
    assert step([1.0, 1.0], [2.0, 1.0]) == pytest.approx([1.0, 1.001], abs=1e-12)


def test_mtard_balance_state_in_the_method(fixed_attack):
    student = linear(W_S, B_S)
    method = _mtard({"balance": "entropy", "temperature_adv": 3.0, "temperature_nat": 3.0}, student)
    # Step 1: the reference losses are set, so ℓ̂ = (1, 1) and the weights stay 0.5/0.5.
    terms, _ = run_step(method, student)
    adv, nat, loss_adv, loss_nat = _mtard_reference(3.0, 3.0, (0.5, 0.5), 1 / 3)
    assert terms["adv"].item() == pytest.approx(adv, rel=1e-6)
    assert method.initial_losses.tolist() == pytest.approx([loss_adv, loss_nat], rel=1e-6)
    assert method.weights.tolist() == pytest.approx([0.5, 0.5], abs=1e-7)
    # Temperatures moved one η_τ step by the entropies of this step's tempered teachers.
    h_adv = mean([-sum(p * math.log(p) for p in ref_softmax(ref_logits(W_R, B_R, xa), 3.0)) for xa in X_ADV])
    h_nat = mean([-sum(p * math.log(p) for p in ref_softmax(ref_logits(W_T, B_T, x), 3.0)) for x in X])
    sign = 1.0 if h_adv > h_nat else -1.0
    assert method.temperatures.tolist() == pytest.approx([3.0 - 0.001 * sign, 3.0 + 0.001 * sign], abs=1e-6)
    # The state is in the method's state_dict (checkpointed) and loads back.
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert set(state) == {"weights", "temperatures", "initial_losses"}
    fresh = _mtard({"balance": "entropy"}, linear(W_S, B_S))
    fresh.load_state_dict(state)
    assert fresh.metrics() == pytest.approx(method.metrics())
    # Step 2 with a moved student: the weights are updated before forming the loss, toward the teacher whose
    # loss fell less.
    with torch.no_grad():
        student.weight.add_(0.3 * (linear(W_T, B_T).weight - student.weight))  # closer to the clean teacher
    before_w = method.weights.clone()
    terms, _ = run_step(method, student)
    w = method.weights
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w[0].item() > 0.5 + 1e-4  # the clean loss fell more (student moved toward T_nat): w_adv rises
    adv_now = terms["adv"].item() / w[0].item()
    nat_now = terms["nat"].item() / w[1].item()
    relative = torch.tensor([adv_now / loss_adv, nat_now / loss_nat])
    expected = before_w - 0.025 * (before_w - relative / relative.sum())
    assert w.tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_mtard_eccv_balance_keeps_temperatures(fixed_attack):
    student = linear(W_S, B_S)
    method = _mtard({"balance": "eccv"}, student)
    run_step(method, student)
    run_step(method, student)
    assert method.temperatures.tolist() == [1.0, 1.0]
    assert method.weights.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_awr_weight_formula_on_hand_numbers():
    # β⟨p_T, p⟩ + (1−β)(1 − ⟨p_T, p̂⟩): ⟨(.5,.5),(.8,.2)⟩ = .5, ⟨(.5,.5),(.1,.9)⟩ = .5 → .3·.5 + .7·.5 = .5
    # second row: ⟨(1,0),(.6,.4)⟩ = .6, ⟨(1,0),(.2,.8)⟩ = .2 → .3·.6 + .7·.8 = .74
    p_t = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.8, 0.2], [0.6, 0.4]], dtype=torch.float64, requires_grad=True)
    p_hat = torch.tensor([[0.1, 0.9], [0.2, 0.8]], dtype=torch.float64, requires_grad=True)
    w = awr_weights(p_t, p, p_hat, 0.3)
    assert w.tolist() == pytest.approx([0.5, 0.74], abs=1e-15)
    w.sum().backward()  # not detached: gradients reach both student probabilities
    assert torch.allclose(p.grad, 0.3 * p_t) and torch.allclose(p_hat.grad, -0.7 * p_t)


@pytest.mark.parametrize("perturb_loss", ["kl", "ce"])
def test_awr_kd_matches_the_official_loss_with_hidden_labels(fixed_attack, perturb_loss):
    student, teacher = linear(W_S, B_S), linear(W_T, B_T)
    lam, gamma, beta, tau, smooth = 20.0, 4.0, 0.3, 1.2, 0.2
    method = build("awr_kd", {"robust_weight": lam, "distill_weight": gamma, "beta": beta, "temperature": tau,
                              "label_smoothing": smooth, "perturb_loss": perturb_loss}, student, teacher)
    labels = [0, -1, 1]  # the middle row's label is hidden
    terms, _ = run_step(method, student, labels)
    clean = [ref_logits(W_S, B_S, x) for x in X]
    adv = [ref_logits(W_S, B_S, x) for x in X_ADV]
    t_clean = [ref_logits(W_T, B_T, x) for x in X]
    ce = mean([ref_ce(z, y, smooth) for z, y in zip(clean, labels) if y >= 0])  # labelled rows only
    robust = []
    for z, za, zt in zip(clean, adv, t_clean):  # all rows are unlabelled rows
        p, p_hat, p_t = ref_softmax(z), ref_softmax(za), ref_softmax(zt)
        w = beta * sum(a * b for a, b in zip(p_t, p)) + (1 - beta) * (1 - sum(a * b for a, b in zip(p_t, p_hat)))
        robust.append(w * ref_kl(p, p_hat))
    kd = mean([ref_kl(ref_softmax(zt, tau), ref_softmax(z, tau)) for z, zt in zip(clean, t_clean)])  # no τ²
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert terms["robust"].item() == pytest.approx(lam * mean(robust), rel=1e-12)
    assert terms["kd"].item() == pytest.approx(gamma * kd, rel=1e-12)
    call = fixed_attack[0]
    assert call["init"] == "uniform" and call["model_mode"] == "eval"
    za = tensor(adv)
    if perturb_loss == "kl":  # summed KL(p_θ(x) ‖ p_θ(x'))
        expected = sum(ref_kl(ref_softmax(z), ref_softmax(a)) for z, a in zip(clean, adv))
    else:  # CE with the teacher's argmax pseudo-labels
        pseudo = [max(range(3), key=lambda c: zt[c]) for zt in t_clean]
        expected = mean([ref_ce(a, y) for a, y in zip(adv, pseudo)])
    assert call["objective"](za).item() == pytest.approx(expected, rel=1e-12)


def test_awr_kd_batch_without_labels_gives_zero_ce(fixed_attack):
    student, teacher = linear(W_S, B_S), linear(W_T, B_T)
    method = build("awr_kd", {}, student, teacher)
    terms, _ = run_step(method, student, [-1, -1, -1])
    assert terms["ce"].item() == 0.0
    assert all(torch.isfinite(v) for v in terms.values())


def test_loss_terms_without_make_batch_say_so():
    student = linear(W_S, B_S)
    method = build("rslad", {}, student, linear(W_T, B_T))
    with pytest.raises(RuntimeError, match="make_batch"):
        method.loss_terms(Batch(tensor(X), torch.tensor(Y)), Outputs(student(tensor(X))), None)


@pytest.mark.parametrize("name, options, message", [
    ("ard", {"alpha": 1.5}, "method.alpha"),
    ("ard", {"temperature": 0.0}, "method.temperature"),
    ("trades", {"beta": -1.0}, "method.beta"),
    ("rslad", {"natural_weight": 2.0}, "method.natural_weight"),
    ("rslad", {"steps": -1}, "method.steps"),
    ("rslad", {"epsilon": -0.1}, "method.epsilon"),
    ("mtard", {"temperature_min": 5.0, "temperature_max": 2.0}, "temperature_min"),
    ("mtard", {"weight_lr": 1.5}, "method.weight_lr"),
    ("awr_kd", {"beta": 1.5}, "method.beta"),
])
def test_bad_hyperparameters_fail_at_build(name, options, message):
    with pytest.raises(KdlabError, match=message):
        build(name, options, linear(W_S, B_S), _teacher_for(name) or linear(W_T, B_T))


# ---------------------------------------------------------------------------------------------------------
# keep_labels_per_class
# ---------------------------------------------------------------------------------------------------------


def test_keep_labels_per_class_is_stratified_deterministic_and_pure():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 5)
    original = labels.clone()
    kept = keep_labels_per_class(labels, 3, seed=4)
    assert torch.equal(labels, original)  # the input is not modified
    assert kept.dtype == torch.int64 and kept.shape == labels.shape
    for c in range(3):
        assert int((kept == c).sum()) == 3
    hidden = kept == -1
    assert int(hidden.sum()) == 22 - 9
    assert torch.equal(kept[~hidden], labels[~hidden])  # kept labels are the true ones
    assert torch.equal(keep_labels_per_class(labels, 3, seed=4), kept)  # same seed, same labels
    others = [keep_labels_per_class(labels, 3, seed=s) for s in range(5, 10)]
    assert any(not torch.equal(o, kept) for o in others)
    assert torch.equal(keep_labels_per_class(labels, 5, seed=0)[17:], labels[17:])  # all 5 of class 2 kept


def test_keep_labels_per_class_errors():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    with pytest.raises(KdlabError, match="class 2 has 1 training samples, fewer than the 2 asked"):
        keep_labels_per_class(labels, 2, seed=0)
    with pytest.raises(KdlabError, match="class 3 has 0 training samples"):
        keep_labels_per_class(labels, 1, seed=0, num_classes=4)
    with pytest.raises(KdlabError, match="integer >= 1"):
        keep_labels_per_class(labels, 0, seed=0)
    with pytest.raises(KdlabError, match="negative"):
        keep_labels_per_class(torch.tensor([0, -1, 1]), 1, seed=0)


# ---------------------------------------------------------------------------------------------------------
# One short run per method through the training loop
# ---------------------------------------------------------------------------------------------------------


def _splits(tmp_path):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 6), "num_train": 80, "num_test": 30,
                                      "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                        val_fraction=0.2, split_seed=0)


FAST = {"steps": 2, "epsilon": 0.1, "step_size": 0.05}


def _models(name, splits):
    torch.manual_seed(11)
    if name == "mtard":
        teacher = TeacherEnsemble([build_model("mlp", {"width": 16}, splits) for _ in range(2)])
    elif registry.get("method", name).needs_teacher:
        teacher = build_model("mlp", {"width": 16}, splits)
    else:
        teacher = None
    torch.manual_seed(12)
    return teacher, build_model("mlp", {"width": 8}, splits)


@pytest.mark.parametrize("name", ROBUST)
def test_each_method_trains_through_the_loop(tmp_path, name):
    splits = _splits(tmp_path)
    if name == "awr_kd":  # the low-label regime: 4 labels per class survive in the train split
        x, y = splits.train
        splits = dataclasses.replace(splits, train=(x, keep_labels_per_class(y, 4, seed=0)))
    teacher, student = _models(name, splits)
    before = [p.detach().clone() for p in student.parameters()]
    method = build_method(MethodConfig(name, dict(FAST)), student=student, teacher=teacher,
                          input_shape=splits.input_shape, train_size=len(splits.train[0]))
    logged = []
    result = fit(student=student, method=method, teacher=teacher, splits=splits, seed=0,
                 train=TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu"),
                 on_epoch=lambda epoch, metrics: logged.append(metrics))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(math.isfinite(v) for v in result.final.values())
    assert all(math.isfinite(v) for k, v in logged[-1].items() if k.startswith("train/loss"))


class _Crash(Exception):
    pass


def test_mtard_balance_state_resumes_with_the_run(tmp_path):
    splits = _splits(tmp_path)
    train = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", checkpoint_every=1)
    options = {**FAST, "balance": "entropy", "temperature_lr": 0.05}

    def run(run_dir, on_epoch=None):
        teacher, student = _models("mtard", splits)
        method = build_method(MethodConfig("mtard", options), student=student, teacher=teacher)
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=3, run_dir=run_dir,
            on_epoch=on_epoch)
        return student, method

    straight_student, straight = run(tmp_path / "straight")

    def crash_in_epoch_2(epoch, metrics):
        if epoch == 2:
            raise _Crash

    with pytest.raises(_Crash):
        run(tmp_path / "killed", crash_in_epoch_2)
    resumed_student, resumed = run(tmp_path / "killed")
    assert straight.metrics() != {"weight_adv": 0.5, "weight_nat": 0.5, "temperature_adv": 1.0,
                                  "temperature_nat": 1.0}  # the balance did move
    assert resumed.metrics() == pytest.approx(straight.metrics(), abs=1e-6)
    for a, b in zip(straight_student.parameters(), resumed_student.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_trades_docstring_states_the_official_scripts_beta_default():
    """Issue 17 item 4: train_trades_cifar10.py's --beta defaults to 6.0 at the official head (not 1.0)."""
    from kdlab.methods import trades

    assert trades.TradesHparams().beta == 6.0
    doc = " ".join(trades.__doc__.split())
    assert "defaults to 1.0" not in doc and "``--beta`` (``train_trades_cifar10.py``" in doc
