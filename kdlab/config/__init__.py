"""Typed experiment configuration: the schema, every default and bound, loading and validation.

    schema.py    dataclasses only; bounds declared on the fields (``Annotated[float, Gt(0)]``)
    validate.py  the one coercer (types, choices, bounds; NaN/inf and >64-bit integers refused)
    entries.py   sections naming a registry entry (dataset, model, method) and that entry's options
    names.py     the ``-wN``/``-dN`` model-name syntax
    sections.py  one grid point: sections → ``ExperimentConfig``
    checks.py    rules tying fields together (teacher kinds, devices, robust section, method hooks)
    load.py      YAML, ``--set``, documents, grid expansion, choosing a variant or grid point
    runs.py      run identity (``RunSpec``, content hashes); the runs that produce teachers: kdlab.plan
"""
from __future__ import annotations

from kdlab import registry
from kdlab.config.checks import device_problem, name_problem
from kdlab.config.entries import (RESERVED_DATASET_ARGS, RESERVED_MODEL_ARGS, check_options, entry_parameters,
                                  split_sized_name)
from kdlab.config.load import (QUICKSTART_PATH, apply_overrides, load_experiment, load_yaml, load_yaml_documents,
                               parse_experiment, parse_override, quickstart_raw)
from kdlab.config.paths import deep_merge, get_path, set_path
from kdlab.config.runs import RunSpec, content_hash, dotted_leaves, to_dict
from kdlab.config.schema import (ATTACK_NAMES, OMIT_DEFAULT, AttackConfig, DataConfig, ExperimentConfig,
                                 MethodConfig, MlflowConfig, ModelConfig, QuantConfig, RobustConfig,
                                 StudentConfig, TeacherConfig, TrackingConfig, TrainConfig)
from kdlab.config.validate import NonFinite, Says, check_fields, coerce, parse_dataclass
from kdlab.errors import ConfigError, KdlabError


def __getattr__(name: str):
    """``check_robust`` (old name ``_check_robust``) lives with the attacks, in ``kdlab.robust.section``."""
    if name in ("check_robust", "_check_robust"):
        from kdlab.robust.section import check_robust

        return check_robust
    raise AttributeError(f"module 'kdlab.config' has no attribute {name!r}")


def parse_train(raw: dict, *, path: str = "train") -> TrainConfig:
    """Validate a ``train`` mapping on its own (used by the Python API)."""
    errors: list[str] = []
    out = parse_dataclass(TrainConfig, raw, path, errors)
    if errors:
        raise ConfigError(errors)
    return out


def parse_method(name: str, options: dict) -> MethodConfig:
    """Validate a method name and its hyperparameters on their own (used by the Python API)."""
    registry.get("method", name, key="method.name")
    errors: list[str] = []
    checked = check_options("method", "method", name, options, set(), errors)
    if errors:
        raise ConfigError(errors)
    return MethodConfig(name=name, options=checked)


__all__ = [name for name in dir() if not name.startswith("__")]
