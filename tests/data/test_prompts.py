"""Prompt files (kdlab.data.prompts): formats, chat messages, one-line errors naming file and row, splits;
and the built-in prompt sets (kdlab.data.prompt_sets)."""
import collections
import csv
import json

import pytest

from kdlab.data.prompt_sets import arithmetic_prompts, docstring_prompts
from kdlab.data.prompts import PromptRecord, read_prompt_file, split_records
from kdlab.errors import KdlabError

ROWS = [
    {"prompt": "What is 2 plus 3?", "completion": "5"},
    {"prompt": "Name a colour."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                  {"role": "assistant", "content": "Hi."}]},
    {"messages": [{"role": "user", "content": "Open question"}]},
]


def expected_records(path):
    return [
        PromptRecord("What is 2 plus 3?", "5", f"{path}, row 1"),
        PromptRecord("Name a colour.", None, f"{path}, row 2"),
        PromptRecord(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}), "Hi.",
                     f"{path}, row 3"),
        PromptRecord(({"role": "user", "content": "Open question"},), None, f"{path}, row 4"),
    ]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "completion", "messages"])
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "messages": json.dumps(row["messages"]) if "messages" in row else ""})
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_every_format_reads_prompts_completions_and_chat_messages(tmp_path, suffix):
    path = write(tmp_path / f"prompts{suffix}", ROWS)
    assert read_prompt_file(path) == expected_records(path)


def test_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "prompts.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([{"prompt": "a?", "completion": "b"}, {"prompt": "c?"}]), path)
    assert [(r.prompt, r.reference) for r in read_prompt_file(path)] == [("a?", "b"), ("c?", None)]


def test_parquet_without_a_reader_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(KdlabError, match=r"p.parquet: reading Parquet needs pyarrow \(or pandas\); pip install pyarrow"):
        read_prompt_file(tmp_path / "p.parquet")


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "ok"}\n{"question": "x", "answer": "y"}\n',
     "row 2: has neither a 'prompt' nor a 'messages' column (columns: question, answer)"),
    ('{"prompt": "ok"}\n{"prompt": "  "}\n', "row 2: the prompt is empty"),
    ('{"prompt": "ok"}\n\n{"prompt": \n', "line 3 is not valid JSON"),
    ('{"messages": [{"role": "assistant", "content": "only an answer"}]}\n', "row 1: the prompt is empty"),
    ('{"messages": [{"role": "user"}]}\n', "row 1: every message needs a string role and a string content"),
    ('{"messages": []}\n', "row 1: messages must be a non-empty list"),
    ('{"prompt": "ok", "completion": 5}\n', "row 1: completion must be text"),
    ('["just", "a", "list"]\n', "row 1: expected an object"),
    ("", "the prompt file has no rows"),
])
def test_bad_rows_give_one_line_naming_file_and_row(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KdlabError) as error:
        read_prompt_file(path)
    message = str(error.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt\nfine\ncaf\xe9?\n".encode("latin-1"))
    with pytest.raises(KdlabError, match=r"latin1.csv: line 3 is not valid UTF-8 .*save the file as UTF-8"):
        read_prompt_file(path)


def test_csv_missing_column_and_bad_messages_cell(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question\nwhat?\n", encoding="utf-8")
    with pytest.raises(KdlabError, match=r"p.csv, row 1: has neither a 'prompt' nor a 'messages' column"):
        read_prompt_file(path)
    path.write_text('messages\n"[{not json"\n', encoding="utf-8")
    with pytest.raises(KdlabError, match=r"p.csv, row 1: the messages cell is not a JSON list"):
        read_prompt_file(path)


def test_unknown_type_and_missing_file(tmp_path):
    with pytest.raises(KdlabError, match="unknown prompt file type '.txt'"):
        read_prompt_file(tmp_path / "p.txt")
    with pytest.raises(KdlabError, match="prompt file not found"):
        read_prompt_file(tmp_path / "p.jsonl")


def records(n, groups=None):
    return [PromptRecord(f"p{i}", str(i), f"row {i}", None if groups is None else groups[i % len(groups)])
            for i in range(n)]


def test_splits_are_deterministic_disjoint_and_complete():
    data = records(100)
    first = split_records(data, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert first == split_records(data, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert [len(first[k]) for k in ("train", "val", "test")] == [72, 8, 20]
    assert sorted(r.prompt for part in first.values() for r in part) == sorted(r.prompt for r in data)
    assert first["test"] != split_records(data, seed=4, val_fraction=0.1, test_fraction=0.2)["test"]
    # test depends only on the seed and test_fraction, not on val_fraction
    assert split_records(data, seed=3, val_fraction=0.3, test_fraction=0.2)["test"] == first["test"]


def test_group_split_holds_out_whole_groups():
    data = records(60, groups=["a", "b", "c"])
    parts = split_records(data, seed=0, val_fraction=0.25, test_groups=["b"])
    assert {r.group for r in parts["test"]} == {"b"} and len(parts["test"]) == 20
    assert all(r.group != "b" for r in parts["train"] + parts["val"]) and len(parts["val"]) == 10
    with pytest.raises(KdlabError, match=r"data.test_groups: unknown group\(s\) \['z'\]; the groups are \['a', 'b', 'c'\]"):
        split_records(data, seed=0, test_groups=["z"])
    with pytest.raises(KdlabError, match="empty train split"):
        split_records(records(1), seed=0, test_fraction=0.6)


def test_arithmetic_prompts_are_distinct_deterministic_and_right():
    items = arithmetic_prompts(300, seed=1)
    assert items == arithmetic_prompts(300, seed=1) and items != arithmetic_prompts(300, seed=2)
    assert len({r.prompt for r in items}) == 300 and {r.group for r in items} == {"+", "*"}
    for record in items:
        words = record.prompt.split()
        a, b = int(words[2]), int(words[4].rstrip("?"))
        assert int(record.reference) == (a + b if words[3] == "plus" else a * b)
    with pytest.raises(KdlabError, match="data.num_prompts: 101 distinct questions with 1-digit numbers are too many"):
        arithmetic_prompts(101, digits=1)
    assert len(arithmetic_prompts(100, digits=1)) == 100


def test_docstring_prompts_name_the_object_and_hold_out_a_family():
    items, digest = docstring_prompts()
    again, digest_again = docstring_prompts()
    assert digest == digest_again and len(items) > 1000
    counts = collections.Counter(r.group for r in items)
    assert set(counts) == {"text", "files", "network", "concurrency", "numbers", "formats", "devtools"}
    json_dumps = next(r for r in items if r.prompt == "Explain what `json.dumps` does.")
    assert json_dumps.reference.startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert len({r.reference for r in items}) == len(items)
    parts = split_records(items, seed=0, val_fraction=0.1, test_groups=["numbers"])
    trained_modules = {r.prompt.split("`")[1].split(".")[0] for r in parts["train"]}
    test_modules = {r.prompt.split("`")[1].split(".")[0] for r in parts["test"]}
    assert test_modules and not test_modules & trained_modules  # test prompts name modules never trained on
