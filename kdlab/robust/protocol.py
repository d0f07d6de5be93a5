"""Robust evaluation protocol: attack settings, robust accuracy, worst case, and gradient-masking checks.

``robust_evaluate`` runs a list of :class:`AttackSpec` on a model and returns
one flat dict of floats (plus the exact settings), e.g.::

    clean/acc  clean/worst_class_acc  clean/nll  clean/ece
    pgd_linf_0.0314/acc  pgd_linf_0.0314/worst_class_acc  pgd_linf_0.0314/nll  pgd_linf_0.0314/ece
    worst/acc  worst/worst_class_acc  worst/nll  worst/ece
    n  num_classes  settings  (settings: {attack key: AttackSpec.to_dict()})

``sanity_checks`` turns already-computed numbers into human-readable warnings
about gradient masking, following the checklist of Carlini et al. (2019), "On
Evaluating Adversarial Robustness" (and Athalye et al. 2018,
"Obfuscated Gradients Give a False Sense of Security");
``gradient_masking_checks`` computes those numbers for one attack.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.metrics.classification import ece, nll
from kdlab.robust import attacks as _attacks  # noqa: F401  (registers fgsm, pgd, apgd)
from kdlab.robust.attacks import (
    LOSSES,
    NORMS,
    _check_eps,
    _check_inputs,
    _check_labels,
    check_model_normalises,
    eval_mode,
    parse_eps,
    transfer,
)
from kdlab.robust.autoattack import autoattack

# The attacks' own defaults, so that a spec records the number of steps that actually ran.
_DEFAULT_STEPS = {"fgsm": 1, "pgd": 10, "apgd": 100}
# Not a registered attack: robust_evaluate calls kdlab.robust.autoattack.autoattack (standard version) itself.
AUTOATTACK = "autoattack"


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """The exact settings of one attack, saved next to every result it produced.

    ``eps`` may be given as text (``"8/255"``): it is parsed with ``parse_eps``
    and the text is kept in ``eps_text`` for logging; a number is kept as its
    ``str``. ``steps=None`` means the attack's default (fgsm 1, pgd 10, apgd
    100) and is resolved here; ``step_size=None`` means the attack's default
    (pgd: 2.5·ε/steps, reported by ``to_dict``; fgsm: ε; apgd: adaptive from 2ε).
    """

    name: str                          # registry name under kind "attack": fgsm, pgd, apgd, ...
    eps: Union[float, str]             # radius in input units ([0, 1] scale); "8/255" is parsed
    eps_text: Optional[str] = None     # eps as written, for logs (filled in from eps when None)
    norm: str = "linf"                 # "linf" or "l2"
    steps: Optional[int] = None        # iterations; None: the attack's default
    step_size: Optional[float] = None  # None: the attack's default (pgd 2.5·ε/steps, Madry et al. 2018)
    restarts: int = 1                  # random restarts; the per-sample best is kept
    loss: str = "ce"                   # "ce" or "cw" (margin)
    seed: int = 0                      # seeds the attack's torch.Generator

    def __post_init__(self):
        where = f"attack {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise KdlabError(f"AttackSpec name={self.name!r} must be a registered attack name such as 'pgd'")
        eps_text = self.eps_text if self.eps_text is not None else str(self.eps)
        object.__setattr__(self, "eps", parse_eps(self.eps))
        object.__setattr__(self, "eps_text", eps_text)
        if self.norm not in NORMS:
            raise KdlabError(f"{where}: norm={self.norm!r}; use one of {', '.join(map(repr, NORMS))}")
        if self.loss not in LOSSES:
            raise KdlabError(f"{where}: loss={self.loss!r}; use one of {', '.join(map(repr, LOSSES))}")
        _check_eps(where, self.eps, self.norm)
        # steps=None stays None only for attacks kdlab does not know (their own default applies).
        steps = self.steps if self.steps is not None else _DEFAULT_STEPS.get(self.name)
        for key, value, minimum in (("steps", steps, 1), ("restarts", self.restarts, 1), ("seed", self.seed, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < minimum):
                raise KdlabError(f"{where}: {key}={value!r} must be an integer >= {minimum}")
        object.__setattr__(self, "steps", None if steps is None else int(steps))
        if self.step_size is not None and (isinstance(self.step_size, bool) or
                                           not isinstance(self.step_size, numbers.Real) or self.step_size < 0):
            raise KdlabError(f"{where}: step_size={self.step_size!r} must be a number >= 0 or null")
        if self.name == "fgsm" and (self.steps != 1 or self.restarts != 1 or self.step_size is not None):
            raise KdlabError(f"{where}: fgsm is one step of size eps; leave steps, restarts and step_size unset")
        if self.name == "apgd" and self.step_size is not None:
            raise KdlabError(f"{where}: apgd chooses its own step size (from 2·eps); leave step_size unset")
        if self.name == AUTOATTACK and (self.steps is not None or self.step_size is not None or self.restarts != 1
                                        or self.loss != "ce"):
            raise KdlabError(f"{where}: the standard AutoAttack fixes its own steps, step sizes, restarts and "
                             "losses; leave steps, step_size, restarts and loss unset")

    @property
    def label(self) -> str:
        """Readable result-key prefix, e.g. ``pgd_linf_0.0314``."""
        return f"{self.name}_{self.norm}_{self.eps:.4f}"

    def to_dict(self) -> dict:
        """The settings as plain values, with the step size that actually runs for fgsm and pgd."""
        settings = dataclasses.asdict(self)
        if self.step_size is None and self.name == "fgsm":
            settings["step_size"] = self.eps
        elif self.step_size is None and self.name == "pgd":
            settings["step_size"] = 2.5 * self.eps / self.steps
        elif self.name == AUTOATTACK:
            settings["version"] = "standard"  # robust_evaluate adds what ran under "autoattack"
        return settings

    def attack_kwargs(self, function, generator: torch.Generator) -> dict:
        """Keyword arguments for ``function`` (an attack); settings it does not take must be neutral."""
        kwargs = {"eps": self.eps, "norm": self.norm, "loss": self.loss, "generator": generator,
                  "steps": self.steps, "restarts": self.restarts, "step_size": self.step_size}
        parameters = inspect.signature(function).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return {k: v for k, v in kwargs.items() if v is not None}
        neutral = {("steps", 1), ("steps", None), ("restarts", 1), ("step_size", None)}
        for key in list(kwargs):
            if key in parameters:
                if kwargs[key] is None:
                    del kwargs[key]
            elif (key, kwargs[key]) in neutral:
                del kwargs[key]
            else:
                raise KdlabError(f"attack {self.name!r} takes no {key} (got {kwargs[key]!r}); remove it from the spec")
        return kwargs


def _attack_keys(specs: Sequence[AttackSpec]) -> list[str]:
    """Result-key prefixes; specs sharing a label get the fields that tell them apart appended."""
    keys = []
    for spec in specs:
        group = [other for other in specs if other.label == spec.label]
        parts = [spec.label]
        if len(group) > 1:
            for field in ("loss", "steps", "restarts", "step_size", "seed"):
                if len({getattr(other, field) for other in group}) > 1:
                    parts.append(f"{field}{getattr(spec, field)}")
        keys.append("_".join(parts))
    for i, key in enumerate(keys):
        if keys.index(key) != i:
            raise KdlabError(f"robust_evaluate: attacks[{keys.index(key)}] and attacks[{i}] have identical "
                             "settings; remove the duplicate")
    return keys


def _worst_class_accuracy(correct: Tensor, labels: Tensor, num_classes: int) -> float:
    """The lowest per-class accuracy over the classes present in ``labels`` (absent classes are skipped)."""
    count = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    present = count > 0
    return (hits[present] / count[present]).min().item()


def _summary(prefix: str, logits: Tensor, correct: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    return {
        f"{prefix}/acc": correct.double().mean().item(),
        f"{prefix}/worst_class_acc": _worst_class_accuracy(correct, labels, num_classes),
        f"{prefix}/nll": nll(logits, labels),
        f"{prefix}/ece": ece(logits, labels),
    }


def _model_device(model: nn.Module, inputs: Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return inputs.device


def robust_evaluate(model: nn.Module, inputs: Tensor, labels: Tensor, attacks: Sequence[AttackSpec], *,
                    batch_size: int = 256, num_classes: Optional[int] = None, device=None,
                    check_normalisation: bool = True) -> dict:
    """Clean and robust accuracy, worst case over attacks, worst-class accuracy, ECE and NLL.

    Shapes: inputs (N, ...) in [0, 1] on any device, labels (N,) int. Batches of
    ``batch_size`` are moved to ``device`` (default: the model's). Each attack
    gets its own ``torch.Generator`` seeded with ``spec.seed`` and consumed batch
    after batch, so results are reproducible for a fixed ``batch_size``.

    Definitions (all fractions in [0, 1]; ECE with 15 bins, NLL in nats):

    * ``<attack>/acc``: robust accuracy — correct on the clean input *and* on
      that attack's adversarial input. ``nll``/``ece`` use the adversarial logits.
    * ``worst/acc``: correct on the clean input and under every attack. Its
      ``nll``/``ece`` use, per sample, the logits of the first input (clean, then
      the attacks in order) that fooled it, else those of the last attack.
    * ``*/worst_class_acc``: the lowest per-class accuracy over the classes
      present in ``labels``.
    * ``settings``: ``{attack key: spec.to_dict()}``; ``n``, ``num_classes``.
    * ``AttackSpec("autoattack", ...)`` runs the standard AutoAttack
      (``kdlab.robust.autoattack``, needs the ``autoattack`` extra) batch by batch
      and adds ``<attack>/<component>`` (``apgd-ce``, ``apgd-t``, ``fab-t``,
      ``square``): the robust accuracy after that component and the earlier ones,
      the last equal to ``<attack>/acc``; its settings gain ``"autoattack"``, the
      configuration that ran (package version, iterations, target classes).

    Attack keys are ``AttackSpec.label`` (``pgd_linf_0.0314``); specs that share
    one get the differing fields appended (``pgd_linf_0.0314_steps20``).
    ``check_normalisation`` warns when the model has no internal normalisation
    (see ``check_model_normalises``). Don't call this under ``torch.inference_mode``.
    """
    x = _check_inputs("robust_evaluate", inputs)
    labels = _check_labels("robust_evaluate", labels, x)
    specs = list(attacks)
    for i, spec in enumerate(specs):
        if not isinstance(spec, AttackSpec):
            raise KdlabError(f"robust_evaluate: attacks[{i}] is a {type(spec).__name__}; pass AttackSpec objects")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise KdlabError(f"robust_evaluate: batch_size={batch_size!r} must be a positive integer")
    keys = _attack_keys(specs)
    functions = [None if spec.name == AUTOATTACK else registry.get("attack", spec.name, key=f"attacks[{i}].name")
                 for i, spec in enumerate(specs)]
    device = torch.device(device) if device is not None else _model_device(model, x)
    if check_normalisation:
        check_model_normalises(model)
    generators = [torch.Generator(device=device).manual_seed(spec.seed) for spec in specs]
    kwargs = [None if function is None else spec.attack_kwargs(function, generator)
              for spec, function, generator in zip(specs, functions, generators)]
    components: list[dict] = [{} for _ in specs]  # autoattack: component -> samples still robust after it
    ran: list[dict] = [{} for _ in specs]  # autoattack: the settings that ran

    clean_logits, worst_logits = [], []
    adversarial_logits: list[list[Tensor]] = [[] for _ in specs]
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            batch = x[start:start + batch_size].to(device)
            target = labels[start:start + batch_size].to(device)
            with torch.no_grad():
                logits = model(batch)
            clean_logits.append(logits.cpu())
            # Worst-case logits: the first of (clean, attack 1, attack 2, ...) that fooled the sample.
            worst = logits
            fooled = logits.argmax(dim=1) != target
            for spec, function, kw, store, counts, setting in zip(specs, functions, kwargs, adversarial_logits,
                                                                  components, ran):
                if function is None:  # autoattack
                    result = autoattack(model, batch, target, eps=spec.eps, norm=spec.norm,
                                        batch_size=batch_size, seed=spec.seed)
                    adversarial = result.adversarial
                    for name, accuracy in result.per_component.items():
                        counts[name] = counts.get(name, 0) + round(accuracy * batch.shape[0])
                    setting.update(result.settings)
                else:
                    adversarial = function(model, batch, target, **kw)
                with torch.no_grad():
                    logits = model(adversarial)
                store.append(logits.cpu())
                wrong = logits.argmax(dim=1) != target
                worst = torch.where((wrong & ~fooled).unsqueeze(1), logits, worst)
                fooled = fooled | wrong
            if specs:  # never fooled: the last attack's logits
                worst = torch.where(fooled.unsqueeze(1), worst, logits)
            worst_logits.append(worst.cpu())

    labels = labels.cpu()
    clean = torch.cat(clean_logits)
    num_classes = clean.shape[1] if num_classes is None else int(num_classes)
    if num_classes != clean.shape[1] or bool((labels >= num_classes).any()):
        raise KdlabError(f"robust_evaluate: num_classes={num_classes} does not match the model's "
                         f"{clean.shape[1]} outputs or the labels; leave it unset")
    clean_correct = clean.argmax(dim=1) == labels
    results: dict = {"n": int(x.shape[0]), "num_classes": num_classes}
    results.update(_summary("clean", clean, clean_correct, labels, num_classes))
    worst_correct = clean_correct.clone()
    for key, store, counts in zip(keys, adversarial_logits, components):
        logits = torch.cat(store)
        correct = clean_correct & (logits.argmax(dim=1) == labels)
        worst_correct &= correct
        results.update(_summary(key, logits, correct, labels, num_classes))
        results.update({f"{key}/{name}": count / x.shape[0] for name, count in counts.items()})
    results.update(_summary("worst", torch.cat(worst_logits), worst_correct, labels, num_classes))
    results["settings"] = {key: spec.to_dict() for key, spec in zip(keys, specs)}
    for key, setting in zip(keys, ran):
        if setting:
            results["settings"][key]["autoattack"] = setting
    return results


def eps_curve(model: nn.Module, inputs: Tensor, labels: Tensor, attack_spec: AttackSpec,
              eps_values: Sequence, *, batch_size: int = 256, device=None) -> list[tuple[float, float]]:
    """Robust accuracy of ``attack_spec`` at each ε of ``eps_values`` (numbers or text like "8/255").

    Returns ``[(eps, robust accuracy), ...]`` in the given order; every other
    setting (and the seed) is kept, and pgd's default step size follows ε.
    """
    curve = []
    for value in eps_values:
        spec = dataclasses.replace(attack_spec, eps=value, eps_text=None)
        result = robust_evaluate(model, inputs, labels, [spec], batch_size=batch_size, device=device,
                                 check_normalisation=False)
        curve.append((spec.eps, result[f"{spec.label}/acc"]))
    return curve


# --------------------------------------------------------------------------- gradient-masking checks


def _rising(points: Sequence[tuple[float, float]], tolerance: float) -> list[tuple[float, float, float, float]]:
    """Consecutive (x, acc) pairs, sorted by x, where acc rises by more than ``tolerance``."""
    ordered = sorted(points)
    return [(a, acc_a, b, acc_b) for (a, acc_a), (b, acc_b) in zip(ordered, ordered[1:]) if acc_b > acc_a + tolerance]


def _pairs_from_results(results: Mapping) -> list[tuple[str, float, str, float]]:
    """(weaker, acc, stronger, acc) pairs among a ``robust_evaluate`` result's attacks at the same ε and norm.

    fgsm is weaker than pgd, apgd and autoattack; pgd (apgd) with fewer steps and the same
    restarts and loss is weaker than pgd (apgd) with more.
    """
    settings = results.get("settings", {})
    pairs = []
    for weak_key, weak in settings.items():
        for strong_key, strong in settings.items():
            if weak_key == strong_key or (weak["eps"], weak["norm"]) != (strong["eps"], strong["norm"]):
                continue
            fgsm_vs_iterative = weak["name"] == "fgsm" and strong["name"] in ("pgd", "apgd", AUTOATTACK)
            fewer_steps = (weak["name"] == strong["name"] and weak["name"] in ("pgd", "apgd")
                           and weak["steps"] < strong["steps"]
                           and (weak["restarts"], weak["loss"]) == (strong["restarts"], strong["loss"]))
            if fgsm_vs_iterative or fewer_steps:
                pairs.append((weak_key, results[f"{weak_key}/acc"], strong_key, results[f"{strong_key}/acc"]))
    return pairs


def sanity_checks(*, results: Optional[Mapping] = None, curve: Optional[Sequence[tuple[float, float]]] = None,
                  steps_curve: Optional[Sequence[tuple[int, float]]] = None,
                  strength_pairs: Sequence[tuple[str, float, str, float]] = (),
                  large_eps_acc: Optional[float] = None, large_eps: float = 0.5,
                  num_classes: Optional[int] = None, transfer_acc: Optional[float] = None,
                  whitebox_acc: Optional[float] = None, tolerance: float = 0.01) -> list[str]:
    """Warnings (one readable line each) about signs of gradient masking; ``[]`` when all is well.

    Every argument is optional and holds numbers already computed (accuracies in
    [0, 1]); only the checks whose numbers are given run. A rise smaller than
    ``tolerance`` is treated as noise; keep it above the sampling noise of the
    subset (one sample of N is 1/N). Following Carlini et al. (2019):

    * ``curve`` ``[(eps, acc), ...]`` (``eps_curve``): accuracy must not rise with ε.
    * ``steps_curve`` ``[(steps, acc), ...]``: accuracy must not rise with more
      steps (e.g. k vs 2k).
    * ``strength_pairs`` ``[(weaker, acc, stronger, acc), ...]`` and pairs found
      in ``results`` (a ``robust_evaluate`` dict: fgsm vs pgd/apgd, pgd or apgd
      with fewer vs more steps, at the same ε and norm): a stronger attack must not
      leave a higher accuracy.
    * ``large_eps_acc``: accuracy at a very large ε (default label 0.5 L∞) must be
      at most max(10%, chance + 5%), chance = 1/``num_classes`` (10% without it).
    * ``transfer_acc`` vs ``whitebox_acc``: a transfer attack must not beat the
      white-box attack.
    """
    warnings: list[str] = []
    for a, acc_a, b, acc_b in _rising(curve or (), tolerance):
        warnings.append(f"robust accuracy rises with eps ({acc_a:.3f} at eps={a:.4g} -> {acc_b:.3f} at "
                        f"eps={b:.4g}); gradient masking suspected: the attack is not converging")
    for a, acc_a, b, acc_b in _rising(steps_curve or (), tolerance):
        warnings.append(f"robust accuracy rises with more steps ({acc_a:.3f} at {a} steps -> {acc_b:.3f} at "
                        f"{b} steps); gradient masking suspected")
    pairs = list(strength_pairs) + (_pairs_from_results(results) if results is not None else [])
    for weak, weak_acc, strong, strong_acc in pairs:
        if strong_acc > weak_acc + tolerance:
            warnings.append(f"stronger attack {strong} leaves higher accuracy ({strong_acc:.3f}) than weaker "
                            f"{weak} ({weak_acc:.3f}); gradient masking suspected")
    if large_eps_acc is not None:
        threshold = max(0.10, 1.0 / num_classes + 0.05) if num_classes else 0.10
        if large_eps_acc > threshold:
            warnings.append(f"accuracy {large_eps_acc:.3f} at a very large eps ({large_eps:.4g}) is above "
                            f"{threshold:.3f}; an unbounded-looking attack should reach ~0: gradient masking "
                            "or a bug suspected")
    if transfer_acc is not None and whitebox_acc is not None and transfer_acc < whitebox_acc - tolerance:
        warnings.append(f"transfer attack ({transfer_acc:.3f}) beats the white-box attack ({whitebox_acc:.3f}); "
                        "the white-box gradients are probably masked")
    return warnings


def gradient_masking_checks(model: nn.Module, inputs: Tensor, labels: Tensor, attack_spec: AttackSpec, *,
                            eps_values: Optional[Sequence] = None, large_eps: Optional[float] = 0.5,
                            source_model: Optional[nn.Module] = None, batch_size: int = 256,
                            device=None, tolerance: float = 0.01) -> list[str]:
    """Compute the numbers for :func:`sanity_checks` for one attack and return its warnings.

    Runs: ``attack_spec`` and the same attack with twice the steps (if it has
    steps > 1), fgsm at the same ε and norm, the ε-curve (default ε/2, ε, 2ε,
    capped at 1 for L∞), the attack at ``large_eps`` (L∞ only; ``None`` skips),
    and, given ``source_model``, a transfer of a pgd attack with the spec's
    settings crafted on it. Costs several attack runs; meant for a held-out subset.
    """
    spec = attack_spec
    specs = [spec]
    if spec.steps is not None and spec.steps > 1:
        specs.append(dataclasses.replace(spec, steps=2 * spec.steps))
    if spec.name != "fgsm":
        specs.append(AttackSpec("fgsm", eps=spec.eps, eps_text=spec.eps_text, norm=spec.norm, loss=spec.loss))
    results = robust_evaluate(model, inputs, labels, specs, batch_size=batch_size, device=device,
                              check_normalisation=False)
    whitebox_acc = results[f"{next(iter(results['settings']))}/acc"]
    cap = 1.0 if spec.norm == "linf" else math.inf
    eps_values = eps_values if eps_values is not None else [min(f * spec.eps, cap) for f in (0.5, 1.0, 2.0)]
    curve = eps_curve(model, inputs, labels, spec, eps_values, batch_size=batch_size, device=device)
    large_eps_acc = None
    if large_eps is not None and spec.norm == "linf":
        large_eps_acc = eps_curve(model, inputs, labels, spec, [large_eps], batch_size=batch_size,
                                  device=device)[0][1]
    transfer_acc = None
    if source_model is not None:
        transfer_acc = _transfer_accuracy(source_model, model, inputs, labels, spec, batch_size=batch_size,
                                          device=device)
    return sanity_checks(results=results, curve=curve, large_eps_acc=large_eps_acc, large_eps=large_eps or 0.5,
                         num_classes=results["num_classes"], transfer_acc=transfer_acc,
                         whitebox_acc=whitebox_acc, tolerance=tolerance)


def _transfer_accuracy(source_model: nn.Module, target_model: nn.Module, inputs: Tensor, labels: Tensor,
                       spec: AttackSpec, *, batch_size: int, device=None) -> float:
    """Robust accuracy of ``target_model`` under pgd (the spec's settings) crafted on ``source_model``."""
    x = _check_inputs("transfer", inputs)
    y = _check_labels("transfer", labels, x)
    device = torch.device(device) if device is not None else _model_device(target_model, x)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    kwargs = spec.attack_kwargs(_attacks.pgd, generator)
    correct = 0
    with eval_mode(target_model):
        for start in range(0, x.shape[0], batch_size):
            batch, target = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            adversarial = transfer(source_model, target_model, batch, target, attack=_attacks.pgd, **kwargs)
            with torch.no_grad():
                ok = (target_model(batch).argmax(dim=1) == target) & (target_model(adversarial).argmax(dim=1) == target)
            correct += int(ok.sum())
    return correct / x.shape[0]
