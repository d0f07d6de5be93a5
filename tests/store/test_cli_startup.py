"""CLI start-up (issue 17 item 13): reading commands import no scipy/torch; running out of memory is one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdlab import cli

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("scipy", "sklearn", "matplotlib", "torch")


def test_the_reading_commands_import_no_heavy_library(tmp_path):
    # scipy.stats alone took ~0.9 s of every start, and under `ulimit -v` its OpenBLAS could spin forever.
    code = (
        "import sys\n"
        "from kdlab.cli import main\n"
        "from kdlab.store import Store\n"
        f"Store({str(tmp_path / 'ws')!r}).close()\n"
        "import kdlab.study.compare, kdlab.study.stats\n"
        f"for argv in (['runs'], ['show', 'nothing'], ['doctor']):\n"
        f"    main(['--workspace', {str(tmp_path / 'ws')!r}, *argv])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("error", [MemoryError(), ImportError("x.so: failed to map segment from shared object"),
                                   OSError(12, "Cannot allocate memory")])
def test_out_of_memory_is_one_line_exit_2(monkeypatch, capsys, error):
    def exhausted(args):
        raise error

    monkeypatch.setattr(cli, "cmd_runs", exhausted)
    assert cli.main(["runs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error: out of memory") and "ulimit -v" in err[0]


def test_other_import_and_os_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(cli, "cmd_runs", broken)
    with pytest.raises(ImportError):
        cli.main(["runs"])
