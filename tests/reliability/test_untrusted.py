"""Untrusted files: no pickle is ever executed, YAML is read safely, no config string is evaluated, and
names from configs cannot point outside the workspace."""
from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

from kdlab.cli import main
from kdlab.engine.checkpoint import load_latest_checkpoint, read_model_file, save_checkpoint
from kdlab.errors import KdlabError

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from reliability_helpers import TINY, write_config  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[2] / "kdlab"


class _Exploit:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weight": _Exploit(marker)}))
    return path


def _crafted_torch_file(path: Path, marker: Path) -> Path:
    torch.save({"weight": _Exploit(marker)}, path)  # a .pt checkpoint as torch.save writes it (zip + pickle)
    return path


def test_the_exploit_works_when_unpickled(tmp_path):
    """The control: plain pickle.load of the file does run the code (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    pickle.loads(_crafted(tmp_path / "x.pkl", marker).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("writer", [_crafted, _crafted_torch_file], ids=["pickle", "torch.save"])
def test_a_pickled_model_file_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = writer(tmp_path / "model.safetensors", marker)
    with pytest.raises(KdlabError, match="not a readable safetensors file"):
        read_model_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("writer", [_crafted, _crafted_torch_file], ids=["pickle", "torch.save"])
def test_a_teacher_checkpoint_from_a_config_is_refused_without_running_it(tmp_path, capsys, writer):
    marker = tmp_path / "pwned"
    bad = writer(tmp_path / "teacher.pt", marker)
    cfg = dict(TINY, teacher={"checkpoint": str(bad), "model": "mlp"}, method={"name": "kd"})
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(write_config(tmp_path, cfg)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "safetensors" in err[0]
    assert not marker.exists()


def test_a_pickled_training_checkpoint_is_refused_on_resume(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, {"w": torch.ones(2)}, {})
    marker = tmp_path / "pwned"
    _crafted_torch_file(root / "epoch-0001" / "weights.safetensors", marker)
    with pytest.raises(KdlabError, match="is unreadable"):
        load_latest_checkpoint(root)
    assert not marker.exists()


def test_a_crafted_cifar_batch_is_refused_without_running_it(tmp_path):
    from kdlab.data.cifar import read_batch

    marker = tmp_path / "pwned"
    path = _crafted(tmp_path / "data_batch_1", marker)
    with pytest.raises(KdlabError, match="refusing to load pathlib"):
        read_batch(path, label_key=b"labels", num_classes=10, source="CIFAR-10")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    "!!python/object/apply:pathlib.Path.touch [[{marker}]]",
    "!!python/object/new:pathlib.Path [{marker}]",
    "!!python/name:os.system",
])
def test_yaml_python_tags_are_refused_in_files_and_overrides(tmp_path, capsys, payload):
    marker = tmp_path / "pwned"
    text = payload.format(marker=str(marker))
    config = tmp_path / "study.yaml"
    config.write_text(f"name: x\ntrain: {text}\n")
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study.yaml" in err[0] and "not valid YAML" in err[0]
    assert main(["--workspace", str(tmp_path / "ws"), "run", "--dry-run", "--set", f"train.lr={text}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # An override that is not plain YAML is kept as the literal string, which the schema then refuses.
    assert len(err) == 1 and err[0].startswith("kdlab: error: train.lr: expected a number")
    assert not marker.exists()


def test_the_package_has_no_unsafe_loader():
    """Source scan: no eval/exec, no unrestricted pickle or torch.load, no unsafe YAML loader in kdlab/."""
    banned = [
        (re.compile(r"(?<![\w.])(eval|exec)\s*\("), "eval/exec"),
        (re.compile(r"\bpickle\.loads?\s*\("), "pickle.load"),
        (re.compile(r"\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
        (re.compile(r"\byaml\.(unsafe_load|full_load)\b|Loader\s*=\s*yaml\.(Loader|FullLoader|UnsafeLoader)"),
         "unsafe YAML loader"),
        (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    ]
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for pattern, what in banned:
                if pattern.search(line):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {what}: {line.strip()}")
    assert found == []


@pytest.mark.parametrize("name", ["../outside", "/tmp/abs", "a/b", "..", ".hidden", "~user", "a\\b"])
def test_a_name_that_looks_like_a_path_is_refused(tmp_path, capsys, name):
    cfg = dict(TINY, name=name)
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(write_config(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error: name:") and "looks like a path" in err[0]
    assert not (tmp_path / "ws" / "runs").exists() or list((tmp_path / "ws" / "runs").iterdir()) == []


def test_run_ids_from_the_command_line_cannot_reach_outside_the_store(tmp_path, capsys):
    from kdlab.store import Store

    store = Store(tmp_path / "ws")
    for bad in ("../../etc/passwd", "/etc/passwd", ".."):
        with pytest.raises(ValueError, match="invalid run id"):
            store.run_dir(bad)
        assert main(["--workspace", str(tmp_path / "ws"), "show", bad]) == 2
        assert "no run id, run-id prefix or experiment named" in capsys.readouterr().err
