"""The ``robust`` config section's rules: radii in range, settings each attack accepts, distinct labels.

Single-field bounds are declared on ``kdlab.config.RobustConfig``/``AttackConfig``; these rules need the
attacks themselves (``AttackSpec``), so they live here, registered with the config's validation (``config_rule``).
"""
from __future__ import annotations

from typing import Any

from kdlab.config.checks import config_rule
from kdlab.config.schema import AttackConfig, ExperimentConfig, RobustConfig
from kdlab.errors import KdlabError
from kdlab.robust.attacks import parse_eps
from kdlab.robust import autoattack
from kdlab.robust.protocol import AttackSpec


def _check_eps(value: Any, norm: str, path: str, errors: list[str]) -> None:
    """An attack radius: a number or text like "8/255"; L∞ radii lie in [0, 1] (inputs are in [0, 1])."""
    try:
        eps = parse_eps(value)
    except KdlabError as exc:
        errors.append(f"{path}: {str(exc).removeprefix('eps: ')}")
        return
    if norm == "linf" and eps > 1:
        shown = f"{value:g}" if isinstance(value, float) else value
        if eps <= 255 and "/" not in str(value):
            errors.append(f"{path}: {shown} is outside [0, 1] for norm linf; inputs are in [0, 1], so this looks "
                          f"like pixel units (0-255): write {eps:g}/255")
        else:
            errors.append(f"{path}: {shown} is outside [0, 1] for norm linf (inputs are in [0, 1]); "
                          "give e.g. 8/255 or 0.031")


def check_robust(r: RobustConfig, errors: list[str]) -> None:
    """The robust section: radii in range, attack settings the attacks accept, distinct metric labels."""
    before = len(errors)
    _check_eps(r.eps, "linf" if not r.attacks else r.attacks[0].norm, "robust.eps", errors)
    section_eps_bad = len(errors) > before
    if not r.attacks and (r.eps_curve or r.sanity_checks):
        errors.append("robust.attacks: eps_curve and sanity_checks need an attack; add one, e.g. "
                      "{name: pgd, steps: 20}")
    labels: dict[str, int] = {}
    for i, a in enumerate(r.attacks):
        if not isinstance(a, AttackConfig):
            continue
        path = f"robust.attacks[{i}]"
        eps = a.eps if a.eps is not None else r.eps
        before = len(errors)
        if a.eps is not None:
            _check_eps(a.eps, a.norm, f"{path}.eps", errors)
        eps_bad = len(errors) > before if a.eps is not None else section_eps_bad
        if a.name == "autoattack":
            if not autoattack.available():
                errors.append(f"{path}: autoattack needs the pyautoattack package; {autoattack.INSTALL_HINT}")
        if a.label is not None and (not a.label or "/" in a.label or a.label in ("clean", "worst", "faith", "curve")):
            errors.append(f"{path}.label: {a.label!r} cannot name metrics; use letters, digits, '_' or '-', "
                          "not clean/worst/faith/curve")
        try:
            spec = AttackSpec(a.name, eps=eps, norm=a.norm, steps=a.steps, step_size=a.step_size,
                              restarts=a.restarts, loss=a.loss, seed=a.seed)
        except KdlabError as exc:
            if not eps_bad:
                errors.append(f"{path}: {str(exc).split(': ', 1)[-1]}")
            continue
        label = a.label or spec.label
        if label in labels:
            errors.append(f"{path}: same metric label {label!r} as robust.attacks[{labels[label]}]; set "
                          f"robust.attacks[{i}].label to tell them apart")
        labels.setdefault(label, i)
    norm = r.attacks[0].norm if r.attacks and isinstance(r.attacks[0], AttackConfig) else "linf"
    for i, value in enumerate(r.eps_curve):
        _check_eps(value, norm, f"robust.eps_curve[{i}]", errors)


@config_rule
def _robust_section(cfg: ExperimentConfig, errors: list[str]) -> None:
    if isinstance(cfg.robust, RobustConfig):
        check_robust(cfg.robust, errors)
