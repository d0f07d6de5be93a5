"""Prompts through the datasets library (kdlab.data.prompts.read_prompt_dataset): save_to_disk folders and data
files written by the test with the library itself; the same columns and row errors as prompt files."""
import json

import pytest

datasets = pytest.importorskip("datasets")

from kdlab.data.prompts import PromptRecord, read_prompt_dataset, read_prompt_file  # noqa: E402
from kdlab.errors import KdlabError  # noqa: E402

CHAT = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]


def test_save_to_disk_folder_reads_prompts_completions_and_messages_per_split(tmp_path):
    train = datasets.Dataset.from_list([{"prompt": "a?", "completion": "b", "messages": None},
                                        {"prompt": None, "completion": None, "messages": CHAT}])
    test = datasets.Dataset.from_list([{"prompt": "c?", "completion": "", "messages": None}])
    datasets.DatasetDict(train=train, test=test).save_to_disk(tmp_path / "ds")
    records = read_prompt_file(tmp_path / "ds")  # a folder goes through the library
    assert records == [
        PromptRecord("a?", "b", f"{tmp_path / 'ds' / 'train'}, row 1", group="train"),
        PromptRecord(({"role": "user", "content": "Say hi."},), "Hi.", f"{tmp_path / 'ds' / 'train'}, row 2",
                     group="train"),
        PromptRecord("c?", None, f"{tmp_path / 'ds' / 'test'}, row 1", group="test"),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_data_files_by_split(tmp_path, suffix):
    part = datasets.Dataset.from_list([{"prompt": "x?", "completion": "y"}, {"prompt": "z?", "completion": None}])
    for split in ("train", "test"):
        {".csv": part.to_csv, ".jsonl": part.to_json, ".parquet": part.to_parquet}[suffix](
            str(tmp_path / f"{split}{suffix}"))
    records = read_prompt_dataset(tmp_path, tmp_path / "cache", data_files={"train": f"train{suffix}",
                                                                            "test": f"test{suffix}"})
    assert [(r.prompt, r.reference, r.group) for r in records] == [
        ("x?", "y", "train"), ("z?", None, "train"), ("x?", "y", "test"), ("z?", None, "test")]
    assert records[1].where == f"{tmp_path / f'train{suffix}'}, row 2"


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "ok"}, {"prompt": "  "}], "row 2: the prompt is empty"),
    ([{"question": "x"}], "row 1: has neither a 'prompt' nor a 'messages' column (columns: question)"),
    ([{"messages": [{"role": "assistant", "content": "only"}]}], "row 1: the prompt is empty"),
])
def test_bad_rows_name_the_split_and_row(tmp_path, rows, expected):
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    with pytest.raises(KdlabError) as error:
        read_prompt_dataset(None, None, path=str(tmp_path / "ds"))
    assert str(error.value).startswith(f"{tmp_path / 'ds'}, {expected}") and "\n" not in str(error.value)


def test_a_folder_that_is_not_a_dataset_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(KdlabError, match=r"notes: not a Hugging Face datasets folder"):
        read_prompt_file(tmp_path / "notes")


def test_parquet_messages_and_a_damaged_parquet_file(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "chat.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([{"messages": CHAT}]), path)
    assert read_prompt_file(path) == [PromptRecord(({"role": "user", "content": "Say hi."},), "Hi.",
                                                   f"{path}, row 1")]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(KdlabError, match=r"bad.parquet: not a readable Parquet file \(\w+\); re-save it"):
        read_prompt_file(tmp_path / "bad.parquet")


def test_jsonl_rows_still_read_natively(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q"}) + "\n")
    assert read_prompt_file(path) == [PromptRecord("q", None, f"{path}, row 1")]
