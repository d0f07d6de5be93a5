"""GKD (Agarwal et al., ICLR 2024, arXiv 2306.13649), tested from the paper's equations.

The reference values are computed here in float64 with explicit loops, independently of
``kdlab.losses.sequence``: Eq. 2 (per-sequence mean over the response tokens, then the mean
over sequences), Eq. 1 (generalized JSD with the mixture M = βP + (1 − β)Q in probability
space, P = teacher, Q = student), Algorithm 1 (a seeded per-step draw u; u ≤ λ → the student
samples the responses, with no gradient through the sampling), SeqKD (the teacher's greedy
responses, cached per prompt) and the canonical causal-LM layout (logits at t predict token
t + 1; labels hold the response tokens, EOS included, and -100 at prompt and padding).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, check_class_counts
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.losses.sequence import count_denominator, sequence_divergence, shift_logits_and_mask
from kdlab.methods.base import Batch, Outputs
from kdlab.seq import sampling
from kdlab.seq.evaluate import max_new_tokens
from kdlab.seq.sampling import Generation, generate
from kdlab.seq.tinygpt import TinyGPT

IGNORE = -100
V = 6  # vocabulary of the hand-built batch

# --------------------------------------------------------------------------- fixtures and helpers


def _reverse_splits(val_fraction: float = 0.0, **options):
    opts = {"num_train": 16, "num_test": 4, "max_length": 4}
    opts.update(options)
    return build_splits("reverse", opts, root=None, cache_dir="/tmp/kdlab-test-gkd", val_fraction=val_fraction,
                        split_seed=0)


@pytest.fixture(scope="module")
def splits():
    return _reverse_splits()


def _tinygpt(splits, *, width: int, seed: int, layers: int = 1, heads: int = 2, **options):
    torch.manual_seed(seed)
    return registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                            layers=layers, width=width, heads=heads, **options)


@pytest.fixture(scope="module")
def models(splits):
    """(teacher, student): tiny tinygpt models of the task's vocabulary and context."""
    return _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)


def _method(splits, models, *, seed: int = 0, **options):
    teacher, student = models
    torch.manual_seed(seed)
    return build_method(MethodConfig("gkd", dict(options)), student=student, teacher=teacher,
                        input_shape=splits.input_shape, train_size=len(splits.train[0]), sequence=splits.sequence)


def _canonical_batch():
    """Three rows in the canonical layout (prompt, response, EOS = 1, pad = 0) and their spans.

    Returns tokens, labels and, per row, (prompt length P, number of response labels R incl. EOS).
    """
    rows = [  # (prompt, response without EOS)
        ([2, 3, 4], [5, 2, 3]),
        ([4, 5], [3, 3, 2, 5]),
        ([2, 2, 3, 5], [4]),
    ]
    length = 8
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    spans = []
    for i, (prompt, response) in enumerate(rows):
        seq = prompt + response + [1]
        tokens[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt):len(seq)] = torch.tensor(response + [1])
        spans.append((len(prompt), len(response) + 1))
    return tokens, labels, spans


def _logits(seed: int, shape=(3, 8, V), scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _token_divergence(s_row, t_row, divergence: str, beta: float, ts: float, tt: float) -> float:
    """One position's divergence between P = softmax(t/tt) (teacher) and Q = softmax(s/ts) (student), float64."""
    s = [float(x) / ts for x in s_row]
    t = [float(x) / tt for x in t_row]
    zs = math.log(sum(math.exp(x - max(s)) for x in s)) + max(s)
    zt = math.log(sum(math.exp(x - max(t)) for x in t)) + max(t)
    q = [math.exp(x - zs) for x in s]
    p = [math.exp(x - zt) for x in t]

    def kl(a, b):
        return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)

    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    assert divergence == "jsd"
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]  # the mixture over probabilities
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _reference_gkd(student_logits, teacher_logits, labels, *, divergence, beta=0.5, ts=1.0, tt=1.0,
                   reduction="sequence") -> float:
    """Eq. 2 by hand: logits at t against label t + 1; sequence = mean of per-sequence means."""
    per_sequence, all_tokens = [], []
    for b in range(labels.shape[0]):
        values = []
        for t in range(labels.shape[1] - 1):
            if int(labels[b, t + 1]) == IGNORE:
                continue
            values.append(_token_divergence(student_logits[b, t].tolist(), teacher_logits[b, t].tolist(),
                                            divergence, beta, ts, tt))
        all_tokens += values
        if values:
            per_sequence.append(sum(values) / len(values))
    if reduction == "token":
        return sum(all_tokens) / len(all_tokens)
    return sum(per_sequence) / len(per_sequence)


