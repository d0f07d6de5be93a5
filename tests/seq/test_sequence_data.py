"""The synthetic sequence tasks as datasets (kdlab.seq.datasets through kdlab.data.build_splits) and
their evaluation (kdlab.seq.evaluate.sequence_metrics) against hand-made oracle models."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.data import SequenceInfo, build_splits
from kdlab.errors import KdlabError
from kdlab.seq.evaluate import sequence_metrics
from kdlab.seq.tokenizer import ALPHABET, CharTokenizer

IGNORE = -100
PAD, EOS = 0, 1
TASKS = ("addition", "multiplication", "arithmetic", "reverse", "sort", "sum_split")
DETERMINISTIC = tuple(t for t in TASKS if t != "sum_split")
SMALL = {"num_train": 24, "num_test": 8}


def _splits(name, options=None, *, cache="a", val_fraction=0.25, split_seed=0):
    opts = dict(SMALL)
    opts.update(options or {})
    return build_splits(name, opts, root=None, cache_dir=f"/tmp/kdlab-test-seqdata-{cache}",
                        val_fraction=val_fraction, split_seed=split_seed)


def _rows(tokens):
    return [tuple(row) for row in tokens.tolist()]


def _prompt_ids(tokens, labels):
    out = []
    for row, lab in zip(tokens.tolist(), labels.tolist()):
        start = next(i for i, v in enumerate(lab) if v != IGNORE)
        out.append(tuple(row[:start]))
    return out


def _text(ids):
    return "".join(ALPHABET[i - 2] for i in ids)


# --------------------------------------------------------------------------- building every task


@pytest.mark.parametrize("name", TASKS)
def test_task_builds_canonical_splits(name):
    splits = _splits(name)
    info = splits.sequence
    assert isinstance(info, SequenceInfo) and info.task == name
    assert info.pad_id == PAD and info.eos_id == EOS
    assert splits.num_classes == CharTokenizer().vocab_size
    assert splits.input_shape == (info.context_length,)
    assert len(splits.train[0]) + len(splits.val[0]) == SMALL["num_train"]
    assert len(splits.val[0]) == 6 and len(splits.test[0]) == SMALL["num_test"]
    longest_response = 0
    for split in (splits.train, splits.val, splits.test):
        tokens, labels = split
        assert tokens.dtype == torch.int64 and labels.dtype == torch.int64
        assert tokens.shape == labels.shape and tokens.dim() == 2
        assert tokens.shape[1] <= info.context_length
        for row, lab in zip(tokens.tolist(), labels.tolist()):
            counted = [i for i, v in enumerate(lab) if v != IGNORE]
            assert counted, "every example has a response"
            start, end = counted[0], counted[-1] + 1
            assert counted == list(range(start, end)), "the response is one contiguous span"
            assert start >= 1, "every example has a prompt"
            assert lab[start:end] == row[start:end], "labels are the tokens at response positions"
            assert row[end - 1] == EOS and EOS not in row[:end - 1], "the response ends with (one) EOS"
            assert all(t == PAD for t in row[end:]), "right padding after EOS"
            assert PAD not in row[:end]
            longest_response = max(longest_response, end - start)
            # The reference response is correct by the task's own checker.
            prompt, response = _text(row[:start]), _text(row[start:end - 1])
            assert info.is_correct(prompt, response) and info.answer_correct(prompt, response)
            assert info.decode(row[start:]) == response
    assert info.max_response_tokens == longest_response


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_by_seed(name):
    a = _splits(name, {"seed": 3}, cache="a")
    b = _splits(name, {"seed": 3}, cache="b")  # another cache dir: a fresh factory call, not the memo
    for split in ("train", "val", "test"):
        for x, y in zip(getattr(a, split), getattr(b, split)):
            assert torch.equal(x, y), split
    c = _splits(name, {"seed": 4}, cache="a")
    assert not (a.train[0].shape == c.train[0].shape and torch.equal(a.train[0], c.train[0]))


@pytest.mark.parametrize("name", TASKS)
def test_val_is_carved_from_train(name):
    splits = _splits(name, {"seed": 1})
    raw = registry.get("dataset", name)(root=None, cache_dir="/tmp", seed=1, **SMALL)
    # Every raw training example lands in exactly one of train and val; test is untouched.
    assert Counter(_rows(splits.train[0])) + Counter(_rows(splits.val[0])) == Counter(_rows(raw.tokens_train))
    assert Counter(_rows(splits.train[1])) + Counter(_rows(splits.val[1])) == Counter(_rows(raw.labels_train))
    assert torch.equal(splits.test[0], raw.tokens_test) and torch.equal(splits.test[1], raw.labels_test)
    # Another split_seed carves another val set from the same examples.
    other = _splits(name, {"seed": 1}, split_seed=5)
    assert Counter(_rows(other.train[0])) + Counter(_rows(other.val[0])) == Counter(_rows(raw.tokens_train))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_prompts_are_distinct_across_splits(name):
    splits = _splits(name, {"num_train": 60, "num_test": 30})
    train, val, test = (_prompt_ids(*split) for split in (splits.train, splits.val, splits.test))
    assert not (set(train) | set(val)) & set(test)
    # Every prompt once: val (carved out of train) shares no prompt with train either.
    assert not set(train) & set(val)
    assert len(set(train + val + test)) == len(train + val + test)


def test_context_length_option_and_default_room():
    default = _splits("reverse", {"max_length": 5})
    longest = max(t.shape[1] for t in (default.train[0], default.val[0], default.test[0]))
    assert default.sequence.context_length > longest  # room to generate past the reference
    wide = _splits("reverse", {"max_length": 5, "context_length": 40})
    assert wide.input_shape == (40,) and wide.sequence.context_length == 40


# --------------------------------------------------------------------------- errors


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(KdlabError, match="did you mean reverse") as info:
        _splits("revers")
    assert "data.dataset" in str(info.value)


def test_unknown_task_option_is_refused():
    with pytest.raises(KdlabError, match="digits"):
        _splits("reverse", {"digits": 3})


def test_too_small_context_length_is_refused():
    with pytest.raises(KdlabError, match="context_length"):
        _splits("reverse", {"context_length": 6})


@pytest.mark.parametrize("key", ["num_train", "num_test"])
def test_bad_sizes_are_refused(key):
    with pytest.raises(KdlabError, match=key):
        _splits("reverse", {key: 0})


# --------------------------------------------------------------------------- metrics with oracles


class _Oracle(nn.Module):
    """Puts all mass on the reference's next token, answering from the prompt it reads in the input.

    ``solve(text) -> answer`` for prompts ``<name>:<text>>``. Follows the sequence-model protocol
    (``past_key_values`` / ``use_cache``); its "cache" is simply the token ids seen so far, so it works
    for teacher-forced right-padded batches and for left-padded cached generation alike.
    ``eos_only``: emits EOS everywhere instead.
    """

    def __init__(self, solve, vocab_size: int, *, eos_only: bool = False, peak: float = 30.0):
        super().__init__()
        self.solve, self.vocab_size, self.eos_only, self.peak = solve, vocab_size, eos_only, peak

    def _next(self, ids: list[int]) -> int:
        if self.eos_only:
            return EOS
        ids = [i for i in ids if i != PAD]
        if EOS in ids:
            return EOS
        text = _text(ids)
        if ">" not in text:
            return PAD  # still inside the prompt: not scored
        prompt, produced = text.split(">", 1)
        answer = [2 + ALPHABET.index(c) for c in self.solve(prompt.split(":", 1)[1])] + [EOS]
        return answer[len(produced)] if len(produced) < len(answer) else EOS

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        full = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], dim=1)
        batch, new = input_ids.shape
        offset = full.shape[1] - new
        logits = torch.zeros(batch, new, self.vocab_size)
        rows = full.tolist()
        for b in range(batch):
            for j in range(new):
                logits[b, j, self._next(rows[b][:offset + j + 1])] = self.peak
        return (logits, full) if use_cache else logits


SOLVERS = {"reverse": lambda text: text[::-1], "sort": lambda text: "".join(sorted(text))}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_oracle_scores_perfectly_and_eos_model_scores_zero(name):
    splits = _splits(name, {"max_length": 5})
    info = splits.sequence
    oracle = _Oracle(SOLVERS[name], splits.num_classes)
    cpu = torch.device("cpu")
    for split in (splits.val, splits.test):
        first = sequence_metrics(oracle, split, info, device=cpu, sampled=True, seed=0)
        assert first["acc"] == 1.0 and first["answer_acc"] == 1.0
        assert first["token_acc"] == 1.0 and first["nll"] < 1e-6
        assert first["sampled_acc"] == 1.0
        references = [info.decode(row[int((lab != IGNORE).int().argmax()):]) for row, lab in zip(*split)]
        again = sequence_metrics(oracle, split, info, device=cpu, teacher_responses=references)
        assert again["agreement"] == 1.0

        silent = _Oracle(SOLVERS[name], splits.num_classes, eos_only=True)
        metrics = sequence_metrics(silent, split, info, device=cpu, teacher_responses=references, sampled=True)
        assert metrics["acc"] == 0.0 and metrics["sampled_acc"] == 0.0 and metrics["agreement"] == 0.0
        labels = split[1]
        n_tokens = int((labels != IGNORE).sum())
        assert metrics["token_acc"] == pytest.approx(len(labels) / n_tokens)  # only the EOS predictions are right
        assert metrics["nll"] > 1.0


def test_oracle_on_a_wrong_task_is_wrong():
    """The oracle really reads the prompt: solving sort on reverse prompts is (almost always) wrong."""
    splits = _splits("reverse", {"min_length": 4, "max_length": 5})
    metrics = sequence_metrics(_Oracle(SOLVERS["sort"], splits.num_classes), splits.test, splits.sequence,
                               device=torch.device("cpu"))
    assert metrics["acc"] < 0.5 and metrics["token_acc"] < 1.0
