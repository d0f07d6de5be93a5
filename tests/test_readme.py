"""The README's examples run as written (issue 17 item 14).

Every fenced block of README.md carries a language tag. ``python`` blocks are executed, each in a
fresh interpreter (they register names into the registry); ``bash`` blocks line by line: a line
with placeholders (``[--flag ...]``, ``RUN``, ``a|b``) is a synopsis, checked against the
command's ``--help`` (every flag it shows must exist; each ``a|b`` choice of ``kdlab list`` is run);
any other line is run as shown unless ``SUBSTITUTES`` lists it, with the cheaper command run
instead or ``None`` (skipped) and the reason. ``yaml`` blocks must parse; ``text`` blocks are
not code. Slow pieces (dry runs that build the datasets, the study) are marked ``integration``.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LANGUAGES = ("python", "bash", "yaml", "text")

# README command -> (cheaper command run instead, or None to skip; why). Each key must appear in README.md.
SUBSTITUTES = {
    "make quickstart": ("kdlab run --dry-run", "trains seven runs; the dry run checks the same embedded quickstart"),
    "make test": (None, "is this suite"),
    "kdlab run configs/qat/minilm_small.yaml --workers 2 --quiet": (
        "kdlab run configs/qat/minilm_small.yaml --dry-run", "a QAT study of minutes"),
    "kdlab plot qat qat-minilm-small": (None, "needs the finished QAT study"),
    "torchrun --nproc_per_node 4 -m kdlab run study.yaml": (
        None, "four processes on a study.yaml the reader writes; tests/engine/test_distributed.py runs torchrun"),
    "torchrun --nproc_per_node N -m kdlab run CONFIG.yaml": (None, "the synopsis of the torchrun line below"),
    "torchrun --nproc_per_node 8 -m kdlab run llm.yaml --set train.sharding=fsdp": (
        None, "eight GPUs on an llm.yaml the reader writes; tests/engine/test_fsdp.py runs the sharded path on gloo"),
    "kdlab run study.yaml --executor ray": (None, "needs Ray and the reader's study.yaml; tests/study cover Ray"),
    "kdlab report quickstart --out report.html": (
        "kdlab report quickstart --out report.html --no-eval", "run after the tiny quickstart (integration)"),
}
SLOW = {"kdlab run --dry-run", "kdlab run configs/qat/minilm_small.yaml --dry-run",
        "kdlab report quickstart --out report.html --no-eval"}
# kdlab.run in the README trains the full quickstart; here it runs one epoch on fewer samples, in tmp.
TINY_RUN = """
import kdlab as _kdlab
_full_run = _kdlab.run
def _tiny_run(config=None, *, workspace="kdlab-workspace", overrides=None, seeds=None):
    config = {root!r} + "/" + config if isinstance(config, str) and not config.startswith("/") else config
    tiny = ["train.epochs=1", "teacher.train.epochs=1", "data.num_samples=600"]
    return _full_run(config, workspace=workspace, overrides=[*(overrides or []), *tiny], seeds=seeds)
_kdlab.run = _tiny_run
"""


def _blocks():
    """(language, body, first line number) of every fenced block."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = re.match(r"^( *)```(\S*)\s*$", lines[i])
        if match:
            indent, language, start = match.group(1), match.group(2), i + 1
            i += 1
            while not re.match(rf"^{indent}```\s*$", lines[i]):
                i += 1
            body = "\n".join(line[len(indent):] for line in lines[start:i])
            blocks.append((language, body, start))
        i += 1
    return blocks


def _commands(body: str) -> list[str]:
    """The block's commands: comments stripped, indented continuation lines joined to their command."""
    commands = []
    for line in body.splitlines():
        text = line.split("  #")[0].rstrip()
        if not text.strip():
            continue
        if line.startswith(" ") and commands:
            commands[-1] += " " + text.strip()
        else:
            commands.append(text.strip())
    return commands


def _is_synopsis(command: str) -> bool:
    return "[" in command or "|" in command or bool(re.search(r"\b[A-Z]{2,}\b", command))


BLOCKS = _blocks()
PYTHON = [(body, line) for language, body, line in BLOCKS if language == "python"]
COMMANDS = [command for language, body, _ in BLOCKS if language == "bash" for command in _commands(body)]
SYNOPSES = [c for c in COMMANDS if _is_synopsis(c) and c.startswith("kdlab ")]
RUNNABLE = [c for c in COMMANDS if not (_is_synopsis(c) and c.startswith("kdlab "))]


def test_every_block_is_tagged_and_every_substitute_is_in_the_readme():
    assert BLOCKS and PYTHON and COMMANDS
    assert {language for language, _, _ in BLOCKS} <= set(LANGUAGES), [(l, n) for l, _, n in BLOCKS]
    for command in SUBSTITUTES:
        assert command in COMMANDS, f"SUBSTITUTES lists {command!r}, which README.md no longer shows"
    for command in RUNNABLE:  # a new slow README command needs a decision here
        assert command in SUBSTITUTES or command.startswith("kdlab list"), command


@pytest.mark.parametrize("body", [body for language, body, _ in BLOCKS if language == "yaml"])
def test_yaml_blocks_parse(body):
    assert isinstance(yaml.safe_load(body), dict)


def _run_python(body: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    prelude = "import torch\ntorch.set_num_threads(1)\n" + TINY_RUN.format(root=str(ROOT))
    return subprocess.run([sys.executable, "-c", prelude + body], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _python_params():
    for body, line in PYTHON:
        marks = [pytest.mark.integration] if "kdlab.run(" in body else []
        yield pytest.param(body, id=f"README.md:{line}", marks=marks)


@pytest.mark.parametrize("body", list(_python_params()))
def test_python_block_runs(body, tmp_path):
    result = _run_python(body, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", SYNOPSES)
def test_synopsis_lines_name_real_commands_and_flags(command, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_WORKSPACE", str(tmp_path / "ws"))
    words = command.split()[1:]
    subcommand = []
    for word in words:
        if not re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", word):
            break
        subcommand.append(word)
    choices = subcommand.pop().split("|") if "|" in subcommand[-1] else None
    text = _help(subcommand, capsys)
    for flag in re.findall(r"--[a-z][a-z-]*", command):
        assert flag in text, f"{command!r}: {flag} is not an option of `kdlab {' '.join(subcommand)}`"
    for choice in choices or []:
        assert main([*subcommand, choice]) == 0, f"kdlab {' '.join(subcommand)} {choice}"
        assert capsys.readouterr().out.strip()


def _command_params():
    for command in RUNNABLE:
        instead, why = SUBSTITUTES.get(command, (command, ""))
        if instead is None:
            yield pytest.param(command, marks=pytest.mark.skip(reason=f"README command skipped: {why}"), id=command)
        else:
            marks = [pytest.mark.integration] if instead in SLOW else []
            yield pytest.param(instead, marks=marks, id=command)


@pytest.mark.parametrize("command", list(_command_params()))
def test_shell_command_runs(command, tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.chdir(ROOT)  # README paths are relative to the repository root
    argv = shlex.split(command)
    assert argv[0] == "kdlab"
    if argv[1] == "report":  # needs the quickstart's runs: the README's kdlab.run block, tiny, first
        body = next(body for body, _ in PYTHON if "kdlab.run(" in body)
        result = _run_python(body.replace('"kdlab-workspace"', repr(str(tmp_path / "ws"))), tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        argv[argv.index("--out") + 1] = str(tmp_path / "report.html")
    assert main(argv[1:]) == 0
