"""REINFORCE helpers (on a toy bandit with a known optimum) and the rl_multi_teacher method."""
from __future__ import annotations

import math

import pytest
import torch

import kdlab.methods.rl_multi_teacher  # noqa: F401  (registers rl_multi_teacher; the lead wires it into methods/)
from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data.base import Splits
from kdlab.engine.build import build_method
from kdlab.errors import KdlabError, NonFiniteLossError
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Batch, Outputs
from kdlab.methods.reinforce import (
    bernoulli_log_prob,
    categorical_log_prob,
    debiased,
    ema_update,
    reinforce_loss,
    sample_bernoulli,
    sample_categorical,
)
from kdlab.methods.rl_multi_teacher import mixture_kd, policy_features
from kdlab.models import Taps, TeacherEnsemble

# ---------------------------------------------------------------------------
# The estimator (kdlab.methods.reinforce)
# ---------------------------------------------------------------------------


def test_reinforce_loss_on_hand_numbers():
    # log π = (ln ½, ln ¼), rewards (1, 3), baseline 1 → advantages (0, 2):
    # −mean(0·ln ½, 2·ln ¼) = −(−2 ln 4)/2 = ln 4; d/d log π = −(r − b)/N = (0, −1).
    log_probs = torch.log(torch.tensor([0.5, 0.25])).requires_grad_(True)
    rewards = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = reinforce_loss(log_probs, rewards, 1.0)
    assert loss.item() == pytest.approx(math.log(4.0), rel=1e-6)
    loss.backward()
    assert torch.allclose(log_probs.grad, torch.tensor([0.0, -1.0]))
    assert rewards.grad is None  # the advantage is detached
    # One reward for the whole batch broadcasts; a mask averages over its True entries only.
    assert reinforce_loss(log_probs, 2.0).item() == pytest.approx(-(math.log(0.5) + math.log(0.25)), rel=1e-6)
    masked = reinforce_loss(log_probs, rewards, 1.0, mask=torch.tensor([False, True]))
    assert masked.item() == pytest.approx(2 * math.log(4.0), rel=1e-6)  # −(2·ln ¼)/1
    assert reinforce_loss(log_probs, rewards, mask=torch.tensor([False, False])).item() == 0.0


def test_ema_baseline_and_its_bias_correction_on_hand_numbers():
    avg = ema_update(0.0, 1.0, 0.9)  # 0.1
    assert avg == pytest.approx(0.1)
    assert debiased(avg, 0.9, 1) == pytest.approx(1.0)  # one reward seen: the baseline is that reward
    avg = ema_update(avg, 3.0, 0.9)  # 0.39
    assert debiased(avg, 0.9, 2) == pytest.approx((0.9 * 1.0 + 3.0) / 1.9)  # the weighted mean of (1, 3)
    assert debiased(avg, 0.9, 0) == 0.0


def test_sampling_helpers_follow_their_distributions_and_replay_with_a_generator():
    probs = torch.tensor([0.1, 0.2, 0.7]).expand(20000, 3)
    first = sample_categorical(probs, torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_categorical(probs, torch.Generator().manual_seed(3)))
    freq = torch.bincount(first, minlength=3).double() / len(first)
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.015)
    coins = sample_bernoulli(torch.full((20000,), 0.3), torch.Generator().manual_seed(4))
    assert set(coins.unique().tolist()) == {0.0, 1.0} and abs(coins.mean().item() - 0.3) < 0.015
    # Log-probabilities against closed forms.
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert categorical_log_prob(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.75), rel=1e-6)
    assert bernoulli_log_prob(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(0.5))
    assert bernoulli_log_prob(torch.tensor([math.log(3.0)]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(0.25), rel=1e-6)


MEANS = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)  # the bandit's expected rewards; arm 2 is best


