"""The ``prompts`` dataset: prompt files or a built-in prompt set, tokenized by a Hugging Face tokenizer.

Config use (``tokenizer`` names where the tokenizer lives: a model folder, a
``.gguf`` file, or ``bundled:smollm2``; ``tokenizer: teacher`` is resolved by the
config layer into the teacher's source, ``kdlab.seq.hf_rules``)::

    data: {dataset: prompts, path: my_prompts.jsonl, tokenizer: ./qwen-1.5b-instruct, chat_template: true,
           max_prompt_tokens: 256, max_new_tokens: 128}
    data: {dataset: prompts, builtin: docstrings, tokenizer: bundled:smollm2, chat_template: true}
    data: {dataset: prompts, builtin: arithmetic, num_prompts: 2000, tokenizer: bundled:smollm2}

It returns ``SequenceArrays`` in the canonical layout (prompt, reference + EOS,
pad), so the existing split (val carved from train by ``data.split_seed``) and
the GKD/SFT methods take it unchanged. Rows without a reference completion get
EOS alone as their response (see ``kdlab.data.prompts.tokenize_records``):
right for on-policy methods, wrong for supervised ones, so their count is
``SequenceInfo.missing_references`` and methods that learn from the data's
responses are refused on such data (``kdlab.engine.build.build_method``).
Generation is exactly ``max_new_tokens`` long at most (``generation_room=0``). ``num_classes`` is the
vocabulary (the larger of the tokenizer's length and the model config's
``vocab_size``, as models pad their embedding); the context is
``max_prompt_tokens + max_new_tokens``, which ``hf_causal_lm`` checks against
the model's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

from kdlab.config.validate import NotInRunId
from kdlab.data.prompt_sets import arithmetic_prompts, docstring_prompts
from kdlab.data.prompts import (PromptRecord, read_prompt_dataset, read_prompt_file, special_ids, split_records,
                                tokenize_records)
from kdlab.data.sequence import SequenceArrays, SequenceInfo
from kdlab.errors import KdlabError
from kdlab.metrics.generation import last_number
from kdlab.registry import register

BUILTIN = ("arithmetic", "docstrings")
LATER = NotInRunId(at_default=True)  # options added after the first runs: at their default, not in the run id
DOCSTRING_TEST_FAMILIES = ("numbers",)  # held out whole: test prompts name modules never trained on


def tokenizer_source(tokenizer: Optional[str], cache_dir: Optional[Path] = None) -> Path:
    """The HF folder holding the tokenizer named by ``data.tokenizer`` (a GGUF is converted once and cached)."""
    from kdlab.seq.hf_load import resolve_source

    if tokenizer is None:
        raise KdlabError("data.tokenizer: the prompts dataset needs a tokenizer: a model folder, a .gguf file or "
                         "bundled:smollm2 (the teacher's)")
    if tokenizer == "teacher":
        raise KdlabError("data.tokenizer: 'teacher' is not resolved here yet (an experiment config resolves it from "
                         "its teacher section); give the teacher's folder, .gguf file or bundled:NAME")
    if tokenizer.startswith("bundled:"):
        return resolve_source(bundled=tokenizer.split(":", 1)[1], key="data.tokenizer", cache_dir=cache_dir)
    return resolve_source(path=tokenizer, key="data.tokenizer", cache_dir=cache_dir)


def _vocab_size(folder: Path, tokenizer) -> int:
    try:
        configured = int(json.loads((folder / "config.json").read_text()).get("vocab_size") or 0)
    except (OSError, ValueError):
        configured = 0
    return max(len(tokenizer), configured)


def _checkers(prompts: list[str], references: list[Optional[str]], numeric: bool):
    answers = dict(zip(prompts, references))

    def is_correct(prompt: str, response: str) -> bool:
        reference = answers.get(prompt)
        return reference is not None and response.strip() == reference.strip()

    def answer_correct(prompt: str, response: str) -> bool:
        reference = answers.get(prompt)
        if reference is None:
            return False
        return last_number(response) == reference.strip() if numeric else response.strip() == reference.strip()

    return is_correct, answer_correct


@register("dataset", "prompts")
def prompts(*, root: Optional[Path] = None, cache_dir: Optional[Path] = None, path: Optional[str] = None,
            builtin: Optional[str] = None, data_files: Annotated[Optional[dict[str, str]], LATER] = None,
            tokenizer: Optional[str] = None, chat_template: bool = False, system: Optional[str] = None,
            max_prompt_tokens: int = 256, max_new_tokens: int = 128, test_fraction: float = 0.1, seed: int = 0,
            num_prompts: Optional[int] = None, digits: int = 2,
            num_test_prompts: Annotated[Optional[int], LATER] = None,
            num_train_prompts: Annotated[Optional[int], LATER] = None) -> SequenceArrays:
    """Prompts (file or built-in arithmetic/docstrings) tokenized by a Hugging Face tokenizer, for LM distillation.

    ``path``: a JSONL/JSON/CSV/Parquet prompt file or a Hugging Face save_to_disk
    folder (relative to ``data.root`` when given), or ``data_files``: {split:
    file} read by the datasets library (a ``test`` split of either is the test
    set; other splits join train), or ``builtin``: ``arithmetic`` / ``docstrings``.
    ``tokenizer``: a model folder, a .gguf file or ``bundled:smollm2``. ``chat_template``: apply
    the tokenizer's chat template (``system`` adds a system turn). Test split:
    ``test_fraction`` by ``seed`` (docstrings: the ``numbers`` family, unseen).
    ``num_prompts``: the first N records (arithmetic: how many to draw, default
    2000). ``digits``: arithmetic operand size. ``num_test_prompts``: evaluate on
    the first N test prompts only (the same N for every seed and arm: decoding the
    test split is the costly part of a CPU study). ``num_train_prompts``: train on N
    evenly spaced train prompts (every family keeps its share: the file order groups
    them), e.g. so that an offline-target cache built over the train split stays small.
    """
    if (path is not None) + (builtin is not None) + (data_files is not None) != 1:
        raise KdlabError(f"data: the prompts dataset needs exactly one of path (a prompt file) or builtin "
                         f"({' or '.join(BUILTIN)}) or data_files ({{split: file}}, read by the datasets library)")
    if num_prompts is not None and (isinstance(num_prompts, bool) or not isinstance(num_prompts, int)
                                    or num_prompts < 2):
        raise KdlabError(f"data.num_prompts: must be an integer >= 2, got {num_prompts!r}")
    for key, value in (("num_test_prompts", num_test_prompts), ("num_train_prompts", num_train_prompts)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KdlabError(f"data.{key}: must be an integer >= 1, got {value!r}")
    test_groups = None
    if builtin == "arithmetic":
        records: list[PromptRecord] = arithmetic_prompts(num_prompts or 2000, seed=seed, digits=digits)
        task = "prompts:arithmetic"
    elif builtin == "docstrings":
        records, _ = docstring_prompts()
        records = records[:num_prompts] if num_prompts else records
        test_groups = [g for g in DOCSTRING_TEST_FAMILIES if any(r.group == g for r in records)] or None
        task = "prompts:docstrings"
    elif builtin is not None:
        raise KdlabError(f"data.builtin: unknown prompt set {builtin!r}; use {' or '.join(BUILTIN)}")
    elif data_files is not None:
        records = read_prompt_dataset(root, cache_dir, data_files=data_files)
        records = records[:num_prompts] if num_prompts else records
        task = f"prompts:{Path(data_files.get('train', next(iter(data_files.values())))).name}"
    else:
        file = Path(path).expanduser()
        if root is not None and not file.is_absolute():
            file = Path(root) / file
        records = read_prompt_file(file, cache_dir=cache_dir)
        records = records[:num_prompts] if num_prompts else records
        task = f"prompts:{file.name}"
    if test_groups is None and any(r.group == "test" for r in records if builtin is None):
        test_groups = ["test"]  # a datasets folder's own test split is the test set
    parts = split_records(records, seed=seed, val_fraction=0.0, test_fraction=test_fraction,
                          test_groups=test_groups)
    if not parts["test"]:
        raise KdlabError(f"data.test_fraction: {len(records)} prompts leave an empty test split; raise it or add "
                         "prompts")
    parts["test"] = parts["test"][:num_test_prompts]
    if num_train_prompts is not None and num_train_prompts < len(parts["train"]):
        train_records = parts["train"]
        parts["train"] = [train_records[i * len(train_records) // num_train_prompts] for i in range(num_train_prompts)]
    from kdlab.seq.hf_load import load_generation_config, load_tokenizer

    folder = tokenizer_source(tokenizer, cache_dir)
    hf_tokenizer = load_tokenizer(folder)
    pad_id, eos_id, stops = special_ids(hf_tokenizer, load_generation_config(folder))
    options = dict(eos_id=eos_id, pad_id=pad_id, chat_template=chat_template, max_prompt_tokens=max_prompt_tokens,
                   max_new_tokens=max_new_tokens, system=system)
    train = tokenize_records(parts["train"], hf_tokenizer, **options)
    test = tokenize_records(parts["test"], hf_tokenizer, **options)
    ends = set(stops) | {pad_id}

    def decode(ids: list[int]) -> str:
        # Drop the trailing run of EOS/pad (a response's end and padding); a prompt keeps the EOS-like tokens
        # its chat template puts between turns (SmolLM2's <|im_end|> is its EOS).
        end = len(ids)
        while end and ids[end - 1] in ends:
            end -= 1
        return hf_tokenizer.decode(ids[:end], skip_special_tokens=True)

    texts = [decode(row[:n]) for part in (train, test)
             for row, n in zip(part.tokens.tolist(), part.prompt_lengths.tolist())]
    references = train.references + test.references
    is_correct, answer_correct = _checkers(texts, references, numeric=builtin == "arithmetic")
    info = SequenceInfo(task=task, pad_id=pad_id, eos_id=eos_id, decode=decode, is_correct=is_correct,
                        answer_correct=answer_correct, max_response_tokens=max_new_tokens,
                        context_length=max_prompt_tokens + max_new_tokens, generation_room=0,
                        missing_references=int((~train.has_reference).sum()),
                        first_missing_reference=next((r.where for r in parts["train"] if r.reference is None), ""))
    return SequenceArrays(train.tokens, train.labels, test.tokens, test.labels, _vocab_size(folder, hf_tokenizer),
                          info)
