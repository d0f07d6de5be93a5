"""The numeric flags of every command are bounded by the config's coercer (kdlab.cli_flags): one line naming the
flag and its value, exit code 2, nothing written, before the command does any work."""
from __future__ import annotations

import pytest

from kdlab.cli import main
from kdlab.cli_flags import FLAGS

BAD = [
    (["run", "--dry-run", "--workers", "0"], "--workers 0: must be ≥ 1"),
    (["eval", "some-run", "--subset", "-3"], "--subset -3: must be ≥ 0"),
    (["eval", "some-run", "--delta", "nan"], "--delta nan: must be a finite number in [0, 1]"),
    (["eval", "some-run", "--delta", "1.5"], "--delta 1.5: must be in [0, 1]"),
    (["eval", "some-run", "--step-size", "inf"], "--step-size inf: must be a finite number ≤ 1000, got inf"),
    (["eval", "some-run", "--restarts", str(2 ** 70)], "--restarts 1180591620717411303424: "),
    (["eval", "some-run", "--steps", "1000000"], "--steps 1000000: must be ≤ 100000"),
    (["eval", "some-run", "--seed", "-1"], "--seed -1: must be ≥ 0"),
    (["eval", "some-run", "--subset-seed", "-2"], "--subset-seed -2: must be ≥ 0"),
    (["eval", "some-run", "--faithfulness-steps", "0"], "--faithfulness-steps 0: must be"),
    (["tune", "missing.yaml", "--trials", "-1"], "--trials -1: must be a whole number >= 0"),
    (["tune", "missing.yaml", "--seed", str(2 ** 40)], f"--seed {2 ** 40}: must be ≤ 4294967295"),
    (["show", "some-run", "--samples", "-5"], "--samples -5: must be ≥ 0"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD])
def test_a_bad_numeric_flag_is_one_line_naming_it_and_exit_code_2(tmp_path, capsys, argv, message):
    workspace = tmp_path / "ws"
    assert main(["--workspace", str(workspace), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kdlab: error: {message}"), lines
    assert not workspace.exists()


def test_every_problem_of_a_command_is_reported_at_once(tmp_path, capsys):
    assert main(["--workspace", str(tmp_path / "ws"), "eval", "r", "--delta", "-1", "--subset", "-1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[2].strip() for line in lines] == ["--subset -1", "--delta -1.0"], lines


def test_every_declared_flag_is_a_flag_of_its_command():
    from kdlab.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for command, flags in FLAGS.items():
        parser_actions = {a.dest: a.option_strings for a in sub[command]._actions}
        for dest, (flag, _) in flags.items():
            assert flag in parser_actions.get(dest, ()), (command, dest, flag)