def _reference_ce(logits, labels, reduction="sequence") -> float:
    """Next-token cross-entropy by hand: -log softmax(logits[b, t])[labels[b, t + 1]] over response labels."""
    per_sequence, all_tokens = [], []
    for b in range(labels.shape[0]):
        values = []
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE:
                continue
            row = [float(x) for x in logits[b, t]]
            top = max(row)
            values.append(math.log(sum(math.exp(x - top) for x in row)) + top - row[target])
        all_tokens += values
        if values:
            per_sequence.append(sum(values) / len(values))
    if reduction == "token":
        return sum(all_tokens) / len(all_tokens)
    return sum(per_sequence) / len(per_sequence)


def _gkd_loss(method, batch, student_logits, teacher_logits):
    return method.loss_terms(batch, Outputs(student_logits), Outputs(teacher_logits))["gkd"]


class _CountingGenerate:
    """Stands in for ``kdlab.seq.sampling.generate``: counts calls, then delegates to the real one."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __call__(self, model, prompts, prompt_lengths, **kwargs):
        self.calls.append({"model": model, "rows": int(prompts.shape[0]), **kwargs})
        return self.real(model, prompts, prompt_lengths, **kwargs)


class _FakeGenerate:
    """A cheap ``generate``: a response of one EOS to every prompt (for schedule-only tests)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, prompts, prompt_lengths, *, eos_id, pad_id, **kwargs):
        self.calls += 1
        responses = torch.full((prompts.shape[0], 1), eos_id, dtype=torch.long)
        response_lengths = torch.ones(prompts.shape[0], dtype=torch.long)
        tokens, labels = sampling.pack_canonical(prompts, prompt_lengths, responses, response_lengths, pad_id=pad_id)
        return Generation(tokens, labels, prompt_lengths, response_lengths)


# --------------------------------------------------------------------------- the loss (Eq. 1, Eq. 2)

CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("ts,tt", [(1.0, 1.0), (2.0, 0.5)])
def test_loss_matches_float64_reference(splits, models, divergence, beta, reduction, ts, tt):
    tokens, labels, _ = _canonical_batch()
    method = _method(splits, models, divergence=divergence, beta=beta, reduction=reduction,
                     student_temperature=ts, teacher_temperature=tt, on_policy_fraction=0.0)
    student, teacher = _logits(0), _logits(1)
    terms = method.loss_terms(Batch(tokens, labels, torch.arange(3)), Outputs(student), Outputs(teacher))
    expected = _reference_gkd(student.double(), teacher.double(), labels, divergence=divergence, beta=beta,
                              ts=ts, tt=tt, reduction=reduction)
    assert set(terms) == {"sft", "gkd"}
    assert float(terms["sft"]) == 0.0
    assert float(terms["gkd"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_jsd_ends_are_the_kl_divergences(splits, models):
    """β = 0 and β = 1 are explicit branches: forward KL(P‖Q) and reverse KL(Q‖P) (not the 0 of the formula)."""
    tokens, labels, _ = _canonical_batch()
    batch = Batch(tokens, labels, torch.arange(3))
    student, teacher = _logits(0), _logits(1)
    for beta, name in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        value = _gkd_loss(_method(splits, models, divergence="jsd", beta=beta), batch, student, teacher)
        expected = _reference_gkd(student.double(), teacher.double(), labels, divergence=name)
        assert float(value) == pytest.approx(expected, rel=1e-5)
        assert expected > 1e-2


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_scaled_jsd_divides_by_beta_one_minus_beta(splits, models, beta):
    tokens, labels, _ = _canonical_batch()
    batch = Batch(tokens, labels, torch.arange(3))
    student, teacher = _logits(0), _logits(1)
    value = _gkd_loss(_method(splits, models, divergence="jsd", beta=beta, scaled_jsd=True), batch, student, teacher)
    expected = _reference_gkd(student.double(), teacher.double(), labels, divergence="jsd", beta=beta)
    assert float(value) == pytest.approx(expected / (beta * (1 - beta)), rel=1e-5)


def test_chunked_divergence_equals_unchunked(splits, models):
    tokens, labels, _ = _canonical_batch()
    batch = Batch(tokens, labels, torch.arange(3))
    teacher = _logits(1)
    values, grads = [], []
    for chunk_size in (None, 3):
        student = _logits(0).requires_grad_(True)
        loss = _gkd_loss(_method(splits, models, divergence="jsd", beta=0.9, chunk_size=chunk_size), batch,
                         student, teacher)
        loss.backward()
        values.append(loss.item())
        grads.append(student.grad)
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_sequence_and_token_reductions_differ_on_unequal_lengths(splits, models):
    """Eq. 2 weighs each sequence equally; the token reduction weighs each token: not the same here."""
    tokens, labels, _ = _canonical_batch()
    student, teacher = _logits(0), _logits(1)
    batch = Batch(tokens, labels, torch.arange(3))
    by_sequence = _gkd_loss(_method(splits, models, divergence="forward_kl"), batch, student, teacher)
    by_token = _gkd_loss(_method(splits, models, divergence="forward_kl", reduction="token"), batch, student, teacher)
    assert abs(float(by_sequence) - float(by_token)) > 1e-4


def _irrelevant_positions(spans, length):
    """Logit positions whose next token is prompt or padding (or which have no next token)."""
    out = []
    for b, (p, r) in enumerate(spans):
        counted = set(range(p - 1, p - 1 + r))  # logits at p-1 predict the first response token ... EOS
        out += [(b, t) for t in range(length) if t not in counted]
    return out


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.9)])
def test_prompt_and_pad_positions_contribute_nothing(splits, models, divergence, beta):
    tokens, labels, spans = _canonical_batch()
    method = _method(splits, models, divergence=divergence, beta=beta)
    student, teacher = _logits(0), _logits(1)
    batch = Batch(tokens, labels, torch.arange(3))
    base = float(_gkd_loss(method, batch, student, teacher))
    s2, t2 = student.clone(), teacher.clone()
    noise_s, noise_t = _logits(7, scale=50.0), _logits(8, scale=50.0)
    for b, t in _irrelevant_positions(spans, tokens.shape[1]):
        s2[b, t] = noise_s[b, t]
        t2[b, t] = noise_t[b, t]
    assert float(_gkd_loss(method, batch, s2, t2)) == pytest.approx(base, rel=1e-6)
    # The gradient does not reach those positions either.
    s3 = student.clone().requires_grad_(True)
    _gkd_loss(method, batch, s3, teacher).backward()
    for b, t in _irrelevant_positions(spans, tokens.shape[1]):
        assert torch.count_nonzero(s3.grad[b, t]) == 0, (b, t)


def test_shift_and_eos_position(splits, models):
    """Logits at t predict token t + 1: the position before the first response token counts, the one
    predicting EOS counts (EOS is a label), and the logits at the EOS token itself do not."""
    tokens, labels, spans = _canonical_batch()
    method = _method(splits, models, divergence="forward_kl")
    student, teacher = _logits(0), _logits(1)
    batch = Batch(tokens, labels, torch.arange(3))
    base = float(_gkd_loss(method, batch, student, teacher))
    p, r = spans[0]

    def changed(position):
        s2 = student.clone()
        s2[0, position] = _logits(9)[0, 0] * 10
        return float(_gkd_loss(method, batch, s2, teacher))

    assert labels[0, p - 1] == IGNORE and labels[0, p] != IGNORE  # p - 1 is the last prompt token
    assert changed(p - 1) != pytest.approx(base, rel=1e-6)  # predicts the first response token
    eos_at = p + r - 1
    assert tokens[0, eos_at] == 1 and labels[0, eos_at] == 1
    assert changed(eos_at - 1) != pytest.approx(base, rel=1e-6)  # predicts EOS: counts
    assert changed(eos_at) == pytest.approx(base, rel=1e-6)  # the EOS token's own logits: nothing follows


