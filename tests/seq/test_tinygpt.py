"""TinyGPT: shapes, causality, padding, left-padded masks, KV cache, context limit, taps, factory."""
import pytest
import torch

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.models import Taps, valid_tap_names
from kdlab.seq.tinygpt import KVCache, TinyGPT, attention_mask_for, tinygpt

VOCAB, CONTEXT = 11, 16
ATOL = 1e-5


def model(seed: int = 0, **options) -> TinyGPT:
    torch.manual_seed(seed)
    options = {"layers": 2, "width": 32, "heads": 4, **options}
    return TinyGPT(VOCAB, CONTEXT, **options).eval()


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_tied_head():
    net = model()
    logits = net(ids(3, 7))
    assert logits.shape == (3, 7, VOCAB) and logits.dtype == torch.float32
    assert net.lm_head.weight is net.embed.token.weight
    assert model(tie_embeddings=False).lm_head.weight is not model().embed.token.weight


def test_causal_later_tokens_do_not_change_earlier_logits():
    net, x = model(), ids(2, 9)
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % VOCAB
    a, b = net(x), net(y)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=ATOL, rtol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_right_padding_leaves_real_positions_unchanged():
    net, x = model(), ids(2, 6)
    padded = torch.cat([x, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(net(padded)[:, :6], net(x), atol=ATOL, rtol=0)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return x, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_left_padded_batch_equals_each_row_alone():
    net = model()
    rows = [ids(7, seed=2), ids(3, seed=3), ids(5, seed=4)]
    x, mask, positions = left_padded(rows)
    logits = net(x, attention_mask=mask, position_ids=positions)
    assert torch.isfinite(logits).all()  # pad queries attend to themselves: no NaN rows
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i, -len(r):], net(r[None])[0], atol=ATOL, rtol=0)


def test_no_query_row_is_fully_masked():
    # Some SDPA backends return NaN for a query with no visible key (others return 0, so the
    # finiteness check above cannot tell): check the mask itself, with and without a cache.
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    for past_length in (0, 2):
        allowed, is_causal = attention_mask_for(mask, past_length=past_length, new_length=4 - past_length,
                                                device=torch.device("cpu"))
        assert allowed.shape == (2, 1, 4 - past_length, 4) and not is_causal
        assert allowed.any(dim=-1).all()
        real_queries = allowed[0, 0, 2 - past_length:]  # query i is position past_length + i
        assert not real_queries[:, :2].any()  # real queries never see the pad keys
    assert attention_mask_for(None, past_length=0, new_length=5, device=torch.device("cpu")) == (None, True)


def test_bool_mask_equals_integer_mask():
    net = model()
    x, mask, positions = left_padded([ids(6, seed=2), ids(2, seed=3)])
    torch.testing.assert_close(net(x, attention_mask=mask.bool(), position_ids=positions),
                               net(x, attention_mask=mask, position_ids=positions), atol=0, rtol=0)


def test_cached_incremental_forward_equals_full_forward():
    net, x = model(), ids(2, 12)
    full = net(x)
    logits, cache = net(x[:, :5], use_cache=True)
    pieces = [logits]
    for start, stop in ((5, 6), (6, 9), (9, 10), (10, 12)):  # single tokens and chunks
        logits, cache = net(x[:, start:stop], past_key_values=cache, use_cache=True)
        pieces.append(logits)
    assert isinstance(cache, KVCache) and cache.length == 12 and len(cache.keys) == 2
    assert cache.keys[0].shape == (2, 4, 12, 8)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_cached_forward_with_left_padding_equals_rows_alone():
    net = model()
    rows = [ids(8, seed=5), ids(4, seed=6)]
    x, mask, positions = left_padded([r[:-3] for r in rows])  # prefill all but 3 tokens per row
    _, cache = net(x, attention_mask=mask, position_ids=positions, use_cache=True)
    for step in range(3, 0, -1):
        token = torch.stack([r[-step] for r in rows])[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        logits, cache = net(token, attention_mask=mask, position_ids=positions[:, -1:], past_key_values=cache,
                            use_cache=True)
        for i, r in enumerate(rows):
            expected = net(r[None, :len(r) - step + 1])[0, -1]
            torch.testing.assert_close(logits[i, -1], expected, atol=ATOL, rtol=0)


def test_context_overflow_is_a_one_line_error():
    net = model()
    with pytest.raises(KdlabError, match="sequence of length 17 exceeds the model's context_length 16"):
        net(ids(1, 17))
    _, cache = net(ids(1, 10), use_cache=True)
    with pytest.raises(KdlabError, match="length 17 exceeds"):
        net(ids(1, 7), past_key_values=cache, use_cache=True)


def test_dropout_is_active_only_in_training():
    net, x = model(dropout=0.5), ids(2, 6)
    torch.testing.assert_close(net(x), net(x))
    net.train()
    assert not torch.allclose(net(x), net(x))


def test_width_not_divisible_by_heads_is_an_error():
    with pytest.raises(KdlabError, match="width=30 is not divisible by heads=4"):
        TinyGPT(VOCAB, CONTEXT, width=30, heads=4)


def test_taps_on_blocks_and_named_stages():
    net = model()
    assert net.feature_stages == ("embed", "blocks.0", "blocks.1", "final_norm")
    assert valid_tap_names(net)[:4] == list(net.feature_stages)
    with Taps(net, ["embed", "blocks.0", "final_norm"]) as feats:
        net(ids(2, 5))
        assert feats["blocks.0"].shape == feats["embed"].shape == feats["final_norm"].shape == (2, 5, 32)


def test_registered_factory():
    assert registry.get("model", "tinygpt") is tinygpt
    net = tinygpt(input_shape=(24,), num_classes=51, mean=(0.0,), std=(1.0,), layers=1, width=16, heads=2)
    assert (net.vocab_size, net.context_length, len(net.blocks)) == (51, 24, 1)
    assert tinygpt(input_shape=(24,), num_classes=51, context_length=32, width=16, heads=2).context_length == 32
    with pytest.raises(KdlabError, match=r"input_shape \(T,\)"):
        tinygpt(input_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(KdlabError, match="shorter than the dataset"):
        tinygpt(input_shape=(24,), num_classes=51, context_length=16)


def test_backward_reaches_every_parameter():
    net = model().train()
    net(ids(2, 6)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
