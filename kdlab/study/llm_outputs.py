"""What a finished language-model run leaves besides its kdlab weights (issue 18).

* ``gen/...`` final metrics and ``samples.jsonl`` — ``evaluate_generation`` of the student against its teacher
  on the held-out (test) prompts: one row per prompt (prompt, student, teacher, reference);
* ``hf/`` — every finished ``hf_causal_lm`` student as a Hugging Face folder (weights, config, generation config
  and the teacher's tokenizer), which ``AutoModelForCausalLM.from_pretrained`` loads with nothing from kdlab.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from kdlab.errors import KdlabError

if TYPE_CHECKING:  # the CLI builds its parser from this module: torch is imported only when a run needs it
    import torch
    from torch import nn

    from kdlab.data import Splits

SAMPLES_FILE = "samples.jsonl"
HF_FOLDER = "hf"


def is_hf_student(student: nn.Module) -> bool:
    from kdlab.seq.hf import HFCausalLM

    return isinstance(student, HFCausalLM)


def finish_llm_run(student: nn.Module, teacher: nn.Module | None, splits: Splits, run_dir: Path, *,
                   device: torch.device, seed: int = 0) -> dict[str, float]:
    """Evaluate generation (with a teacher), write ``samples.jsonl`` and export ``hf/``; the ``gen/`` metrics."""
    from kdlab.engine.run_files import safe_path
    from kdlab.seq.generation_eval import evaluate_generation
    from kdlab.seq.hf_export import export_student
    from kdlab.store import atomic_write_text

    final: dict[str, float] = {}
    info = splits.sequence
    if teacher is not None and info is not None:
        tokens, labels = splits.test
        metrics, samples = evaluate_generation(student, teacher, tokens, labels, info,
                                               max_new_tokens=info.max_response_tokens, device=device, seed=seed)
        final.update({f"gen/{key}": float(value) for key, value in metrics.items()})
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples)
        atomic_write_text(safe_path(run_dir, run_dir / SAMPLES_FILE), text)
    source = getattr(student, "source", None) or getattr(teacher, "source", None)
    if source is None:
        raise KdlabError("student: an hf_causal_lm student built from a config has no tokenizer to export with; "
                         "start it from a teacher folder (init: teacher) or give it path:")
    export_student(student, safe_path(run_dir, run_dir / HF_FOLDER), tokenizer_source=source, overwrite=True)
    return final


def read_samples(run_dir: Path, count: int) -> list[dict]:
    """The first ``count`` rows of a run's ``samples.jsonl`` (one line naming the file when it has none)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        raise KdlabError(f"--samples: {path} does not exist; only language-model runs with a teacher write samples")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if len(rows) >= count:
            break
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise KdlabError(f"--samples: {path} line {number} is not JSON; the file is damaged") from None
    return rows


def show_samples(run_dir: Path, count: int) -> None:
    """``kdlab show RUN --samples N``: print the first N generations of a run."""
    print("\n".join(format_samples(read_samples(run_dir, count))))


def format_samples(rows: list[dict]) -> list[str]:
    lines = []
    for index, row in enumerate(rows, 1):
        lines.append(f"--- sample {index}")
        for key in ("prompt", "student", "teacher", "reference"):
            if row.get(key) is not None:
                lines.append(f"{key}: {row[key]}")
    return lines


def copy_hf_folder(record, target: str | Path) -> Path:
    """``kdlab export``: copy run ``record``'s ``hf/`` folder to ``target`` (a new or empty folder)."""
    import shutil

    source = Path(record.run_dir) / HF_FOLDER
    if not (source / "config.json").is_file():
        raise KdlabError(f"export: run {record.run_id} has no Hugging Face folder ({source}); only finished "
                         "hf_causal_lm students are exported")
    target = Path(target).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise KdlabError(f"export: {str(target)!r} already exists and is not empty; choose a new folder")
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def add_llm_commands(sub, show, read_store) -> None:
    """``kdlab show RUN --samples N`` and ``kdlab export RUN DIR`` on the CLI's parsers (``read_store(args)``: the
    workspace's store, read-only)."""
    show.add_argument("--samples", type=int, default=0, metavar="N",
                      help="also print N generations of a language-model run (samples.jsonl)")

    def cmd_export(args) -> int:
        matches = read_store(args).find(args.run, skip_damaged=False)
        if len(matches) != 1:
            raise KdlabError(f"{args.run!r} matches {len(matches)} runs; give a full run id")
        print(f"exported {matches[0].run_id} to {copy_hf_folder(matches[0], args.dir)}")
        return 0

    export = sub.add_parser("export", help="copy a language-model run's Hugging Face folder (runs/<id>/hf) to DIR")
    export.add_argument("run", help="run id or unique prefix")
    export.add_argument("dir", help="where to write it (new or empty folder)")
    export.set_defaults(func=cmd_export)
