"""Tests of kdlab.losses.attention (Kim et al. 2022 transformer-encoder KD losses).

The attention-map reference is written with explicit Python loops over
batch, head, query and key with ``math.log`` in float64 (renormalising each
row over the valid keys by hand), a different route from the batched code.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.losses.attention import ATTENTION_LOSSES, attention_map, attention_output, hidden_mse


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def attn_probs(b, h, length, *, seed, mask=None, dtype=torch.float64, sharp=1.0):
    """Softmax attention (B, H, L, L); with a mask, padded keys get an additive -inf as HF does."""
    scores = sharp * randn(b, h, length, length, seed=seed, dtype=dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], -math.inf)
    return torch.softmax(scores, dim=-1)


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def reference_attention_map(s, t, mask=None):
    """float64 loops: Σ over valid (b, h, q) of Σ_{valid k} t'(log t' − log s'), / (H · #valid q)."""
    b_, h_, lq, lk = s.shape
    total, rows = 0.0, 0
    for b in range(b_):
        for h in range(h_):
            for q in range(lq):
                if mask is not None and not mask[b, q]:
                    continue
                keys = [k for k in range(lk) if mask is None or mask[b, k]]
                zs = sum(float(s[b, h, q, k]) for k in keys)
                zt = sum(float(t[b, h, q, k]) for k in keys)
                row = 0.0
                for k in keys:
                    pt, ps = float(t[b, h, q, k]) / zt, float(s[b, h, q, k]) / zs
                    row += pt * (math.log(pt) - math.log(ps))
                total += row
                rows += 1
    return total / rows


# ---------------------------------------------------------------------------
# attention_map
# ---------------------------------------------------------------------------


def test_attention_map_zero_for_identical_and_positive_otherwise():
    t = attn_probs(2, 3, 5, seed=1)
    assert attention_map(t.clone(), t).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_map(attn_probs(2, 3, 5, seed=2), t).item() > 1e-3
    m = attention_map(t.clone(), t, mask=MASK[:2])
    assert m.item() == pytest.approx(0.0, abs=1e-12)


def test_attention_map_matches_float64_loop_reference():
    s, t = attn_probs(3, 2, 5, seed=3), attn_probs(3, 2, 5, seed=4, sharp=2.0)
    assert attention_map(s, t).item() == pytest.approx(reference_attention_map(s, t), rel=1e-12)
    # Direction: KL(teacher ‖ student), not the reverse.
    assert attention_map(s, t).item() != pytest.approx(reference_attention_map(t, s), rel=1e-6)


def test_attention_map_matches_reference_with_mask_and_log_inputs():
    s = attn_probs(3, 2, 5, seed=5, mask=MASK)
    t = attn_probs(3, 2, 5, seed=6, mask=MASK)
    expected = reference_attention_map(s, t, MASK)
    assert attention_map(s, t, mask=MASK).item() == pytest.approx(expected, rel=1e-12)
    assert attention_map(s, t, mask=MASK.bool()).item() == pytest.approx(expected, rel=1e-12)
    assert attention_map(s.log(), t.log(), mask=MASK, log_inputs=True).item() == pytest.approx(expected, rel=1e-12)


def test_attention_map_renormalises_over_valid_keys():
    # Maps that leave mass on padded keys are renormalised over the valid ones (the reference does the same).
    s, t = attn_probs(3, 2, 5, seed=7), attn_probs(3, 2, 5, seed=8)
    expected = reference_attention_map(s, t, MASK)
    assert attention_map(s, t, mask=MASK).item() == pytest.approx(expected, rel=1e-12)


def test_attention_map_ignores_garbage_at_padded_queries_and_keys():
    s = attn_probs(3, 2, 5, seed=9, mask=MASK).requires_grad_(True)
    t = attn_probs(3, 2, 5, seed=10, mask=MASK)
    clean = attention_map(s, t, mask=MASK)
    clean.backward()
    grad_clean = s.grad.clone()
    pad = ~(MASK.bool()[:, None, :, None] & MASK.bool()[:, None, None, :]).expand_as(s)
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 7.0, -3.0, 0.0], dtype=s.dtype)
    fill = garbage[torch.arange(pad.sum().item()) % len(garbage)]
    s2 = s.detach().clone()
    s2[pad] = fill
    t2 = t.clone()
    t2[pad] = fill.flip(0)
    s2.requires_grad_(True)
    dirty = attention_map(s2, t2, mask=MASK)
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-12)
    dirty.backward()
    assert torch.isfinite(s2.grad).all()
    torch.testing.assert_close(s2.grad, grad_clean)
    assert (s2.grad[pad] == 0).all()
    # Same with log inputs.
    ls, lt = s.detach().log(), t.log()
    ls[pad], lt[pad] = fill, fill.flip(0)
    assert attention_map(ls, lt, mask=MASK, log_inputs=True).item() == pytest.approx(clean.item(), rel=1e-12)


