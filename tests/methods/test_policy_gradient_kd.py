"""policy_gradient_kd (MiniLLM-style on-policy distillation as RL), tested from its equations.

References are recomputed here in float64 from the two models' logits: the per-token reward
r_t = log p_T(y_t | y_<t, x) − log p_S(y_t | y_<t, x) on the canonical layout (logits at t
predict token t + 1; -100 labels at prompt and padding), returns-to-go on hand numbers, the
baselines, and the unbiasedness of the estimator against the exact gradient of the reverse KL
computed by enumerating every response of a tiny vocabulary.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method
from kdlab.engine.checkpoint import load_latest_checkpoint
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError, NonFiniteLossError
from kdlab.losses.sequence import sequence_divergence, shift_logits_and_mask
from kdlab.methods import policy_gradient_kd as pgkd  # registers "policy_gradient_kd"
from kdlab.methods.base import Batch, Outputs
from kdlab.seq.evaluate import max_new_tokens
from kdlab.seq.sampling import generate

IGNORE = -100
V = 6


# --------------------------------------------------------------------------- fixtures and helpers


def _reverse_splits(val_fraction: float = 0.0, **options):
    opts = {"num_train": 16, "num_test": 4, "max_length": 4}
    opts.update(options)
    return build_splits("reverse", opts, root=None, cache_dir="/tmp/kdlab-test-pgkd", val_fraction=val_fraction,
                        split_seed=0)


@pytest.fixture(scope="module")
def splits():
    return _reverse_splits()


def _tinygpt(splits, *, width: int, seed: int):
    torch.manual_seed(seed)
    return registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                            layers=1, width=width, heads=2)


@pytest.fixture(scope="module")
def models(splits):
    return _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)


def _method(splits, teacher, student, **options):
    torch.manual_seed(0)
    return build_method(MethodConfig("policy_gradient_kd", dict(options)), student=student, teacher=teacher,
                        input_shape=splits.input_shape, train_size=len(splits.train[0]), sequence=splits.sequence)


def _canonical_batch():
    """Three rows (prompt, response, EOS = 1, pad = 0) of unequal lengths, and per row (P, R)."""
    rows = [([2, 3, 4], [5, 2, 3]), ([4, 5], [3, 3, 2, 5]), ([2, 2, 3, 5], [4])]
    tokens = torch.zeros(3, 8, dtype=torch.long)
    labels = torch.full((3, 8), IGNORE, dtype=torch.long)
    spans = []
    for i, (prompt, response) in enumerate(rows):
        seq = prompt + response + [1]
        tokens[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt):len(seq)] = torch.tensor(response + [1])
        spans.append((len(prompt), len(response) + 1))
    return tokens, labels, spans


def _logits(seed: int, shape=(3, 8, V), scale: float = 2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _irrelevant_positions(spans, length):
    out = []
    for b, (p, r) in enumerate(spans):
        counted = set(range(p - 1, p - 1 + r))  # logits at p − 1 predict the first response token ... EOS
        out += [(b, t) for t in range(length) if t not in counted]
    return out


def _sampled_batch(splits, method, rows: int = 6):
    tokens, labels = splits.train[0][:rows], splits.train[1][:rows]
    return method.make_batch(Batch(tokens, labels, torch.arange(rows)))


# --------------------------------------------------------------------------- the reward


def test_reward_is_the_log_probability_difference_at_sampled_tokens(splits, models):
    teacher, student = models
    method = _method(splits, teacher, student)
    batch = _sampled_batch(splits, method)
    assert method.generation_calls["student"] == 1 and batch.extras["source"] == "student"
    with torch.no_grad():
        t_logits, s_logits = teacher(batch.inputs), student(batch.inputs)
    method.loss_terms(batch, Outputs(s_logits), Outputs(t_logits))
    rewards = method.last_terms.rewards
    log_p = torch.log_softmax(t_logits.double(), dim=-1)
    log_q = torch.log_softmax(s_logits.double(), dim=-1)
    labels = batch.labels
    counted = 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE:
                assert float(rewards[b, t]) == 0.0
                continue
            assert int(batch.inputs[b, t + 1]) == y  # the sampled token
            expected = float(log_p[b, t, y] - log_q[b, t, y])
            assert float(rewards[b, t]) == pytest.approx(expected, abs=1e-5)
            counted += 1
    assert counted == int((labels != IGNORE).sum()) > 0
    # Their sum per sequence is minus the sampled reverse KL (logged as method/reverse_kl).
    metrics = method.metrics()
    assert metrics["reverse_kl"] == pytest.approx(float(-rewards.sum(dim=1).double().mean()), rel=1e-5)
    assert method.metrics() == {}  # reset after each call


def test_prompt_and_pad_positions_get_no_reward_and_no_gradient():
    tokens, labels, spans = _canonical_batch()
    student, teacher = _logits(0), _logits(1)
    base = pgkd.policy_gradient_terms(student, teacher, labels, baseline="none")
    s2, t2 = student.clone(), teacher.clone()
    for b, t in _irrelevant_positions(spans, tokens.shape[1]):
        s2[b, t] = float("nan")
        t2[b, t] = float("inf")
    s2.requires_grad_(True)
    other = pgkd.policy_gradient_terms(s2, t2, labels, baseline="none")
    assert torch.equal(other.rewards, base.rewards)
    assert other.pg.item() == pytest.approx(base.pg.item(), rel=1e-6)
    assert other.single_step.item() == pytest.approx(base.single_step.item(), rel=1e-6)
    (other.pg + other.single_step).backward()
    assert torch.isfinite(s2.grad).all()
    for b, t in _irrelevant_positions(spans, tokens.shape[1]):
        if t < tokens.shape[1] - 1:
            assert float(other.rewards[b, t]) == 0.0
        assert torch.count_nonzero(s2.grad[b, t]) == 0, (b, t)
    assert s2.grad.abs().sum() > 0


# --------------------------------------------------------------------------- returns and baselines


def test_returns_to_go_on_hand_numbers():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 4.0, -2.0, 9.0]])
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    rtg = pgkd.returns_to_go
    torch.testing.assert_close(rtg(rewards, mask), torch.tensor([[0, 6.0, 5, 3, 0], [0, 0, 2.0, -2, 0]]))
    torch.testing.assert_close(rtg(rewards, mask, exclude_current=True),
                               torch.tensor([[0, 5.0, 3, 0, 0], [0, 0, -2.0, 0, 0]]))
    torch.testing.assert_close(rtg(rewards, mask, length_normalize=True),
                               torch.tensor([[0, 2.0, 2.5, 3, 0], [0, 0, 1.0, -2, 0]]))
    torch.testing.assert_close(rtg(rewards, mask, exclude_current=True, length_normalize=True),
                               torch.tensor([[0, 2.5, 3.0, 0, 0], [0, 0, -2.0, 0, 0]]))


def test_baselines_on_hand_numbers():
    # Rows start their responses at different columns: baselines pair up response offsets, not columns.
    returns = torch.tensor([[0.0, 1.0, 10.0, 0.0], [2.0, 20.0, 0.0, 0.0], [0.0, 0.0, 6.0, 30.0]])
    mask = torch.tensor([[False, True, True, False], [True, True, False, False], [False, False, True, True]])
    loo = pgkd.baselines(returns, mask, "loo")
    # Offset 0 holds 1, 2, 6; offset 1 holds 10, 20, 30.
    expected = torch.tensor([[0.0, 4.0, 25.0, 0.0], [3.5, 20.0, 0.0, 0.0], [0.0, 0.0, 1.5, 15.0]])
    torch.testing.assert_close(loo, expected)
    mean = pgkd.baselines(returns, mask, "batch_mean")
    torch.testing.assert_close(mean, torch.tensor([[0.0, 3.0, 20.0, 0.0], [3.0, 20.0, 0.0, 0.0],
                                                   [0.0, 0.0, 3.0, 20.0]]))
    torch.testing.assert_close(pgkd.baselines(returns, mask, "moving_average", moving_average=0.5),
                               torch.where(mask, 0.5, 0.0))
    assert torch.count_nonzero(pgkd.baselines(returns, mask, "none")) == 0
    # A position only one row reaches: no other row, no baseline (0, still unbiased).
    lone = pgkd.baselines(torch.tensor([[1.0, 5.0], [2.0, 0.0]]), torch.tensor([[True, True], [True, False]]), "loo")
    torch.testing.assert_close(lone, torch.tensor([[2.0, 0.0], [1.0, 0.0]]))


@pytest.mark.parametrize("baseline", ["loo", "batch_mean"])
def test_advantages_have_mean_zero_over_the_batch(splits, models, baseline):
    teacher, student = models
    method = _method(splits, teacher, student, baseline=baseline)
    batch = _sampled_batch(splits, method, rows=8)
    with torch.no_grad():
        method.loss_terms(batch, Outputs(student(batch.inputs)), Outputs(teacher(batch.inputs)))
    terms = method.last_terms
    mask = terms.mask
    offsets = torch.where(mask, mask.long().cumsum(1) - 1, 0)
    assert terms.returns[mask].abs().sum() > 0
    checked = 0
    for k in range(int(offsets[mask].max()) + 1):
        at = mask & (offsets == k)
        if int(at.sum()) >= 2:  # the leave-one-out advantages sum to 0 too (n/(n−1) × the batch-mean ones)
            assert float(terms.advantages[at].sum()) == pytest.approx(0.0, abs=1e-5)
            checked += 1
    assert checked >= 1
    assert abs(float(terms.advantages[mask].mean())) < 1e-5 or baseline == "loo"


def test_moving_average_baseline_is_state(splits, models):
    teacher, student = models
    method = _method(splits, teacher, student, baseline="moving_average", baseline_decay=0.5)
    assert "baseline_value" in method.state_dict()
    means = []
    for step in range(2):
        method.step = step
        batch = _sampled_batch(splits, method)
        before = float(method.baseline_value)
        with torch.no_grad():
            method.loss_terms(batch, Outputs(student(batch.inputs)), Outputs(teacher(batch.inputs)))
        terms = method.last_terms
        # This step's baseline is the value from earlier steps (0 at the first).
        torch.testing.assert_close(terms.baselines[terms.mask], torch.full_like(terms.returns[terms.mask], before))
        means.append(float(terms.returns[terms.mask].double().mean()))
    assert float(method.baseline_value) == pytest.approx(0.5 * means[0] + 0.5 * means[1], rel=1e-6)


# --------------------------------------------------------------------------- single step, identity, unbiasedness


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_single_step_term_is_the_token_level_reverse_kl(reduction):
    tokens, labels, _ = _canonical_batch()
    student = _logits(0).requires_grad_(True)
    teacher = _logits(1)
    terms = pgkd.policy_gradient_terms(student, teacher, labels, single_step=True, reduction=reduction)
    shifted, mask = shift_logits_and_mask(student, labels)
    expected = sequence_divergence(shifted, teacher[:, :-1], mask, divergence="reverse_kl", reduction=reduction)
    assert terms.single_step.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(terms.single_step, student)
    (reference,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-7)
    off = pgkd.policy_gradient_terms(student, teacher, labels, single_step=False, reduction=reduction)
    assert float(off.single_step) == 0.0


def test_student_equal_to_teacher_gives_zero_reward_and_zero_loss(splits, models):
    teacher, _ = models
    method = _method(splits, teacher, teacher)  # the student is the teacher
    batch = _sampled_batch(splits, method)
    logits = teacher(batch.inputs)
    terms = method.loss_terms(batch, Outputs(logits), Outputs(logits.detach()))
    last = method.last_terms
    assert torch.count_nonzero(last.rewards) == 0 and torch.count_nonzero(last.advantages) == 0
    assert terms["pg"].item() == 0.0 and terms["single_step"].item() == pytest.approx(0.0, abs=1e-6)
    teacher.zero_grad()
    terms["pg"].backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in teacher.parameters())
    teacher.zero_grad()


def _enumerated_reverse_kl(theta1, theta2, p1, p2):
    """Exact KL(q ‖ p) over all two-token responses: Σ_{y1} q(y1)[log q(y1)/p(y1) + KL(q(·|y1) ‖ p(·|y1))]."""
    log_q1, log_p1 = theta1.log_softmax(-1), p1.log_softmax(-1)
    log_q2, log_p2 = theta2.log_softmax(-1), p2.log_softmax(-1)
    inner = (log_q2.exp() * (log_q2 - log_p2)).sum(-1)  # (V,) per first token
    return (log_q1.exp() * (log_q1 - log_p1 + inner)).sum()


@pytest.mark.parametrize("single_step", [False, True])
@pytest.mark.parametrize("baseline", ["loo", "none"])
def test_expected_policy_gradient_is_the_gradient_of_the_reverse_kl(single_step, baseline):
    """Tabular student and teacher over a vocabulary of 3, responses of 2 tokens: the mean over many
    sampled responses of the estimator's gradient equals the exact ∇ KL(q ‖ p) (loose tolerance)."""
    vocab, n = 3, 20000
    g = torch.Generator().manual_seed(0)
    theta1 = torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_(True)
    theta2 = torch.randn(vocab, vocab, generator=g, dtype=torch.float64).requires_grad_(True)
    p1 = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    p2 = torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * 2
    exact = torch.autograd.grad(_enumerated_reverse_kl(theta1, theta2, p1, p2), (theta1, theta2))

    sampler = torch.Generator().manual_seed(1)
    with torch.no_grad():
        y1 = torch.multinomial(theta1.softmax(-1).expand(n, vocab), 1, generator=sampler).squeeze(-1)
        y2 = torch.multinomial(theta2.softmax(-1)[y1], 1, generator=sampler).squeeze(-1)
    labels = torch.stack([torch.full_like(y1, IGNORE), y1, y2], dim=1)  # prompt token, then two response tokens
    filler = torch.zeros(n, vocab, dtype=torch.float64)
    student = torch.stack([theta1.expand(n, vocab), theta2[y1], filler], dim=1)
    teacher = torch.stack([p1.expand(n, vocab), p2[y1], filler], dim=1)
    terms = pgkd.policy_gradient_terms(student, teacher, labels, single_step=single_step, length_normalize=False,
                                       baseline=baseline, reduction="sum")
    estimate = torch.autograd.grad(terms.pg + terms.single_step, (theta1, theta2))
    for got, want in zip(estimate, exact):
        assert (got - want).abs().max() < 0.02 + 0.04 * want.abs().max(), (got, want)
    assert max(w.abs().max() for w in exact) > 0.2  # a gradient worth checking


