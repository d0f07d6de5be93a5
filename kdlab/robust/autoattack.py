"""AutoAttack (Croce & Hein 2020) through the optional PyPI package ``pyautoattack``, component by component.

Croce & Hein (2020), "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks" (ICML). The *standard* version runs,
in order, APGD-CE, APGD-T (targeted APGD on the DLR loss), FAB-T (targeted FAB)
and Square (a black-box random search), each only on the points that every
earlier component left correctly classified; a point counts as broken by the
first component that misclassifies it. ``pyautoattack`` (import name
``pyautoattack``, install ``pip install 'kdlab[autoattack]'``) computes the
robust accuracy after each component but only logs it, so :func:`autoattack`
runs the package's own attack objects (``AutoAttack(...).apgd``,
``.apgd_targeted``, ``.fab``, ``.square``, configured by the package for the
chosen version) one component at a time with the dispatch of the package's
``run_standard_evaluation``, and records the cumulative robust accuracy after
each one.

kdlab's conventions apply (see ``kdlab.robust.attacks``): inputs in [0, 1] with
the model normalising inside ``forward``; ``eps`` checked as by the other attacks
(L∞ ε > 1 is refused as pixel units); every module in eval mode and given back
its mode; returned points in the ε-ball ∩ [0, 1] (each component's output is
projected with kdlab's projection before it is judged, so a point is only
counted as broken if the returned point itself is misclassified); the global
RNG state is left as it was (the package reseeds it with ``seed``).

Choices forced by the package, recorded in ``settings``:

* The package's Square attack expects images (N, C, H, W). Other shapes are
  folded for the package only: (N, C, L) -> (N, C, h, w) and (N, d) ->
  (N, 1, h, w) with h·w = L (or d), h the largest divisor ≤ √L; the model
  always sees its own shape. Square's patches then cover h×w windows of the
  folded signal (``settings["package_shape"]``).
* The standard version targets the 9 most likely other classes (APGD-T, FAB-T);
  with fewer than 10 classes kdlab uses all C − 1 (``n_target_classes``).
  APGD-T/APGD-DLR need ≥ 4/≥ 3 classes (the DLR loss reads the 3rd/4th largest logit).

Not registered under kind ``"attack"``: it returns an :class:`AutoAttackResult`
(points plus per-component accuracies) and takes no ``loss``, ``steps`` or
``generator``, so it does not fit the registry's attack signature; the protocol
(``kdlab.robust.protocol.robust_evaluate``) calls it directly for
``AttackSpec("autoattack", ...)``.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from kdlab.errors import KdlabError
from kdlab.robust.attacks import (
    NORMS,
    _check_choice,
    _check_count,
    _check_eps,
    _check_inputs,
    _check_labels,
    _finish,
    _project,
    eval_mode,
)

PACKAGE = "pyautoattack"  # the import name of the PyPI package pyautoattack
INSTALL_HINT = "install the autoattack extra: pip install 'kdlab[autoattack]'"
VERSIONS = ("standard", "plus", "rand", "custom")
COMPONENTS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
STANDARD_COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
_PACKAGE_NORMS = {"linf": "Linf", "l2": "L2"}


@dataclasses.dataclass(frozen=True)
class AutoAttackResult:
    """What :func:`autoattack` returns.

    ``adversarial``: (N, ...) like the inputs, each point the first successful
    component's output (the clean input where none succeeded or the clean input
    was already misclassified). ``per_component``: component name -> fraction of
    all N samples still correctly classified after it and every earlier
    component (non-increasing, in run order; the last equals the accuracy of
    ``adversarial``). ``clean_accuracy``: before any attack. ``settings``: the
    exact configuration that ran (package version, components, targets, shapes).
    """

    adversarial: Tensor
    per_component: dict
    clean_accuracy: float
    settings: dict

    @property
    def robust_accuracy(self) -> float:
        """The accuracy after the last component (the clean accuracy when no component ran)."""
        return list(self.per_component.values())[-1] if self.per_component else self.clean_accuracy


def available() -> bool:
    """Whether the ``pyautoattack`` package can be imported (without importing it)."""
    return importlib.util.find_spec(PACKAGE) is not None


def import_autoattack():
    """The ``pyautoattack`` module, or a one-line ``KdlabError`` with the install hint."""
    try:
        return importlib.import_module(PACKAGE)
    except ImportError:
        raise KdlabError(f"autoattack needs the pyautoattack package: {INSTALL_HINT}") from None


def package_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The (C, H, W) shape a sample of ``shape`` (without the batch dim) is folded to for the package."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return shape
    channels, length = (shape[0], math.prod(shape[1:])) if len(shape) == 2 else (1, math.prod(shape))
    height = max(h for h in range(1, math.isqrt(length) + 1) if length % h == 0)
    return channels, height, length // height


class _Folded(nn.Module):
    """``model`` seen through the package's (N, C, H, W) view; the model gets its own shape and dtype."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.shape = shape
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.reshape(x.shape[0], *self.shape).to(self.dtype))


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG the package may reseed (it seeds the current one even for CPU inputs)."""
    if device.type == "cuda":
        return sorted({device.index if device.index is not None else torch.cuda.current_device(),
                       torch.cuda.current_device()})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []


def _components(version: str, attacks) -> tuple[str, ...]:
    if version != "custom":
        if attacks is not None:
            raise KdlabError(f"autoattack: attacks={attacks!r} is only used with version='custom'; the "
                             f"{version} version fixes its components")
        return ()  # the package's own list for the version
    if isinstance(attacks, str) or not isinstance(attacks, Sequence) or not attacks:
        raise KdlabError("autoattack: version='custom' needs attacks=[...], a list of "
                         f"{', '.join(map(repr, COMPONENTS))}")
    for name in attacks:
        _check_choice("autoattack", "attacks", name, COMPONENTS)
    if len(set(attacks)) != len(attacks):
        raise KdlabError(f"autoattack: attacks={list(attacks)!r} names a component twice")
    return tuple(attacks)


def _run_component(aa, name: str, x: Tensor, y: Tensor, seed: int) -> Tensor:
    """One component on (x, y), dispatched as ``AutoAttack.run_standard_evaluation`` of pyautoattack 0.2.0."""
    if name in ("apgd-ce", "apgd-dlr"):
        aa.apgd.loss = "ce" if name == "apgd-ce" else "dlr"
        aa.apgd.seed = seed
        return aa.apgd.perturb(x, y)
    if name == "apgd-t":
        aa.apgd_targeted.seed = seed
        return aa.apgd_targeted.perturb(x, y)
    if name in ("fab", "fab-t"):
        aa.fab.targeted = name == "fab-t"
        if name == "fab-t":
            aa.fab.n_restarts = 1
        aa.fab.seed = seed
        return aa.fab.perturb(x, y)
    aa.square.seed = seed
    return aa.square.perturb(x, y)


def autoattack(model: nn.Module, inputs: Tensor, labels: Tensor, *, eps, norm: str = "linf",
               version: str = "standard", attacks: Optional[Sequence[str]] = None, batch_size: int = 256,
               seed: int = 0) -> AutoAttackResult:
    """AutoAttack of ``model`` on (``inputs``, ``labels``), with the robust accuracy after each component.

    ``version``: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square; the version of
    the paper's leaderboards), ``"plus"``, ``"rand"`` (EOT for randomised
    models) or ``"custom"`` with ``attacks`` a list of ``"apgd-ce"``,
    ``"apgd-dlr"``, ``"fab"``, ``"square"``, ``"apgd-t"``, ``"fab-t"`` (run in the
    order given, with the package's defaults for a custom run: e.g. APGD with 5
    restarts). ``norm``: ``"linf"`` or ``"l2"``.
    Each component runs on the still-robust points in batches of ``batch_size``;
    ``seed`` seeds every component as the package does (it reseeds torch's global
    RNG, which is restored afterwards). Shapes: inputs (N, ...) in [0, 1], labels
    (N,) int. See the module docstring for the conventions and the recorded settings.
    """
    _check_choice("autoattack", "norm", norm, NORMS)
    _check_choice("autoattack", "version", version, VERSIONS)
    eps = _check_eps("autoattack", eps, norm)
    batch_size = _check_count("autoattack", "batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise KdlabError(f"autoattack: seed={seed!r} must be an integer >= 0")
    seed = int(seed)
    custom = _components(version, attacks)
    x = _check_inputs("autoattack", inputs)
    y = _check_labels("autoattack", labels, x)
    package = import_autoattack()
    shape = tuple(x.shape[1:])
    folded_shape = package_shape(shape)
    n = x.shape[0]

    with eval_mode(model), torch.random.fork_rng(devices=_rng_devices(x.device)):
        net = _Folded(model, shape, x.dtype)
        with torch.no_grad():
            clean_logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, n, batch_size)])
        num_classes = clean_logits.shape[1]
        aa = package.AutoAttack(net, attacks=list(custom) if custom else None, device=x.device, eps=eps,
                                norm=_PACKAGE_NORMS[norm], seed=seed, version=version)
        aa.verbose = False
        components = tuple(aa.attacks_to_run)
        # The standard version's 9 target classes assume >= 10 classes; use every other class below that.
        targets = min(9, num_classes - 1)
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, targets)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, targets)
        if (num_classes < 4 and "apgd-t" in components) or (num_classes < 3 and "apgd-dlr" in components):
            raise KdlabError(f"autoattack: the model has {num_classes} classes, too few for the DLR loss of "
                             "apgd-t (>= 4) or apgd-dlr (>= 3); use version='custom' with attacks=['apgd-ce', "
                             "'fab-t', 'square']")
        if norm == "l2" and "square" in components and min(folded_shape[1:]) < 5:
            raise KdlabError(f"autoattack: the package's L2 Square attack needs inputs of at least 5x5; inputs "
                             f"{shape} fold to {folded_shape}; use norm='linf' or a custom version without square")
        flat = x.reshape(n, *folded_shape)
        # The package's one-off checks of run_standard_evaluation (randomness, probabilities as outputs,
        # target classes), as warnings; its dynamic-defence check (sys.settrace) is skipped.
        first = flat[:batch_size]
        if version != "rand":
            package.checks.check_randomized(net, first, y[:batch_size], bs=batch_size)
        package.checks.check_range_output(net, first)
        package.checks.check_n_classes(num_classes, list(components), aa.apgd_targeted.n_target_classes,
                                       aa.fab.n_target_classes)

        clean_correct = clean_logits.argmax(dim=1) == y
        adversarial = x.clone()
        broken_by = torch.full((n,), -1, dtype=torch.long, device=x.device)  # index of the first successful component
        robust = clean_correct.clone()
        for k, name in enumerate(components):
            index = robust.nonzero().flatten()
            for start in range(0, index.numel(), batch_size):
                chunk = index[start:start + batch_size]
                with torch.enable_grad():
                    points = _run_component(aa, name, flat[chunk], y[chunk], seed)
                points = _project(points.detach().reshape(-1, *shape).to(x.dtype), x[chunk], eps, norm)
                with torch.no_grad():
                    wrong = model(points).argmax(dim=1) != y[chunk]
                adversarial[chunk[wrong]] = points[wrong]
                broken_by[chunk[wrong]] = k
                robust[chunk[wrong]] = False
        # Judge the returned points once more as a whole, so that the last number is exactly their accuracy
        # (a point found misclassified inside a smaller batch may round the other way in another batch).
        with torch.no_grad():
            final = torch.cat([model(adversarial[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]
                               for i in range(0, n, batch_size)])
        broken_by = torch.where(clean_correct & final, torch.full_like(broken_by, -1), broken_by)
        broken_by = torch.where(clean_correct & ~final & (broken_by < 0), len(components) - 1, broken_by)
        per_component = {}
        for k, name in enumerate(components):
            survived = clean_correct & ((broken_by < 0) | (broken_by > k))
            per_component[name] = survived.double().mean().item()
        clean_accuracy = clean_correct.double().mean().item()
        package.checks.check_square_sr({"clean": clean_accuracy, **per_component})

    settings = {
        "package": f"pyautoattack {getattr(package, '__version__', 'unknown')}",
        "version": version, "components": list(components), "norm": norm, "eps": eps, "seed": seed,
        "batch_size": batch_size, "num_classes": int(num_classes),
        "apgd": {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts, "rho": aa.apgd.thr_decr, "eot_iter": aa.apgd.eot_iter},
        "apgd_t": {"n_iter": aa.apgd_targeted.n_iter, "n_restarts": aa.apgd_targeted.n_restarts,
                   "n_target_classes": aa.apgd_targeted.n_target_classes},
        "fab": {"n_iter": aa.fab.n_iter, "n_restarts": aa.fab.n_restarts,
                "n_target_classes": aa.fab.n_target_classes},
        "square": {"n_queries": aa.square.n_queries, "p_init": aa.square.p_init},
        "package_shape": list(folded_shape),
    }
    return AutoAttackResult(adversarial=_finish(adversarial, inputs), per_component=per_component,
                            clean_accuracy=clean_accuracy, settings=settings)
