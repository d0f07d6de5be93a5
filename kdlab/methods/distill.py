"""A method composed from config: any weighted list of registered losses.

    method:
      name: distill
      terms:
        ce: 1.0                                    # weight only
        kl: {weight: 0.9, temperature: 4}          # options go to the loss function
        hint: {loss: fitnet, weight: 100, student: block2, teacher: block3}
        dkd: {weight: 1.0, schedule: linear_warmup, warmup: 0.2, temperature: 4}

A term's key names the loss unless ``loss:`` is given (so one loss can appear
twice); ``ce`` is short for ``cross_entropy``. Reserved keys: ``weight``, ``schedule`` (constant | linear_warmup |
cosine), ``warmup``, ``final_weight``, ``loss``, and for feature losses
``student``/``teacher`` (tap names) and ``adapter`` (auto | linear | conv |
identity | none). Every other key is a keyword option of the loss, checked
against its signature when the method is built — before training.

How each loss kind is called: label losses ``f(student_logits, labels)``;
logit losses ``f(student_logits, teacher_logits)``; logit+label losses (DKD)
``f(student_logits, teacher_logits, labels=labels)``; feature losses
``f(adapter(student_feature), teacher_feature)``, the adapter owned by this method.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdlab import registry
from kdlab.config.validate import NonNegative, UnitInterval, coerce, hints
from kdlab.errors import KdlabError
from kdlab.methods.adapters import make_adapter
from kdlab.methods.base import Method
from kdlab.methods.schedules import SCHEDULES, term_weight
from kdlab.models.taps import tap_shapes, valid_tap_names
from kdlab.registry import register

RESERVED = ("weight", "schedule", "warmup", "final_weight", "loss", "student", "teacher", "adapter")
# Feature losses that compare tensors element-wise need an adapter to the teacher's shape by default;
# relational ones (AT, RKD, PKT, SP) compare batch-level structure and take any widths as they are.
_ELEMENTWISE_FEATURE_LOSSES = {"fitnet"}
ALIASES = {"ce": "cross_entropy"}  # the usual short name of the label term


def _default_terms() -> dict:
    return {"ce": 0.1, "kl": {"weight": 0.9, "temperature": 4.0}}


@dataclass
class DistillHparams:
    terms: dict[str, Any] = field(default_factory=_default_terms)  # term name -> weight or {weight, options...}

    @staticmethod
    def check_config(cfg, errors: list[str]) -> None:
        """Run at config validation: every term, with the same checks and bounds as at build time."""
        terms = cfg.method.options.get("terms")
        if not isinstance(terms, dict) or not terms:
            errors.append("method.terms: give at least one term, e.g. terms: {ce: 0.1, kl: {weight: 0.9}}")
            return
        for name, spec in terms.items():
            _parse_term(str(name), spec, errors)


@dataclass
class Term:
    name: str
    loss: str
    kind: str
    weight: float
    schedule: str
    warmup: float
    final_weight: float
    options: dict
    student_tap: str | None = None
    teacher_tap: str | None = None


# The numbers of a term, bounded like every config field (kdlab.config.validate); a weight is >= 0 (a
# negative one would maximise the divergence it weighs).
TERM_NUMBERS = {"weight": (NonNegative, 1.0), "warmup": (UnitInterval, 0.1), "final_weight": (NonNegative, 0.0)}
# A loss option without an annotation is coerced to the type of its default (NaN and ±inf refused for floats);
# the losses declare bounds on their signatures (kdlab.losses.divergences.Temperature, ...).
_DEFAULT_TYPES = (bool, int, float, str)


def _option_type(types_: dict, param: inspect.Parameter) -> Any:
    if param.name in types_:
        return types_[param.name]
    default = param.default
    return next((tp for tp in _DEFAULT_TYPES if type(default) is tp), Any)


def _parse_term(name: str, spec: Any, errors: list[str]) -> Term | None:
    """One ``method.terms`` entry → ``Term``; each problem is appended to ``errors`` (None if any)."""
    where = f"method.terms.{name}"
    before = len(errors)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):  # shorthand: just the weight
        spec = {"weight": spec}
    if not isinstance(spec, dict):
        errors.append(f"{where}: expected a weight or a mapping {{weight: ..., <loss options>}}, got {spec!r}")
        return None
    loss_name = spec.get("loss", ALIASES.get(name, name))
    try:
        fn = registry.get("loss", loss_name, key=f"{where}.loss" if "loss" in spec else where)
    except KdlabError as exc:
        errors.append(str(exc))
        return None
    kind = getattr(fn, "loss_kind", None)
    if kind not in ("label", "logit", "logit_label", "feature"):
        errors.append(f"{where}: loss {loss_name!r} has no usable loss_kind ({kind!r})")
        return None
    numbers = {key: coerce(spec.get(key, default), tp, f"{where}.{key}", errors)
               for key, (tp, default) in TERM_NUMBERS.items()}
    schedule = spec.get("schedule", "constant")
    if schedule not in SCHEDULES:
        errors.append(f"{where}.schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    params = inspect.signature(fn).parameters
    types_ = hints(fn)
    allowed = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p not in ("mask", "labels")]
    options = {k: v for k, v in spec.items() if k not in RESERVED}
    for key, value in options.items():
        if key in allowed:
            options[key] = coerce(value, _option_type(types_, params[key]), f"{where}.{key}", errors)
        elif not any(v.kind == v.VAR_KEYWORD for v in params.values()):
            errors.append(f"{where}.{key}: not an option of loss {loss_name!r}; its options: "
                          f"{', '.join(allowed) or '(none)'}; reserved keys: {', '.join(RESERVED)}")
    taps = {}
    for role in ("student", "teacher") if kind == "feature" else ():
        if not isinstance(spec.get(role), str):
            errors.append(f"{where}.{role}: feature loss {loss_name!r} needs the {role} tap to compare, "
                          f"e.g. {role}: pool (see `kdlab run --dry-run` for the tap names)")
        taps[f"{role}_tap"] = spec.get(role)
    for role in ("student", "teacher", "adapter") if kind != "feature" else ():
        if role in spec:
            errors.append(f"{where}.{role}: loss {loss_name!r} works on logits and takes no {role} key")
    if len(errors) > before:
        return None
    return Term(name=name, loss=loss_name, kind=kind, weight=numbers["weight"], schedule=schedule,
                warmup=numbers["warmup"], final_weight=numbers["final_weight"], options=options, **taps)


def _probe_shapes(net: nn.Module, keys: dict[str, str], input_shape, role: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (batch dim dropped, as ``make_adapter`` takes them) of the taps in ``keys``.

    ``keys`` maps each tap name to the config key of the (first) term that names it.
    """
    valid = set(valid_tap_names(net))
    for name, key in keys.items():
        if name not in valid:
            stages = ", ".join(getattr(net, "feature_stages", ())) or "(none)"
            raise KdlabError(f"{key}: {role} tap {name!r} does not exist; named stages: {stages} "
                             "(any module path also works; `kdlab run --dry-run` lists shapes)")
    device = next(iter(net.parameters()), torch.zeros(())).device
    # Batch of 2: relational losses and BatchNorm need more than one sample.
    shapes = tap_shapes(net, list(keys), torch.zeros(2, *input_shape, device=device))
    for name, key in keys.items():
        if name not in shapes:
            raise KdlabError(f"{key}: {role} tap {name!r} is not run by the {role}'s forward; tap a module it uses")
    return {name: tuple(shape[1:]) for name, shape in shapes.items()}


