"""Min–max (GAN) losses for methods that train a discriminator against the student.

These are not teacher/student losses: they take discriminator outputs, so they
are not registered under kind "loss" (whose contract is student vs. teacher
logits). Methods call them directly; the discriminator itself lives in
``kdlab.methods.adversarial``.

Conventions:

* ``real_logits`` / ``fake_logits``: the discriminator's raw scores, one per
  sample, shape ``(N,)`` or ``(N, 1)`` (any shape is flattened). No sigmoid is
  applied by the discriminator; each loss applies what it needs.
* "real" is the distribution the generator (here: the student) should imitate,
  "fake" is the generator's output.
* Reduction: mean over samples (real and fake means are taken separately, so the
  two sets may have different sizes). Computed in at least float32.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from kdlab.errors import KdlabError

GAN_LOSSES = ("bce", "lsgan", "hinge")


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise KdlabError(f"GAN loss kind: unknown value {kind!r}; use one of {', '.join(repr(k) for k in GAN_LOSSES)}")


def _scores(name: str, logits: torch.Tensor) -> torch.Tensor:
    """Flattened scores in at least float32."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise KdlabError(f"GAN loss {name}: expected a floating-point tensor of discriminator scores, got {logits!r}")
    if logits.numel() == 0:
        raise KdlabError(f"GAN loss {name}: empty tensor; the discriminator needs at least one sample")
    flat = logits.reshape(-1)
    return flat if flat.dtype == torch.float64 else flat.float()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, *, kind: str = "bce") -> torch.Tensor:
    """The loss the discriminator D minimises (real → "1", fake → "0").

    * ``"bce"`` — Goodfellow et al. (2014), "Generative Adversarial Nets", eq. 1:
      D maximises E log D(x) + E log(1 − D(G(z))) with D = σ(score); we return the
      negation, E softplus(−s_real) + E softplus(s_fake) (= −log σ and −log(1 − σ),
      computed stably). Scores 0 on both sides give 2·log 2.
    * ``"lsgan"`` — Mao et al. (2017), "Least Squares Generative Adversarial
      Networks", eq. 2 with the 0-1-1 coding (a = 0 fake, b = 1 real, c = 1):
      ½ E (s_real − 1)² + ½ E s_fake². The scores are used raw (no sigmoid).
    * ``"hinge"`` — Lim & Ye (2017), "Geometric GAN"; the form used by Miyato et
      al. (2018), "Spectral Normalization for GANs":
      E max(0, 1 − s_real) + E max(0, 1 + s_fake).

    Shapes: any; flattened (see the module docstring). Returns a float32 (or
    float64) scalar.
    """
    _check_kind(kind)
    real, fake = _scores("real_logits", real_logits), _scores("fake_logits", fake_logits)
    if kind == "bce":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "lsgan":
        return 0.5 * (real - 1.0).square().mean() + 0.5 * fake.square().mean()
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def generator_loss(fake_logits: torch.Tensor, *, kind: str = "bce") -> torch.Tensor:
    """The loss the generator (the student) minimises to make D call its outputs real.

    * ``"bce"`` — the non-saturating loss of Goodfellow et al. (2014), §3 (train G
      to maximise log D(G(z)) instead of minimising log(1 − D(G(z)))):
      E −log σ(s_fake) = E softplus(−s_fake). Score 0 gives log 2.
    * ``"lsgan"`` — Mao et al. (2017), eq. 2 with c = 1: ½ E (s_fake − 1)².
    * ``"hinge"`` — Lim & Ye (2017) / Miyato et al. (2018): −E s_fake.

    Shapes: any; flattened. Returns a float32 (or float64) scalar.
    """
    _check_kind(kind)
    fake = _scores("fake_logits", fake_logits)
    if kind == "bce":
        return F.softplus(-fake).mean()
    if kind == "lsgan":
        return 0.5 * (fake - 1.0).square().mean()
    return -fake.mean()


def gradient_penalty(discriminator: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     *, weight: float = 10.0) -> torch.Tensor:
    """WGAN-GP: weight · E_x̂ (‖∇_x̂ D(x̂)‖₂ − 1)².

    Gulrajani et al. (2017), "Improved Training of Wasserstein GANs", Algorithm 1:
    x̂ = ε·x_real + (1 − ε)·x_fake with one ε ~ U[0, 1] per sample, λ = 10.

    ``real`` and ``fake`` (the discriminator's inputs, shape ``(N, ...)``, same
    shape) are detached: the penalty regularises the discriminator only. ε is drawn
    with ``torch.rand`` from the global RNG (no ``torch.Generator`` argument), so it
    follows the caller's seeding and the training loop's saved RNG state on resume —
    and it consumes global random numbers, which shifts e.g. later dropout masks.
    The gradient norm is taken per sample over all non-batch dims
    (``torch.linalg.vector_norm``, whose gradient at 0 is 0). The graph is kept
    (``create_graph=True``) so the penalty can be back-propagated into D.
    Returns a float32 (or float64) scalar.
    """
    if real.shape != fake.shape:
        raise KdlabError(f"gradient_penalty: real shape {tuple(real.shape)} != fake shape {tuple(fake.shape)}")
    real, fake = real.detach(), fake.detach()
    epsilon = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
    mixed = (epsilon * real + (1.0 - epsilon) * fake).requires_grad_(True)
    scores = discriminator(mixed)
    (gradient,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norms = torch.linalg.vector_norm(gradient.reshape(len(gradient), -1).to(_at_least_float32(gradient)), dim=1)
    return weight * (norms - 1.0).square().mean()


def _at_least_float32(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def discriminator_accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor, *, kind: str = "bce") -> float:
    """Fraction of samples D classifies correctly: real above the threshold, fake strictly below.

    The threshold is the midpoint of the loss's targets: 0 for ``"bce"`` (σ = ½)
    and ``"hinge"``, ½ for ``"lsgan"`` (targets 0 and 1). A score exactly at the
    threshold counts as "real". Counted over all real and fake samples together.
    Returns a Python float (reads the value back: one device sync).
    """
    _check_kind(kind)
    threshold = 0.5 if kind == "lsgan" else 0.0
    real, fake = _scores("real_logits", real_logits), _scores("fake_logits", fake_logits)
    correct = (real.detach() >= threshold).sum() + (fake.detach() < threshold).sum()
    return float(correct) / (real.numel() + fake.numel())
