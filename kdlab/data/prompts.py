"""Prompt data for distilling language models: read prompt files, split them, tokenize them.

A prompt file is JSONL, JSON (a list of objects), CSV or Parquet (Parquet needs
``pyarrow`` or ``pandas``); with the ``datasets`` extra, prompts may also be a
Hugging Face ``save_to_disk`` folder or ``{split: file}`` data files read by that
library (``read_prompt_dataset``). Each row has either

* a ``prompt`` column (non-empty text) and optionally a ``completion`` column
  (the reference answer), or
* a ``messages`` column in chat format — a list of ``{"role", "content"}``; the
  last turn, if it is the assistant's, is the reference completion and the turns
  before it are the prompt. (In CSV the cell holds the list as JSON.)

``read_prompt_file`` gives ``PromptRecord`` s; ``split_records`` splits them by
seed (or by group, so test prompts come from unseen groups);
``tokenize_records`` turns them into kdlab's canonical sequence layout (see
``kdlab.data.sequence``) with a Hugging Face tokenizer, its chat template when
asked. Every bad row is one ``KdlabError`` line naming the file and row.

The built-in offline prompt sets are in ``kdlab.data.prompt_sets``; the
registered ``prompts`` dataset, which ties these together, in
``kdlab.seq.prompt_dataset``. Generated responses are masked by the first EOS's
position (``kdlab.metrics.generation.response_mask``), never by ``!= pad``.
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from kdlab.data.sequence import IGNORE
from kdlab.errors import KdlabError

FORMATS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: plain text or chat messages (without the reference turn), and its reference answer."""

    prompt: str | tuple[dict, ...]  # text, or chat messages ({"role", "content"}) ending before the answer
    reference: Optional[str]  # the reference completion, None when the row has none
    where: str  # "file, row N" (1-based data rows) for error messages
    group: Optional[str] = None  # split unit for split_records(by_group=True), e.g. a module family


# --------------------------------------------------------------------------- reading


def _decode(raw: bytes, path: Path) -> str:
    """UTF-8 text of a file, or one line naming the file and the line of the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise KdlabError(f"{path}: line {line} is not valid UTF-8 (byte {error.start}); save the file as UTF-8")


def _rows(path: Path) -> list[tuple[int, Any]]:
    """``(row number, row)`` pairs: JSONL lines (1-based, blank lines skipped), JSON list items and CSV data
    rows (1-based, header excluded), Parquet rows (1-based)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise KdlabError(f"{path}: unknown prompt file type {suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise KdlabError(f"{path}: prompt file not found; check data.path")
    if suffix == ".parquet":
        return list(enumerate(_parquet_rows(path), start=1))
    text = _decode(path.read_bytes(), path)
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise KdlabError(f"{path}: line {number} is not valid JSON ({error.msg}); write one JSON object "
                                 "per line") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise KdlabError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); fix the file") from None
        if not isinstance(data, list):
            raise KdlabError(f"{path}: a JSON prompt file must hold a list of objects, got a {type(data).__name__}")
        return list(enumerate(data, start=1))
    return list(enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1))


def _parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        parquet = None
    try:
        if parquet is not None:
            return parquet.read_table(path).to_pylist()
        try:
            import pandas
        except ImportError:
            raise KdlabError(f"{path}: reading Parquet needs pyarrow (or pandas); pip install pyarrow, or convert "
                             "the file to JSONL") from None
        return pandas.read_parquet(path).to_dict("records")
    except KdlabError:
        raise
    except Exception as error:  # noqa: BLE001 - pyarrow/pandas raise their own classes for a damaged file
        raise KdlabError(f"{path}: not a readable Parquet file ({type(error).__name__}); re-save it") from None