def test_only_eos_responses_count(splits, models):
    """A row whose response is just EOS still contributes one token (the EOS prediction)."""
    tokens = torch.tensor([[2, 3, 1, 0], [2, 4, 5, 1]])
    labels = torch.tensor([[IGNORE, IGNORE, 1, IGNORE], [IGNORE, IGNORE, 5, 1]])
    method = _method(splits, models, divergence="reverse_kl")
    student, teacher = _logits(3, (2, 4, V)), _logits(4, (2, 4, V))
    value = float(_gkd_loss(method, Batch(tokens, labels), student, teacher))
    expected = _reference_gkd(student.double(), teacher.double(), labels, divergence="reverse_kl")
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_ce_divergence_is_next_token_cross_entropy(splits, models, reduction):
    tokens, labels, _ = _canonical_batch()
    method = _method(splits, models, divergence="ce", reduction=reduction)
    student, teacher = _logits(0), _logits(1)
    terms = method.loss_terms(Batch(tokens, labels, torch.arange(3)), Outputs(student), Outputs(teacher))
    assert float(terms["gkd"]) == pytest.approx(_reference_ce(student.double(), labels, reduction), rel=1e-5)
    # Hard targets: the teacher's logits play no part.
    other = method.loss_terms(Batch(tokens, labels, torch.arange(3)), Outputs(student), Outputs(_logits(5)))
    assert float(other["gkd"]) == pytest.approx(float(terms["gkd"]), rel=1e-7)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_micro_batches_sum_to_the_full_batch_loss(splits, models, reduction):
    """With the full batch's denominator, sequence_divergence over micro-batches of real tinygpt
    outputs sums to the method's full-batch loss (values and gradients)."""
    teacher, student = models
    tokens, labels = splits.train[0][:8], splits.train[1][:8]
    method = _method(splits, models, divergence="jsd", beta=0.5, reduction=reduction)
    batch = Batch(tokens, labels, torch.arange(8))
    with torch.no_grad():
        teacher_logits = teacher(tokens)

    student.zero_grad()
    full = _gkd_loss(method, batch, student(tokens), teacher_logits)
    full.backward()
    full_grads = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    s_all, mask = shift_logits_and_mask(student(tokens), labels)
    denominator = count_denominator(mask, reduction)
    total = 0.0
    for start in range(0, 8, 3):
        part = sequence_divergence(s_all[start:start + 3], teacher_logits[start:start + 3, :-1],
                                   mask[start:start + 3], divergence="jsd", beta=0.5, reduction=reduction,
                                   denominator=denominator)
        total = total + part
    total.backward()
    assert total.item() == pytest.approx(full.item(), rel=1e-5)
    for g_full, p in zip(full_grads, student.parameters()):
        torch.testing.assert_close(p.grad, g_full, rtol=1e-4, atol=1e-7)
    student.zero_grad()


# --------------------------------------------------------------------------- the data-source schedule


def _run_schedule(method, steps, *, between=None):
    """make_batch at steps 0..steps-1; the source of each step (read from the batch's extras)."""
    tokens, labels = _canonical_batch()[:2]
    sources = []
    for step in range(steps):
        method.step = step
        if between is not None:
            between(step)
        out = method.make_batch(Batch(tokens, labels, torch.arange(3)))
        sources.append(out.extras.get("source", method.last_source))
    return sources


