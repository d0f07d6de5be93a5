"""The user's own code from a config, a CLI flag or an installed package (kdlab.plugins, issue 20)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kdlab import plugins, registry
from kdlab.cli import main
from kdlab.config import load_experiment
from kdlab.errors import KdlabError
from kdlab.store import Store

REPO = Path(__file__).resolve().parents[1]

# A logit loss and a method, each registered by the user's file (the names are unique to this test file).
PLUGIN = '''
from dataclasses import dataclass

import torch

from kdlab.losses import cross_entropy
from kdlab.methods.base import Method
from kdlab.registry import register


@register("loss", "{prefix}_l1_probs")
def l1_probs(student_logits, teacher_logits, *, temperature=1.0):
    """L1 distance between the softened class distributions."""
    p = torch.softmax(teacher_logits / temperature, -1)
    q = torch.softmax(student_logits / temperature, -1)
    return (p - q).abs().sum(-1).mean()


l1_probs.loss_kind = "logit"


@dataclass
class Hparams:
    beta: float = 0.5  # weight of the L1 term


@register("method", "{prefix}_l1_kd")
class L1KD(Method):
    """Cross-entropy plus beta times the L1 distance of the class distributions."""

    Hparams = Hparams

    def loss_terms(self, batch, student_out, teacher_out):
        return {{"ce": cross_entropy(student_out.logits, batch.labels),
                "l1": self.hparams.beta * l1_probs(student_out.logits, teacher_out.logits)}}
'''

DATA = {"dataset": "synthetic", "num_classes": 3, "input_shape": [1, 12], "num_train": 60, "num_test": 30}


@pytest.fixture
def clean_registry(monkeypatch):
    """Whatever a test registers or imports is forgotten afterwards."""
    registry.names("method")  # the built-ins first, so the snapshot holds them
    saved = {kind: dict(entries) for kind, entries in registry._entries.items()}
    modules = set(sys.modules)
    monkeypatch.setattr(plugins, "_loaded", [])
    monkeypatch.setattr(plugins, "_files", {})
    yield
    for kind, entries in saved.items():
        registry._entries[kind].clear()
        registry._entries[kind].update(entries)
    for name in set(sys.modules) - modules:
        if name.startswith(("kdlab_plugin_", "userpkg")):
            del sys.modules[name]


def _plugin(folder: Path, prefix: str, name: str = "my_method.py") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PLUGIN.format(prefix=prefix))
    return path


def test_a_config_imports_a_file_relative_to_itself_before_validation(tmp_path, clean_registry):
    _plugin(tmp_path / "cfg", "pa")
    config = tmp_path / "cfg" / "study.yaml"
    config.write_text(yaml.safe_dump({"imports": ["./my_method.py"], "data": DATA, "teacher": {"model": "mlp"},
                                      "method": {"name": "pa_l1_kd", "beta": 0.25}}))
    base, specs = load_experiment(config)
    assert specs[0].config.method.options == {"beta": 0.25}
    absolute = str((tmp_path / "cfg" / "my_method.py").resolve())
    assert base.imports == [absolute] and plugins.loaded() == [absolute]
    assert registry.summary("loss", "pa_l1_probs").startswith("L1 distance")
    assert specs[0].resolved()["imports"] == [absolute]  # saved with the run (config.yaml) ...
    assert "imports" not in specs[0].identity()  # ... but not part of its id
    again = yaml.safe_load(config.read_text())
    again.pop("imports")
    config.write_text(yaml.safe_dump(again))
    assert load_experiment(config)[1][0].run_id == specs[0].run_id  # already imported; the same run


def test_a_module_name_on_sys_path_and_a_loss_in_a_distill_method(tmp_path, clean_registry, monkeypatch):
    _plugin(tmp_path / "userpkg", "pb", "losses.py")
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {"imports": ["userpkg.losses"], "data": DATA, "teacher": {"model": "mlp"},
           "method": {"name": "distill", "terms": {"ce": 0.5, "pb_l1_probs": {"weight": 0.5, "temperature": 2.0}}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(raw))
    load_experiment(config)
    assert plugins.loaded() == ["userpkg.losses"]
    assert plugins.search_paths() == [str(tmp_path)]  # what a Ray task's PYTHONPATH gets


def test_importing_the_same_file_twice_registers_once(tmp_path, clean_registry):
    path = _plugin(tmp_path, "pc")
    first = plugins.import_one(str(path), where="--import")
    assert plugins.import_one(str(path), where="imports[0]") == first == str(path.resolve())
    plugins.load_all([first])  # what a worker does with the parent's list
    assert registry.get("method", "pc_l1_kd").__name__ == "L1KD"


@pytest.mark.parametrize("entry, content, expected", [
    ("./missing.py", None, "imports[1]: cannot import ./missing.py: no file "),
    ("./broken.py", "def f(:\n", "imports[1]: cannot import ./broken.py: SyntaxError: "),
    ("./raises.py", "import no_such_package_kdlab\n", "imports[1]: cannot import ./raises.py: ModuleNotFoundError: "),
    ("no_such_module_kdlab.sub", None, "imports[1]: cannot import no_such_module_kdlab.sub: ModuleNotFoundError"),
    ("./twice.py", "from kdlab.registry import register\nregister('method', 'kd')(object)\n",
     "imports[1]: cannot import ./twice.py: ValueError: method 'kd' is registered twice"),
])
def test_an_import_that_fails_is_one_line_naming_the_key_and_module(tmp_path, clean_registry, entry, content,
                                                                    expected):
    _plugin(tmp_path, "pd", "ok.py")
    if content is not None:
        (tmp_path / entry).write_text(content)
    with pytest.raises(KdlabError) as info:
        plugins.load_imports(["./ok.py", entry], base_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(expected) and "\n" not in message and "; " in message


def test_imports_must_be_a_list_of_names(clean_registry):
    with pytest.raises(KdlabError, match=r"^imports: expected a list"):
        plugins.load_imports({"a": 1})
    with pytest.raises(KdlabError, match=r"^imports\[0\]: expected a module name"):
        plugins.load_imports([3])
    assert plugins.load_imports(None) is None


def test_cli_import_failure_exits_2_with_one_line_and_writes_nothing(tmp_path, clean_registry, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"imports": ["./nope.py"], "data": DATA}))
    workspace = tmp_path / "ws"
    assert main(["--workspace", str(workspace), "run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error: imports[0]: cannot import ./nope.py: no file")
    assert not workspace.exists()
    assert main(["--workspace", str(workspace), "--import", "./nope.py", "list", "methods"]) == 2
    assert capsys.readouterr().err.startswith("kdlab: error: --import ./nope.py: cannot import ./nope.py")
    assert not workspace.exists()


def test_cli_import_flag_lists_the_plugins_entries(tmp_path, clean_registry, capsys, monkeypatch):
    _plugin(tmp_path, "pe")
    monkeypatch.chdir(tmp_path)
    assert main(["--import", "my_method.py", "list", "methods", "pe_*"]) == 0
    assert capsys.readouterr().out.split()[0] == "pe_l1_kd"


def _entry_points(monkeypatch, *eps):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return list(eps)

    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", fake)
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    return calls


def test_entry_points_load_once_with_the_builtins(clean_registry, monkeypatch):
    seen = []

    def register_it():
        seen.append(1)
        registry.register("loss", "pf_entry_loss")(lambda s, t: (s - t).abs().mean())

    calls = _entry_points(monkeypatch, SimpleNamespace(name="mine", value="pkg:register_it", dist=None,
                                                       load=lambda: register_it))
    monkeypatch.setattr(registry, "_loaded", False)  # as at the first lookup of a process
    assert "pf_entry_loss" in registry.names("loss", "pf_*")
    registry.get("method", "kd")
    assert seen == [1] and calls == [{"group": "kdlab.plugins"}]


def test_a_broken_entry_point_is_one_line_naming_it_and_its_package(clean_registry, monkeypatch):
    def load():
        raise ImportError("No module named 'torch_extra'")

    _entry_points(monkeypatch, SimpleNamespace(name="broken", value="bad_pkg.kd", dist=SimpleNamespace(name="bad-pkg"),
                                               load=load))
    with pytest.raises(KdlabError) as info:
        plugins.load_entry_points()
    assert str(info.value) == ("kdlab.plugins entry point broken = bad_pkg.kd (package bad-pkg): cannot import it: "
                               "ImportError: No module named 'torch_extra'; fix or uninstall that package")


@pytest.mark.integration
def test_a_plugin_loss_and_method_run_from_yaml_with_two_workers(tmp_path):
    _plugin(tmp_path, "pg")
    study = {"name": "plugins", "imports": ["./my_method.py"], "data": DATA,
             "teacher": {"model": "mlp", "train": {"epochs": 1}},
             "student": {"model": "mlp", "width": 8}, "train": {"epochs": 1, "batch_size": 20, "device": "cpu"},
             "grid": {"method": {"mine": {"name": "pg_l1_kd", "beta": 0.5},
                                 "terms": {"name": "distill", "terms": {"ce": 0.5, "pg_l1_probs": 0.5}}}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    workspace = tmp_path / "ws"
    done = subprocess.run([sys.executable, "-m", "kdlab.cli", "--workspace", str(workspace), "run", str(config),
                           "--workers", "2", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    store = Store(workspace)
    records = store.runs(experiment="plugins")
    assert sorted(r.method for r in records) == ["distill", "pg_l1_kd"]
    assert all(r.status == "finished" for r in records)
    store.close()


@pytest.mark.integration
def test_a_plugin_module_found_from_the_working_directory_runs_on_ray_tasks(tmp_path):
    pytest.importorskip("ray")
    _plugin(tmp_path / "userpkg", "ph", "losses.py")
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    study = {"name": "plugins-ray", "data": DATA, "teacher": {"model": "mlp", "train": {"epochs": 1}},
             "student": {"model": "mlp", "width": 8}, "train": {"epochs": 1, "batch_size": 20, "device": "cpu"},
             "method": {"name": "ph_l1_kd"}, "seeds": [0, 1]}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    # `python -m` puts the working directory on sys.path: the module is found there, not through PYTHONPATH
    # (the executor hands its folder to the tasks; a local Ray also puts the driver's directory on their path).
    done = subprocess.run([sys.executable, "-m", "kdlab.cli", "--import", "userpkg.losses", "--workspace",
                           str(tmp_path / "ws"), "run", str(config), "--executor", "ray", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    store = Store(tmp_path / "ws")
    records = store.runs(experiment="plugins-ray", role="student")
    assert len(records) == 2 and all(r.status == "finished" and r.method == "ph_l1_kd" for r in records)
    store.close()