def test_one_token_responses_single_step_is_exact():
    """1-step responses: the single-step term alone is the whole gradient (R_{t+1} = 0), with no noise."""
    vocab, n = 4, 64
    theta = torch.randn(vocab, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_(True)
    p = torch.randn(vocab, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.multinomial(theta.detach().softmax(-1).expand(n, vocab), 1, generator=torch.Generator().manual_seed(5))
    labels = torch.cat([torch.full_like(y, IGNORE), y], dim=1)
    student = torch.stack([theta.expand(n, vocab), torch.zeros(n, vocab, dtype=torch.float64)], dim=1)
    teacher = torch.stack([p.expand(n, vocab), torch.zeros(n, vocab, dtype=torch.float64)], dim=1)
    terms = pgkd.policy_gradient_terms(student, teacher, labels, single_step=True, length_normalize=False)
    (grad,) = torch.autograd.grad(terms.pg + terms.single_step, theta)
    log_q, log_p = theta.log_softmax(-1), p.log_softmax(-1)
    (exact,) = torch.autograd.grad((log_q.exp() * (log_q - log_p)).sum(), theta)
    torch.testing.assert_close(grad, exact, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- task reward (GKD Eq. 5)


def test_task_reward_uses_is_correct(splits, models):
    teacher, student = models
    method = _method(splits, teacher, student, task_reward_weight=0.25)
    tokens, labels = splits.train[0][:4], splits.train[1][:4]  # the reference responses are the oracle's
    assert method.task_rewards(tokens, labels).tolist() == [1.0] * 4
    wrong = tokens.clone()
    first = int((labels[0] != IGNORE).int().argmax())
    wrong[0, first] = tokens[0, first + 1] if tokens[0, first + 1] != tokens[0, first] else splits.sequence.eos_id
    assert method.task_rewards(wrong, torch.where(labels != IGNORE, wrong, labels)).tolist() == [0.0, 1.0, 1.0, 1.0]

    # The return: α·R_t + (1 − α)·r_task, α = 1 − task_reward_weight.
    with torch.no_grad():
        t_logits, s_logits = teacher(tokens), student(tokens)
    method.loss_terms(Batch(tokens, labels, torch.arange(4)), Outputs(s_logits), Outputs(t_logits))
    terms = method.last_terms
    kd_only = pgkd.returns_to_go(terms.rewards, terms.mask, exclude_current=True, length_normalize=True)
    torch.testing.assert_close(terms.returns, torch.where(terms.mask, 0.75 * kd_only + 0.25, 0.0))
    assert method.metrics()["task_reward"] == 1.0


def test_pure_task_reward_is_reinforce_on_exact_match():
    _, labels, _ = _canonical_batch()
    reward = torch.tensor([1.0, 0.0, 1.0])
    terms = pgkd.policy_gradient_terms(_logits(0), _logits(1), labels, task_reward=reward, task_reward_weight=1.0,
                                       baseline="none")
    torch.testing.assert_close(terms.returns, torch.where(terms.mask, reward[:, None], 0.0))
    assert float(terms.single_step) == 0.0
    with pytest.raises(KdlabError, match="task reward"):
        pgkd.policy_gradient_terms(_logits(0), _logits(1), labels, task_reward_weight=0.5)


# --------------------------------------------------------------------------- teacher-mixed sampling


def _prompts(splits, rows=5):
    tokens, labels = splits.train[0][:rows], splits.train[1][:rows]
    lengths = (labels != IGNORE).int().argmax(dim=1)
    width = int(lengths.max())
    prompts = torch.where(torch.arange(width) < lengths[:, None], tokens[:, :width], splits.sequence.pad_id)
    options = dict(max_new_tokens=max_new_tokens(splits.sequence, width), eos_id=splits.sequence.eos_id,
                   pad_id=splits.sequence.pad_id)
    return prompts, lengths, options


def test_teacher_mixed_sampling_ends_are_the_two_models(splits, models):
    teacher, student = models
    prompts, lengths, options = _prompts(splits)
    for alpha, model in ((0.0, student), (1.0, teacher)):
        mixed = pgkd.teacher_mixed_generate(student, teacher, prompts, lengths, alpha=alpha,
                                            generator=torch.Generator().manual_seed(7), **options)
        alone = generate(model, prompts, lengths, temperature=1.0, generator=torch.Generator().manual_seed(7),
                         **options)
        assert torch.equal(mixed.tokens, alone.tokens) and torch.equal(mixed.labels, alone.labels)
    cached = pgkd.teacher_mixed_generate(student, teacher, prompts, lengths, alpha=0.3,
                                         generator=torch.Generator().manual_seed(8), **options)
    full = pgkd.teacher_mixed_generate(student, teacher, prompts, lengths, alpha=0.3, use_cache=False,
                                       generator=torch.Generator().manual_seed(8), **options)
    assert torch.equal(cached.tokens, full.tokens)


def test_teacher_mixed_importance_weights(splits, models):
    teacher, student = models
    alpha = 0.4
    method = _method(splits, teacher, student, teacher_mix_alpha=alpha, importance_clip=None)
    batch = _sampled_batch(splits, method)
    assert batch.extras["source"] == "mixed" and method.generation_calls == {"student": 0, "mixed": 1}
    with torch.no_grad():
        t_logits, s_logits = teacher(batch.inputs), student(batch.inputs)
    method.loss_terms(batch, Outputs(s_logits), Outputs(t_logits))
    terms = method.last_terms
    q = torch.softmax(s_logits.double(), -1)[:, :-1]
    p = torch.softmax(t_logits.double(), -1)[:, :-1]
    y = batch.labels[:, 1:].clamp_min(0)[..., None]
    q_y, p_y = q.gather(-1, y).squeeze(-1), p.gather(-1, y).squeeze(-1)
    expected = torch.where(terms.mask, q_y / (alpha * p_y + (1 - alpha) * q_y), 0.0)
    torch.testing.assert_close(terms.weights.double(), expected, rtol=1e-5, atol=1e-7)
    assert float(terms.weights[terms.mask].max()) <= 1 / (1 - alpha) + 1e-6


def test_importance_clip_is_ppo_style():
    """max(−A·w·ρ, −A·clip(w·ρ)): clipped tokens whose clip is the pessimistic branch get no gradient."""
    tokens, labels, _ = _canonical_batch()
    student, teacher = _logits(0).requires_grad_(True), _logits(1)
    clipped = pgkd.policy_gradient_terms(student, teacher, labels, mix_alpha=0.5, importance_clip=0.01)
    free = pgkd.policy_gradient_terms(student, teacher, labels, mix_alpha=0.5, importance_clip=None)
    (g_clip,) = torch.autograd.grad(clipped.pg, student)
    (g_free,) = torch.autograd.grad(free.pg, student)
    w, a, mask = free.weights, free.advantages, free.mask
    active = mask & ~(((w > 1.01) & (a > 0)) | ((w < 0.99) & (a < 0)))  # tokens the clip leaves with a gradient
    assert (mask & ~active).any()
    shifted = g_clip[:, :-1]
    for b, t in (mask & ~active).nonzero().tolist():
        assert torch.count_nonzero(shifted[b, t]) == 0
    for b, t in active.nonzero().tolist():
        torch.testing.assert_close(shifted[b, t], g_free[:, :-1][b, t])


# --------------------------------------------------------------------------- end to end


def _train_config(**options):
    base = dict(steps=3, batch_size=6, lr=0.01, device="cpu", eval_every=1, checkpoint_every=100)
    base.update(options)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def fit_splits():
    return _reverse_splits(val_fraction=0.25, num_train=24, num_test=6)


@pytest.mark.parametrize("options", [
    {},
    {"teacher_mix_alpha": 0.2, "task_reward_weight": 0.5, "baseline": "moving_average", "single_step": False,
     "length_normalize": False, "whiten": True, "reduction": "sum", "sft_steps": 1},
])
def test_fit_end_to_end(fit_splits, options):
    splits = fit_splits
    teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
    method = _method(splits, teacher, student, **options)
    logged = []
    result = fit(student=student, method=method, teacher=teacher, splits=splits, train=_train_config(), seed=0,
                 on_epoch=lambda epoch, metrics: logged.append(metrics))
    terms = {k: v for k, v in logged[-1].items() if k.startswith("train/loss")}
    assert {"train/loss/sft", "train/loss/pg", "train/loss/single_step", "train/loss"} <= set(terms)
    assert all(math.isfinite(v) for v in terms.values())
    for key in ("method/reverse_kl", "method/token_reverse_kl", "method/task_reward", "method/response_length"):
        assert key in logged[-1] and math.isfinite(logged[-1][key]), key
    assert math.isfinite(result.final["test/acc"])
    sampled = 3 - options.get("sft_steps", 0)
    assert sum(method.generation_calls.values()) == sampled
    if options.get("teacher_mix_alpha"):
        assert method.generation_calls["mixed"] == sampled
        assert float(method.baseline_value) != 0.0


class _Crash(Exception):
    pass


def test_resume_matches_uninterrupted_run(fit_splits, tmp_path):
    """Samples are seeded by step and the moving-average baseline is checkpointed with the method."""
    splits = fit_splits
    train = TrainConfig(epochs=3, batch_size=6, lr=0.01, device="cpu", checkpoint_every=1)
    options = {"baseline": "moving_average", "teacher_mix_alpha": 0.2, "task_reward_weight": 0.3}

    def build():
        teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
        return teacher, student, _method(splits, teacher, student, **options)

    teacher, student, method = build()
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
        run_dir=tmp_path / "straight")
    straight = {k: v.clone() for k, v in student.state_dict().items()}
    straight_baseline = float(method.baseline_value)

    def crash_after_epoch_2(epoch, metrics):
        if epoch == 2:
            raise _Crash

    teacher, student, method = build()
    with pytest.raises(_Crash):
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
            run_dir=tmp_path / "killed", on_epoch=crash_after_epoch_2)
    teacher, student, method = build()
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
        run_dir=tmp_path / "killed")
    assert float(method.baseline_value) == pytest.approx(straight_baseline, rel=1e-6)
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, straight[name], rtol=0, atol=1e-6, msg=name)