def test_lambda_zero_never_generates(splits, models, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("λ = 0 must not generate")

    monkeypatch.setattr(sampling, "generate", refuse)
    method = _method(splits, models, on_policy_fraction=0.0)
    sources = _run_schedule(method, 200)
    assert set(sources) == {"data"}
    assert method.generation_calls == {"student": 0, "teacher": 0}


def test_lambda_one_always_generates(splits, models, monkeypatch):
    fake = _FakeGenerate()
    monkeypatch.setattr(sampling, "generate", fake)
    method = _method(splits, models, on_policy_fraction=1.0)
    sources = _run_schedule(method, 200)
    assert set(sources) == {"student"}
    assert fake.calls == 200 and method.generation_calls["student"] == 200


def test_lambda_half_is_about_half_and_seeded(splits, models, monkeypatch):
    fake = _FakeGenerate()
    monkeypatch.setattr(sampling, "generate", fake)
    first = _run_schedule(_method(splits, models, on_policy_fraction=0.5, seed=11), 400)
    on_policy = first.count("student")
    assert fake.calls == on_policy
    assert 160 <= on_policy <= 240  # Binomial(400, 0.5): mean 200, sd 10
    assert set(first) == {"student", "data"}

    # Same seed at construction -> same sources, whatever random numbers other code draws in between.
    again = _run_schedule(_method(splits, models, on_policy_fraction=0.5, seed=11), 400,
                          between=lambda step: torch.rand(step % 7 + 1))
    assert again == first
    # Another seed -> another sequence.
    other = _run_schedule(_method(splits, models, on_policy_fraction=0.5, seed=12), 400)
    assert other != first


def test_lambda_quarter_fraction(splits, models, monkeypatch):
    monkeypatch.setattr(sampling, "generate", _FakeGenerate())
    sources = _run_schedule(_method(splits, models, on_policy_fraction=0.25, seed=3), 400)
    assert 60 <= sources.count("student") <= 140  # mean 100, sd ≈ 8.7


def test_sft_steps_use_data_and_the_sft_term_only(splits, models, monkeypatch):
    fake = _FakeGenerate()
    monkeypatch.setattr(sampling, "generate", fake)
    method = _method(splits, models, on_policy_fraction=1.0, sft_steps=3)
    tokens, labels, _ = _canonical_batch()
    student, teacher = _logits(0), _logits(1)
    for step in range(3):
        method.step = step
        batch = method.make_batch(Batch(tokens, labels, torch.arange(3)))
        assert fake.calls == 0
        assert torch.equal(batch.inputs, tokens) and torch.equal(batch.labels, labels)
        terms = method.loss_terms(batch, Outputs(student), Outputs(teacher))
        assert float(terms["gkd"]) == 0.0
        assert float(terms["sft"]) == pytest.approx(_reference_ce(student.double(), labels), rel=1e-5)
    method.step = 3
    batch = method.make_batch(Batch(tokens, labels, torch.arange(3)))
    assert fake.calls == 1
    terms = method.loss_terms(batch, Outputs(_logits(0, (3, batch.inputs.shape[1], V))),
                              Outputs(_logits(1, (3, batch.inputs.shape[1], V))))
    assert float(terms["sft"]) == 0.0 and float(terms["gkd"]) > 0.0


# --------------------------------------------------------------------------- on-policy: no gradient through sampling


def test_on_policy_batch_is_fixed_data_for_the_gradient(splits, models):
    teacher, student = models
    tokens, labels = splits.train[0][:6], splits.train[1][:6]
    on_policy = _method(splits, models, on_policy_fraction=1.0, divergence="jsd", beta=0.5, seed=4)
    student.train()
    batch = on_policy.make_batch(Batch(tokens, labels, torch.arange(6)))
    assert on_policy.generation_calls["student"] == 1 and on_policy.generation_calls["teacher"] == 0
    assert student.training  # generation restored the student's mode
    assert batch.inputs.dtype == torch.int64 and batch.labels.dtype == torch.int64
    assert not batch.inputs.requires_grad and batch.inputs.grad_fn is None and batch.labels.grad_fn is None
    # Same prompts; the responses are the student's, in the canonical layout.
    lengths = (labels != IGNORE).int().argmax(dim=1)
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(batch.inputs[i, :n], tokens[i, :n])
        assert (batch.labels[i, :n] == IGNORE).all() and batch.labels[i, n] != IGNORE
        response = batch.labels[i][batch.labels[i] != IGNORE]
        assert torch.equal(batch.inputs[i, n:n + len(response)], response)

    def grads(method, b):
        student.zero_grad()
        with torch.no_grad():
            t = teacher(b.inputs)
        _gkd_loss(method, b, student(b.inputs), t).backward()
        out = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        return out

    sampled = grads(on_policy, batch)
    # The same sequences handed over as fixed data to a λ = 0 method.
    fixed = _method(splits, models, on_policy_fraction=0.0, divergence="jsd", beta=0.5)
    data_batch = fixed.make_batch(Batch(batch.inputs.clone(), batch.labels.clone(), torch.arange(6)))
    assert fixed.generation_calls["student"] == 0
    for a, b in zip(sampled, grads(fixed, data_batch)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in sampled)


# --------------------------------------------------------------------------- SeqKD


def test_seqkd_uses_cached_greedy_teacher_responses(splits, models, monkeypatch):
    teacher, student = models
    counter = _CountingGenerate(generate)
    monkeypatch.setattr(sampling, "generate", counter)
    method = _method(splits, models, on_policy_fraction=0.0, seqkd=True)
    tokens, labels = splits.train[0][:5], splits.train[1][:5]
    indices = torch.tensor([3, 0, 7, 1, 4])
    batch = method.make_batch(Batch(tokens, labels, indices))
    assert method.generation_calls == {"student": 0, "teacher": 1}
    assert len(counter.calls) == 1 and counter.calls[0]["model"] is teacher

    # The reference: the teacher's greedy responses to the same prompts.
    lengths = (labels != IGNORE).int().argmax(dim=1)
    width = int(lengths.max())
    prompts = torch.where(torch.arange(width) < lengths[:, None], tokens[:, :width], 0)
    reference = generate(teacher, prompts, lengths, max_new_tokens=max_new_tokens(splits.sequence, width),
                         eos_id=splits.sequence.eos_id, pad_id=splits.sequence.pad_id, temperature=0)
    for i, n in enumerate(lengths.tolist()):
        expected = reference.tokens[i, n:n + int(reference.response_lengths[i])]
        got = batch.labels[i][batch.labels[i] != IGNORE]
        assert torch.equal(got, expected), i
        assert torch.equal(batch.inputs[i, :n], tokens[i, :n])
        assert torch.equal(batch.inputs[i, n:n + len(got)], got)
        assert (batch.labels[i, :n] == IGNORE).all()

    # Same indices again: served from the cache, no teacher generation.
    again = method.make_batch(Batch(tokens, labels, indices))
    assert method.generation_calls["teacher"] == 1 and len(counter.calls) == 1
    assert torch.equal(again.inputs, batch.inputs) and torch.equal(again.labels, batch.labels)

    # Partly new indices: only the new rows are generated.
    mixed = method.make_batch(Batch(splits.train[0][[0, 9]], splits.train[1][[0, 9]], torch.tensor([0, 9])))
    assert method.generation_calls["teacher"] == 2 and counter.calls[-1]["rows"] == 1
    cached_row = batch.labels[1][batch.labels[1] != IGNORE]  # train index 0 was row 1 above
    assert torch.equal(mixed.labels[0][mixed.labels[0] != IGNORE], cached_row)


# --------------------------------------------------------------------------- end to end


def _train_config(steps: int, batch_size: int = 6):
    return TrainConfig(steps=steps, batch_size=batch_size, lr=0.01, device="cpu", eval_every=1,
                       checkpoint_every=100)


@pytest.fixture(scope="module")
def fit_splits():
    return _reverse_splits(val_fraction=0.25, num_train=24, num_test=6)


@pytest.mark.parametrize("options", [
    {"on_policy_fraction": 1.0, "divergence": "forward_kl"},
    {"on_policy_fraction": 0.5, "divergence": "jsd", "beta": 0.9},
    {"on_policy_fraction": 0.0, "divergence": "ce", "seqkd": True},
])
def test_fit_end_to_end(fit_splits, options):
    splits = fit_splits
    teacher = _tinygpt(splits, width=16, seed=1)
    student = _tinygpt(splits, width=8, seed=2)
    check_class_counts(student, teacher, splits)
    torch.manual_seed(0)
    method = build_method(MethodConfig("gkd", dict(options)), student=student, teacher=teacher,
                          input_shape=splits.input_shape, train_size=len(splits.train[0]), sequence=splits.sequence)
    logged = []
    result = fit(student=student, method=method, teacher=teacher, splits=splits, train=_train_config(3), seed=0,
                 on_epoch=lambda epoch, metrics: logged.append(metrics))
    assert logged
    terms = {k: v for k, v in logged[-1].items() if k.startswith("train/loss")}
    assert {"train/loss/gkd", "train/loss/sft", "train/loss"} <= set(terms)
    assert all(math.isfinite(v) for v in terms.values())
    for key in ("val/acc", "val/token_acc", "val/nll", "val/agreement", "test/acc", "test/sampled_acc"):
        assert key in result.final and math.isfinite(result.final[key]), key
    if options["on_policy_fraction"] == 1.0:
        assert method.generation_calls["student"] == 3
    if options["on_policy_fraction"] == 0.0:
        assert method.generation_calls["student"] == 0
    if options.get("seqkd"):
        assert 1 <= method.generation_calls["teacher"] <= 3


def test_fit_with_sft_warm_up(fit_splits):
    """sft_steps: the first k steps train on the data with the "sft" term, without sampling; the
    teacher's training forward (a plain forward, without the generation's attention mask) is not needed."""
    splits = fit_splits
    teacher = _tinygpt(splits, width=16, seed=1)
    student = _tinygpt(splits, width=8, seed=2)
    torch.manual_seed(0)
    method = build_method(MethodConfig("gkd", {"on_policy_fraction": 1.0, "sft_steps": 2}), student=student,
                          teacher=teacher, input_shape=splits.input_shape, train_size=len(splits.train[0]),
                          sequence=splits.sequence)
    plain_forwards = []
    sources = []

    def count(module, args, kwargs):
        if not kwargs:
            plain_forwards.append(method.step)

    handle = teacher.register_forward_pre_hook(count, with_kwargs=True)
    original = method.make_batch

    def recording(batch):
        out = original(batch)
        sources.append(method.last_source)
        return out

    method.make_batch = recording
    logged = []
    try:
        fit(student=student, method=method, teacher=teacher, splits=splits, train=_train_config(3), seed=0,
            on_epoch=lambda epoch, metrics: logged.append(metrics))
    finally:
        handle.remove()
    assert sources == ["data", "data", "student"]
    assert method.generation_calls["student"] == 1
    assert plain_forwards == [2]  # only the distillation step runs the teacher forward
    assert logged[-1]["train/loss/sft"] > 0 and logged[-1]["train/loss/gkd"] > 0


class _Crash(Exception):
    pass


@pytest.mark.parametrize("options", [
    pytest.param({"on_policy_fraction": 0.5, "divergence": "jsd"}, id="on-policy"),
    pytest.param({"on_policy_fraction": 0.5, "seqkd": True}, id="seqkd-greedy"),
    pytest.param({"on_policy_fraction": 0.0, "seqkd": True, "teacher_sampling_temperature": 1.0},
                 id="seqkd-sampled"),
])
def test_resume_matches_uninterrupted_run(fit_splits, tmp_path, options):
    """The loop's contract: a resumed run ends where an uninterrupted one would (the schedule is seeded
    by step, on-policy samples by step, SeqKD responses are the teacher's per prompt)."""
    splits = fit_splits
    train = TrainConfig(epochs=3, batch_size=6, lr=0.01, device="cpu", checkpoint_every=1)

    def build():
        teacher = _tinygpt(splits, width=16, seed=1)
        student = _tinygpt(splits, width=8, seed=2)
        torch.manual_seed(5)  # the caller seeds the global RNG before building
        method = build_method(MethodConfig("gkd", dict(options)), student=student, teacher=teacher,
                              input_shape=splits.input_shape, train_size=len(splits.train[0]),
                              sequence=splits.sequence)
        return teacher, student, method

    teacher, student, method = build()
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
        run_dir=tmp_path / "straight")
    straight = {k: v.clone() for k, v in student.state_dict().items()}

    def crash_after_epoch_2(epoch, metrics):
        if epoch == 2:  # before epoch 2's checkpoint: epoch 1 is the last one on disk
            raise _Crash

    teacher, student, method = build()
    with pytest.raises(_Crash):
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
            run_dir=tmp_path / "killed", on_epoch=crash_after_epoch_2)
    teacher, student, method = build()  # a fresh process
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
        run_dir=tmp_path / "killed")
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, straight[name], rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- bad input


