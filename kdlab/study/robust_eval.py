"""Robust and faithfulness evaluation of a trained student: the ``robust:`` section and ``kdlab eval``.

``robust_report(student, teacher, splits, robust)`` runs on a fixed subset of the
**test** split (``robust.subset`` samples drawn once by ``robust.subset_seed``, the
same subset for every run of a study), in this order:

1. the attacks of ``robust.attacks`` through ``kdlab.robust.robust_evaluate``: clean,
   per-attack and worst-case accuracy, worst-class accuracy, NLL and ECE;
2. the ε-curve of the first attack (``robust.eps_curve``);
3. with ``robust.sanity_checks``, the gradient-masking checks of the first attack
   (``gradient_masking_checks``: twice the steps, FGSM, ε/2–ε–2ε, ε = 0.5 L∞, and a
   transfer attack crafted on the teacher when there is one) plus the checks that
   the numbers of steps 1–2 allow; each problem is a warning line kept with the numbers;
4. with ``robust.faithfulness`` and a teacher: clean top-1 agreement, the adversarial
   disagreement rate, empirical relative calibration (PGD on the confidence gap,
   ``robust.faithfulness_steps`` steps) and, when interval bounds support both
   networks (the zoo's ``mlp``/``cnn1d``, not ensembles), certified relative
   calibration and certified agreement (IBP), all at radius ``robust.eps``.

The report holds the exact settings of every attack (ε as written and as a number),
the subset, the numbers and the warnings; ``report["metrics"]`` is the flat
``robust/...`` dict added to the run's final metrics:

    robust/clean/acc  robust/<attack>/acc  robust/worst/acc  (and /worst_class_acc /nll /ece)
    robust/curve/<eps>  robust/faith/{agreement, adv_disagreement, relcal_emp, relcal_emp_violation,
    relcal_cert, relcal_cert_rate, cert_agreement}  robust/sanity_warnings  robust/n  robust/seconds

``<attack>`` is the attack's ``label`` (default the protocol's key, e.g. ``pgd_linf_0.1000``).
"""
from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from kdlab.config import AttackConfig, RobustConfig
from kdlab.data import Splits
from kdlab.errors import KdlabError
from kdlab.robust import (
    AttackSpec,
    adversarial_disagreement_rate,
    agreement,
    certified_agreement_rate,
    certified_relative_calibration,
    check_model_normalises,
    check_supported,
    eps_curve,
    eval_mode,
    gradient_masking_checks,
    parse_eps,
    relative_calibration,
    robust_evaluate,
    sanity_checks,
)

FAITH_METRICS = ("agreement", "adv_disagreement", "adv_disagreement_eligible", "relcal_emp", "relcal_emp_violation",
                 "relcal_cert", "relcal_cert_rate", "cert_agreement")
REPORT_FILE = "robust.json"  # written by the runner for a config's robust section
EVALS_FILE = "robust_evals.jsonl"  # one line per `kdlab eval`


def attack_spec(attack: AttackConfig, robust: RobustConfig) -> AttackSpec:
    """The protocol's ``AttackSpec`` of one configured attack (its ε defaults to ``robust.eps``)."""
    eps = attack.eps if attack.eps is not None else robust.eps
    return AttackSpec(attack.name, eps=eps, eps_text=str(eps), norm=attack.norm, steps=attack.steps,
                      step_size=attack.step_size, restarts=attack.restarts, loss=attack.loss, seed=attack.seed)


def eps_display(text, value: float) -> str:
    """``"8/255 (0.0314)"``; a plain number is shown once."""
    text = str(text)
    try:
        if float(text) == value:
            return f"{value:g}"
    except ValueError:
        pass
    return f"{text} ({value:.4f})"