class _Poisonable(torch.nn.Module):
    """A teacher whose logits become NaN once ``poisoned`` is set."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.context_length = inner.context_length
        self.vocab_size = inner.vocab_size
        self.poisoned = False

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if not self.poisoned:
            return out
        if isinstance(out, tuple):
            return out[0] * float("nan"), out[1]
        return out * float("nan")


def test_nan_reward_raises_and_the_last_good_checkpoint_is_kept(fit_splits, tmp_path):
    splits = fit_splits
    teacher = _Poisonable(_tinygpt(splits, width=16, seed=1))
    student = _tinygpt(splits, width=8, seed=2)
    method = _method(splits, teacher, student)

    def poison_after_epoch_1(epoch, metrics):
        teacher.poisoned = True

    train = TrainConfig(epochs=2, batch_size=6, lr=0.01, device="cpu", checkpoint_every=1)
    with pytest.raises(KdlabError, match="reward became NaN") as caught:
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
            run_dir=tmp_path, on_epoch=poison_after_epoch_1)
    assert isinstance(caught.value, NonFiniteLossError) and "'pg'" in str(caught.value)
    tensors, state = load_latest_checkpoint(tmp_path / "checkpoints")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("student."))


def test_infinite_single_step_term_raises():
    """A token the teacher rules out (−inf logit) makes the token-level reverse KL infinite: stop."""
    tokens, labels, spans = _canonical_batch()
    teacher = _logits(1)
    p, _ = spans[0]
    teacher[0, p, 0] = float("-inf")  # a token the sampled response did not use
    assert int(labels[0, p + 1]) != 0
    with pytest.raises(pgkd.RewardError, match="term 'single_step'"):
        pgkd.policy_gradient_terms(_logits(0), teacher, labels, single_step=True)
    off = pgkd.policy_gradient_terms(_logits(0), teacher, labels, single_step=False)
    assert torch.isfinite(off.pg)


def test_nan_teacher_in_mixed_sampling_raises(splits, models):
    teacher, student = models
    prompts, lengths, options = _prompts(splits)
    poisoned = _Poisonable(teacher)
    poisoned.poisoned = True
    with pytest.raises(NonFiniteLossError, match="teacher-mixed sampling distribution became NaN"):
        pgkd.teacher_mixed_generate(student, poisoned, prompts, lengths, alpha=0.2, **options)


def test_nan_teacher_logits_in_the_response_raise():
    tokens, labels, spans = _canonical_batch()
    teacher = _logits(1)
    p, _ = spans[1]
    teacher[1, p] = float("nan")
    with pytest.raises(pgkd.RewardError, match=r"reward became NaN .*term 'pg'.*row 1"):
        pgkd.policy_gradient_terms(_logits(0), teacher, labels)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("key,value", [("baseline", "ema"), ("reduction", "mean"), ("teacher_mix_alpha", 1.0),
                                       ("task_reward_weight", 1.5), ("importance_clip", 0.0),
                                       ("baseline_decay", 1.0), ("sft_steps", -1)])
def test_bad_hyperparameters_are_refused(splits, models, key, value):
    teacher, student = models
    with pytest.raises(KdlabError, match=key):
        _method(splits, teacher, student, **{key: value})


def test_on_a_classification_dataset_is_refused():
    digits = build_splits("digits", {}, root=None, cache_dir="/tmp/kdlab-test-pgkd", val_fraction=0.1, split_seed=0)
    mlp = registry.get("model", "mlp")
    net = mlp(input_shape=digits.input_shape, num_classes=10, mean=digits.mean, std=digits.std, width=8)
    with pytest.raises(KdlabError, match="sequence"):
        build_method(MethodConfig("policy_gradient_kd", {}), student=net, teacher=net,
                     input_shape=digits.input_shape, sequence=digits.sequence)