def _messages(value: Any, where: str) -> tuple[tuple[dict, ...], Optional[str]]:
    """Prompt turns and the reference (the last turn when it is the assistant's) of a ``messages`` cell."""
    if isinstance(value, str):  # CSV cells hold the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise KdlabError(f"{where}: the messages cell is not a JSON list; write it as "
                             '[{"role": "user", "content": "..."}]') from None
    if hasattr(value, "tolist"):  # numpy arrays from pandas
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise KdlabError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str):
            raise KdlabError(f"{where}: every message needs a string role and a string content, got {turn!r:.80}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    reference = None
    if turns[-1]["role"] == "assistant":
        reference = turns.pop()["content"]
    if not turns or not any(turn["content"].strip() for turn in turns):
        raise KdlabError(f"{where}: the prompt is empty (no non-empty message before the last assistant turn); "
                         "give at least one user message")
    return tuple(turns), reference


def _records(rows: Sequence[tuple[int, Any]], source: str, group: Optional[str] = None) -> list[PromptRecord]:
    """``PromptRecord`` s of ``(row number, row)`` pairs; errors name ``source`` and the row."""
    records = []
    for number, row in rows:
        where = f"{source}, row {number}"
        if not isinstance(row, dict):
            raise KdlabError(f"{where}: expected an object with a prompt or messages column, got {row!r:.60}")
        if row.get("messages") not in (None, ""):
            prompt, reference = _messages(row["messages"], where)
        elif "prompt" in row:
            prompt, reference = row["prompt"], row.get("completion")
            if not isinstance(prompt, str) or not prompt.strip():
                raise KdlabError(f"{where}: the prompt is empty; give every row a non-empty prompt or remove it")
            if reference == "":
                reference = None
            if reference is not None and not isinstance(reference, str):
                raise KdlabError(f"{where}: completion must be text, got {type(reference).__name__}")
        else:
            raise KdlabError(f"{where}: has neither a 'prompt' nor a 'messages' column (columns: "
                             f"{', '.join(map(str, row)) or 'none'}); name the prompt column 'prompt'")
        records.append(PromptRecord(prompt=prompt, reference=reference, where=where, group=group))
    return records


def read_prompt_file(path: str | Path, *, cache_dir: Optional[Path] = None) -> list[PromptRecord]:
    """Every row of a prompt file as a ``PromptRecord`` (see the module docstring for the columns).

    A folder is a Hugging Face ``save_to_disk`` dataset (``read_prompt_dataset``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return read_prompt_dataset(None, cache_dir, path=str(path))
    records = _records(_rows(path), str(path))
    if not records:
        raise KdlabError(f"{path}: the prompt file has no rows; add prompts")
    return records


def read_prompt_dataset(root: Optional[Path], cache_dir: Optional[Path], *, path: Optional[str] = None,
                        data_files: Optional[dict[str, str]] = None) -> list[PromptRecord]:
    """Prompts through the ``datasets`` library: a ``save_to_disk`` folder or ``{split: file}`` data files.

    Same columns and row errors as a prompt file; each record's ``group`` is its split's name, so a
    ``test`` split can be held out whole (``split_records(test_groups=["test"])``).
    """
    from kdlab.data.hf_dataset import load_hf

    records = []
    found = load_hf(root, cache_dir, path=path, data_files=data_files)
    for split, (part, source) in found.items():
        records += _records(list(enumerate(part.to_list(), start=1)), source, group=split)
    if not records:
        raise KdlabError(f"{path or 'data.data_files'}: the dataset has no rows; add prompts")
    return records


# --------------------------------------------------------------------------- splitting


def split_records(records: Sequence[PromptRecord], *, seed: int, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, test_groups: Sequence[str] | None = None
                  ) -> dict[str, list[PromptRecord]]:
    """Deterministic ``{"train", "val", "test"}`` by ``seed`` (file order otherwise irrelevant to the draw).

    With ``test_groups`` the test split is every record of those groups (so its
    prompts come from unseen groups) and ``test_fraction`` is unused; val is
    drawn from the rest. Each split keeps the records' original order.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise KdlabError(f"data.{name}: must be in [0, 1), got {value!r}")
    indices = list(range(len(records)))
    if test_groups is not None:
        groups = set(test_groups)
        known = {record.group for record in records}
        if not groups <= known:
            raise KdlabError(f"data.test_groups: unknown group(s) {sorted(groups - known)}; the groups are "
                             f"{sorted(g for g in known if g is not None)}")
        test = [i for i in indices if records[i].group in groups]
        rest = [i for i in indices if records[i].group not in groups]
    else:
        order = indices[:]
        random.Random(seed).shuffle(order)
        held = round(len(records) * test_fraction)
        test, rest = sorted(order[:held]), sorted(order[held:])
    order = rest[:]
    random.Random(seed + 1_000_003).shuffle(order)  # val's own stream: changing test_fraction alone moves it
    held = round(len(rest) * val_fraction)
    val, train = sorted(order[:held]), sorted(order[held:])
    if not train:
        raise KdlabError(f"data: {len(records)} prompts leave an empty train split; add prompts or lower "
                         "val_fraction/test_fraction")
    return {name: [records[i] for i in part] for name, part in (("train", train), ("val", val), ("test", test))}


# --------------------------------------------------------------------------- tokenizing


def special_ids(tokenizer: Any, generation_config: Any = None) -> tuple[int, int, tuple[int, ...]]:
    """``(pad_id, eos_id, stop_ids)`` from the generation config, then the tokenizer.

    EOS: the generation config's ``eos_token_id`` (its first entry when a list;
    all entries are stop ids), else the tokenizer's. Pad: the tokenizer's, else
    the generation config's, else EOS (pad == EOS is common: SmolLM2, Llama 3,
    Qwen; responses are then masked by length, never by ``!= pad``).
    """
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    stops = tuple(int(i) for i in eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    if not stops:
        raise KdlabError("tokenizer: it has no EOS token (nor does the generation config); responses could not "
                         "end: use a tokenizer with an eos_token")
    pad = tokenizer.pad_token_id
    if pad is None and generation_config is not None:
        pad = getattr(generation_config, "pad_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    return (int(pad) if pad is not None else stops[0]), stops[0], stops


def prompt_text(record: PromptRecord, tokenizer: Any, *, chat_template: bool, system: Optional[str] = None) -> str:
    """The text the model is prompted with: the chat template applied (generation prompt added) when asked."""
    if not chat_template:
        if not isinstance(record.prompt, str):
            raise KdlabError(f"{record.where}: a chat-format prompt (messages) needs data.chat_template: true")
        return record.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise KdlabError("data.chat_template: the tokenizer has no chat template; set chat_template: false "
                         "(prompts are then used as plain text) or use an instruct model's tokenizer")
    turns = [{"role": "user", "content": record.prompt}] if isinstance(record.prompt, str) else list(record.prompt)
    if system is not None and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


@dataclass
class TokenizedPrompts:
    """Prompts (and references) in kdlab's canonical layout, plus the texts evaluation needs."""

    tokens: torch.Tensor  # (N, L) int64: prompt, reference + EOS (or EOS alone), pad
    labels: torch.Tensor  # (N, L) int64: tokens at response positions, IGNORE elsewhere
    prompt_lengths: torch.Tensor  # (N,)
    has_reference: torch.Tensor  # (N,) bool: False = the response is a placeholder EOS (no completion given)
    prompts: list[str]  # the prompt texts as given to the tokenizer (chat template applied)
    references: list[Optional[str]]


def tokenize_records(records: Sequence[PromptRecord], tokenizer: Any, *, eos_id: int, pad_id: int,
                     chat_template: bool = False, max_prompt_tokens: int = 256, max_new_tokens: int = 128,
                     context_length: Optional[int] = None, system: Optional[str] = None) -> TokenizedPrompts:
    """Tokenize prompts and references into the canonical layout.

    The prompt is tokenized as the model sees it (with the tokenizer's own
    special tokens when no chat template is used; the template brings its own).
    The response is the reference's tokens then EOS, cut to ``max_new_tokens``
    (a cut reference loses its EOS: it did not end there); a record without a
    reference gets EOS alone as a placeholder (``has_reference`` False) so the
    canonical layout holds — on-policy methods replace it by a generation,
    supervised ones must skip such rows. A prompt over ``max_prompt_tokens`` or
    one leaving fewer than ``max_new_tokens`` in ``context_length`` is refused
    with its file and row.
    """
    for key, value in (("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KdlabError(f"data.{key}: must be an integer >= 1, got {value!r}")
    if context_length is not None and max_new_tokens >= context_length:
        raise KdlabError(f"data.max_new_tokens: {max_new_tokens} leaves no room for a prompt in the model's context "
                         f"of {context_length} tokens; lower it")
    rows, prompts, references, lengths, flags = [], [], [], [], []
    for record in records:
        text = prompt_text(record, tokenizer, chat_template=chat_template, system=system)
        prompt_ids = tokenizer(text, add_special_tokens=not chat_template)["input_ids"]
        if not prompt_ids:
            raise KdlabError(f"{record.where}: the prompt tokenizes to nothing; give a non-empty prompt")
        if len(prompt_ids) > max_prompt_tokens:
            raise KdlabError(f"{record.where}: the prompt has {len(prompt_ids)} tokens, over data.max_prompt_tokens="
                             f"{max_prompt_tokens}; raise it or shorten the prompt")
        if context_length is not None and len(prompt_ids) + max_new_tokens > context_length:
            raise KdlabError(f"{record.where}: the prompt's {len(prompt_ids)} tokens leave no room for "
                             f"max_new_tokens={max_new_tokens} in the model's context of {context_length}; "
                             "shorten the prompt or lower max_new_tokens")
        if record.reference is not None:
            response = tokenizer(record.reference, add_special_tokens=False)["input_ids"] + [eos_id]
            response = response[:max_new_tokens]
        else:
            response = [eos_id]
        rows.append((prompt_ids, response))
        prompts.append(text)
        references.append(record.reference)
        lengths.append(len(prompt_ids))
        flags.append(record.reference is not None)
    width = max(len(p) + len(r) for p, r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    for index, (prompt_ids, response) in enumerate(rows):
        end = len(prompt_ids) + len(response)
        tokens[index, :end] = torch.tensor(prompt_ids + response)
        labels[index, len(prompt_ids):end] = torch.tensor(response)
    return TokenizedPrompts(tokens=tokens, labels=labels, prompt_lengths=torch.tensor(lengths, dtype=torch.int64),
                            has_reference=torch.tensor(flags), prompts=prompts, references=references)

