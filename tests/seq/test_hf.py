"""Hugging Face adapter (kdlab.seq.hf): protocol forward, generate through HF, loading, errors.

Tiny GPT-2 and Llama models are built from configs (no downloads); the whole file
skips when the optional ``transformers`` is not installed.
"""
import sys

import pytest
import torch

pytest.importorskip("transformers")

import kdlab.seq.hf  # noqa: E402,F401  (registers hf_causal_lm)
from kdlab.errors import KdlabError  # noqa: E402
from kdlab.registry import get  # noqa: E402
from kdlab.seq import sampling  # noqa: E402
from kdlab.seq.hf import HFCausalLM, load_hf_causal_lm  # noqa: E402

VOCAB, PAD, EOS = 40, 0, 1
CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=EOS,
                 eos_token_id=EOS),
    "llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, bos_token_id=EOS, eos_token_id=EOS),
}
# Right-padded prompts of different lengths.
PROMPTS = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 14, 0, 0, 0]])
LENGTHS = torch.tensor([3, 5, 2])


def build(kind: str, seed: int = 0) -> HFCausalLM:
    torch.manual_seed(seed)
    model = get("model", "hf_causal_lm")(input_shape=(16,), num_classes=VOCAB, config=CONFIGS[kind])
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return build(request.param)


def manual_greedy(model, prompt, max_new_tokens, eos_id):
    """One row, no padding, no cache: argmax of the wrapped forward, stopping after EOS."""
    sequence = prompt.tolist()
    response = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([sequence]))[0, -1].argmax())
            sequence.append(token)
            response.append(token)
            if token == eos_id:
                break
    return response


def test_factory_builds_a_protocol_model(model):
    assert isinstance(model, HFCausalLM)
    assert model.vocab_size == VOCAB and model.context_length == 64
    assert len(model.feature_stages) == 2 and all(model.get_submodule(s) for s in model.feature_stages)
    ids = torch.randint(2, VOCAB, (2, 7))
    with torch.no_grad():
        logits = model(ids)
        raw = model.model(input_ids=ids, use_cache=False).logits
        cached_logits, cache = model(ids, use_cache=True)
    assert logits.shape == (2, 7, VOCAB)
    torch.testing.assert_close(logits, raw, rtol=0, atol=0)
    torch.testing.assert_close(cached_logits, logits)
    assert cache is not None


def test_right_padding_does_not_change_real_positions(model):
    with torch.no_grad():
        padded = model(PROMPTS)
        for row, length in enumerate(LENGTHS.tolist()):
            alone = model(PROMPTS[row:row + 1, :length])
            torch.testing.assert_close(padded[row, :length], alone[0], atol=1e-5, rtol=1e-5)


def canonical_rows(generation):
    """Per row: (prompt tokens, response tokens) read back from the canonical layout."""
    rows = []
    for row in range(generation.tokens.shape[0]):
        p, r = int(generation.prompt_lengths[row]), int(generation.response_lengths[row])
        tokens, labels = generation.tokens[row], generation.labels[row]
        assert (labels[:p] == -100).all() and (labels[p + r:] == -100).all()
        assert torch.equal(labels[p:p + r], tokens[p:p + r])
        assert (tokens[p + r:] == PAD).all()
        rows.append((tokens[:p].tolist(), tokens[p:p + r].tolist()))
    return rows


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_equals_a_manual_loop_and_keeps_eos(model, use_cache):
    # The model's own generation defaults must not leak in (kdlab_generate swaps them out).
    model.model.generation_config.repetition_penalty = 3.0
    try:
        first = model.kdlab_generate(PROMPTS, LENGTHS, max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0,
                                     use_cache=use_cache)
    finally:
        model.model.generation_config.repetition_penalty = None
    assert model.model.generation_config.repetition_penalty is None and not model.training
    for row, (prompt, response) in enumerate(canonical_rows(first)):
        assert prompt == PROMPTS[row, :LENGTHS[row]].tolist()
        assert response == manual_greedy(model, PROMPTS[row, :LENGTHS[row]], 6, EOS)
    # Make the 3rd greedy token of row 0 the EOS: that row stops there (EOS kept), the others go on.
    eos = int(first.tokens[0, LENGTHS[0] + 2])
    second = model.kdlab_generate(PROMPTS, LENGTHS, max_new_tokens=6, eos_id=eos, pad_id=PAD, temperature=0,
                                  use_cache=use_cache)
    rows = canonical_rows(second)
    for row, (_, response) in enumerate(rows):
        assert response == manual_greedy(model, PROMPTS[row, :LENGTHS[row]], 6, eos)
    assert rows[0][1][-1] == eos and len(rows[0][1]) <= 3
    assert second.tokens.shape[1] == int((second.prompt_lengths + second.response_lengths).max())


