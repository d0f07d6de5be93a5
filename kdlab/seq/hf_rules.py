"""Config rules of language-model distillation (issue 18): pretrained Hugging Face teachers, students cut from
them, prompts tokenized by the teacher's tokenizer. Registered with the config's validation
(``kdlab.config.checks``), which imports nothing of this package.

* ``resolve_llm_raw(raw)`` — before a grid point is parsed: ``student.init: teacher`` without a model takes the
  teacher's model and options; ``data.tokenizer: teacher`` becomes the teacher's source (its ``path``, or
  ``bundled:NAME``), so the dataset is built from the same tokenizer.
* ``check_llm(cfg, errors)`` — what can be known from the files before any work: layers the teacher lacks, a chat
  template the tokenizer lacks, prompts that leave no room for ``max_new_tokens`` in the model's context.
  (An ``hf_causal_lm`` teacher named by ``path``/``bundled`` is used as it is, not trained:
  ``hf_causal_lm.pretrained``.)

Facts about a model source are read cheaply (``config.json``/``tokenizer_config.json`` of a folder, the metadata of
a GGUF file); a source that cannot be read is left to the loader, which names the problem when it builds.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from kdlab.config.checks import config_rule, raw_rule
from kdlab.config.entries import pretrained_teacher
from kdlab.config.schema import StudentConfig
from kdlab.errors import KdlabError

HF_MODEL = "hf_causal_lm"
_SECTION_KEYS = {"model", "checkpoint", "train", "seed", "epoch", "trajectory", "assistants", "members", "method",
                 "options", "quant", "init", "keep_layers", "peft", "device", "dtype"}


def _teacher_source(teacher: Any) -> Optional[str]:
    """``data.tokenizer``'s spelling of a teacher section's model source, or None when it names none."""
    if not isinstance(teacher, dict) or teacher.get("model") != HF_MODEL:
        return None
    options = teacher.get("options") if isinstance(teacher.get("options"), dict) else {}
    path, bundled = teacher.get("path", options.get("path")), teacher.get("bundled", options.get("bundled"))
    if isinstance(path, str):
        return path
    if isinstance(bundled, str):
        return f"bundled:{bundled}"
    return None


@raw_rule
def resolve_llm_raw(raw: dict, errors: list[str]) -> dict:
    """``raw`` with the student's model taken from the teacher (``init: teacher``) and ``data.tokenizer: teacher``
    resolved; the input is not modified."""
    student, teacher, data = raw.get("student"), raw.get("teacher"), raw.get("data")
    out = raw
    if isinstance(student, dict) and student.get("init") == "teacher" and student.get("model") is None \
            and isinstance(teacher, dict) and isinstance(teacher.get("model"), str) and teacher.get("checkpoint") is None:
        out = copy.copy(out)
        out["student"] = {**{k: copy.deepcopy(v) for k, v in teacher.items() if k not in _SECTION_KEYS},
                          **student, "model": teacher["model"]}
    if isinstance(data, dict) and data.get("tokenizer") == "teacher":
        source = _teacher_source(teacher)
        if teacher is None:
            errors.append("data.tokenizer: 'teacher' names the teacher's tokenizer but there is no teacher section; "
                          "add one or give the tokenizer's folder, .gguf file or bundled:NAME")
        elif source is None:
            errors.append(f"data.tokenizer: 'teacher' needs a teacher of model {HF_MODEL} with path: or bundled:; "
                          "give the tokenizer's folder, .gguf file or bundled:NAME instead")
        else:
            out = copy.copy(out)
            out["data"] = {**data, "tokenizer": source}
    return out


# --------------------------------------------------------------------------- facts about a source, read cheaply


def _source_file(source: str) -> Optional[Path]:
    """The folder or .gguf file of a source spelling (``bundled:NAME`` looked up), None if not found."""
    from kdlab.seq.hf_load import bundled_path

    try:
        path = bundled_path(source.split(":", 1)[1]) if source.startswith("bundled:") else Path(source).expanduser()
    except KdlabError:
        return None
    return path if path.exists() else None


def source_facts(source: str) -> dict:
    """``layers``, ``context`` and ``chat_template`` (bool) of a model source, each only when readable."""
    path = _source_file(source)
    if path is None:
        return {}
    facts: dict = {}
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
            facts["layers"] = config.get("num_hidden_layers") or config.get("n_layer")
            facts["context"] = config.get("max_position_embeddings") or config.get("n_positions")
        except (OSError, ValueError, AttributeError):
            pass
        try:
            tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
            facts["chat_template"] = bool(tokenizer_config.get("chat_template")) or any(
                (path / name).is_file() for name in ("chat_template.jinja", "chat_template.json"))
        except (OSError, ValueError, AttributeError):
            pass
    elif path.suffix.lower() == ".gguf":
        try:
            import gguf

            reader = gguf.GGUFReader(str(path))

            def value(key):
                field = reader.fields.get(key)
                return None if field is None else field.parts[field.data[0]]

            arch = bytes(value("general.architecture")).decode()
            blocks, context = value(f"{arch}.block_count"), value(f"{arch}.context_length")
            facts["layers"] = int(blocks[0]) if blocks is not None else None
            facts["context"] = int(context[0]) if context is not None else None
            facts["chat_template"] = "tokenizer.chat_template" in reader.fields
        except Exception:  # noqa: BLE001 - a file the loader will name properly
            pass
    return {key: value for key, value in facts.items() if value is not None}


def _model_source(section: Any) -> Optional[str]:
    options = getattr(section, "options", None) or {}
    if getattr(section, "model", None) != HF_MODEL:
        return None
    if options.get("path") is not None:
        return str(options["path"])
    if options.get("bundled") is not None:
        return f"bundled:{options['bundled']}"
    return None


@config_rule
def check_llm(cfg: Any, errors: list[str]) -> None:
    """Cross-field rules of LM distillation (see the module docstring); problems appended to ``errors``."""
    from kdlab.seq.hf_export import layers_to_keep

    if not isinstance(cfg.student, StudentConfig) or not isinstance(cfg.data.options, dict):
        return
    student, teacher, data = cfg.student, cfg.teacher, cfg.data
    if pretrained_teacher(teacher) and teacher.model == "hf_causal_lm" and getattr(teacher, "train", None) is not None:
        errors.append("teacher.train: a pretrained hf_causal_lm teacher (path: or bundled:) is used as it is; remove "
                      "teacher.train (fine-tune it in a run of its own and give that run's hf/ folder as path:)")
    keep = getattr(student, "keep_layers", None)
    if keep is not None and getattr(student, "init", None) != "teacher":
        errors.append("student.keep_layers: keeps layers of the teacher; set student.init: teacher too")
    elif keep is not None and teacher is not None:
        source = _model_source(teacher)
        total = source_facts(source).get("layers") if source else None
        if total is None and getattr(teacher, "model", None) == HF_MODEL:
            total = (teacher.options.get("config") or {}).get("num_hidden_layers") \
                if isinstance(teacher.options.get("config"), dict) else None
        if isinstance(total, int):
            try:
                layers_to_keep(keep, total)
            except KdlabError as exc:
                errors.append(str(exc))
    options = data.options if isinstance(data.options, dict) else {}
    if data.dataset != "prompts":
        return
    tokenizer = options.get("tokenizer")
    facts = source_facts(tokenizer) if isinstance(tokenizer, str) else {}
    if options.get("chat_template") is True and facts.get("chat_template") is False:
        errors.append(f"data.chat_template: the tokenizer of {tokenizer!r} has no chat template; set "
                      "chat_template: false (prompts used as plain text) or use an instruct model's tokenizer")
    prompt_tokens, new_tokens = options.get("max_prompt_tokens", 256), options.get("max_new_tokens", 128)
    contexts = [facts.get("context")] + [source_facts(s).get("context") for s in
                                         filter(None, (_model_source(teacher), _model_source(student)))
                                         if s != tokenizer]
    contexts = [c for c in contexts if isinstance(c, int)]
    if contexts and isinstance(prompt_tokens, int) and isinstance(new_tokens, int) \
            and prompt_tokens + new_tokens > min(contexts):
        errors.append(f"data.max_new_tokens: max_prompt_tokens ({prompt_tokens}) + max_new_tokens ({new_tokens}) "
                      f"exceed the model's context of {min(contexts)} tokens, leaving no room for the response; "
                      "lower either")