def test_different_vocabularies_are_refused(splits):
    student = _tinygpt(splits, width=8, seed=0)
    torch.manual_seed(0)
    teacher = registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes + 9,
                                               layers=1, width=8, heads=2)
    with pytest.raises(KdlabError, match="vocabulary"):
        check_class_counts(student, teacher, splits)


def test_short_student_context_is_refused(splits):
    need = splits.input_shape[0]
    with pytest.raises(KdlabError, match="context_length"):
        registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes, layers=1,
                                         width=8, heads=2, context_length=need - 1)
    teacher = _tinygpt(splits, width=8, seed=0)
    # Long enough for the training sequences, too short for the task's generation room.
    longest = splits.train[0].shape[1]
    assert longest < need
    student = TinyGPT(splits.num_classes, longest, layers=1, width=8, heads=2)
    with pytest.raises(KdlabError, match="context_length"):
        check_class_counts(student, teacher, splits)


def test_gkd_on_a_classification_dataset_is_refused():
    digits = build_splits("digits", {}, root=None, cache_dir="/tmp/kdlab-test-gkd", val_fraction=0.1, split_seed=0)
    assert digits.sequence is None
    mlp = registry.get("model", "mlp")
    student = mlp(input_shape=digits.input_shape, num_classes=10, mean=digits.mean, std=digits.std, width=8)
    teacher = mlp(input_shape=digits.input_shape, num_classes=10, mean=digits.mean, std=digits.std, width=8)
    with pytest.raises(KdlabError, match="sequence"):
        build_method(MethodConfig("gkd", {}), student=student, teacher=teacher, input_shape=digits.input_shape,
                     sequence=digits.sequence)


