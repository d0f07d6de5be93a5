"""Student–teacher deviations: does the student exaggerate the teacher's confidence?

Nagarajan, Menon, Bhojanapalli, Mobahi, Kumar (2023), "On student-teacher
deviations in distillation: does it pay to disobey?" (NeurIPS 2023). Their
diagnostic: for each example take the teacher's predicted class
``y_T = argmax p_T(·|x)`` and compare the probabilities both models give it,
through the logit transform ``φ(p) = log(p / (1 − p))``. A straight line
fitted to ``φ(p_S(y_T|x))`` against ``φ(p_T(y_T|x))`` with a slope above 1
means the student *exaggerates* the teacher's confidence levels: where the
teacher is unsure the student is even less sure, where it is confident the
student is more so.

Conventions (choices of kdlab, not of the paper):

* Probabilities are computed in float64 from the logits, so a confident model
  saturates at 1 only for logit margins above ~37 rather than ~17 (float32).
* ``φ`` clamps ``p`` to ``[eps, 1 − eps]`` (default ``eps = 1e-6``), so
  ``|φ| ≤ log((1 − eps)/eps) ≈ 13.8``. Clamped points sit on that cap and pull
  the fitted slope towards whatever the other model does there;
  :func:`deviation_summary` reports how many points were clamped.
* The line is ordinary least squares of φ_student on φ_teacher; its CI is the
  Student-t interval with ``n − 2`` degrees of freedom around the slope, with
  standard error ``sqrt(SSR / (n − 2) / Sxx)``. The OLS CI assumes independent,
  homoscedastic residuals; treat it as a measure of how well the slope is
  determined by these points, not as a population guarantee.
* "Student less confident" means ``p_S(y_T|x) < p_T(y_T|x)`` strictly, on the
  unclamped probabilities. Buckets are ``n_buckets`` equal-width bins of the
  teacher's top-1 probability over [0, 1] with the ECE convention
  ((b/n, (b+1)/n], the first bin closed); fixed edges keep train, test and
  different runs comparable (the teacher's top-1 probability is ≥ 1/C, so the
  lowest bins are empty).

Pure functions of tensors. Nothing here is registered: the registry's
``metric`` kind holds scalar metrics of ``(logits, labels)``, and these return
dicts. The t quantile comes from ``scipy.stats`` (imported when used).
"""
from __future__ import annotations

import math

import torch

from kdlab.errors import KdlabError
from kdlab.metrics.classification import _ece_bin_index, _pair

DEFAULT_EPS = 1e-6


def _as_float64(name: str, values) -> torch.Tensor:
    return _as_float(values, torch.float64)


def _as_float(values, at_least: torch.dtype = torch.float32) -> torch.Tensor:
    """A flat, detached floating tensor of at least ``at_least`` precision (lists become float64)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.float64)
    dtype = torch.promote_types(tensor.dtype, at_least) if tensor.is_floating_point() else torch.float64
    return tensor.detach().to(dtype).reshape(-1)


def logit_confidence(p, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """φ(p) = log(p / (1 − p)), with p clamped to [eps, 1 − eps] first.

    Works elementwise on any shape; the result has ``p``'s floating dtype
    (at least float32). ``eps`` must lie in (0, 0.5).
    """
    if not 0.0 < float(eps) < 0.5:
        raise KdlabError(f"logit_confidence eps: must lie in (0, 0.5), got {eps!r}; use e.g. 1e-6")
    p = p if isinstance(p, torch.Tensor) else torch.as_tensor(p, dtype=torch.float64)
    if not p.is_floating_point():
        p = p.to(torch.float64)
    p = p.detach().to(torch.promote_types(p.dtype, torch.float32)).clamp(float(eps), 1.0 - float(eps))
    return torch.log(p) - torch.log1p(-p)


def teacher_class_probabilities(student_logits, teacher_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_teacher, p_student)``: the probability each model gives the teacher's argmax class.

    Shapes: both logits (N, C) over the same samples and classes; returns two
    float64 tensors of shape (N,). Softmax at temperature 1; ties in the
    teacher's argmax go to the lowest class index (``torch.argmax``).
    """
    student, teacher = _pair(student_logits, teacher_logits)
    student, teacher = student.to(torch.float64), teacher.to(torch.float64)
    target = teacher.argmax(dim=-1, keepdim=True)
    p_teacher = torch.softmax(teacher, dim=-1).gather(-1, target).squeeze(-1)
    p_student = torch.softmax(student, dim=-1).gather(-1, target).squeeze(-1)
    return p_teacher, p_student


