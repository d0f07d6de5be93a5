"""Tokenizing prompts with a HF tokenizer (kdlab.data.prompts) and the registered `prompts` dataset
(kdlab.seq.prompt_dataset), with the tiny byte-level tokenizer of conftest (pad == EOS)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kdlab.seq  # noqa: E402,F401  (registers the prompts dataset)
from kdlab.data.base import build_splits  # noqa: E402
from kdlab.data.prompts import PromptRecord, special_ids, tokenize_records  # noqa: E402
from kdlab.data.sequence import IGNORE, prompt_lengths  # noqa: E402
from kdlab.errors import KdlabError  # noqa: E402
from kdlab.registry import get  # noqa: E402

from .conftest import make_tokenizer  # noqa: E402

EOS = PAD = 2


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_special_ids_prefer_the_generation_config(tokenizer):
    assert special_ids(tokenizer) == (2, 2, (2,))
    generation = transformers.GenerationConfig(eos_token_id=[0, 2], pad_token_id=1)
    assert special_ids(tokenizer, generation) == (2, 0, (0, 2))  # the tokenizer's pad wins over the config's
    no_pad = make_tokenizer()
    no_pad.pad_token = None
    assert special_ids(no_pad, generation) == (1, 0, (0, 2))
    assert special_ids(no_pad) == (2, 2, (2,))  # pad falls back to EOS


def test_chat_template_tokenization_and_the_final_eos_is_a_label_when_pad_is_eos(tokenizer):
    records = [PromptRecord("What is 2 plus 3?", "5", "row 1"), PromptRecord("Say hi.", None, "row 2")]
    out = tokenize_records(records, tokenizer, eos_id=EOS, pad_id=PAD, chat_template=True, max_prompt_tokens=64,
                           max_new_tokens=8)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert out.prompts[0] == text and text.endswith("<|im_start|>assistant\n")
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer("5", add_special_tokens=False)["input_ids"] + [EOS]
    n = len(prompt_ids)
    assert out.tokens[0, :n + len(answer)].tolist() == prompt_ids + answer
    assert out.labels[0, :n].eq(IGNORE).all() and out.labels[0, n:n + len(answer)].tolist() == answer
    assert out.labels[0, n + len(answer) - 1] == EOS  # the final EOS is learned although pad == EOS
    assert out.labels[0, n + len(answer):].eq(IGNORE).all() and out.tokens[0, n + len(answer):].eq(PAD).all()
    assert out.has_reference.tolist() == [True, False] and out.references == ["5", None]
    n2 = int(out.prompt_lengths[1])
    assert out.labels[1, n2:n2 + 1].tolist() == [EOS] and out.labels[1, n2 + 1:].eq(IGNORE).all()  # placeholder
    assert prompt_lengths(out.labels).tolist() == out.prompt_lengths.tolist()


def test_plain_prompts_long_references_and_refusals(tokenizer):
    long_reference = "the quick brown fox jumps over the lazy dog " * 3
    out = tokenize_records([PromptRecord("hello world", long_reference, "f, row 1")], tokenizer, eos_id=EOS,
                           pad_id=PAD, max_prompt_tokens=16, max_new_tokens=5)
    n = int(out.prompt_lengths[0])
    assert out.prompts == ["hello world"] and out.tokens[0, :n].tolist() == tokenizer("hello world")["input_ids"]
    assert out.labels[0, n:].ne(IGNORE).sum() == 5 and EOS not in out.labels[0].tolist()  # cut: no EOS
    chat = PromptRecord(({"role": "user", "content": "hi"},), None, "f.jsonl, row 7")
    cases = [
        (dict(records=[chat]), "f.jsonl, row 7: a chat-format prompt (messages) needs data.chat_template: true"),
        (dict(records=[PromptRecord("What is 2 plus 3? " * 10, None, "f.jsonl, row 3")], max_prompt_tokens=10),
         "f.jsonl, row 3: the prompt has"),
        (dict(records=[PromptRecord("What is 2 plus 3?", None, "f.jsonl, row 4")], context_length=12,
              max_new_tokens=8), "f.jsonl, row 4: the prompt's"),
        (dict(records=[chat], context_length=8, max_new_tokens=8), "data.max_new_tokens: 8 leaves no room"),
        (dict(records=[chat], max_new_tokens=0), "data.max_new_tokens: must be an integer >= 1"),
    ]
    for options, expected in cases:
        kwargs = dict(eos_id=EOS, pad_id=PAD, max_prompt_tokens=64, max_new_tokens=8) | options
        with pytest.raises(KdlabError) as error:
            tokenize_records(kwargs.pop("records"), tokenizer, **kwargs)
        assert str(error.value).startswith(expected) and "\n" not in str(error.value), expected
    with pytest.raises(KdlabError, match="the tokenizer has no chat template; set chat_template: false"):
        tokenize_records([chat], make_tokenizer(chat_template=None), eos_id=EOS, pad_id=PAD, chat_template=True)


def test_the_prompts_dataset_fits_the_splits_contract(tmp_path, tiny_llama_folder):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} plus {i + 1}?", "completion": str(2 * i + 1)} for i in range(20)]
    rows.append({"messages": [{"role": "user", "content": "Say hi."}]})
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    options = dict(path=str(path), tokenizer=str(tiny_llama_folder), chat_template=True, max_prompt_tokens=32,
                   max_new_tokens=6, test_fraction=0.2, seed=1)
    splits = build_splits("prompts", options, root=None, cache_dir=tmp_path / "cache", val_fraction=0.25,
                          split_seed=0)
    assert [len(splits.train[0]), len(splits.val[0]), len(splits.test[0])] == [13, 4, 4]
    info = splits.sequence
    assert splits.num_classes == 300 and splits.input_shape == (38,) and info.context_length == 38
    assert info.pad_id == info.eos_id == EOS and info.max_response_tokens == 6 and info.task == "prompts:prompts.jsonl"
    tokens, labels = splits.test
    lengths = prompt_lengths(labels)
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        prompt = info.decode(row[:n])
        assert prompt.startswith("user\nWhat is") or prompt.startswith("user\nSay hi")
        reference = info.decode(row[n:])  # decode drops the trailing EOS/pad run
        if "Say hi" not in prompt:
            assert info.is_correct(prompt, reference) and info.is_correct(prompt, f" {reference}\n")
            assert not info.is_correct(prompt, reference + "0")
    again = get("dataset", "prompts")(root=None, cache_dir=tmp_path, **options)
    assert torch.equal(again.tokens_test, tokens)  # deterministic by seed (val is carved from train)
    model = get("model", "hf_causal_lm")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                         path=str(tiny_llama_folder))
    assert model.vocab_size == splits.num_classes


def test_builtin_arithmetic_prompts_check_the_number(tmp_path, tiny_tokenizer_folder):
    arrays = get("dataset", "prompts")(root=None, cache_dir=tmp_path, builtin="arithmetic", num_prompts=50,
                                       tokenizer=str(tiny_tokenizer_folder), chat_template=True, max_new_tokens=8)
    assert len(arrays.tokens_train) == 45 and len(arrays.tokens_test) == 5
    info = arrays.info
    row, n = arrays.tokens_test[0].tolist(), int(prompt_lengths(arrays.labels_test[:1])[0])
    prompt, answer = info.decode(row[:n]), info.decode(row[n:])
    assert "What is" in prompt and answer.isdigit()
    assert info.answer_correct(prompt, f"The answer is {answer}.") and not info.is_correct(prompt, f"It is {answer}")
    assert not info.answer_correct("an unknown prompt", answer)


def test_num_train_prompts_keeps_evenly_spaced_train_prompts_and_the_test_split(tmp_path, tiny_tokenizer_folder):
    options = dict(root=None, cache_dir=tmp_path, builtin="arithmetic", num_prompts=50,
                   tokenizer=str(tiny_tokenizer_folder), max_new_tokens=8)
    full = get("dataset", "prompts")(**options)
    subset = get("dataset", "prompts")(**options, num_train_prompts=9)
    assert len(subset.tokens_train) == 9 and torch.equal(subset.tokens_test, full.tokens_test)
    picked = [i * 45 // 9 for i in range(9)]  # every fifth of the 45 train prompts, first to last family
    assert torch.equal(subset.tokens_train, full.tokens_train[picked])
    assert torch.equal(get("dataset", "prompts")(**options, num_train_prompts=100).tokens_train, full.tokens_train)
    with pytest.raises(KdlabError, match="data.num_train_prompts: must be an integer >= 1, got 0"):
        get("dataset", "prompts")(**options, num_train_prompts=0)


def test_prompts_dataset_errors(tmp_path, tiny_tokenizer_folder):
    factory = get("dataset", "prompts")
    base = dict(root=None, cache_dir=tmp_path)
    cases = [
        (dict(), "exactly one of path (a prompt file) or builtin"),
        (dict(builtin="poems", tokenizer="x"), "data.builtin: unknown prompt set 'poems'"),
        (dict(builtin="arithmetic"), "data.tokenizer: the prompts dataset needs a tokenizer"),
        (dict(builtin="arithmetic", tokenizer="teacher"), "data.tokenizer: 'teacher' is not resolved here yet"),
        (dict(builtin="arithmetic", tokenizer=str(tmp_path / "nothing")), "data.tokenizer.path:"),
        (dict(builtin="arithmetic", num_prompts=1, tokenizer="x"), "data.num_prompts: must be an integer >= 2"),
    ]
    for options, expected in cases:
        with pytest.raises(KdlabError) as error:
            factory(**base, **options)
        assert expected in str(error.value) and "\n" not in str(error.value), options
    (tmp_path / "two.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(KdlabError, match="data.test_fraction: 2 prompts leave an empty test split"):
        factory(root=tmp_path, cache_dir=tmp_path, path="two.jsonl", tokenizer=str(tiny_tokenizer_folder))
