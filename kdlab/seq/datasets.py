"""The synthetic sequence tasks as datasets (``data.dataset: addition``, ``reverse``, ...).

Each task of ``kdlab.seq.tasks`` is registered as a dataset whose options are
``num_train``, ``num_test``, ``seed``, ``context_length`` and the task's own
options (e.g. ``digits``). The test set is drawn first from its own seeded
stream; for deterministic tasks every prompt appears once in train and test
together, so exact match on test (and on val, carved out of train) measures
generalisation, not recall.
(``sum_split`` has a few dozen distinct prompts and several answers each:
there the prompts are shared and the answers are what is learnt.)
"""
from __future__ import annotations

import inspect
import random
from pathlib import Path
from typing import Optional

from kdlab.data.sequence import SequenceArrays, SequenceInfo
from kdlab.errors import KdlabError
from kdlab.registry import register
from kdlab.seq.evaluate import EXTRA_TOKENS
from kdlab.seq.tasks import TASKS, encode_examples, get_task
from kdlab.seq.tokenizer import CharTokenizer

# Tasks whose prompts are few and whose answers are many: train and test share prompts.
SHARED_PROMPTS = {"sum_split"}


def _draw(task, n: int, seed: int, exclude: set[str] | None, key: str) -> list[tuple[str, str]]:
    """``n`` examples with distinct prompts outside ``exclude`` (None: prompts may repeat, as in sum_split).

    Distinct prompts keep the val split (carved out of train) and the test split free of
    prompts the model was trained on; KdlabError if the task has too few of them.
    """
    rng = random.Random(seed)
    examples, tries = [], 0
    seen = set(exclude) if exclude is not None else None
    while len(examples) < n:
        tries += 1
        if tries > 20 * n + 1000:
            raise KdlabError(f"data.{key}: task {task.name!r} has too few distinct prompts for {n} examples "
                             "(train and test prompts are kept distinct); lower num_train/num_test or widen the "
                             "task's options (e.g. more digits)")
        prompt, response = task.sample(rng)
        if seen is None:
            examples.append((prompt, response))
        elif prompt not in seen:
            seen.add(prompt)
            examples.append((prompt, response))
    return examples


def load_task(name: str, *, num_train: int, num_test: int, seed: int, context_length: int | None,
              **task_options) -> SequenceArrays:
    for key, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KdlabError(f"data.{key}: must be an integer >= 1, got {value!r}")
    task = get_task(name, **task_options)
    tokenizer = CharTokenizer()
    shared = name in SHARED_PROMPTS
    test = _draw(task, num_test, 2 * seed + 1, None if shared else set(), "num_test")
    train = _draw(task, num_train, 2 * seed, None if shared else {prompt for prompt, _ in test}, "num_train")
    longest_response = max(len(tokenizer.encode(r)) + 1 for _, r in train + test)
    longest = max(len(tokenizer.encode(p)) + len(tokenizer.encode(r)) + 1 for p, r in train + test)
    if context_length is None:
        context_length = longest + EXTRA_TOKENS  # room for a model that overshoots a little before EOS
    try:
        tokens_train, labels_train = encode_examples(train, tokenizer, context_length)
        tokens_test, labels_test = encode_examples(test, tokenizer, context_length)
    except KdlabError as exc:  # a prompt + response longer than the context: name the key to change
        raise KdlabError(f"data.context_length: {exc}") from None
    info = SequenceInfo(task=name, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, decode=tokenizer.decode,
                        is_correct=task.is_correct, answer_correct=task.answer_correct,
                        max_response_tokens=longest_response, context_length=context_length)
    return SequenceArrays(tokens_train, labels_train, tokens_test, labels_test, tokenizer.vocab_size, info)


def _register(name: str) -> None:
    """Register task ``name`` as a dataset whose signature lists its options (checked by the config layer)."""
    builder = TASKS[name]

    def factory(*, root: Optional[Path] = None, cache_dir: Optional[Path] = None, num_train: int = 4000, num_test: int = 500, seed: int = 0,
                context_length: int | None = None, **task_options) -> SequenceArrays:
        return load_task(name, num_train=num_train, num_test=num_test, seed=seed, context_length=context_length,
                         **task_options)

    base = [p for p in inspect.signature(factory).parameters.values() if p.kind is not p.VAR_KEYWORD]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(builder).parameters.values()]
    factory.__signature__ = inspect.Signature(base + own)
    factory.__annotations__ = {"root": Optional[Path], "cache_dir": Optional[Path], "num_train": int,
                               "num_test": int, "seed": int, "context_length": Optional[int],
                               **{p.name: p.annotation for p in own}, "return": SequenceArrays}
    factory.__name__ = name
    factory.image_inputs = False  # token ids: data.augment crop_flip is refused at config validation
    factory.__doc__ = f"Sequence task {name}: {(builder.__doc__ or '').strip().splitlines()[0]}"
    register("dataset", name)(factory)


for _name in TASKS:
    _register(_name)
