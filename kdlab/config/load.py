"""YAML config files and ``--set`` overrides: reading them safely, one line for every file that cannot be a config.

Resolution order: schema defaults → the YAML file → ``--set key.path=value`` overrides. The documents of a file,
its grid points and seeds become runs in ``kdlab.runs`` (``load_experiment``), which validates all of them before
any work and reports every problem at once as ``key.path: what is wrong; the fix``.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from kdlab.dotted import set_path
from kdlab.errors import KdlabError


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``3E4`` as floats (PyYAML's YAML 1.1 needs ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

QUICKSTART_PATH = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def _read_text(path: Path) -> str:
    """The file's text, or a one-line error for a path that is not a readable UTF-8 text file."""
    if str(path) in ("", "."):
        raise KdlabError("config path is empty; give the path of a YAML config (see configs/), "
                         "or no path for the built-in quickstart")
    if path.is_dir():
        raise KdlabError(f"config file {path} is a directory; give the path of a YAML file (see configs/)")
    if not path.is_file():
        raise KdlabError(f"config file {path} does not exist; pass the path of a YAML config (see configs/)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KdlabError(f"config file {path} cannot be read ({exc.strerror}); check its permissions") from None
    if b"\0" in data:
        raise KdlabError(f"config file {path} is binary, not YAML text; give a YAML config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KdlabError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def load_yaml_documents(path: str | Path) -> list[dict]:
    """All YAML documents of a config file (``---`` separated), each a mapping."""
    path = Path(path)
    text = _read_text(path)
    try:
        documents = list(yaml.load_all(text, Loader=_YamlLoader))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise KdlabError(f"config file {path} is not valid YAML{line}; fix the syntax") from None
    except RecursionError:
        raise KdlabError(f"config file {path} is nested too deeply to be a config; flatten it") from None
    documents = [{} if doc is None else doc for doc in documents] or [{}]
    for doc in documents:
        if not isinstance(doc, dict):
            raise KdlabError(f"config file {path} must hold a mapping at the top level, got {type(doc).__name__}")
    return documents


def load_yaml(path: str | Path) -> dict:
    """Read a one-document YAML config file; a missing or malformed file is a one-line ``KdlabError``."""
    documents = load_yaml_documents(path)
    if len(documents) > 1:
        raise KdlabError(f"config file {path} holds {len(documents)} YAML documents; `kdlab run` reads those "
                         "(each later document extends the first)")
    return documents[0]


def quickstart_raw() -> dict:
    """The embedded default experiment run by a bare ``kdlab run``."""
    return load_yaml(QUICKSTART_PATH)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` → ``("train.lr", 0.1)``; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise KdlabError(f"--set {text!r}: expected key.path=value, e.g. --set train.lr=0.05")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise KdlabError(f"--set {text!r}: expected key.path=value with a key before '=', e.g. --set train.lr=0.05")
    try:
        value = yaml.load(value_text, Loader=_YamlLoader) if value_text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = value_text
    return key, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_path(raw, key, value)
    return raw