def test_attention_map_all_padding_is_zero_not_nan():
    s, t = attn_probs(2, 2, 4, seed=11), attn_probs(2, 2, 4, seed=12)
    s.requires_grad_(True)
    value = attention_map(s, t, mask=torch.zeros(2, 4))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(s.grad).all()


def test_attention_map_exact_zero_in_student_is_finite():
    t = attn_probs(1, 1, 3, seed=13)
    s = t.clone()
    s[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=s.dtype)
    s.requires_grad_(True)
    value = attention_map(s, t)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert torch.isfinite(s.grad).all()


def test_attention_map_head_mismatch_and_bad_input():
    s, t = attn_probs(2, 2, 4, seed=14), attn_probs(2, 3, 4, seed=15)
    with pytest.raises(KdlabError, match=r"student 2 heads, teacher 3 heads"):
        attention_map(s, t)
    bad = [
        (r"shape", lambda: attention_map(s, attn_probs(2, 2, 5, seed=1))),
        (r"expected \(B, H, Lq, Lk\)", lambda: attention_map(s[0], s[0])),
        (r"4-D", lambda: attention_map(s[None], s[None])),
        (r"mask shape", lambda: attention_map(s, s, mask=torch.ones(2, 5))),
        (r"eps", lambda: attention_map(s, s, eps=0.0)),
        (r"log_inputs", lambda: attention_map(s, s, log_inputs=1)),
        (r"floating point", lambda: attention_map(s.long(), s)),
    ]
    for match, call in bad:
        with pytest.raises(KdlabError, match=match) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_attention_map_bf16_computes_in_float32():
    s = attn_probs(2, 2, 4, seed=16, dtype=torch.float32).bfloat16()
    t = attn_probs(2, 2, 4, seed=17, dtype=torch.float32).bfloat16()
    value = attention_map(s, t)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(attention_map(s.float(), t.float()).item(), rel=1e-6)


# ---------------------------------------------------------------------------
# attention_output / hidden_mse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [attention_output, hidden_mse])
def test_token_mse_hand_values(fn):
    # Sample 0: token 0 diff (1, 2) -> 1 + 4 = 5; token 1 diff (0, 3) -> 9. Sample 1: token 0 diff (2, 0) -> 4;
    # token 1 is padding: diff (10, -10) -> 200 when unmasked, then NaN/inf garbage when masked.
    s = torch.tensor([[[1.0, 2.0], [0.0, 3.0]], [[2.0, 0.0], [10.0, -10.0]]])
    t = torch.zeros(2, 2, 2)
    # No mask: (5 + 9 + 4 + 200) / (4 tokens · 2 features) = 218 / 8.
    assert fn(s, t).item() == pytest.approx(218 / 8)
    mask = torch.tensor([[1, 1], [1, 0]])
    # Masked: (5 + 9 + 4) / (3 tokens · 2 features) = 3.
    assert fn(s, t, mask=mask).item() == pytest.approx(3.0)
    s2 = s.clone()
    s2[1, 1] = torch.tensor([math.nan, math.inf])
    t2 = t.clone()
    t2[1, 1] = -math.inf
    s2.requires_grad_(True)
    value = fn(s2, t2, mask=mask.bool())
    assert value.item() == pytest.approx(3.0)
    value.backward()
    assert torch.isfinite(s2.grad).all() and (s2.grad[1, 1] == 0).all()
    # Gradient of Σ(s−t)²/6 at valid entries: 2(s−t)/6.
    torch.testing.assert_close(s2.grad[0], 2 * s[0] / 6)


