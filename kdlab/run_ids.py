"""Run identity: one run's resolved config, its content hash (the run id) and group key.

The graph of runs (who trains before whom) is ``kdlab.plan``; ``kdlab.config.load`` expands a config into
run specs, one per grid point and seed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.config.entries import entry_parameters
from kdlab.config.schema import ExperimentConfig, StudentConfig
from kdlab.config.validate import NotInRunId
from kdlab.errors import KdlabError


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
        for section, name_key, kind in (("data", "dataset", "dataset"), ("student", "model", "model"),
                                        ("teacher", "model", "model")):
            options = out.get(section)
            if isinstance(options, dict) and isinstance(options.get(name_key), str):
                for key in identity_free_options(kind, options[name_key]):  # e.g. data.download
                    options.pop(key, None)
        out["seed"] = self.seed
        return out

    def identity(self) -> dict:
        """What the run id hashes: the resolved config, plus the content hashes of the model files it names by
        path (``source_hashes``) when there are any (so configs without them keep their ids)."""
        out = self.resolved()
        sources = source_hashes(out)
        if sources:
            out["source_sha256"] = sources
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


def identity_free_options(kind: str, name: str) -> tuple[str, ...]:
    """The options of a registry entry marked ``NotInRunId`` (left out of run ids); () for an unknown entry."""
    try:
        params = entry_parameters(kind, name)
    except KdlabError:
        return ()
    return tuple(key for key, (tp, _) in params.items()
                 if any(isinstance(m, NotInRunId) for m in getattr(tp, "__metadata__", ())))



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