def attack_subset(splits: Splits, subset: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, labels, indices)`` of ``subset`` test samples, the same for every run: a permutation by
    ``seed`` (a CPU generator), its first ``subset`` indices, sorted. ``None`` or more than the split: all."""
    inputs, labels = splits.test
    n = len(inputs)
    if n == 0:
        raise KdlabError(f"robust: dataset {splits.name!r} has an empty test split; nothing to attack")
    if subset is None or subset >= n:
        index = torch.arange(n)
    else:
        index = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:subset].sort().values
    chosen = inputs[index]
    if not isinstance(chosen, torch.Tensor):  # a streamed split (LazyImages): its subset decodes by a slice
        chosen = chosen[0:len(chosen)]
    return chosen, labels[index], index


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def robust_report(student: nn.Module, teacher: nn.Module | None, splits: Splits, robust: RobustConfig, *,
                  device: torch.device | str | None = None) -> dict:
    """Robust (and faithfulness) numbers of ``student`` on the test subset; see the module docstring.

    Returns ``{"metrics": {robust/...: float}, "attacks": {label: settings}, "results": ..., "curve": ...,
    "faithfulness": ..., "warnings": [...], "subset": ..., "eps": ...}``, all JSON-serialisable.
    Both networks are used in eval mode and given back their modes.
    """
    started = time.perf_counter()
    device = torch.device(device) if device is not None else _device_of(student)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    x, y, index = attack_subset(splits, robust.subset, robust.subset_seed)
    x, y = x.to(device), y.to(device)
    warning_lines: list[str] = []
    if not check_model_normalises(student, warn=False):
        line = (f"{type(student).__name__} has no mean/std normalisation inside; attacks assume it takes inputs "
                "in [0, 1] and normalises them itself, so the ε below may be in the wrong units")
        warnings.warn(line, UserWarning, stacklevel=2)
        warning_lines.append(line)

    specs = [attack_spec(a, robust) for a in robust.attacks]
    metrics: dict[str, float] = {}
    report: dict = {"subset": {"n": int(len(index)), "of": int(len(splits.test[0])), "seed": robust.subset_seed,
                               "requested": robust.subset},
                    "eps": {"text": str(robust.eps), "value": parse_eps(robust.eps)}}
    labels: list[str] = []
    if specs:
        results = robust_evaluate(student, x, y, specs, batch_size=robust.batch_size, device=device,
                                  check_normalisation=False)
        keys = list(results["settings"])
        labels = [a.label or key for a, key in zip(robust.attacks, keys)]
        rename = dict(zip(keys, labels))
        numbers = {}
        for key, value in results.items():
            if key in ("settings", "n", "num_classes"):
                continue
            prefix, _, name = key.rpartition("/")
            numbers[f"{rename.get(prefix, prefix)}/{name}"] = float(value)
        metrics.update({f"robust/{k}": v for k, v in numbers.items()})
        report["attacks"] = {label: {**results["settings"][key], "eps_display": eps_display(spec.eps_text, spec.eps)}
                             for label, key, spec in zip(labels, keys, specs)}
        report["results"] = numbers
        curve = []
        if robust.eps_curve:
            curve = eps_curve(student, x, y, specs[0], list(robust.eps_curve), batch_size=robust.batch_size,
                              device=device)
            report["curve"] = {"attack": labels[0], "points": [[e, a] for e, a in curve]}
            metrics.update({f"robust/curve/{e:.4f}": float(a) for e, a in curve})
        if robust.sanity_checks:
            lines = sanity_checks(results=results, curve=curve or None, tolerance=_tolerance(len(x)))
            lines += gradient_masking_checks(student, x, y, specs[0], source_model=teacher,
                                             batch_size=robust.batch_size, device=device,
                                             tolerance=_tolerance(len(x)))
            warning_lines += [f"{labels[0]}: {line}" for line in dict.fromkeys(lines)]
            report["sanity_checks"] = {"attack": labels[0], "tolerance": _tolerance(len(x))}

    if robust.faithfulness:
        if teacher is None:
            report["faithfulness"] = {"skipped": "the run has no teacher"}
        else:
            faith = faithfulness_numbers(student, teacher, x, y, robust)
            report["faithfulness"] = faith
            metrics.update({f"robust/faith/{k}": float(faith[k]) for k in FAITH_METRICS if k in faith})
    metrics["robust/sanity_warnings"] = float(len(warning_lines))
    metrics["robust/n"] = float(len(index))
    metrics["robust/seconds"] = time.perf_counter() - started
    report["warnings"] = warning_lines
    report["metrics"] = metrics
    return report


def _tolerance(n: int) -> float:
    """Noise floor of an accuracy difference on ``n`` samples: 1% or two samples, whichever is larger."""
    return max(0.01, 2.0 / max(1, n))


def faithfulness_numbers(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         robust: RobustConfig) -> dict:
    """Agreement, adversarial disagreement, relative calibration (empirical; certified where IBP applies)."""
    eps = parse_eps(robust.eps)
    steps = robust.faithfulness_steps
    generator = torch.Generator(device=x.device).manual_seed(robust.subset_seed)
    with eval_mode(student, teacher), torch.no_grad():
        s_logits, t_logits = student(x), teacher(x)
    out: dict = {"eps": eps, "eps_display": eps_display(robust.eps, eps), "steps": steps, "delta": robust.delta,
                 "agreement": agreement(s_logits, t_logits)}
    disagreement = adversarial_disagreement_rate(student, teacher, x, y, eps=eps, steps=steps, generator=generator)
    out["adv_disagreement"] = disagreement.rate
    out["adv_disagreement_eligible"] = disagreement.eligible
    empirical = relative_calibration(student, teacher, x, eps=eps, steps=steps, delta=robust.delta,
                                     generator=generator)
    out["relcal_emp"] = empirical.mean
    out["relcal_emp_violation"] = empirical.violation_rate
    try:
        check_supported(student)
        check_supported(teacher)
    except KdlabError as exc:
        out["certified"] = f"skipped: {exc}"
        return out
    certified = certified_relative_calibration(student, teacher, x, eps=eps, delta=robust.delta)
    out["relcal_cert"] = certified.mean
    out["relcal_cert_rate"] = certified.certified_rate
    out["cert_agreement"] = certified_agreement_rate(student, teacher, x, y, eps=eps)
    return out


def format_report(report: dict) -> list[str]:
    """The report as printable lines: settings, a table of the numbers, faithfulness and warnings."""
    lines = []
    subset = report["subset"]
    lines.append(f"test subset: {subset['n']} of {subset['of']} samples (subset_seed {subset['seed']})")
    results = report.get("results", {})
    for label, s in report.get("attacks", {}).items():
        if s["name"] == "autoattack":  # an ensemble: its components instead of steps/restarts/loss
            parts = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in results.items()
                              if k.startswith(f"{label}/") and k.split("/", 1)[1] not in
                              ("acc", "worst_class_acc", "nll", "ece"))
            lines.append(f"attack {label}: autoattack {s['norm']} eps {s['eps_display']}, seed {s['seed']}"
                         + (f"; robust accuracy after each component: {parts}" if parts else ""))
            continue
        step = f", step {s['step_size']:.4g}" if s.get("step_size") is not None else ""
        lines.append(f"attack {label}: {s['name']} {s['norm']} eps {s['eps_display']}, {s['steps']} steps{step}, "
                     f"{s['restarts']} restart(s), loss {s['loss']}, seed {s['seed']}")
    rows = ["clean"] + list(report.get("attacks", {})) + (["worst"] if len(report.get("attacks", {})) > 1 else [])
    if results:
        lines.append(f"{'':<24} {'acc':>7} {'worst-class':>11} {'nll':>8} {'ece':>7}")
        for row in rows:
            lines.append(f"{row:<24} {results[f'{row}/acc']:>7.4f} {results[f'{row}/worst_class_acc']:>11.4f} "
                         f"{results[f'{row}/nll']:>8.4f} {results[f'{row}/ece']:>7.4f}")
    if "curve" in report:
        points = ", ".join(f"{e:.4g}: {a:.4f}" for e, a in report["curve"]["points"])
        lines.append(f"robust accuracy vs eps ({report['curve']['attack']}): {points}")
    faith = report.get("faithfulness")
    if faith:
        if "skipped" in faith:
            lines.append(f"faithfulness: skipped ({faith['skipped']})")
        else:
            lines.append(f"faithfulness at eps {faith['eps_display']} ({faith['steps']} PGD steps, delta {faith['delta']}): "
                         f"agreement {faith['agreement']:.4f}, adversarial disagreement {faith['adv_disagreement']:.4f} "
                         f"(of {faith['adv_disagreement_eligible']} both-correct), relative calibration empirical "
                         f"{faith['relcal_emp']:.4f} (violations {faith['relcal_emp_violation']:.4f})")
            if "relcal_cert" in faith:
                lines.append(f"  certified (IBP): relative calibration bound {faith['relcal_cert']:.4f}, certified "
                             f"within delta {faith['relcal_cert_rate']:.4f}, certified agreement "
                             f"{faith['cert_agreement']:.4f}")
            else:
                lines.append(f"  certified: {faith['certified']}")
    for line in report.get("warnings", []):
        lines.append(f"warning: {line}")
    if not report.get("warnings") and "sanity_checks" in report:
        lines.append("sanity checks: no sign of gradient masking")
    return lines
