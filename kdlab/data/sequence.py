"""Sequence (prompt → response) datasets: what a task factory returns and how it is split.

A sequence task is stored in the canonical training layout used everywhere in
kdlab's sequence code: ``tokens`` (N, L) int64, right-padded — prompt tokens,
response tokens, EOS, then padding — and ``labels`` (N, L) int64 holding the
token id at response positions (EOS included) and -100 at prompt and padding
positions (the Hugging Face convention, so masks come for free).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kdlab.errors import KdlabError

IGNORE = -100  # label of prompt and padding positions


@dataclass(frozen=True)
class SequenceInfo:
    """What evaluation and on-policy sampling need to know about a sequence task."""

    task: str
    pad_id: int
    eos_id: int
    decode: Callable[[list[int]], str]  # token ids -> text (stops at EOS, skips padding)
    is_correct: Callable[[str, str], bool]  # (prompt, response) -> exact/valid answer
    answer_correct: Callable[[str, str], bool]  # (prompt, response) -> the final answer is right
    max_response_tokens: int  # longest reference response, EOS included
    context_length: int  # prompt + response room every model of this task must have
    # Tokens generated beyond max_response_tokens before a response that has not stopped is cut (evaluation and
    # on-policy sampling): room for a model that overshoots a little on tasks with exact references; 0 for
    # open-ended prompts, where max_response_tokens is the user's max_new_tokens and is generated exactly.
    generation_room: int = 4
    # Train rows whose response is a placeholder EOS (a prompt given without a completion): on-policy methods
    # replace it by a generation; methods that would learn from it (SFT, off-policy KD) are refused.
    missing_references: int = 0
    first_missing_reference: str = ""  # where the first of them is ("file, row N"), for the refusal's message


@dataclass
class SequenceArrays:
    """What a sequence-task factory returns: train and test in the canonical layout."""

    tokens_train: torch.Tensor
    labels_train: torch.Tensor
    tokens_test: torch.Tensor
    labels_test: torch.Tensor
    vocab_size: int
    info: SequenceInfo


def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the number of prompt tokens: the position of the first response label."""
    is_response = labels != IGNORE
    if not bool(is_response.any(dim=1).all()):
        raise KdlabError("a sequence has no response tokens; every example needs a response")
    return is_response.int().argmax(dim=1)


def check_sequence_arrays(name: str, arrays: SequenceArrays) -> None:
    where = f"dataset {name!r}"
    for split in ("train", "test"):
        tokens, labels = getattr(arrays, f"tokens_{split}"), getattr(arrays, f"labels_{split}")
        if tokens.dtype != torch.int64 or labels.dtype != torch.int64 or tokens.shape != labels.shape or tokens.dim() != 2:
            raise KdlabError(f"{where}: tokens_{split}/labels_{split} must be int64 tensors of one shape (N, L); fix the task factory")
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < arrays.vocab_size):
            raise KdlabError(f"{where}: tokens_{split} has ids outside [0, {arrays.vocab_size}); fix the tokenizer")
        if tokens.shape[1] > arrays.info.context_length:
            raise KdlabError(f"{where}: sequences of {tokens.shape[1]} tokens exceed the task's context length "
                             f"{arrays.info.context_length}; raise it")
    if arrays.tokens_train.shape[0] < 1:
        raise KdlabError(f"{where}: the train split is empty; raise num_train")


def split_sequences(name: str, arrays: SequenceArrays, *, val_fraction: float, split_seed: int):
    """Hold out ``round(N·val_fraction)`` random train sequences as val (seeded); test untouched."""
    from kdlab.data.base import Splits
    from kdlab.data.stratify import holdout_size

    check_sequence_arrays(name, arrays)
    tokens, labels = arrays.tokens_train, arrays.labels_train
    held = holdout_size(tokens.shape[0], val_fraction)
    if held:
        order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(split_seed))
        val_index, train_index = order[:held].sort().values, order[held:].sort().values
        val = (tokens[val_index], labels[val_index])
        tokens, labels = tokens[train_index], labels[train_index]
    else:
        val = (tokens[:0], labels[:0])
    return Splits(name=name, train=(tokens, labels), val=val, test=(arrays.tokens_test, arrays.labels_test),
                  num_classes=arrays.vocab_size, input_shape=(arrays.info.context_length,), mean=(0.0,), std=(1.0,),
                  sequence=arrays.info)
