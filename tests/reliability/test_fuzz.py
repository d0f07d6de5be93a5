"""Bad-input fuzzing: random and malformed configs and argument lists end in exit code 0/1/2, never a traceback.

The CLI entry point runs in-process (``kdlab.cli.main(argv)``). Every example
either succeeds, or is refused by argparse (``SystemExit(2)``) or with a
one-line ``KdlabError`` (return 2); any other exception is a bug and fails the
test with its traceback. ``run`` is always a ``--dry-run`` (nothing trains) and
sizes stay small (no example may allocate gigabytes). Hypothesis runs
derandomized (the same examples on every machine) with a bounded number of
examples, so CI is deterministic; the four property tests take ~25 s together
and sit in the integration tier. The crashes they found are pinned as plain
unit tests at the end of this file.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kdlab.cli import main  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from reliability_helpers import TINY  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def _run_cli(argv: list[str], capsys) -> int:
    """``main(argv)``'s exit code; argparse's SystemExit counts as its code. Anything else propagates."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if code == 2 and err.startswith("kdlab: error:"):
        lines = err.strip().splitlines()
        # One line per problem, each prefixed (a config with several problems lists them all).
        assert all(line.startswith("kdlab: error: ") for line in lines), err
    return code


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "ws"  # shared: the dataset cache is built once


# ----------------------------------------------------------------------------- argument lists

COMMANDS = ["run", "list", "compare", "show", "runs", "eval", "analyze", "plot", "tune"]
FLAGS = ["--set", "--seeds", "--workers", "--metrics", "--markdown", "--baseline", "--capacity", "--attack", "--eps",
         "--steps", "--norm", "--subset", "--restarts", "--step-size", "--out", "--metric", "--trials", "--direction",
         "--retry-failed", "--no-resume", "--quiet", "--faithfulness", "--help", "-h", "--", "-"]
WORDS = ["models", "methods", "datasets", "losses", "metrics", "attacks", "deviations", "capacity-gap", "gkd-grid",
         "train.lr=0.1", "train.lr=", "=1", "train.epochs=-1", "x.y.z=[1", "data.dataset=nope", "0,1", "1,,x", "-1",
         "0", "8/255", "1/0", "nan", "inf", "-inf", "1e999", "maximize", "tiny", "resnet*", "[", "", " ", "\x00",
         "über", "../..", "/", "pgd", "fgsm", "linf", "l3"]

words = st.one_of(st.sampled_from(FLAGS), st.sampled_from(WORDS), st.text(max_size=12))


@pytest.mark.integration
@FUZZ
@given(command=st.sampled_from(COMMANDS), rest=st.lists(words, max_size=6))
def test_random_argument_lists_end_cleanly(workspace, capsys, command, rest):
    argv = ["--workspace", str(workspace), command, *rest]
    if command == "run":
        argv.append("--dry-run")  # the quickstart or a config is built, never trained
    assert _run_cli(argv, capsys) in (0, 1, 2)


# ----------------------------------------------------------------------------- config files

@pytest.mark.integration
@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_random_text_as_a_config_file_ends_cleanly(tmp_path_factory, workspace, capsys, text):
    config = tmp_path_factory.mktemp("cfg") / "study.yaml"
    config.write_text(text, errors="surrogateescape")
    assert _run_cli(["--workspace", str(workspace), "run", str(config), "--dry-run"], capsys) in (0, 2)