def _pull(arms: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noisy rewards: the arm's mean plus N(0, 0.5²)."""
    return MEANS[arms] + 0.5 * torch.randn(arms.shape, generator=generator, dtype=torch.float64)


def _batch_gradients(theta0, baseline, *, batches=200, size=20, seed=0):
    """∇_θ of the REINFORCE surrogate (negated: the estimate of ∇E[r]) on independent batches, (batches, 3)."""
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(batches):
        theta = theta0.clone().requires_grad_(True)
        arms = sample_categorical(torch.softmax(theta, 0).expand(size, 3), generator)
        log_probs = categorical_log_prob(theta.expand(size, 3), arms)
        reinforce_loss(log_probs, _pull(arms, generator), baseline).backward()
        grads.append(-theta.grad)
    return torch.stack(grads)


def test_estimator_is_unbiased_with_or_without_a_baseline_and_the_baseline_cuts_its_variance():
    # Exact gradient of E[r] = Σ_a π_a μ_a for π = softmax(θ): ∂/∂θ_j = π_j (μ_j − Σ_a π_a μ_a).
    theta0 = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    pi = torch.softmax(theta0, 0)
    exact = pi * (MEANS - (pi * MEANS).sum())
    plain = _batch_gradients(theta0, 0.0)
    with_baseline = _batch_gradients(theta0, float((pi * MEANS).sum()))  # b = E[r]: action-independent
    for estimates in (plain, with_baseline):
        standard_error = estimates.std(0) / math.sqrt(len(estimates))
        assert ((estimates.mean(0) - exact).abs() < 4 * standard_error + 1e-3).all()
    var_plain, var_baseline = plain.var(0).sum().item(), with_baseline.var(0).sum().item()
    assert var_baseline < 0.5 * var_plain, (var_baseline, var_plain)


def _train_bandit(seed: int, updates: int = 150) -> torch.Tensor:
    """REINFORCE with an EMA baseline: 16 pulls per update, SGD; returns the final arm probabilities."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=0.5)
    average, count = 0.0, 0
    for _ in range(updates):
        arms = sample_categorical(torch.softmax(theta, 0).expand(16, 3), generator)
        rewards = _pull(arms, generator)
        loss = reinforce_loss(categorical_log_prob(theta.expand(16, 3), arms), rewards, debiased(average, 0.9, count))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        average, count = ema_update(average, rewards.mean().item(), 0.9), count + 1  # after use: earlier rewards only
    return torch.softmax(theta.detach(), 0)


def test_policy_converges_to_the_best_arm_deterministically():
    probs = _train_bandit(seed=0)
    assert probs[2] > 0.9, probs
    # A seeded generator replays a run exactly (checked on a shorter run: the same code path).
    assert torch.equal(_train_bandit(seed=1, updates=40), _train_bandit(seed=1, updates=40))


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


def mlp(width):
    return registry.get("model", "mlp")(input_shape=(1, 5), num_classes=3, mean=(0.0,), std=(1.0,), width=width)


def build(options=None, *, teacher=None, student=None, train_size=96):
    student = student if student is not None else mlp(6)
    teacher = teacher if teacher is not None else TeacherEnsemble([mlp(16), mlp(12), mlp(8)])
    method = build_method(MethodConfig("rl_multi_teacher", dict(options or {})), student=student, teacher=teacher,
                          input_shape=(1, 5), train_size=train_size)
    return method, student, teacher


def forwards(method, student, teacher, batch):
    with Taps(teacher, method.teacher_taps, detach=True) as taps, torch.no_grad():
        teacher_out = Outputs(teacher(batch.inputs), dict(taps.captured))
    return Outputs(student(batch.inputs)), teacher_out


def drive(method, student, teacher, batches, lr=0.1):
    """The loop's order per step: make_batch → forwards → adversary (policy) step → student step."""
    policy_opt = torch.optim.SGD(method.adversary_parameters(), lr=1.0)
    student_opt = torch.optim.SGD(student.parameters(), lr=lr)
    for step, batch in enumerate(batches):
        method.set_progress(step, len(batches))
        batch = method.make_batch(batch)
        student_out, teacher_out = forwards(method, student, teacher, batch)
        adv = method.adversary_loss(batch, Outputs(student_out.logits.detach()), teacher_out)
        policy_opt.zero_grad()
        sum(adv.values()).backward()
        policy_opt.step()
        terms = method.loss_terms(batch, student_out, teacher_out)
        student_opt.zero_grad()
        sum(terms.values()).backward()
        student_opt.step()


def toy_batches(count=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(96, generator=g)
    x = torch.rand(96, 1, 5, generator=g)
    y = (x[:, 0, 0] > 0.5).long() + (x[:, 0, 1] > 0.5).long()
    return [Batch(x[i], y[i], i) for i in order[:count * size].split(size)]


def test_policy_features_on_a_hand_batch():
    # Teacher 0 logits (0, ln 3) → p = (¼, ¾); teacher 1 (0, 0) → (½, ½);
    # student (ln 3, 0) → q = (¾, ¼); label y = 1.
    members = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])  # (K=2, N=1, C=2)
    student = torch.tensor([[math.log(3.0), 0.0]])
    features = policy_features(members, student, torch.tensor([1]))
    expected = [
        0.75, 0.5,  # confidences max_c p_k
        -math.log(0.75), -math.log(0.5),  # teachers' CE with y = 1
        -math.log(0.25),  # the student's CE
        0.25 * math.log(0.25 / 0.75) + 0.75 * math.log(0.75 / 0.25),  # KL(p_0 ‖ q) = ½ ln 3
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),  # KL(p_1 ‖ q) = ½ ln 4/3
    ]
    assert features.shape == (1, 7)
    assert torch.allclose(features[0], torch.tensor(expected), atol=1e-6)
    assert policy_features(members, student, torch.tensor([1]), kl_features=False).shape == (1, 5)


