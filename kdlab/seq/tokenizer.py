"""A character tokenizer with one fixed alphabet shared by every synthetic sequence task.

Ids: ``<pad>`` = 0, ``<eos>`` = 1, then one id per character of ``ALPHABET`` in
order. Because the alphabet is fixed (not built from the data), every task and
every model trained on any of them agree on the ids, so a teacher trained on
``addition`` can distil into a student evaluated on ``arithmetic``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from kdlab.errors import KdlabError

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*=>|,:;.()"
SPECIAL_TOKENS = ("<pad>", "<eos>")
PAD_ID = 0
EOS_ID = 1


class CharTokenizer:
    """``encode(text) -> ids`` and ``decode(ids) -> text`` over ``ALPHABET`` (vocab_size 51)."""

    pad_id = PAD_ID
    eos_id = EOS_ID

    def __init__(self) -> None:
        offset = len(SPECIAL_TOKENS)
        self._ids = {char: offset + index for index, char in enumerate(ALPHABET)}
        self._chars = {index: char for char, index in self._ids.items()}

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(ALPHABET)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS appended); ``KdlabError`` on a character outside ``ALPHABET``."""
        try:
            return [self._ids[char] for char in text]
        except KeyError as exc:
            raise KdlabError(f"character {exc.args[0]!r} in {text!r} is not in the tokenizer alphabet "
                             f"{ALPHABET!r}; use only these characters") from None

    def decode(self, ids: Iterable[int] | torch.Tensor, stop_at_eos: bool = True) -> str:
        """Text of ``ids`` (a list or 1-D tensor): padding is skipped; stops at the first EOS.

        With ``stop_at_eos=False`` an EOS is skipped like padding and decoding goes on.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = []
        for index in ids:
            if index == EOS_ID:
                if stop_at_eos:
                    break
                continue
            if index == PAD_ID:
                continue
            try:
                chars.append(self._chars[index])
            except KeyError:
                raise KdlabError(f"token id {index!r} is outside the vocabulary [0, {self.vocab_size}); "
                                 f"the model's num_classes must equal the tokenizer's vocab_size "
                                 f"{self.vocab_size}") from None
        return "".join(chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