@register("method", "distill")
class Distill(Method):
    """Any weighted sum of registered losses (logit, label, DKD, feature) with per-term weight schedules."""

    Hparams = DistillHparams

    def __init__(self, hparams, *, student, teacher, input_shape=None, train_size=None):
        super().__init__(hparams, student=student, teacher=teacher, input_shape=input_shape, train_size=train_size)
        if not isinstance(hparams.terms, dict) or not hparams.terms:
            raise KdlabError("method.terms: give at least one term, e.g. terms: {ce: 0.1, kl: {weight: 0.9}}")
        errors: list[str] = []
        self.terms = [_parse_term(str(name), spec, errors) for name, spec in hparams.terms.items()]
        if errors:
            raise KdlabError(errors[0])
        features = [t for t in self.terms if t.kind == "feature"]
        self.student_taps = tuple(dict.fromkeys(t.student_tap for t in features))
        self.teacher_taps = tuple(dict.fromkeys(t.teacher_tap for t in features))
        self.adapters = nn.ModuleDict()
        if features:
            if input_shape is None:
                raise KdlabError("method.terms: feature terms need the input shape to size their adapters")
            s_keys, t_keys = {}, {}
            for term in features:
                s_keys.setdefault(term.student_tap, f"method.terms.{term.name}.student")
                t_keys.setdefault(term.teacher_tap, f"method.terms.{term.name}.teacher")
            s_shapes = _probe_shapes(student, s_keys, input_shape, "student")
            t_shapes = _probe_shapes(teacher, t_keys, input_shape, "teacher")
            for term, spec in zip(self.terms, hparams.terms.values()):
                if term.kind != "feature":
                    continue
                kind = spec.get("adapter", "auto" if term.loss in _ELEMENTWISE_FEATURE_LOSSES else "none")
                if kind == "none":
                    continue
                try:
                    self.adapters[term.name] = make_adapter(
                        s_shapes[term.student_tap], t_shapes[term.teacher_tap], kind=kind,
                        student_tap=term.student_tap, teacher_tap=term.teacher_tap)
                except KdlabError as exc:  # name the config key; make_adapter's own text says what is wrong
                    raise KdlabError(f"method.terms.{term.name}.adapter: {exc}") from None

    def weight(self, term: Term) -> float:
        return term_weight(term.weight, self.progress, schedule=term.schedule, warmup=term.warmup,
                           final_weight=term.final_weight)

    def loss_terms(self, batch, student_out, teacher_out):
        out = {}
        for term in self.terms:
            fn = registry.get("loss", term.loss)
            if term.kind == "label":
                value = fn(student_out.logits, batch.labels, **term.options)
            elif term.kind == "logit":
                value = fn(student_out.logits, teacher_out.logits, **term.options)
            elif term.kind == "logit_label":
                value = fn(student_out.logits, teacher_out.logits, labels=batch.labels, **term.options)
            else:
                feature = student_out.features[term.student_tap]
                if term.name in self.adapters:
                    feature = self.adapters[term.name](feature)
                value = fn(feature, teacher_out.features[term.teacher_tap], **term.options)
            out[term.name] = self.weight(term) * value
        return out
