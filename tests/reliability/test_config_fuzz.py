"""Malformed configs and values, from a fixed seeded generator: every one is refused before any work.

Each case runs ``kdlab run --dry-run`` in process (``kdlab.cli.main``) on a config that must be refused:
wrong types, NaN, ±inf, negative, huge and zero values for every numeric key of the schema and of the
method hyperparameters (enumerated from the dataclasses, so a new key is fuzzed on arrival), integers
beyond 64 bits, unknown devices, fp16 on the CPU, crop_flip on 1-D data, sft_steps ≥ steps, deep nesting,
empty, binary, non-UTF-8 files and a directory. Asserted: no traceback (any other exception fails the
test), exit code 2, every stderr line names a key (or the file), and nothing is written to the workspace.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
import typing

import annotated_types as at
import pytest
import yaml

from kdlab import registry
from kdlab.cli import main
from kdlab.config import AttackConfig, DataConfig, RobustConfig, TrainConfig, entry_parameters
from kdlab.config.validate import hints

# "kdlab: error: " then a key path (optionally after "(document N) "), or the file / flag it is about.
LINE = re.compile(r"^kdlab: error: (\(document \d+\) )?([A-Za-z_][\w.\[\]]*:|config (file|path)|--set|--point)")
TINY = {"name": "fuzz", "data": {"dataset": "synthetic", "num_train": 64, "num_test": 32},
        "student": {"model": "mlp", "width": 8, "depth": 1}, "method": {"name": "scratch"},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu"}, "seeds": [0]}


def _numeric_keys(cls: type, prefix: str) -> list[tuple[str, type, list]]:
    """(key path, int or float, bounds metadata) of every numeric field of a dataclass."""
    out = []
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        meta = list(getattr(tp, "__metadata__", ()))
        base = typing.get_args(tp)[0] if meta else tp
        if base in (int, float):
            out.append((f"{prefix}.{f.name}", base, meta))
    return out


def _refused(base: type, meta: list) -> list:
    """Values this key must refuse: wrong types, non-finite, beyond 64 bits, and outside its bounds."""
    values: list = ["text", [1], {"a": 1}, True]
    values += [math.nan, math.inf, -math.inf] if base is float else [1.5, 2 ** 70, -(2 ** 70)]
    lows = [m for m in meta if isinstance(m, (at.Ge, at.Gt, at.Interval))]
    highs = [m for m in meta if isinstance(m, (at.Le, at.Lt, at.Interval))]
    if any(getattr(m, "ge", None) == 0 or getattr(m, "gt", None) == 0 for m in lows):
        values += [-1, -1e9] if base is float else [-1, -10 ** 9]
    if any(getattr(m, "gt", None) == 0 or getattr(m, "ge", None) == 1 for m in lows):
        values.append(0)
    if any(getattr(m, "le", None) is not None or getattr(m, "lt", None) is not None for m in highs):
        values.append(10 ** 15 if base is int else 1e300)
    return values


def _cases() -> list[tuple[str, dict | bytes | None, list[str]]]:
    """(what, config mapping or raw file bytes or None for a directory, extra argv)."""
    rng = random.Random(20261206)
    cases: list = []
    sections = [(TrainConfig, "train"), (DataConfig, "data"), (RobustConfig, "robust"),
                (AttackConfig, "robust.attacks[0]")]
    for method in ("kd", "gkd", "adversarial_kd", "mtard", "faithful_kd"):
        hp = registry.get("method", method).Hparams
        sections.append((hp, f"method@{method}"))
    for cls, prefix in sections:
        for key, base, meta in _numeric_keys(cls, prefix):
            for value in _refused(base, meta):
                cfg = yaml.safe_load(yaml.safe_dump(TINY))
                if prefix.startswith("method@"):
                    cfg["method"] = {"name": prefix.split("@")[1]}
                    cfg["teacher"] = {"model": "mlp", "width": 8, "depth": 1, "train": {"epochs": 1}}
                    argv = ["--set", f"method.{key.split('.')[-1]}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
                elif prefix == "robust.attacks[0]":
                    cfg["robust"] = {"attacks": [{"name": "pgd", key.split(".")[-1]: value}]}
                    argv = []
                else:
                    cfg.setdefault(prefix, {})[key.split(".")[-1]] = value
                    argv = []
                cases.append((f"{key}={value!r}", cfg, argv))
    for device in ("tpu", "cuda:99", "gpu", "cuda:x", "", "cpu:0"):
        cases.append((f"device {device}", {**TINY, "train": {**TINY["train"], "device": device}}, []))
    cases.append(("fp16 on cpu", {**TINY, "train": {**TINY["train"], "precision": "fp16"}}, []))
    cases.append(("crop_flip 1-D", {**TINY, "data": {**TINY["data"], "augment": "crop_flip"}}, []))
    cases.append(("mnist1d crop_flip", {**TINY, "data": {"dataset": "mnist1d", "augment": "crop_flip"}}, []))
    gkd = {**TINY, "data": {"dataset": "addition"}, "student": {"model": "tinygpt"},
           "teacher": {"model": "tinygpt", "train": {"epochs": 1}}, "method": {"name": "gkd", "sft_steps": 50},
           "train": {**TINY["train"], "steps": 10}}
    cases.append(("sft_steps > steps", gkd, []))
    cases.append(("long name", {**TINY, "name": "n" * 300}, []))
    cases.append(("typo", {**TINY, "data": {**TINY["data"], "val_fractoin": 0.2}}, []))
    for depth in (50, 2000):  # as YAML text: {a: {a: ... 1}} under train, and a nested list as the student
        text = yaml.safe_dump({k: v for k, v in TINY.items() if k not in ("train", "student")})
        cases.append((f"nested {depth}", (text + "train: " + "{a: " * depth + "1" + "}" * depth + "\n").encode(), []))
        cases.append((f"nested list {depth}", (text + "student: " + "[" * depth + "]" * depth + "\n").encode(), []))
    cases += [("empty file", b"", []), ("blank file", b"\n\n  \n", []), ("binary", bytes(range(256)), []),
              ("latin-1", "name: caf\xe9\n".encode("latin-1"), []), ("deep yaml", b"[" * 5000 + b"]" * 5000, []),
              ("directory", None, [])]
    for i in range(40):  # random junk bytes (with a NUL: never valid YAML text)
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        cases.append((f"junk {i}", junk + b"\0", []))
    return cases


CASES = _cases()


def test_the_generator_makes_at_least_500_cases():
    assert len(CASES) >= 500, len(CASES)


@pytest.mark.parametrize("chunk", range(4))
def test_malformed_configs_are_refused_before_any_work(tmp_path, capsys, chunk):
    workspace = tmp_path / "ws"
    for index, (what, cfg, argv) in enumerate(CASES[chunk::4]):
        path = tmp_path / f"case{index}.yaml"
        if cfg is None:
            path.mkdir()
        elif isinstance(cfg, bytes):
            path.write_bytes(cfg)
        else:
            try:
                path.write_text(yaml.safe_dump(cfg))
            except RecursionError:
                continue
        code = main(["--workspace", str(workspace), "run", str(path), "--dry-run", "--quiet", *argv])
        err = capsys.readouterr().err
        assert code == 2, (what, err)
        lines = err.strip().splitlines()
        assert lines and all(LINE.match(line) for line in lines), (what, err)
        assert not workspace.exists(), what


def test_set_values_are_refused_in_process(tmp_path, capsys):
    """``--set`` on the built-in quickstart: the same refusals through the override path."""
    workspace = tmp_path / "ws"
    count = 0
    for key, base, meta in _numeric_keys(TrainConfig, "train"):
        for value in ("nan", "inf", "-.inf", "x") + ((str(2 ** 70),) if base is int else ("-1",)):
            code = main(["--workspace", str(workspace), "run", "--dry-run", "--set", f"{key}={value}"])
            err = capsys.readouterr().err
            assert code == 2 and all(LINE.match(line) for line in err.strip().splitlines()), (key, value, err)
            count += 1
    assert count >= 50 and not workspace.exists()