def test_kdlab_decoder_runs_the_wrapped_forward_with_its_cache(model):
    # kdlab's own decoding loop (left padding, position ids, HF cache) agrees with HF generate.
    expected = model.kdlab_generate(PROMPTS, LENGTHS, max_new_tokens=5, eos_id=EOS, pad_id=PAD, temperature=0)
    with torch.no_grad():
        responses = sampling._decode(model, PROMPTS, LENGTHS, max_new_tokens=5, eos_id=EOS, pad_id=PAD,
                                     temperature=0, top_k=None, top_p=None, use_cache=True, generator=None)
    lengths = sampling._response_lengths(responses, EOS)
    tokens, _ = sampling.pack_canonical(PROMPTS, LENGTHS, responses, lengths, pad_id=PAD)
    assert torch.equal(tokens, expected.tokens)


def test_sampling_is_reproducible_with_a_seeded_generator(model):
    def sample(seed, **options):
        return model.kdlab_generate(PROMPTS, LENGTHS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.5,
                                    generator=torch.Generator().manual_seed(seed), **options)

    state = torch.get_rng_state()
    a, b = sample(0), sample(0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert not torch.equal(sample(1).tokens, a.tokens)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is forked, not consumed
    # One generator advances: a second call samples anew, and the pair replays from the same seed.
    generator = torch.Generator().manual_seed(5)
    pair = [model.kdlab_generate(PROMPTS, LENGTHS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.5,
                                 generator=generator).tokens for _ in range(2)]
    assert not torch.equal(pair[0], pair[1])
    assert torch.equal(pair[0], sample(5).tokens)
    # top_k=1 is greedy whatever the seed.
    greedy = model.kdlab_generate(PROMPTS, LENGTHS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0)
    assert torch.equal(sample(7, top_k=1).tokens, greedy.tokens)
    canonical_rows(sample(3, top_p=0.9))


def test_sampling_generate_delegates_to_the_adapter(model):
    options = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=1.0)
    ours = sampling.generate(model, PROMPTS, LENGTHS, generator=torch.Generator().manual_seed(2), **options)
    direct = model.kdlab_generate(PROMPTS, LENGTHS, generator=torch.Generator().manual_seed(2), **options)
    for field in ("tokens", "labels", "prompt_lengths", "response_lengths"):
        assert torch.equal(getattr(ours, field), getattr(direct, field))


def test_context_length_is_checked(model):
    with pytest.raises(KdlabError, match="context_length 64"):
        model.kdlab_generate(PROMPTS, LENGTHS, max_new_tokens=60, eos_id=EOS, pad_id=PAD, temperature=0)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_pretrained_then_load_by_path(kind, tmp_path):
    original = build(kind, seed=1)
    original.save_pretrained(tmp_path / "model")
    loaded = get("model", "hf_causal_lm")(input_shape=(16,), num_classes=VOCAB, path=str(tmp_path / "model"))
    ids = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids), original(ids), rtol=0, atol=0)

    with pytest.raises(KdlabError) as error:  # the task's vocabulary differs from the model's
        get("model", "hf_causal_lm")(input_shape=(16,), num_classes=VOCAB + 1, path=str(tmp_path / "model"))
    message = str(error.value)
    assert "\n" not in message and f"{VOCAB} tokens" in message and f"{VOCAB + 1}" in message


def test_errors_are_one_line(tmp_path):
    factory = get("model", "hf_causal_lm")
    cases = [
        (dict(path=str(tmp_path / "missing")), "is not a directory"),
        (dict(path=str(tmp_path)), "cannot load"),  # a directory without a model
        (dict(config={**CONFIGS["llama"], "vocab_size": 50}), "50 tokens but the task's has 40"),
        (dict(), "exactly one of path"),
        (dict(path=str(tmp_path), config=CONFIGS["gpt2"]), "exactly one of path"),
        (dict(config={"hidden_size": 32}), "model_type"),
        (dict(config={"model_type": "no_such_model"}), "no_such_model"),
    ]
    for options, expected in cases:
        with pytest.raises(KdlabError) as error:
            factory(input_shape=(16,), num_classes=VOCAB, **options)
        assert expected in str(error.value) and "\n" not in str(error.value), options
    with pytest.raises(KdlabError, match="context length 64 is shorter"):
        factory(input_shape=(100,), num_classes=VOCAB, config=CONFIGS["gpt2"])
    with pytest.raises(KdlabError, match="input_shape"):
        factory(input_shape=(1, 16), num_classes=VOCAB, config=CONFIGS["gpt2"])


def test_missing_transformers_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(KdlabError, match=r"pip install 'kdlab\[hf\]'") as error:
        load_hf_causal_lm(config=CONFIGS["gpt2"], vocab_size=VOCAB)
    assert "\n" not in str(error.value)
