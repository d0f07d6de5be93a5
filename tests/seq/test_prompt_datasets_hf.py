"""The prompts dataset on Hugging Face `datasets` data (its test split held out whole), and the refusal of rows
without a reference for arms that learn from references, naming the file and row (issue 18)."""
import json

import pytest
import yaml

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

import kdlab.seq  # noqa: E402,F401  (registers the prompts dataset)
from kdlab.cli import main  # noqa: E402
from kdlab.registry import get  # noqa: E402

ROWS = [{"prompt": f"What is {i} plus 1?", "completion": str(i + 1)} for i in range(8)]


def test_a_datasets_folders_test_split_is_the_test_set(tmp_path, tiny_tokenizer_folder):
    test = [{"prompt": "What is 40 plus 2?", "completion": "42"}, {"prompt": "What is 1 plus 1?", "completion": "2"}]
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(test)
                         ).save_to_disk(tmp_path / "ds")
    factory = get("dataset", "prompts")
    arrays = factory(root=tmp_path, cache_dir=tmp_path, path="ds", tokenizer=str(tiny_tokenizer_folder),
                     max_new_tokens=4, test_fraction=0.5)
    assert len(arrays.tokens_train) == 8 and len(arrays.tokens_test) == 2  # test_fraction unused: its own test
    assert arrays.info.missing_references == 0 and arrays.info.first_missing_reference == ""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    same = factory(root=tmp_path, cache_dir=tmp_path, data_files={"train": "train.jsonl", "test": "test.jsonl"},
                   tokenizer=str(tiny_tokenizer_folder), max_new_tokens=4)
    assert same.tokens_test.tolist() == arrays.tokens_test.tolist()
    assert same.info.task == "prompts:train.jsonl"


def test_rows_without_a_reference_are_refused_naming_file_and_row(tmp_path, tiny_llama_folder, capsys):
    path = tmp_path / "bare.jsonl"
    rows = [dict(r) for r in ROWS + ROWS]
    for index in (0, 4, 7):  # row 1 may land in test; at least one of these is in train
        rows[index].pop("completion")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    arrays = get("dataset", "prompts")(root=None, cache_dir=tmp_path, path=str(path),
                                       tokenizer=str(tiny_llama_folder), max_new_tokens=4, test_fraction=0.2)
    first = arrays.info.first_missing_reference
    assert first.startswith(f"{path}, row ") and int(first.rsplit(" ", 1)[1]) in (1, 5, 8)
    cfg = {"name": "bare",
           "data": {"dataset": "prompts", "path": str(path), "tokenizer": "teacher", "max_prompt_tokens": 32,
                    "max_new_tokens": 4, "test_fraction": 0.2},
           "teacher": {"model": "hf_causal_lm", "path": str(tiny_llama_folder)},
           "student": {"init": "teacher", "keep_layers": 2},
           "method": {"name": "gkd", "on_policy_fraction": 0.0, "divergence": "forward_kl"},
           "train": {"steps": 1, "batch_size": 4, "optimizer": "adamw", "lr": 1e-5, "device": "cpu"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"have no reference completion (first: {first})" in err and "\n" not in err