def test_classification_method_on_a_sequence_task_is_refused(splits, models):
    teacher, student = models
    with pytest.raises(KdlabError, match="classification"):
        build_method(MethodConfig("kd", {}), student=student, teacher=teacher, input_shape=splits.input_shape,
                     sequence=splits.sequence)


@pytest.mark.parametrize("key,value", [("on_policy_fraction", 1.5), ("on_policy_fraction", -0.1),
                                       ("divergence", "foo"), ("beta", 2.0), ("reduction", "mean"),
                                       ("student_temperature", 0.0), ("sft_steps", -1)])
def test_bad_hyperparameters_are_refused(splits, models, key, value):
    with pytest.raises(KdlabError, match=key):
        _method(splits, models, **{key: value})


# --------------------------------------------------------------------------- Hugging Face teacher


@pytest.mark.parametrize("options", [{"on_policy_fraction": 1.0},
                                     {"on_policy_fraction": 0.0, "seqkd": True}])
def test_fit_with_a_hugging_face_teacher(fit_splits, options):
    pytest.importorskip("transformers")
    splits = fit_splits
    torch.manual_seed(0)
    teacher = registry.get("model", "hf_causal_lm")(
        input_shape=splits.input_shape, num_classes=splits.num_classes,
        config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64,
                "bos_token_id": 1, "eos_token_id": 1, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    student = _tinygpt(splits, width=8, seed=2)
    check_class_counts(student, teacher, splits)
    torch.manual_seed(0)
    method = build_method(MethodConfig("gkd", dict(options)), student=student, teacher=teacher,
                          input_shape=splits.input_shape, train_size=len(splits.train[0]), sequence=splits.sequence)
    logged = []
    result = fit(student=student, method=method, teacher=teacher, splits=splits, train=_train_config(2), seed=0,
                 on_epoch=lambda epoch, metrics: logged.append(metrics))
    assert all(math.isfinite(v) for k, v in logged[-1].items() if k.startswith("train/loss"))
    assert {"val/acc", "val/agreement", "test/sampled_acc"} <= set(result.final)
    if options.get("seqkd"):
        assert method.generation_calls == {"student": 0, "teacher": 2}
    else:
        assert method.generation_calls == {"student": 2, "teacher": 0}


def test_divergence_runs_from_the_earliest_response_column(splits, models, monkeypatch):
    # The columns before every row's response (here column 0: the shortest prompt has 2 tokens) are cut before
    # the full-vocabulary divergence; the loss is still Eq. 2 (float64 reference) and those columns get no gradient.
    import kdlab.methods.gkd as gkd_module

    tokens, labels, _ = _canonical_batch()
    seen = []
    real = gkd_module.sequence_divergence
    monkeypatch.setattr(gkd_module, "sequence_divergence",
                        lambda s, t, m, **kw: seen.append((s.shape[1], t.shape[1], m.shape[1])) or real(s, t, m, **kw))
    method = _method(splits, models, divergence="jsd", beta=0.5)
    student = _logits(0).requires_grad_(True)
    teacher = _logits(1)
    loss = _gkd_loss(method, Batch(tokens, labels, torch.arange(3)), student, teacher)
    assert seen == [(6, 6, 6)]  # 8 positions, shifted: 7, minus column 0
    expected = _reference_gkd(student.detach().double(), teacher.double(), labels, divergence="jsd", beta=0.5)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    loss.backward()
    assert torch.count_nonzero(student.grad[:, 0]) == 0
