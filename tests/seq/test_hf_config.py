"""Config rules of LM distillation (issue 18): resolution of init: teacher / tokenizer: teacher, one-line errors
before any work, and run identity by the content of a model named by path."""
from __future__ import annotations

import shutil

import pytest
import yaml

from kdlab.cli import main
from kdlab.config import parse_experiment
from kdlab.errors import ConfigError

from .conftest import make_llama, make_tokenizer

pytest.importorskip("transformers")


def _raw(folder, **changes) -> dict:
    raw = {"name": "hf-cfg",
           "data": {"dataset": "prompts", "builtin": "docstrings", "tokenizer": "teacher", "chat_template": True,
                    "max_prompt_tokens": 64, "max_new_tokens": 16},
           "teacher": {"model": "hf_causal_lm", "path": str(folder)},
           "student": {"init": "teacher", "keep_layers": 2},
           "method": {"name": "gkd", "on_policy_fraction": 1.0},
           "train": {"steps": 2, "batch_size": 4, "optimizer": "adamw", "lr": 1e-5}}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if value is None:
            raw[section].pop(name, None)
        else:
            raw[section][name] = value
    return raw


def _problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_experiment(raw)
    return info.value.problems


def test_student_and_tokenizer_resolve_from_the_teacher(tiny_llama_folder):
    _, specs = parse_experiment(_raw(tiny_llama_folder))
    cfg = specs[0].config
    assert cfg.student.model == "hf_causal_lm" and cfg.student.options["path"] == str(tiny_llama_folder)
    assert cfg.data.options["tokenizer"] == str(tiny_llama_folder)
    assert cfg.teacher.train is None  # a pretrained teacher is used as it is: no recipe run
    from kdlab.plan import build_plan

    assert [node.role for node in build_plan(specs[0].config, specs).order()] == ["student"]


def test_keep_layers_problems_are_one_line_each(tiny_llama_folder):
    assert any("layer 9 does not exist" in p for p in _problems(_raw(tiny_llama_folder, **{"student.keep_layers": [0, 9]})))
    assert any("count must be between 1 and the teacher's 4" in p
               for p in _problems(_raw(tiny_llama_folder, **{"student.keep_layers": 5})))
    raw = _raw(tiny_llama_folder, **{"student.init": None, "student.model": "hf_causal_lm"})
    raw["student"]["path"] = str(tiny_llama_folder)
    assert any(p.startswith("student.keep_layers: keeps layers of the teacher; set student.init") for p in _problems(raw))


def test_a_pretrained_teacher_takes_no_recipe(tiny_llama_folder):
    raw = _raw(tiny_llama_folder)
    raw["teacher"]["train"] = {"steps": 3}
    assert any(p.startswith("teacher.train: a pretrained hf_causal_lm teacher") for p in _problems(raw))


def test_tokenizer_teacher_needs_a_teacher(tiny_llama_folder):
    raw = _raw(tiny_llama_folder, **{"student.init": None, "student.keep_layers": None})
    raw["student"].update(model="hf_causal_lm", path=str(tiny_llama_folder))
    del raw["teacher"]
    raw["method"] = {"name": "gkd"}
    assert any(p.startswith("data.tokenizer: 'teacher' names the teacher's tokenizer but there is no teacher")
               for p in _problems(raw))


def test_chat_template_missing_and_no_room_for_new_tokens(tiny_llama_folder, tmp_path):
    plain = tmp_path / "plain"
    make_tokenizer(chat_template=None).save_pretrained(plain)
    raw = _raw(tiny_llama_folder, **{"data.tokenizer": str(plain)})
    assert any(p.startswith("data.chat_template: the tokenizer of") for p in _problems(raw))
    # tiny Llama's context is 256 tokens
    raw = _raw(tiny_llama_folder, **{"data.max_prompt_tokens": 250, "data.max_new_tokens": 10})
    assert any(p.startswith("data.max_new_tokens: max_prompt_tokens (250) + max_new_tokens (10) exceed the model's "
                            "context of 256") for p in _problems(raw))


def test_bad_llm_config_exits_2_from_the_cli(tiny_llama_folder, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_raw(tiny_llama_folder, **{"student.keep_layers": [0, 9]})))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 2
    assert "layer 9 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "ws" / "runs").exists()


def test_a_model_named_by_path_is_identified_by_its_content(tmp_path):
    """Replacing the model at the same path gives a new run id (the old run must not read as finished)."""
    folder = tmp_path / "model"
    tokenizer = make_tokenizer()

    def write(seed):
        if folder.exists():
            shutil.rmtree(folder)
        make_llama(len(tokenizer), layers=2, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        spec = parse_experiment(_raw(folder, **{"student.keep_layers": 1}))[1][0]
        return spec, spec.run_id  # the id is asked of the files as they are now

    spec, first = write(0)
    assert "source_sha256" not in spec.resolved() and "source_sha256" in spec.identity()  # config.yaml keeps the path
    assert write(0)[1] == first  # same content, same run
    assert write(1)[1] != first  # same path, other weights: another run