# Values of every kind YAML can hold, kept small: sizes are ints in [-3, 40], so a config that happens
# to be valid dry-runs in milliseconds.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([0, -1, 2**63, -(2**63), 10**30]).filter(
        lambda v: abs(v) < 100),  # huge ints only where they cannot size anything: see BIG_KEYS
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.text(max_size=8),
    st.sampled_from(["mlp", "cnn1d", "kd", "scratch", "synthetic", "mnist1d", "dkd", "8/255", "1/0", "cpu",
                     "cuda", "auto", "adam", "sgd", "cosine", "best_val", "crop_flip", "..", "../x", "/abs"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)

PATHS = ["name", "seeds", "grid", "data", "data.dataset", "data.num_classes", "data.input_shape", "data.num_train",
         "data.num_test", "data.val_fraction", "data.split_seed", "data.augment", "data.labels_per_class",
         "student", "student.model", "student.width", "student.checkpoint", "teacher", "teacher.model",
         "teacher.train", "teacher.train.epochs", "teacher.checkpoint", "teacher.members", "teacher.assistants",
         "method", "method.name", "method.temperature", "method.alpha", "train", "train.epochs", "train.steps",
         "train.batch_size", "train.lr", "train.optimizer", "train.schedule", "train.milestones", "train.grad_clip",
         "train.selection", "train.device", "train.precision", "train.keep_epochs", "train.warmup_epochs",
         "robust", "robust.eps", "robust.attacks", "robust.subset", "grid.method.name", "grid.train.lr", "unknown",
         "data.unknown"]
# Sizes a valid config could turn into memory: kept to a few samples / units whatever the example says.
SIZE_KEYS = {"data.num_train", "data.num_test", "student.width", "data.num_classes"}


def _set(cfg: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def _delete(cfg: dict, dotted: str) -> None:
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    node.pop(keys[-1], None)


@pytest.mark.integration
@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(st.just("<delete>"), values)), min_size=1,
                      max_size=4))
def test_mutated_configs_end_cleanly(tmp_path_factory, workspace, capsys, edits):
    cfg = copy.deepcopy(TINY)
    cfg["teacher"] = {"model": "mlp", "width": 8, "train": {"epochs": 1, "batch_size": 50, "device": "cpu"}}
    for path, value in edits:
        if value == "<delete>":
            _delete(cfg, path)
            continue
        if path in SIZE_KEYS and isinstance(value, int) and not isinstance(value, bool):
            value = max(-3, min(value, 64))
        _set(cfg, path, value)
    config = tmp_path_factory.mktemp("cfg") / "study.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    assert _run_cli(["--workspace", str(workspace), "run", str(config), "--dry-run"], capsys) in (0, 2)


@pytest.mark.integration
@FUZZ
@given(key=st.sampled_from(PATHS), value=st.one_of(st.text(max_size=16), st.sampled_from(
    ["[1,", "{a: 1", "!!python/object:os.system", "&a [*a]", "1e400", ".nan", "-.inf", "0x10", "~", "'", '"',
     "[1, 2, 3]", "{}", "null", "yes", "8/255"])))
def test_random_overrides_end_cleanly(workspace, capsys, key, value):
    if key in SIZE_KEYS:
        return  # sizes are fuzzed in bounded form above
    argv = ["--workspace", str(workspace), "run", "--dry-run", "--set", f"{key}={value}"]
    assert _run_cli(argv, capsys) in (0, 2)


# ----------------------------------------------------------------------------- what the fuzzing found

@pytest.mark.parametrize("edit, message", [
    # A wrongly typed section value was reported, then still handed to the later range checks, which crashed
    # (TypeError, KeyError, AttributeError in the robust checks). Now it is replaced by the default.
    ({"robust": {"attacks": None}}, "robust.attacks: expected list"),
    ({"robust": {"attacks": "0"}}, "robust.attacks: expected list"),
    ({"robust": {"attacks": True}}, "robust.attacks: expected list"),
    ({"robust": {"attacks": {"": None}}}, "robust.attacks: expected list"),
    ({"robust": {"eps_curve": 3}}, "robust.eps_curve: expected list"),
    # An unhashable entry name crashed the collection of grid candidates (TypeError: unhashable type).
    ({"method": {"name": []}}, "method.name: expected a string"),
    ({"method": {"name": {"a": 1}}}, "method.name: expected a string"),
    ({"grid": {"method.name": 7}}, "grid"),
])
def test_configs_the_fuzzer_broke_are_one_line_errors(tmp_path, capsys, edit, message):
    cfg = copy.deepcopy(TINY)
    cfg.update(edit)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"kdlab: error: {message}" in err