def fit_slope(x, y, confidence: float = 0.95) -> dict:
    """Ordinary least squares ``y ≈ intercept + slope·x`` with a t-based CI on the slope.

    Returns ``{slope, intercept, half_width, low, high, stderr, n, r2, confidence}``:
    ``stderr = sqrt(SSR / (n − 2) / Sxx)``, ``half_width = t_{(1+c)/2, n−2} · stderr``,
    ``r2 = 1 − SSR / SST``. With fewer than 3 points the half width (and
    stderr) is NaN; when every x is equal the slope is undefined and NaN;
    when every y is equal ``r2`` is NaN. Computed in float64.
    """
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise KdlabError(f"fit_slope confidence: must lie in (0, 1), got {confidence}; use e.g. 0.95")
    xs, ys = _as_float64("x", x), _as_float64("y", y)
    if xs.numel() != ys.numel():
        raise KdlabError(f"fit_slope: x has {xs.numel()} values but y has {ys.numel()}; pass paired values")
    n = int(xs.numel())
    nan = math.nan
    result = {"slope": nan, "intercept": nan, "half_width": nan, "low": nan, "high": nan, "stderr": nan,
              "n": n, "r2": nan, "confidence": confidence}
    if n < 2:
        return result
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx = float((dx * dx).sum())
    syy = float((dy * dy).sum())
    if sxx <= 0.0:
        return result
    slope = float((dx * dy).sum()) / sxx
    intercept = float(ys.mean()) - slope * float(xs.mean())
    residuals = ys - (intercept + slope * xs)
    ssr = float((residuals * residuals).sum())
    result.update(slope=slope, intercept=intercept)
    if syy > 0.0:
        result["r2"] = 1.0 - ssr / syy
    if n >= 3:
        from scipy import stats as scipy_stats

        stderr = math.sqrt(ssr / (n - 2) / sxx)
        half_width = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 2)) * stderr
        result.update(stderr=stderr, half_width=half_width, low=slope - half_width, high=slope + half_width)
    return result


def underconfidence_by_bucket(p_teacher, p_student, *, n_buckets: int = 10) -> list[dict]:
    """Fraction of samples with ``p_student < p_teacher``, per bucket of teacher confidence.

    ``p_teacher``/``p_student``: (N,) probabilities of the teacher's class (see
    :func:`teacher_class_probabilities`). Buckets are ``n_buckets`` equal-width
    bins of ``p_teacher`` over [0, 1], ``(b/n, (b+1)/n]`` with the first closed
    (as ECE). Returns one dict per bucket, lowest first:
    ``{low, high, n, fraction_student_less_confident}``, the fraction NaN for
    an empty bucket.
    """
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise KdlabError(f"underconfidence_by_bucket n_buckets: must be an integer >= 1, got {n_buckets!r}")
    # Binned and compared in the inputs' own precision (at least float32), so a float32 probability equal to an
    # edge b/n in float32 falls in the lower bucket, as in ECE.
    teacher, student = _as_float(p_teacher), _as_float(p_student)
    dtype = torch.promote_types(teacher.dtype, student.dtype)
    teacher, student = teacher.to(dtype), student.to(dtype)
    if teacher.numel() != student.numel():
        raise KdlabError(f"underconfidence_by_bucket: {teacher.numel()} teacher but {student.numel()} student "
                         "probabilities; pass the same samples")
    bins = _ece_bin_index(teacher, n_buckets)
    less = (student < teacher).to(torch.float64)
    bins = bins.to(torch.device("cpu"))
    less = less.to(torch.device("cpu"))
    counts = torch.bincount(bins, minlength=n_buckets)
    hits = torch.zeros(n_buckets, dtype=torch.float64).index_add_(0, bins, less)
    out = []
    for b in range(n_buckets):
        n = int(counts[b])
        out.append({"low": b / n_buckets, "high": (b + 1) / n_buckets, "n": n,
                    "fraction_student_less_confident": float(hits[b]) / n if n else math.nan})
    return out


def deviation_summary(student_logits, teacher_logits, *, eps: float = DEFAULT_EPS, n_buckets: int = 10,
                      confidence: float = 0.95) -> dict:
    """The whole diagnostic for one set of samples, as a JSON-ready dict.

    Keys: ``n``; ``eps``; ``fit`` (:func:`fit_slope` of φ_student on φ_teacher);
    ``verdict`` ("exaggerates" when the CI lies above 1, "softens" when below,
    else "inconclusive"); ``fraction_student_less_confident`` (all samples);
    ``buckets`` (:func:`underconfidence_by_bucket`); ``agreement`` (top-1
    agreement); ``mean_p_teacher``/``mean_p_student``; ``clamped`` (how many
    points φ clamped at each end, per model).
    """
    p_teacher, p_student = teacher_class_probabilities(student_logits, teacher_logits)
    phi_teacher, phi_student = logit_confidence(p_teacher, eps), logit_confidence(p_student, eps)
    fit = fit_slope(phi_teacher, phi_student, confidence)
    if fit["low"] > 1.0:
        verdict = "exaggerates"
    elif fit["high"] < 1.0:
        verdict = "softens"
    else:
        verdict = "inconclusive"
    student, teacher = _pair(student_logits, teacher_logits)

    def clamped(p: torch.Tensor) -> dict:
        return {"low": int((p < eps).sum()), "high": int((p > 1.0 - eps).sum())}

    return {
        "n": int(p_teacher.numel()),
        "eps": float(eps),
        "fit": fit,
        "verdict": verdict,
        "fraction_student_less_confident": float((p_student < p_teacher).double().mean()),
        "buckets": underconfidence_by_bucket(p_teacher, p_student, n_buckets=n_buckets),
        "agreement": float((student.argmax(-1) == teacher.argmax(-1)).double().mean()),
        "mean_p_teacher": float(p_teacher.mean()),
        "mean_p_student": float(p_student.mean()),
        "clamped": {"teacher": clamped(p_teacher), "student": clamped(p_student)},
    }
