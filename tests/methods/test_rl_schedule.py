"""rl_schedule: the UCB rule at chosen values, convergence to the best arm on a synthetic reward, the
held-out probe, arm changes only at epoch boundaries, state round-trips, NaN rewards, and resume in fit()."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.methods.base import Batch, Outputs
from kdlab.methods.rl_schedule import bandit_update, ucb_select

TRAIN = 40  # samples of the hand-driven tests; probe_fraction 0.1 → a probe of 4


def _mlp(width=6, seed=0):
    torch.manual_seed(seed)
    return registry.get("model", "mlp")(input_shape=(1, 5), num_classes=3, mean=(0.0,), std=(1.0,), width=width)


def _method(student=None, **options):
    student = student if student is not None else _mlp()
    return build_method(MethodConfig("rl_schedule", options), student=student, teacher=_mlp(12, seed=1),
                        input_shape=(1, 5), train_size=TRAIN)


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(TRAIN, 1, 5, generator=generator), torch.randint(0, 3, (TRAIN,), generator=generator)


def _drive(method, steps, *, steps_per_epoch, batch_size=10, total=None, start=0):
    """As the loop does: set_progress then make_batch, over the data in order; the arm in play after each step."""
    x, y = _data()
    method.steps_per_epoch = steps_per_epoch
    arms = []
    for step in range(start, start + steps):
        begin = (step % steps_per_epoch) * batch_size % TRAIN
        index = torch.arange(begin, begin + batch_size) % TRAIN
        method.set_progress(step, total or start + steps)
        method.make_batch(Batch(x[index], y[index], index))
        arms.append(method.current())
    return arms


def test_ucb_plays_unplayed_arms_first_then_the_largest_index():
    assert ucb_select(torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3), 1.0) == 1
    counts, sums = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.2], dtype=torch.float64)
    # c = 1: 0.5 + √(2·ln 3/2) = 1.548 < 0.2 + √(2·ln 3) = 1.682 → the less-played arm
    assert ucb_select(counts, sums, 1.0) == 1
    # c = 0.1: 0.5 + 0.105 = 0.605 > 0.2 + 0.148 = 0.348 → the better mean
    assert ucb_select(counts, sums, 0.1) == 0
    assert ucb_select(counts, torch.tensor([0.4, 0.2], dtype=torch.float64), 0.0) == 0  # a tie: lowest index
    counts, sums = bandit_update(counts, sums, 1, 0.7, discount=0.5)  # decay every arm, then add to arm 1
    assert counts.tolist() == [1.0, 1.5] and sums.tolist() == pytest.approx([0.5, 0.8])


def test_the_bandit_converges_to_the_best_arm_on_a_synthetic_reward():
    method = _method(temperatures=(1.0, 4.0), alphas=(0.5, 0.9), exploration=0.1)
    means = [0.10, 0.30, 0.50, 0.20]  # arm 2 = (T 4, α 0.5) is best
    noise = torch.Generator().manual_seed(0)
    level = {"nll": 10.0, "calls": 0}

    def synthetic_score():
        """A probe NLL that drops over each epoch by the played arm's mean plus N(0, 0.05²) noise."""
        if level["calls"] > 0:
            level["nll"] -= means[method._arm] + 0.05 * float(torch.randn((), generator=noise))
        level["calls"] += 1
        return level["nll"]

    method._score = synthetic_score
    _drive(method, 150, steps_per_epoch=1)  # 150 one-step epochs: 149 rewards
    assert int(method.counts.argmax()) == 2 and float(method.counts[2]) >= 120
    assert method.current() == (4.0, 0.5)
    assert method.counts.sum().item() == 149
    assert float(method.last_reward) == pytest.approx(0.5, abs=0.2)


