"""YAML files, ``--set`` overrides, multi-document studies, grid expansion, choosing one variant or point.

Resolution order: schema defaults → the YAML file → ``--set key.path=value`` overrides. The whole config
(every document, every grid point) is validated before any work, and every problem is reported at once
as ``key.path: what is wrong; the fix``.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

import yaml

from kdlab.config.entries import drop_knobs_set_by_sized_name, entry_parameters, split_sized_name
from kdlab.config.sections import REGISTRY_SECTIONS, parse_point
from kdlab.dotted import MISSING, deep_merge, get_path, set_path
from kdlab.errors import ConfigError, KdlabError
from kdlab.run_ids import RunSpec


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


def _accepts(doc: dict, key: str) -> bool:
    """Whether document ``doc`` has ``key``, or could: no section on its path is null or a value, and a
    registry section (``method``, ``student``, ...) takes the key for some entry the document selects."""
    if get_path(doc, key, MISSING) is not MISSING:
        return True
    parts = key.split(".")
    node: Any = doc
    for part in parts[:-1]:
        if not isinstance(node, dict):
            return False
        node = node.get(part, {}) if part in node else {}
        if node is None:
            return False  # e.g. teacher: null
    if not isinstance(node, dict):
        return False
    section = REGISTRY_SECTIONS.get(parts[0]) if len(parts) == 2 else None
    if section is None:
        return True
    cls, name_key, kind = section
    grid = doc.get("grid") if isinstance(doc.get("grid"), dict) else {}
    names = [node.get(name_key, getattr(cls(), name_key))] + list(grid.get(f"{parts[0]}.{name_key}", []) or [])
    fields = {f.name for f in dataclasses.fields(cls)}
    for name in names:
        try:
            if parts[1] in fields or parts[1] in entry_parameters(kind, split_sized_name(name)[0]):
                return True
        except (KdlabError, TypeError):
            return True  # an unknown entry is reported by validation
    return False


def _overrides_for(docs: list[dict], overrides: list[str]) -> list[list[str]]:
    """Which ``--set`` overrides apply to which document: those that have the key (or its section, taking
    the key); where no document does, every document (so a typo is still reported)."""
    out: list[list[str]] = [[] for _ in docs]
    for text in overrides:
        key, _ = parse_override(text)
        holders = [i for i, d in enumerate(docs) if _accepts(d, key)]
        for i in holders or range(len(docs)):
            out[i].append(text)
    return out


def parse_experiment(raw: dict):
    """Validate an experiment (every grid point) and expand it into runs (grid product × seeds).

    Raises ``ConfigError`` listing every problem. Returns the base config and
    the run specs in a stable order: grid points in the order written, then seeds.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"config: expected a mapping, got {raw!r}"])
    errors: list[str] = []
    grid_raw = raw.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise ConfigError([f"grid: expected a mapping of key.path to a list of values, got {grid_raw!r}"])
    # A grid entry is a list of values, or a mapping name -> value whose names label the runs.
    named: dict[str, list[tuple[str | None, Any]]] = {}
    for key, values in grid_raw.items():
        if isinstance(values, dict) and values:
            named[key] = [(str(name), value) for name, value in values.items()]
        elif isinstance(values, list) and values:
            named[key] = [(None, value) for value in values]
        else:
            errors.append(f"grid.{key}: expected a non-empty list of values (or a mapping name: value), "
                          f"got {values!r}")
        if str(key).split(".")[0] in ("grid", "seeds", "name"):
            errors.append(f"grid.{key}: cannot be swept; sweep seeds with seeds: [...]")
    if errors:
        raise ConfigError(errors)
    base_raw = {k: v for k, v in raw.items() if k != "grid"}
    grid_values = {key: [value for _, value in items] for key, items in named.items()}
    base = parse_point(base_raw, grid_values, errors)
    base.grid = dict(grid_raw)
    specs: list[RunSpec] = []
    keys = list(named)
    seen_errors = set(errors)
    for combo in itertools.product(*(named[k] for k in keys)):
        point = {key: value for key, (_, value) in zip(keys, combo)}
        point_names = {key: name for key, (name, _) in zip(keys, combo) if name is not None}
        point_raw = copy.deepcopy(base_raw)
        point_errors: list[str] = []
        for key, value in point.items():
            try:
                set_path(point_raw, key, copy.deepcopy(value))
                if key.endswith(".model"):
                    drop_knobs_set_by_sized_name(get_path(point_raw, key.rsplit(".", 1)[0]), value)
            except KdlabError as exc:
                point_errors.append(f"grid.{key}: {exc}")
        cfg = parse_point(point_raw, grid_values, point_errors)
        for e in point_errors:
            if e not in seen_errors:
                seen_errors.add(e)
                errors.append(e + (f" (grid point {point})" if point else ""))
        for seed in (cfg.seeds if isinstance(cfg.seeds, list) else []):
            specs.append(RunSpec(config=cfg, seed=seed, point=point, point_names=point_names))
    if errors:
        raise ConfigError(errors)
    # Runs that resolve to the same config (e.g. scratch under a temperature grid) run once.
    unique: dict[str, RunSpec] = {}
    for spec in specs:
        unique.setdefault(spec.run_id, spec)
    return base, list(unique.values())


