"""Synthetic prompt -> response tasks: seeded string generators and answer checkers.

Every task is pure Python over strings of ``kdlab.seq.tokenizer.ALPHABET``:

==============  ==========================  =====================================================
task            prompt                      response
==============  ==========================  =====================================================
addition        ``456+78=``                 ``6+8+0=14;5+7+1=13;4+0+1=5|534`` (column sums, carry in)
multiplication  ``47*36=``                  ``47*6=282;47*30=1410;282+1410=1692|1692``
arithmetic      either of the two           (a seeded 50/50 mix)
reverse         ``rev:abcde>``              ``edcba``
sort            ``sort:3192>``              ``1239``
sum_split       ``n=13>``                   any ``a+b`` with a + b = 13, a, b >= 0 (e.g. ``6+7``)
==============  ==========================  =====================================================

The scratchpad responses end with ``|`` and the final answer, like a GSM8K
chain of thought. ``is_correct`` is exact match of the whole response (steps
included) for deterministic tasks and validity for ``sum_split``, whose
references are drawn uniformly among its n + 1 valid answers: a task with
several correct answers is where forward and reverse KL distillation differ
(mode covering vs mode seeking; Agarwal et al. 2024, GKD). ``answer_correct``
checks only the final answer. With default options prompt + response + EOS
fits in 48 tokens.
"""
from __future__ import annotations

import difflib
import inspect
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from kdlab.errors import KdlabError
from kdlab.seq.tokenizer import CharTokenizer

IGNORE = -100  # label of prompt and padding positions


@dataclass(frozen=True)
class Task:
    """A named prompt -> response task with its options bound.

    ``make(n, seed)`` draws n (prompt, response) pairs (a prefix of ``make(m, seed)``
    for m > n); ``is_correct`` / ``answer_correct`` judge a response to a prompt and
    never raise on a malformed response (it is simply wrong).
    """

    name: str
    options: dict
    sample: Callable[[random.Random], tuple[str, str]] = field(repr=False)
    check: Callable[[str, str], bool] = field(repr=False)
    check_answer: Callable[[str, str], bool] = field(repr=False)

    def make(self, n: int, seed: int) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    def is_correct(self, prompt: str, response: str) -> bool:
        return self.check(prompt, response)

    def answer_correct(self, prompt: str, response: str) -> bool:
        return self.check_answer(prompt, response)


# --------------------------------------------------------------------------- helpers


def _parse(pattern: re.Pattern, prompt: str, task: str) -> tuple[str, ...]:
    match = pattern.fullmatch(prompt)
    if match is None:
        raise KdlabError(f"prompt {prompt!r} does not match task {task} (expected {pattern.pattern!r}); "
                         f"check that the data was made by task {task!r}")
    return match.groups()


def _final_answer(response: str) -> Optional[str]:
    """Text after the last ``|`` (the scratchpad's answer), or None without one."""
    return response.rsplit("|", 1)[1] if "|" in response else None


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** digits)