def test_forced_selection_is_hinton_kd_from_that_teacher_and_probe_samples_are_left_out():
    torch.manual_seed(0)
    method, student, teacher = build({"temperature": 3.0, "alpha": 0.7, "probe_size": 4})
    torch.nn.init.constant_(method.policy.net[-1].bias, -1e3)
    with torch.no_grad():
        method.policy.net[-1].bias[1] = 1e3  # softmax = (0, 1, 0) exactly: always teacher 1
    batch = toy_batches(count=1, size=8)[0]
    batch = method.make_batch(batch)  # the first 4 samples become the held-out probe
    assert int(method.probe_count) == 4 and method.is_probe[batch.indices].tolist() == [True] * 4 + [False] * 4
    student_out, teacher_out = forwards(method, student, teacher, batch)
    terms = method.loss_terms(batch, student_out, teacher_out)
    z_s, z_1 = student_out.logits[4:], teacher.members[1](batch.inputs[4:]).detach()
    assert terms["kd"].item() == pytest.approx(0.7 * kl(z_s, z_1, temperature=3.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.3 * cross_entropy(z_s, batch.labels[4:]).item(), rel=1e-6)
    assert method.metrics()["select_1"] == 1.0 and method.metrics()["select_0"] == 0.0
    (terms["kd"] + terms["ce"]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


def test_mixture_kd_against_a_float64_rederivation():
    torch.manual_seed(1)
    members, student = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    weights = torch.distributions.Dirichlet(torch.ones(5, 3, dtype=torch.float64)).sample()
    mask = torch.tensor([True, False, True, True, False])
    T = 2.5
    expected = 0.0
    for i in (0, 2, 3):
        p = sum(weights[i, k] * torch.softmax(members[k, i] / T, 0) for k in range(3))  # Σ_k w_k p_k
        q = torch.softmax(student[i] / T, 0)
        expected += T * T * float((p * (p / q).log()).sum())
    value = mixture_kd(student, members, weights, temperature=T, mask=mask)
    assert value.item() == pytest.approx(expected / 3, rel=1e-10)


def test_weights_mode_samples_points_of_the_simplex_with_finite_log_densities():
    torch.manual_seed(2)
    method, student, teacher = build({"mode": "weights", "probe_size": 4})
    batch = toy_batches(count=1, size=8)[0]
    student_out, teacher_out = forwards(method, student, teacher, method.make_batch(batch))
    terms = method.loss_terms(batch, student_out, teacher_out)
    w = method.pending_weights
    assert w.shape == (8, 3) and (w > 0).all() and torch.allclose(w.sum(1), torch.ones(8))
    assert torch.isfinite(method.log_probs(method.pending_features, w)).all()
    assert all(torch.isfinite(v) for v in terms.values())
    assert sum(method.metrics()[f"select_{k}"] for k in range(3)) == pytest.approx(1.0)


def test_fewer_than_two_teachers_is_refused_naming_teacher_members():
    with pytest.raises(KdlabError, match="^teacher.members: .*got a single network"):
        build(teacher=mlp(16))
    with pytest.raises(KdlabError, match="^teacher.members: .*got 1 member"):
        build(teacher=TeacherEnsemble([mlp(16)]))


@pytest.mark.parametrize("options, message", [
    ({"mode": "best"}, "method.mode"),
    ({"temperature": 0.0}, "method.temperature"),
    ({"alpha": 1.5}, "method.alpha"),
    ({"baseline_decay": 1.0}, "method.baseline_decay"),
    ({"probe_size": 0}, "method.probe_size"),
    ({"policy_lr": -1.0}, "method.policy_lr"),
])
def test_bad_hyperparameters_fail_at_build(options, message):
    with pytest.raises(KdlabError, match=message):
        build(options)


def test_reward_is_the_probe_loss_drop_and_state_round_trips(tmp_path):
    torch.manual_seed(3)
    method, student, teacher = build({"probe_size": 8, "baseline_decay": 0.5})
    batches = toy_batches(count=3)
    drive(method, student, teacher, batches[:1])  # fills the probe; the step's actions await their reward
    assert bool(method.has_pending) and int(method.reward_count) == 0
    before = float(method.pending_probe_loss)  # P(θ_0), measured before step 0's student update
    after = float(method.probe_loss())  # P(θ_1): the student has taken step 0 since
    assert before != after
    drive(method, student, teacher, batches[1:2])  # step 1's adversary step rewards step 0's actions
    assert int(method.reward_count) == 1
    assert float(method.last_reward) == pytest.approx(before - after, rel=1e-6)  # r_0 = P(θ_0) − P(θ_1)
    assert float(method.pending_probe_loss) == after  # and P(θ_1) is step 1's "before"
    drive(method, student, teacher, batches[2:])
    state = method.state_dict()
    assert state["pending_features"].shape == (16, 10)

    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "m.safetensors")
    torch.manual_seed(99)
    fresh, _, _ = build({"probe_size": 8, "baseline_decay": 0.5}, student=student, teacher=teacher)
    fresh.pending_features = torch.zeros(3, 10)  # another size: load resizes the per-batch buffers
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    for name, value in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert fresh.metrics()["reward"] == method.metrics()["reward"]


def test_nan_reward_raises_a_clear_error():
    torch.manual_seed(4)
    method, student, teacher = build({"probe_size": 8})
    batches = toy_batches(count=2)
    drive(method, student, teacher, batches[:1])
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(math.nan)
    batch = method.make_batch(batches[1])
    student_out, teacher_out = forwards(method, student, teacher, batch)
    with pytest.raises(NonFiniteLossError, match="rl_multi_teacher: the reward became non-finite") as info:
        method.adversary_loss(batch, student_out, teacher_out)
    assert isinstance(info.value, KdlabError)


def _splits():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(160, 1, 5, generator=g)
    y = (x[:, 0, 0] > 0.5).long() + (x[:, 0, 1] > 0.5).long()  # 3 classes
    return Splits("toy", train=(x[:96], y[:96]), val=(x[96:128], y[96:128]), test=(x[128:], y[128:]),
                  num_classes=3, input_shape=(1, 5), mean=(0.0,), std=(1.0,))


def _fit_run(tmp_path, name, *, on_epoch=None):
    from kdlab.engine.loop import fit

    torch.manual_seed(5)
    method, student, teacher = build({"probe_size": 8, "policy_lr": 0.05})
    train = TrainConfig(epochs=2, batch_size=16, lr=0.05, device="cpu", eval_every=1, checkpoint_every=1)
    fit(student=student, method=method, teacher=teacher, splits=_splits(), train=train, seed=5,
        run_dir=tmp_path / name, on_epoch=on_epoch)
    return method, student


def test_fit_trains_the_policy_with_its_own_optimiser_only(monkeypatch):
    import kdlab.engine.loop as loop

    built = []  # the parameter lists the loop hands to its optimisers: main first, then the adversary's
    original = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda params, train: built.append(list(params))
                        or original(built[-1], train))
    logged = {}
    torch.manual_seed(5)
    method, student, teacher = build({"probe_size": 8, "policy_lr": 0.05})
    policy_before = [p.detach().clone() for p in method.policy.parameters()]
    train = TrainConfig(epochs=2, batch_size=16, lr=0.05, device="cpu", eval_every=1, checkpoint_every=1)
    loop.fit(student=student, method=method, teacher=teacher, splits=_splits(), train=train, seed=5,
             on_epoch=lambda epoch, metrics: logged.update({epoch: metrics}))
    main, adversary = built
    policy_ids = {id(p) for p in method.policy.parameters()}
    assert not policy_ids & {id(p) for p in main}  # the main optimiser never sees the policy
    assert {id(p) for p in adversary} == policy_ids
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, method.policy.parameters()))
    assert int(method.probe_count) == 8 and int(method.is_probe.sum()) == 8
    assert int(method.reward_count) == 11  # 12 steps; step 0's actions are rewarded at step 1, the last never
    for metrics in logged.values():
        assert sum(metrics[f"method/select_{k}"] for k in range(3)) == pytest.approx(1.0)
        assert math.isfinite(metrics["method/reward"]) and math.isfinite(metrics["adv/policy"])


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight, straight_student = _fit_run(tmp_path, "straight")

    def crash(epoch, metrics):
        if epoch == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _fit_run(tmp_path, "killed", on_epoch=crash)  # epoch 1's checkpoint is the last on disk
    resumed, resumed_student = _fit_run(tmp_path, "killed")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight_student.parameters(), resumed_student.parameters()):
        assert torch.equal(a, b)
