"""generate: cache vs recompute, batching, sampling filters, EOS, canonical layout, modes, delegation."""
import pytest
import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.seq.sampling import (filter_top_k, filter_top_p, generate, pack_canonical, prompts_from_canonical)
from kdlab.seq.tinygpt import TinyGPT

VOCAB, CONTEXT, PAD, EOS = 13, 24, 0, 1


def random_model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(VOCAB, CONTEXT, layers=2, width=32, heads=4)


def mixed_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded prompts of lengths 5, 2 and 4 (ids >= 2: no pad/EOS inside)."""
    rows = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))
    lengths = torch.tensor([5, 2, 4])
    rows[torch.arange(5)[None, :] >= lengths[:, None]] = PAD
    return rows, lengths


def run(model, **options):
    prompts, lengths = mixed_prompts()
    options = {"max_new_tokens": 8, "eos_id": EOS, "pad_id": PAD, "temperature": 0.0, **options}
    return generate(model, prompts, lengths, **options)


def test_greedy_with_cache_equals_without_cache():
    model = random_model()
    cached, recomputed = run(model), run(model, use_cache=False)
    assert torch.equal(cached.tokens, recomputed.tokens) and torch.equal(cached.labels, recomputed.labels)


def test_batched_greedy_equals_each_prompt_alone():
    model = random_model()
    prompts, lengths = mixed_prompts()
    batched = run(model)
    for i in range(3):
        alone = generate(model, prompts[i:i + 1, :lengths[i]], lengths[i:i + 1], max_new_tokens=8, eos_id=EOS,
                         pad_id=PAD, temperature=0.0)
        n = alone.tokens.shape[1]
        assert torch.equal(batched.tokens[i, :n], alone.tokens[0])
        assert (batched.tokens[i, n:] == PAD).all()


def test_greedy_continues_the_argmax_of_a_full_forward():
    model = random_model()
    out = run(model, max_new_tokens=1)
    prompts, lengths = mixed_prompts()
    for i in range(3):
        expected = model(prompts[i:i + 1, :lengths[i]])[0, -1].argmax()
        assert out.tokens[i, lengths[i]] == expected


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = random_model()
    for options in ({"temperature": 1.3}, {"temperature": 1.0, "top_k": 4}, {"temperature": 0.8, "top_p": 0.9}):
        a = run(model, generator=torch.Generator().manual_seed(3), **options)
        b = run(model, generator=torch.Generator().manual_seed(3), **options)
        c = run(model, generator=torch.Generator().manual_seed(4), **options)
        assert torch.equal(a.tokens, b.tokens), options
        assert not torch.equal(a.tokens, c.tokens), options


def test_top_k_1_equals_greedy():
    model = random_model()
    sampled = run(model, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled.tokens, run(model).tokens)


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.25, 0.1]])  # sorted: 0.5, 0.25, 0.1, 0.1, 0.05
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(filter_top_p(logits, p))[0].nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.3) == {1}  # the top token alone reaches 0.3
    assert kept(0.7) == {1, 3}  # 0.5 + 0.25 = 0.75 >= 0.7
    assert kept(0.8) in ({1, 3, 0}, {1, 3, 4})  # one of the tied 0.1s brings 0.85
    assert kept(1.0) == {0, 1, 2, 3, 4}
    # Kept logits are unchanged, so renormalising gives the conditional distribution.
    assert torch.equal(filter_top_p(logits, 0.7)[0, [1, 3]], logits[0, [1, 3]])


def test_top_k_filter():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(filter_top_k(logits, 10)).all()


class Counter(nn.Module):
    """Scripted model: the next token is the last token + 1, and EOS in place of 7.

    Logits depend only on the current token, so it ignores the cache; it
    records its forwards and whether it ran in eval mode.
    """

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls, self.training_seen = 0, set()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        self.calls += 1
        self.training_seen.add(self.training)
        target = input_ids + 1
        target = torch.where(target == 7, torch.full_like(target, EOS), target)
        logits = 10.0 * nn.functional.one_hot(target % VOCAB, VOCAB).float()
        return (logits, None) if use_cache else logits


def test_eos_stops_rows_pads_after_and_stops_early():
    model = Counter().train()
    prompts = torch.tensor([[2, 3], [5, PAD]])
    out = generate(model, prompts, torch.tensor([2, 1]), max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0)
    assert out.tokens.tolist() == [[2, 3, 4, 5, 6, EOS], [5, 6, EOS, PAD, PAD, PAD]]
    assert out.labels.tolist() == [[-100, -100, 4, 5, 6, EOS], [-100, 6, EOS, -100, -100, -100]]
    assert out.response_lengths.tolist() == [4, 2] and out.prompt_lengths.tolist() == [2, 1]
    assert model.calls == 4  # prefill + 3 steps; stopped when both rows were done, not after 10
    assert model.training_seen == {False} and model.training  # ran in eval, mode restored


def test_rows_without_eos_keep_every_generated_token():
    out = generate(Counter(), torch.tensor([[2], [3]]), torch.tensor([1, 1]), max_new_tokens=2, eos_id=EOS,
                   pad_id=PAD, temperature=0)
    assert out.tokens.tolist() == [[2, 3, 4], [3, 4, 5]] and out.response_lengths.tolist() == [2, 2]


def test_submodule_modes_are_restored_individually():
    model = random_model().train()
    model.blocks[0].eval()
    run(model, max_new_tokens=2)
    assert model.training and not model.blocks[0].training and model.blocks[1].training


def test_context_limit_names_max_new_tokens():
    with pytest.raises(KdlabError, match=r"5 tokens \+ max_new_tokens=20 exceeds the model's context_length 24"):
        run(random_model(), max_new_tokens=20)


def test_delegates_to_kdlab_generate():
    class Adapter(nn.Module):
        def kdlab_generate(self, prompts, prompt_lengths, **options):
            return ("delegated", options)

    tag, options = generate(Adapter(), torch.tensor([[2]]), torch.tensor([1]), max_new_tokens=3, eos_id=EOS,
                            pad_id=PAD, top_p=0.5)
    assert tag == "delegated"
    assert options == {"max_new_tokens": 3, "eos_id": EOS, "pad_id": PAD, "temperature": 1.0, "top_k": None,
                       "top_p": 0.5, "use_cache": True, "generator": None}


def test_pack_canonical_and_back():
    prompts = torch.tensor([[5, 6, 7], [8, PAD, PAD]])
    responses = torch.tensor([[9, EOS, PAD], [10, 11, 12]])
    tokens, labels = pack_canonical(prompts, torch.tensor([3, 1]), responses, torch.tensor([2, 3]), pad_id=PAD)
    assert tokens.tolist() == [[5, 6, 7, 9, EOS], [8, 10, 11, 12, PAD]]
    assert labels.tolist() == [[-100, -100, -100, 9, EOS], [-100, 10, 11, 12, -100]]
    again, lengths = prompts_from_canonical(tokens, labels, pad_id=PAD)
    assert torch.equal(again, prompts) and lengths.tolist() == [3, 1]
