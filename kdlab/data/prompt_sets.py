"""Built-in offline prompt sets for language-model distillation (no download needed).

* ``arithmetic_prompts`` — kdlab's arithmetic (addition and multiplication of
  random integers) as natural-language questions, the number as the reference;
  prompts are distinct, so splitting them keeps test questions unseen.
* ``docstring_prompts`` — "Explain what `module.function` does." for the public
  functions, classes and methods of the standard-library modules of
  ``kdlab.data.docstrings.FAMILIES``, the first paragraph of the docstring as
  the reference. Each record's ``group`` is its module family, so
  ``split_records(test_groups=...)`` holds out whole families: test prompts
  are about modules never seen in training.

Both depend only on the seed (and, for docstrings, on the Python version's
docstrings; ``docstring_prompts`` returns the content hash to compare machines).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import warnings

from kdlab.data.docstrings import _MIN_CHARS, FAMILIES, _documented
from kdlab.data.prompts import PromptRecord
from kdlab.errors import KdlabError

ARITHMETIC_TEMPLATES = {
    "+": "What is {a} plus {b}? Answer with the number only.",
    "*": "What is {a} times {b}? Answer with the number only.",
}


def arithmetic_prompts(n: int, *, seed: int = 0, digits: int = 2, operations: str = "+*") -> list[PromptRecord]:
    """``n`` distinct arithmetic questions with their answers (``reference`` = the number as text)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KdlabError(f"data.num_prompts: must be an integer >= 1, got {n!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 9:
        raise KdlabError(f"data.digits: must be an integer in 1..9, got {digits!r}")
    if not operations or set(operations) - set(ARITHMETIC_TEMPLATES):
        raise KdlabError(f"data.operations: use a string of {''.join(ARITHMETIC_TEMPLATES)}, got {operations!r}")
    distinct = len(operations) * (10 ** digits) ** 2
    if n > distinct // 2:
        raise KdlabError(f"data.num_prompts: {n} distinct questions with {digits}-digit numbers are too many "
                         f"(at most {distinct // 2}); raise digits or lower num_prompts")
    rng = random.Random(seed)
    seen, records = set(), []
    while len(records) < n:
        op = operations[rng.randrange(len(operations))]
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
        prompt = ARITHMETIC_TEMPLATES[op].format(a=a, b=b)
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = a + b if op == "+" else a * b
        records.append(PromptRecord(prompt=prompt, reference=str(answer), where=f"arithmetic prompt {len(records) + 1}",
                                    group=op))
    return records


def docstring_prompts() -> tuple[list[PromptRecord], str]:
    """``(records, content_sha256)``: one explain-this prompt per documented stdlib object, grouped by family.

    Objects and paragraphs follow ``kdlab.data.docstrings`` (same modules, same
    25-character minimum, a repeated paragraph kept only where first met); the
    modules themselves are skipped (their names say little).
    """
    records, seen = [], set()
    for family, modules in FAMILIES.items():
        for module_name in modules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules (typing.io, ...) still document themselves
                module = importlib.import_module(module_name)
                documented = [(obj, inspect.getdoc(obj)) for obj in _documented(module)[1:]]
            for obj, doc in documented:
                name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
                if not doc or not name:
                    continue
                paragraph = " ".join(doc.strip().split("\n\n")[0].split())
                if len(paragraph) < _MIN_CHARS or paragraph in seen:
                    continue
                seen.add(paragraph)
                records.append(PromptRecord(prompt=f"Explain what `{module_name}.{name}` does.", reference=paragraph,
                                            where=f"docstring of {module_name}.{name}", group=family))
    digest = hashlib.sha256("\n".join(f"{r.group}\t{r.prompt}\t{r.reference}" for r in records).encode()).hexdigest()
    return records, digest
