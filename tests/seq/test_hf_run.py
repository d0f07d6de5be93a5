"""`kdlab run` on a Hugging Face teacher end to end (issue 18): a tiny random Llama folder with a tiny tokenizer as
the teacher, a layer-dropped student, GKD on prompts from a file; store rows, samples, the hf/ export, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.store import Store

pytest.importorskip("transformers")

PROMPTS = [{"prompt": f"What is {a} plus {b}?", "completion": str(a + b)} for a, b in
           [(12, 30), (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 18)]]


def _config(folder: Path, prompts: Path, **changes) -> dict:
    cfg = {
        "name": "hf-tiny",
        "data": {"dataset": "prompts", "path": str(prompts), "tokenizer": "teacher", "chat_template": True,
                 "max_prompt_tokens": 64, "max_new_tokens": 6, "test_fraction": 0.2},
        "teacher": {"model": "hf_causal_lm", "path": str(folder)},
        "student": {"init": "teacher", "keep_layers": 2},
        "method": {"name": "gkd", "on_policy_fraction": 1.0, "divergence": "jsd", "beta": 0.5},
        "train": {"steps": 2, "batch_size": 4, "optimizer": "adamw", "lr": 1e-5, "device": "cpu"},
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        cfg[section][name] = value
    return cfg


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return path


def _run(tmp_path: Path, cfg: dict, *args: str) -> int:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet", *args])


def test_gkd_on_a_hf_teacher_runs_exports_and_resumes(tmp_path, tiny_llama_folder, prompts_file, capsys):
    transformers = pytest.importorskip("transformers")
    assert _run(tmp_path, _config(tiny_llama_folder, prompts_file)) == 0
    runs = Store(tmp_path / "ws").runs(experiment="hf-tiny")
    assert len(runs) == 1 and runs[0].status == "finished"
    final = runs[0].final
    for key in ("gen/reverse_kl", "gen/forward_kl", "gen/teacher_nll", "gen/rouge_l_teacher", "gen/length",
                "gen/eos_fraction", "test/nll"):
        assert key in final, key
    run_dir = Path(runs[0].run_dir)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "student", "teacher", "reference"} <= set(samples[0])
    assert "plus" in samples[0]["prompt"]
    # The exported folder loads with transformers alone, has 2 of the teacher's 4 layers, and generates.
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    assert model.config.num_hidden_layers == 2
    ids = tokenizer("What is 1 plus 2?", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # kdlab export copies the folder; kdlab show --samples prints samples.
    capsys.readouterr()
    assert main(["--workspace", str(tmp_path / "ws"), "export", runs[0].run_id, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert main(["--workspace", str(tmp_path / "ws"), "show", runs[0].run_id, "--samples", "1"]) == 0
    shown = capsys.readouterr().out
    assert "sample 1" in shown and "sample 2" not in shown and "student:" in shown
    # A second `kdlab run` finds the run finished.
    assert _run(tmp_path, _config(tiny_llama_folder, prompts_file)) == 0
    assert Store(tmp_path / "ws").run(runs[0].run_id).status == "finished"


def test_prompt_datasets_generate_exactly_max_new_tokens(tmp_path, tiny_llama_folder, prompts_file):
    from kdlab.registry import get
    from kdlab.seq.evaluate import max_new_tokens

    arrays = get("dataset", "prompts")(root=None, cache_dir=tmp_path, path=str(prompts_file),
                                       tokenizer=str(tiny_llama_folder), chat_template=True, max_prompt_tokens=40,
                                       max_new_tokens=7, test_fraction=0.2)
    info = arrays.info
    assert info.missing_references == 0
    assert {max_new_tokens(info, width) for width in (1, 20, 40)} == {7}  # not 7 + EXTRA_TOKENS


def test_prompts_without_completions_refuse_training_on_references(tmp_path, tiny_llama_folder, capsys):
    path = tmp_path / "bare.jsonl"
    path.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in PROMPTS))
    cfg = _config(tiny_llama_folder, path, **{"method.on_policy_fraction": 0.5})
    assert _run(tmp_path, cfg) == 2
    assert "have no reference completion" in capsys.readouterr().err
    assert _run(tmp_path, _config(tiny_llama_folder, path)) == 0  # on-policy only: the placeholders never teach


def test_teacher_and_student_tokenizers_must_match(tmp_path, tiny_llama_folder):
    from kdlab.engine.build import check_sequence_models
    from kdlab.errors import KdlabError
    from kdlab.seq.hf import load_hf_causal_lm

    from .conftest import make_tokenizer

    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_llama_folder, other)
    tokenizer = make_tokenizer(chat_template="{{ messages[0]['content'] }}")
    tokenizer.save_pretrained(other)
    teacher, student = load_hf_causal_lm(path=tiny_llama_folder), load_hf_causal_lm(path=other)

    class Splits:
        sequence = type("Info", (), {"context_length": 10, "task": "t"})()

    with pytest.raises(KdlabError, match="student: its tokenizer differs from the teacher's .chat templates differ"):
        check_sequence_models(student, teacher, Splits())
    check_sequence_models(load_hf_causal_lm(path=tiny_llama_folder), teacher, Splits())  # same folder: fine


def test_a_run_failed_after_training_is_resumed_and_exported(tmp_path, tiny_llama_folder, prompts_file, monkeypatch):
    """The LM outputs come after training: a failure there leaves a checkpoint that --retry-failed resumes from."""
    import kdlab.study.runner as runner
    from kdlab.errors import KdlabError

    real = runner.finish_llm_run

    def broken(*args, **kwargs):
        raise KdlabError("disk hiccup")

    monkeypatch.setattr(runner, "finish_llm_run", broken)
    cfg = _config(tiny_llama_folder, prompts_file)
    assert _run(tmp_path, cfg) == 1
    (run,) = Store(tmp_path / "ws").runs(experiment="hf-tiny")
    assert run.status == "failed" and not (Path(run.run_dir) / "hf").exists()
    monkeypatch.setattr(runner, "finish_llm_run", real)
    assert _run(tmp_path, cfg, "--retry-failed") == 0
    run = Store(tmp_path / "ws").run(run.run_id)
    assert run.status == "finished" and (Path(run.run_dir) / "hf" / "config.json").is_file()
    assert (Path(run.run_dir) / "samples.jsonl").is_file()