def _select_points(specs: list, points: list[str]) -> list:
    """The runs of the grid points ``key=value`` (a value or a grid name) picks; unknown ones name the choices."""
    for text in points:
        key, value = parse_override(text) if "=" in text else (text, MISSING)
        choices: dict[str, set[str]] = {}
        for spec in specs:
            for k, v in spec.point.items():
                choices.setdefault(k, set()).add(spec.point_names.get(k) or str(v))
        if key not in choices:
            listed = ", ".join(sorted(choices)) or "(none: this config has no grid)"
            raise KdlabError(f"--point {text!r}: {key!r} is not a grid key; the grid keys are {listed}")
        kept = [s for s in specs if key in s.point and (s.point[key] == value or s.point_names.get(key) == str(value)
                                                         or str(s.point[key]) == str(value))]
        if not kept:
            raise KdlabError(f"--point {text!r}: no grid point has {key}={value!r}; its values are "
                             f"{', '.join(sorted(choices[key]))}")
        specs = kept
    return specs


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None,
                    seeds: list[int] | None = None, *, variant: str | None = None,
                    points: list[str] | None = None):
    """YAML file (or the built-in quickstart when ``path`` is None) + overrides → validated runs.

    A file may hold several YAML documents: the first is the study, each later
    one extends it (deep-merged over the first, with a grid of its own or none),
    so arms that are not a full grid product (e.g. remedies for one teacher–student
    pair) join the same experiment; ``variant: NAME`` in a later document labels its
    runs and ``variant`` (``"base"`` for the first document) picks one document.
    An override applies to the documents that hold its key (see ``_overrides_for``); ``seeds``
    to every document; ``points`` (``key=value``) keep the runs of the chosen grid points.
    Every document is validated, and all their problems are reported together.
    """
    if path is not None and not str(path).strip():
        raise KdlabError("config path is empty; give the path of a YAML config (see configs/), "
                         "or no path for the built-in quickstart")
    documents = load_yaml_documents(path) if path is not None else [quickstart_raw()]
    if path is not None and all(not doc for doc in documents):
        raise KdlabError(f"config file {path} is empty; give at least a method or a dataset (see configs/)")
    first = documents[0]
    names = ["base"] + [str(doc.get("variant")) for doc in documents[1:]]
    if variant is not None and variant not in names:
        raise KdlabError(f"--variant {variant!r}: no such document; the variants are {', '.join(names)}")
    merged = [first] + [deep_merge({k: v for k, v in first.items() if k not in ("grid", "variant")},
                                   {k: v for k, v in doc.items() if k != "variant"}) for doc in documents[1:]]
    per_doc = _overrides_for(merged, overrides or [])
    base, specs, problems = None, [], []
    for index, (raw, doc) in enumerate(zip(merged, documents)):
        if variant is not None and names[index] != variant:
            continue
        raw = apply_overrides(raw, per_doc[index])
        if seeds is not None:
            raw["seeds"] = list(seeds)
        try:
            doc_base, doc_specs = parse_experiment(raw)
        except ConfigError as exc:
            prefix = f"(document {index + 1}) " if len(documents) > 1 else ""
            problems.extend(prefix + problem for problem in exc.problems)
            continue
        base = base or doc_base
        if index > 0 and doc.get("variant") is not None:
            for spec in doc_specs:
                spec.point = {"variant": doc["variant"], **spec.point}
                spec.point_names = {"variant": str(doc["variant"]), **spec.point_names}
        known = {spec.run_id for spec in specs}
        specs.extend(spec for spec in doc_specs if spec.run_id not in known)
    if problems:
        raise ConfigError(problems)
    return base, _select_points(specs, points or [])