def test_the_probe_is_held_out_of_the_loss():
    method = _method()
    x, y = _data()
    index = torch.arange(10)
    method.steps_per_epoch = 4
    method.set_progress(0, 8)
    batch = method.make_batch(Batch(x[index], y[index], index))
    assert method.probe_indices.tolist() == [0, 1, 2, 3]  # the first 4 samples seen
    assert torch.equal(method.probe_inputs, x[:4]) and torch.equal(method.probe_labels, y[:4])
    assert batch.extras["train_mask"].tolist() == [False] * 4 + [True] * 6
    later = torch.tensor([7, 2, 9, 0])  # probe samples in a later batch stay masked
    method.set_progress(1, 8)
    assert method.make_batch(Batch(x[later], y[later], later)).extras["train_mask"].tolist() == [True, False, True,
                                                                                                  False]
    torch.manual_seed(0)
    s, t = torch.randn(10, 3), torch.randn(10, 3)
    T, alpha = method.current()
    terms = method.loss_terms(batch, Outputs(s), Outputs(t))
    assert terms["kd"].item() == pytest.approx(alpha * kl(s[4:], t[4:], temperature=T).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx((1 - alpha) * cross_entropy(s[4:], y[4:10]).item(), rel=1e-6)
    s[:4] = 100.0  # the probe's logits do not reach the loss
    assert method.loss_terms(batch, Outputs(s), Outputs(t))["ce"].item() == pytest.approx(terms["ce"].item())
    nll, acc = method.probe_scores()
    with torch.no_grad():
        logits = method._student.eval()(x[:4])
    method._student.train()
    assert nll == pytest.approx(torch.nn.functional.cross_entropy(logits, y[:4]).item(), rel=1e-6)
    assert acc == pytest.approx((logits.argmax(-1) == y[:4]).float().mean().item())


def test_the_arm_changes_only_at_epoch_boundaries():
    method = _method()
    arms = _drive(method, 15, steps_per_epoch=3)
    changed = [step for step in range(1, 15) if arms[step] != arms[step - 1]]
    assert changed == [3, 6, 9, 12]  # the first epochs play each arm once, in grid order
    assert arms[::3] == method.arms[:5]
    metrics = method.metrics()
    assert (metrics["temperature"], metrics["alpha"], metrics["arm"]) == (*method.arms[4], 4.0)
    assert all(math.isfinite(v) for v in metrics.values()) and {"reward", "probe_nll", "probe_acc"} <= set(metrics)


def test_state_round_trips_through_state_dict():
    student = _mlp()
    method = _method(student, exploration=0.05)
    _drive(method, 12, steps_per_epoch=1, total=30)
    copy = _method(student, exploration=0.05)  # a fresh controller on the same student
    assert copy.current() == method.arms[0] and copy.counts.sum() == 0
    copy.load_state_dict(method.state_dict())
    for name, value in method.state_dict().items():
        assert torch.equal(value, copy.state_dict()[name]), name
    assert copy.current() == method.current() and copy._filled == 4
    # Both continue identically: the same arms and the same bandit statistics.
    assert _drive(copy, 10, steps_per_epoch=1, total=30, start=12) == \
        _drive(method, 10, steps_per_epoch=1, total=30, start=12)
    assert torch.equal(copy.sums, method.sums)


def test_a_nan_reward_is_a_kdlab_error():
    student = _mlp()
    method = _method(student)
    _drive(method, 2, steps_per_epoch=2)  # epoch 1: the probe is filled and scored
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(math.nan)  # the student diverged
    with pytest.raises(KdlabError, match=r"rl_schedule: the reward of epoch 1 is nan"):
        _drive(method, 1, steps_per_epoch=2, start=2, total=4)
    with pytest.raises(KdlabError, match=r"rl_schedule: the reward of arm 0 is nan"):
        bandit_update(torch.zeros(2), torch.zeros(2), 0, math.nan)


@pytest.mark.parametrize(("options", "match"), [
    ({"temperatures": ()}, r"temperatures \(rl_schedule\)"),
    ({"temperatures": (0.0, 2.0)}, r"temperatures \(rl_schedule\)"),
    ({"alphas": (0.5, 1.5)}, r"alphas \(rl_schedule\)"),
    ({"exploration": -1.0}, r"exploration \(rl_schedule\)"),
    ({"discount": 0.0}, r"discount \(rl_schedule\)"),
    ({"probe_fraction": 0.7}, r"probe_fraction \(rl_schedule\)"),
    ({"reward": "loss"}, r"reward \(rl_schedule\)"),
])
def test_bad_hyperparameters_are_kdlab_errors_naming_the_method(options, match):
    with pytest.raises(KdlabError, match=match):
        _method(**options)


def test_it_needs_the_probe_sizes_and_batch_indices():
    with pytest.raises(KdlabError, match=r"rl_schedule: build it with .*train_size"):
        build_method(MethodConfig("rl_schedule", {}), student=_mlp(), teacher=_mlp(), input_shape=(1, 5))
    method = _method()
    with pytest.raises(KdlabError, match=r"rl_schedule: batches must carry"):
        method.make_batch(Batch(torch.rand(2, 1, 5), torch.tensor([0, 1])))


def test_resume_in_fit_picks_the_same_arms(tmp_path):
    splits = build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 120, "num_test": 30,
                                        "separation": 2.0}, root=None, cache_dir=tmp_path / "cache",
                          val_fraction=0.2, split_seed=0)  # 96 train samples, probe 10: 3 steps of 32 per epoch
    train = TrainConfig(epochs=4, batch_size=32, lr=0.05, eval_every=1, checkpoint_every=1, device="cpu")

    def build(seed=0):
        torch.manual_seed(0)
        teacher = build_model("mlp", {"width": 16}, splits)  # the same fixed teacher in every run
        torch.manual_seed(seed)
        student = build_model("mlp", {"width": 8}, splits)
        method = build_method(MethodConfig("rl_schedule", {"temperatures": (1.0, 4.0), "alphas": (0.5,)}),
                              student=student, teacher=teacher, input_shape=tuple(splits.input_shape),
                              train_size=len(splits.train[0]))
        return teacher, student, method

    teacher, student, method = build()
    logged = []
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=3, run_dir=tmp_path / "a",
        on_epoch=lambda e, m: logged.append(m))
    assert [m["method/arm"] for m in logged][:2] == [0.0, 1.0]  # round-robin over the 2 arms first
    assert all("method/reward" in m for m in logged[1:]) and float(method.counts.sum()) == 3  # 3 boundaries

    class Crash(Exception):
        pass

    def crash_in_epoch_3(epoch, metrics):
        if epoch == 3:
            raise Crash

    teacher, student, killed = build()
    with pytest.raises(Crash):
        fit(student=student, method=killed, teacher=teacher, splits=splits, train=train, seed=3,
            run_dir=tmp_path / "b", on_epoch=crash_in_epoch_3)
    assert json.loads((tmp_path / "b/checkpoints/latest.json").read_text())["epoch"] == 2
    teacher, student, resumed = build(seed=999)  # a fresh process: other weights, an empty controller
    fit(student=student, method=resumed, teacher=teacher, splits=splits, train=train, seed=3, run_dir=tmp_path / "b")
    for name, value in method.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.mark.parametrize(("options", "key", "fragment"), [
    ({"method": {"probe_fraction": 0.7}}, "method.probe_fraction", "in (0, 0.5]"),
    ({"method": {"temperatures": []}}, "method.temperatures", "non-empty"),
    ({"method": {"alphas": [0.5, float("nan")]}}, "method.alphas[1]", "finite"),
])
def test_the_config_refuses_rl_schedule_before_any_work(refuses_before_work, options, key, fragment):
    """``kdlab run --dry-run``: exit 2, one line naming the key, nothing written (no teacher trained first)."""
    refuses_before_work("rl_schedule", options, key, fragment)
