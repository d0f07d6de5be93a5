"""The runs of an experiment and their identity.

``load_experiment`` reads a config file (or the quickstart) with its ``--set`` overrides; ``parse_experiment``
validates a mapping (every grid point, through ``kdlab.config``) and expands it into runs: one ``RunSpec`` per
document × grid point × seed, runs that resolve to the same config kept once. A ``RunSpec``'s ``run_id`` hashes
its resolved config (``resolved``/``identity``); its ``group_key`` the same without the seed. The graph of runs
(teachers and assistants before their students) is ``kdlab.plan``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab import registry
from kdlab.config.entries import drop_knobs_set_by_sized_name, entry_parameters, split_sized_name
from kdlab.config.load import apply_overrides, load_yaml_documents, parse_override, quickstart_raw
from kdlab.config.schema import ExperimentConfig, StudentConfig
from kdlab.config.sections import REGISTRY_SECTIONS, parse_point
from kdlab.config.validate import NotInRunId
from kdlab.dotted import MISSING, deep_merge, get_path, set_path
from kdlab.errors import ConfigError, KdlabError


@dataclass
class RunSpec:
    """One run: a fully resolved config (no grid), its seed and the grid point it came from."""

    config: ExperimentConfig
    seed: int
    point: dict[str, Any]
    point_names: dict[str, str] = field(default_factory=dict)  # key -> name, for grids given as name: value

    @property
    def label(self) -> str:
        parts = [f"{k}={self.point_names.get(k) or _short(v)}" for k, v in self.point.items()]
        return " ".join(parts + [f"seed={self.seed}"])

    def resolved(self) -> dict:
        """The config as saved with the run: every default filled in, one seed, no grid."""
        out = to_dict(self.config)
        out.pop("grid")
        out.pop("seeds")
        out.pop("tracking", None)  # where metrics are also sent: neither identity nor results of the run
        teacher = out.get("teacher") if isinstance(out.get("teacher"), dict) else {}
        for options, name_key, kind in ((out.get("data"), "dataset", "dataset"), (out.get("student"), "model", "model"),
                                        (teacher, "model", "model"), (out.get("method"), "name", "method"),
                                        (teacher.get("method"), "name", "method")):
            if isinstance(options, dict) and isinstance(options.get(name_key), str):
                for key, at_default, default in identity_free_options(kind, options[name_key]):  # data.download
                    if not at_default or options.get(key) == default:
                        options.pop(key, None)
        out["seed"] = self.seed
        return out

    def identity(self) -> dict:
        """What the run id hashes: the resolved config, plus the content hashes of the model files it names by
        path (``source_hashes``) when there are any (so configs without them keep their ids)."""
        out = self.resolved()
        out.pop("imports", None)  # which module registered a name is not what ran (kdlab.plugins)
        sources = source_hashes(out)
        if sources:
            out["source_sha256"] = sources
        revisions = method_revisions(out)
        if revisions:
            out["method_revision"] = revisions
        return out

    @property
    def group_key(self) -> str:
        """Identical for runs that differ only by seed."""
        out = self.identity()
        out.pop("seed")
        return content_hash(out)[:16]

    @property
    def run_id(self) -> str:
        return f"{_slug(self.config.name)}-{content_hash(self.identity())[:10]}"


def identity_free_options(kind: str, name: str) -> tuple[tuple[str, bool, Any], ...]:
    """``(key, at_default, default)`` of a registry entry's options left out of run ids: marked ``NotInRunId``
    (always, or at their default), or a method's ``Hparams`` field with ``OMIT_DEFAULT`` metadata (at its
    default: a later-added hyperparameter keeps the ids of runs that do not set it); () for an unknown entry."""
    try:
        params = entry_parameters(kind, name)
    except KdlabError:
        return ()
    hparams = getattr(registry.get(kind, name), "Hparams", None) if kind == "method" else None
    later = {f.name for f in dataclasses.fields(hparams) if f.metadata.get("omit_default")} if hparams else set()
    return tuple((key, key in later or marks[0].at_default, default) for key, (tp, default) in params.items()
                 if key in later or (marks := [m for m in getattr(tp, "__metadata__", ())
                                               if isinstance(m, NotInRunId)]))



def method_revisions(resolved: dict) -> dict[str, int]:
    """``{"method" | "teacher.method": revision}`` of the methods ``resolved`` trains with whose
    ``Method.revision`` is above 1 (a fix changed what they compute); {} keeps every other run's id."""
    teacher = resolved.get("teacher") if isinstance(resolved.get("teacher"), dict) else {}
    out = {}
    for key, section in (("method", resolved.get("method")), ("teacher.method", teacher.get("method"))):
        if isinstance(section, dict) and isinstance(section.get("name"), str):
            try:
                revision = getattr(registry.get("method", section["name"]), "revision", 1)
            except KdlabError:
                continue
            if revision != 1:
                out[key] = revision
    return out