@pytest.mark.parametrize("fn", [attention_output, hidden_mse])
def test_token_mse_zero_identical_all_padding_and_errors(fn):
    x = randn(2, 3, 4, seed=20)
    assert fn(x, x.clone()).item() == 0.0
    assert fn(x, x + 1, mask=torch.zeros(2, 3)).item() == 0.0
    torch.testing.assert_close(fn(x, x + 0.5), torch.tensor(0.25, dtype=torch.float64))
    with pytest.raises(KdlabError, match="shape"):
        fn(x, randn(2, 3, 5, seed=21))
    with pytest.raises(KdlabError, match="mask shape"):
        fn(x, x, mask=torch.ones(2, 4))
    with pytest.raises(KdlabError, match="expected"):
        fn(x[0], x[0])
    assert fn(x.float().bfloat16(), x.float().bfloat16() + 1).dtype == torch.float32


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


def test_gradients_finite_float32():
    s = attn_probs(2, 2, 5, seed=30, dtype=torch.float32, mask=MASK[1:]).requires_grad_(True)
    t = attn_probs(2, 2, 5, seed=31, dtype=torch.float32, mask=MASK[1:])
    attention_map(s, t, mask=MASK[1:]).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    h = randn(2, 5, 4, seed=32, dtype=torch.float32).requires_grad_(True)
    (attention_output(h, h.detach() * 2, mask=MASK[1:]) + hidden_mse(h, h.detach() + 1)).backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


@pytest.mark.parametrize("log_inputs", [False, True])
def test_gradcheck_attention_map_float64(log_inputs):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s = attn_probs(2, 2, 3, seed=40)
    t = attn_probs(2, 2, 3, seed=41)
    if log_inputs:
        s, t = s.log(), t.log()
    s.requires_grad_(True)
    t.requires_grad_(True)
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda a, b: attention_map(a, b, mask=m, log_inputs=log_inputs), (s, t), eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("fn", [attention_output, hidden_mse])
def test_gradcheck_token_mse_float64(fn):
    s = randn(2, 3, 2, seed=42).requires_grad_(True)
    t = randn(2, 3, 2, seed=43).requires_grad_(True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask=mask), (s, t), eps=1e-6, atol=1e-7)


def test_registered_as_attention_losses():
    # Registered under loss_kind "attention" (not "feature": the feature-loss contract tests feed
    # different-width pairs these losses refuse).
    assert [registry.get("loss", n) for n in ATTENTION_LOSSES] == [attention_map, attention_output, hidden_mse]
    assert all(registry.get("loss", n).loss_kind == "attention" for n in ATTENTION_LOSSES)


def reference_sequence_reduction(s, t, mask):
    """float64 loops, the official code's reduction: per (b, h) mean over valid rows, then mean over b, h."""
    b_, h_, lq, lk = s.shape
    per_bh = []
    for b in range(b_):
        rows = [q for q in range(lq) if mask[b, q]]
        keys = [k for k in range(lk) if mask[b, k]]
        for h in range(h_):
            total = 0.0
            for q in rows:
                zs = sum(float(s[b, h, q, k]) for k in keys)
                zt = sum(float(t[b, h, q, k]) for k in keys)
                for k in keys:
                    pt, ps = float(t[b, h, q, k]) / zt, float(s[b, h, q, k]) / zs
                    total += pt * (math.log(pt) - math.log(ps))
            per_bh.append(total / len(rows))
    return sum(per_bh) / len(per_bh)


def test_attention_map_sequence_reduction_matches_reference():
    s, t = attn_probs(3, 2, 5, seed=11, mask=MASK), attn_probs(3, 2, 5, seed=12, mask=MASK)
    seq = attention_map(s, t, mask=MASK, reduction="sequence").item()
    assert seq == pytest.approx(reference_sequence_reduction(s, t, MASK), rel=1e-12)
    # Unequal lengths: the two reductions weigh sequences differently.
    assert seq != pytest.approx(attention_map(s, t, mask=MASK).item(), rel=1e-6)
    full = torch.ones(3, 5, dtype=torch.long)  # equal lengths: they agree
    assert attention_map(s, t, mask=full, reduction="sequence").item() == pytest.approx(
        attention_map(s, t, mask=full).item(), rel=1e-12)
    with pytest.raises(KdlabError, match="reduction"):
        attention_map(s, t, reduction="batch")
