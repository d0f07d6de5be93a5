"""Typed experiment configuration: the schema, every default and bound, loading and validation.

    schema.py    dataclasses only; bounds declared on the fields (``Annotated[float, Gt(0)]``)
    validate.py  the one coercer (types, choices, bounds; NaN/inf and >64-bit integers refused)
    entries.py   sections naming a registry entry and that entry's options; the ``-wN``/``-dN``/``LIB:NAME`` model names
    sections.py  one grid point: sections → ``ExperimentConfig``
    checks.py    rules tying fields together; the hooks by which other packages register theirs
    load.py      YAML files and their documents, ``--set``

Elsewhere: a config's runs and run ids ``kdlab.runs``; the run graph ``kdlab.plan``; key paths ``kdlab.dotted``.
"""
from __future__ import annotations

from kdlab import registry
from kdlab.config.checks import name_problem
from kdlab.config.entries import check_options, entry_parameters, split_sized_name
from kdlab.config.load import (QUICKSTART_PATH, apply_overrides, load_yaml, load_yaml_documents, parse_override,
                               quickstart_raw)
from kdlab.config.schema import (AttackConfig, DataConfig, ExperimentConfig, MethodConfig, MlflowConfig, ModelConfig,
                                 QuantConfig, RobustConfig, StudentConfig, TeacherConfig, TrackingConfig, TrainConfig)
from kdlab.config.validate import parse_dataclass
from kdlab.errors import ConfigError, KdlabError


def __getattr__(name: str):
    """``load_experiment``/``parse_experiment``/``to_dict`` live in ``kdlab.runs``; importable from here too."""
    if name in ("load_experiment", "parse_experiment", "to_dict"):
        from kdlab import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'kdlab.config' has no attribute {name!r}")


__all__ = [name for name in dir() if not name.startswith("__")]