_HASHES: dict[tuple, str] = {}  # (path, file stats) -> content hash: a study hashes each model once


def _stat_key(path: Path) -> tuple | None:
    try:
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            return None
        return (str(path.resolve()),) + tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        return None


def source_hashes(resolved: dict) -> dict[str, str]:
    """``{dotted key: SHA-256}`` of each Hugging Face model folder / GGUF file (and tokenizer) ``resolved`` names
    by path: the one place where a model named by path joins a run's identity by its content, so replacing the
    model at the same path makes a new run. A path that does not exist is left out (the loader names it)."""
    paths = {}
    for section in ("teacher", "student"):
        value = resolved.get(section)
        if isinstance(value, dict) and value.get("model") == "hf_causal_lm" and isinstance(value.get("path"), str):
            paths[f"{section}.path"] = value["path"]
    tokenizer = (resolved.get("data") or {}).get("tokenizer") if isinstance(resolved.get("data"), dict) else None
    if isinstance(tokenizer, str) and not tokenizer.startswith("bundled:") and tokenizer != "teacher":
        paths["data.tokenizer"] = tokenizer
    out = {}
    for key, text in paths.items():
        path = Path(text).expanduser()
        stats = _stat_key(path)
        if stats is None:
            continue
        if stats not in _HASHES:
            from kdlab.seq.hf_load import source_sha256

            _HASHES[stats] = source_sha256(path)
        out[key] = _HASHES[stats]
    return out


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower())
    return keep.strip("-")[:40] or "run"


def content_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys): the identity of a config."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def to_dict(cfg: Any) -> Any:
    """Dataclass → plain dict, with each section's ``options`` flattened back into the section."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.metadata.get("omit_default") and value == f.default:
                continue  # a later-added key at its default: not part of the resolved config (run ids unchanged)
            if f.name == "options":
                out.update({k: to_dict(v) for k, v in value.items()})
            else:
                out[f.name] = to_dict(value)
            if f.name == "checkpoint" and isinstance(cfg, StudentConfig):
                out.update(copy.deepcopy(StudentConfig.RUN_ID_KEYS))
        return out
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# --------------------------------------------------------------------------- an experiment → its runs


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


def _with_imports(raw: dict, base_dir: Path | None) -> dict:
    """``raw`` after importing its ``imports`` (kdlab.plugins), relative files made absolute: before validation."""
    if raw.get("imports") is None:
        return raw
    from kdlab.plugins import load_imports

    return {**raw, "imports": load_imports(raw["imports"], base_dir=base_dir)}


def parse_experiment(raw: dict):
    """Validate an experiment (every grid point) and expand it into runs (grid product × seeds).

    Raises ``ConfigError`` listing every problem. Returns the base config and
    the run specs in a stable order: grid points in the order written, then seeds.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"config: expected a mapping, got {raw!r}"])
    raw = _with_imports(raw, None)
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
        raw = _with_imports(raw, Path(path).parent if path is not None else None)
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