def _check_int(task: str, key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KdlabError(f"task {task}: {key}={value!r} must be an integer >= {minimum}; fix tasks option {key}")


def _check_range(task: str, low_key: str, low: int, high_key: str, high: int, minimum: int) -> None:
    _check_int(task, low_key, low, minimum)
    _check_int(task, high_key, high, minimum)
    if low > high:
        raise KdlabError(f"task {task}: {low_key}={low} is larger than {high_key}={high}; swap or fix them")


# --------------------------------------------------------------------------- arithmetic

ADDITION = re.compile(r"(\d+)\+(\d+)=")
MULTIPLICATION = re.compile(r"(\d+)\*(\d+)=")


def addition_response(a: int, b: int) -> str:
    """Column-wise sums from the units up, ``x+y+carry_in=s`` each, then ``|a+b``.

    The answer's digits are the units of each column sum read right to left,
    led by the last column's carry.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return ";".join(steps) + f"|{a + b}"


def multiplication_response(a: int, m: int) -> str:
    """One partial product per digit of ``m`` (``a*d0=p;a*d10=p``), their sum, then ``|a*m``."""
    partials, steps = [], []
    for i, digit in enumerate(reversed(str(m))):
        multiplier = int(digit) * 10 ** i
        partials.append(a * multiplier)
        steps.append(f"{a}*{multiplier}={a * multiplier}")
    if len(partials) > 1:
        steps.append("+".join(map(str, partials)) + f"={a * m}")
    return ";".join(steps) + f"|{a * m}"


def _solve_addition(prompt: str) -> tuple[str, str]:
    a, b = map(int, _parse(ADDITION, prompt, "addition"))
    return addition_response(a, b), str(a + b)


def _solve_multiplication(prompt: str) -> tuple[str, str]:
    a, m = map(int, _parse(MULTIPLICATION, prompt, "multiplication"))
    return multiplication_response(a, m), str(a * m)


def _solve_arithmetic(prompt: str) -> tuple[str, str]:
    return _solve_multiplication(prompt) if "*" in prompt else _solve_addition(prompt)


def _scratchpad_task(name: str, options: dict, sample, solve) -> Task:
    """A deterministic task whose ``solve(prompt)`` gives (reference response, final answer)."""
    return Task(name=name, options=options, sample=sample,
                check=lambda prompt, response: response == solve(prompt)[0],
                check_answer=lambda prompt, response: _final_answer(response) == solve(prompt)[1])


def _sample_addition(rng: random.Random, digits: int) -> tuple[str, str]:
    a, b = _number(rng, digits), _number(rng, digits)
    return f"{a}+{b}=", addition_response(a, b)


def _sample_multiplication(rng: random.Random, digits: int, multiplier_digits: int) -> tuple[str, str]:
    a = _number(rng, digits)
    # Draw the multiplier's length first so 1-digit multipliers are not a rare 10% of 2-digit draws.
    length = rng.randint(1, multiplier_digits)
    m = rng.randrange(10 ** (length - 1) if length > 1 else 0, 10 ** length)
    return f"{a}*{m}=", multiplication_response(a, m)


def addition(*, digits: int = 3) -> Task:
    """a + b with a, b uniform in [0, 10^digits), column-wise scratchpad with carries."""
    _check_int("addition", "digits", digits, 1)
    return _scratchpad_task("addition", {"digits": digits},
                            lambda rng: _sample_addition(rng, digits), _solve_addition)


def multiplication(*, digits: int = 2, multiplier_digits: int = 2) -> Task:
    """a * m, a uniform in [0, 10^digits), m of 1..multiplier_digits digits; partial products, then their sum."""
    _check_int("multiplication", "digits", digits, 1)
    _check_int("multiplication", "multiplier_digits", multiplier_digits, 1)
    return _scratchpad_task("multiplication", {"digits": digits, "multiplier_digits": multiplier_digits},
                            lambda rng: _sample_multiplication(rng, digits, multiplier_digits),
                            _solve_multiplication)


def arithmetic(*, addition_digits: int = 3, multiplication_digits: int = 2, multiplier_digits: int = 2) -> Task:
    """A seeded 50/50 mix of addition and multiplication examples (same formats)."""
    _check_int("arithmetic", "addition_digits", addition_digits, 1)
    _check_int("arithmetic", "multiplication_digits", multiplication_digits, 1)
    _check_int("arithmetic", "multiplier_digits", multiplier_digits, 1)

    def sample(rng: random.Random) -> tuple[str, str]:
        if rng.random() < 0.5:
            return _sample_addition(rng, addition_digits)
        return _sample_multiplication(rng, multiplication_digits, multiplier_digits)

    options = {"addition_digits": addition_digits, "multiplication_digits": multiplication_digits,
               "multiplier_digits": multiplier_digits}
    return _scratchpad_task("arithmetic", options, sample, _solve_arithmetic)


# --------------------------------------------------------------------------- string tasks

REVERSE = re.compile(r"rev:([a-z]+)>")
SORT = re.compile(r"sort:([0-9]+|[a-z]+)>")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


def _exact_task(name: str, options: dict, sample, solve) -> Task:
    """A deterministic task without scratchpad: the answer is the whole response."""
    check = lambda prompt, response: response == solve(prompt)  # noqa: E731
    return Task(name=name, options=options, sample=sample, check=check, check_answer=check)


def reverse(*, min_length: int = 3, max_length: int = 8) -> Task:
    """Reverse a string of lowercase letters whose length is uniform in [min_length, max_length]."""
    _check_range("reverse", "min_length", min_length, "max_length", max_length, 1)

    def sample(rng: random.Random) -> tuple[str, str]:
        text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_length, max_length)))
        return f"rev:{text}>", text[::-1]

    return _exact_task("reverse", {"min_length": min_length, "max_length": max_length}, sample,
                       lambda prompt: _parse(REVERSE, prompt, "reverse")[0][::-1])


def sort(*, symbols: str = "digits", min_length: int = 3, max_length: int = 8) -> Task:
    """Sort a list of digits (``symbols: digits``) or letters (``letters``), repeats allowed."""
    _check_range("sort", "min_length", min_length, "max_length", max_length, 1)
    pools = {"digits": DIGITS, "letters": LETTERS}
    if symbols not in pools:
        raise KdlabError(f"task sort: symbols={symbols!r} must be one of {', '.join(pools)}; fix tasks option symbols")
    pool = pools[symbols]

    def sample(rng: random.Random) -> tuple[str, str]:
        text = "".join(rng.choice(pool) for _ in range(rng.randint(min_length, max_length)))
        return f"sort:{text}>", "".join(sorted(text))

    return _exact_task("sort", {"symbols": symbols, "min_length": min_length, "max_length": max_length}, sample,
                       lambda prompt: "".join(sorted(_parse(SORT, prompt, "sort")[0])))


# --------------------------------------------------------------------------- several correct answers

SUM_SPLIT = re.compile(r"n=(\d+)>")
SPLIT_ANSWER = re.compile(r"(0|[1-9]\d*)\+(0|[1-9]\d*)")  # canonical decimals: no leading zeros


def _valid_split(prompt: str, response: str) -> bool:
    (n,) = map(int, _parse(SUM_SPLIT, prompt, "sum_split"))
    match = SPLIT_ANSWER.fullmatch(response)
    return match is not None and int(match.group(1)) + int(match.group(2)) == n


def sum_split(*, min_n: int = 2, max_n: int = 30) -> Task:
    """Write n as ``a+b`` (a, b >= 0): n + 1 correct answers; references are uniform among them."""
    _check_range("sum_split", "min_n", min_n, "max_n", max_n, 0)

    def sample(rng: random.Random) -> tuple[str, str]:
        n = rng.randint(min_n, max_n)
        a = rng.randint(0, n)
        return f"n={n}>", f"{a}+{n - a}"

    return Task(name="sum_split", options={"min_n": min_n, "max_n": max_n}, sample=sample, check=_valid_split,
                check_answer=_valid_split)


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Callable[..., Task]] = {
    "addition": addition,
    "multiplication": multiplication,
    "arithmetic": arithmetic,
    "reverse": reverse,
    "sort": sort,
    "sum_split": sum_split,
}


def get_task(name: str, **options) -> Task:
    """The task ``name`` with ``options`` bound; ``KdlabError`` on an unknown name or option."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KdlabError(f"unknown sequence task {name!r}; {hint}known tasks: {', '.join(sorted(TASKS))}")
    builder = TASKS[name]
    known = list(inspect.signature(builder).parameters)
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise KdlabError(f"task {name} has no option {key!r}; {hint}its options: {', '.join(known) or '(none)'}")
    return builder(**options)


# --------------------------------------------------------------------------- tensors


def encode_examples(examples: list[tuple[str, str]], tokenizer: CharTokenizer,
                    context_length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, labels)`` int64 ``(N, L)`` in the canonical layout: prompt, response, EOS, pad;
    labels are the response ids + EOS at their positions (not shifted), -100 elsewhere.

    L is the longest prompt + response + 1 (EOS). A longer example than
    ``context_length`` raises ``KdlabError``.
    """
    rows = []
    for index, (prompt, response) in enumerate(examples):
        prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response) + [tokenizer.eos_id]
        total = len(prompt_ids) + len(response_ids)
        if context_length is not None and total > context_length:
            raise KdlabError(f"example {index} ({prompt!r} -> {response!r}) has {len(prompt_ids)} prompt + "
                             f"{len(response_ids)} response tokens (EOS included) = {total} > context_length "
                             f"{context_length}; raise the context_length or shorten the task (its options)")
        rows.append((prompt_ids, response_ids))
    length = max((len(p) + len(r) for p, r in rows), default=0)
    tokens = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for row, (prompt_ids, response_ids) in enumerate(rows):
        start, end = len(prompt_ids), len(prompt_ids) + len(response_ids)
        tokens[row, :end] = torch.tensor(prompt_ids + response_ids)
        labels[row, start:end] = torch.tensor(response_ids)
    return tokens, labels


def encode_prompts(prompts: list[str], tokenizer: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt ids ``(N, P)`` and lengths ``(N,)``, the input of ``sampling.generate``."""
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    width = max((len(ids) for ids in encoded), default=0)
    tokens = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long)
    for row, ids in enumerate(encoded):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens, torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
