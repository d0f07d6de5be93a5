"""The deviation analysis of a finished student run against its teacher.

Nagarajan et al. (2023): does the student exaggerate the teacher's confidence?
For each requested split this rebuilds the run's data (the same splits the run
trained on: ``data`` config, ``split_seed``, the workspace cache), loads the
student's final weights (``model.safetensors`` in the run folder) and its
teacher (``teacher.checkpoint``, or the teacher recipe run found in the store by
``teacher_run_spec(cfg).run_id``), computes eval-mode logits without
augmentation, and summarises them with
:func:`kdlab.metrics.deviation.deviation_summary`. ``deviations.json`` and
``deviations.png`` are written to the run folder (or ``out_dir``).

The "train" split is the training data after the validation part was carved
out, i.e. exactly what student and teacher were fitted on. Logits are computed
in fp32 on the run's ``train.device``.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Iterable

from kdlab.config import ExperimentConfig
from kdlab.data import Splits, build_splits
from kdlab.errors import KdlabError
from kdlab.metrics.deviation import (
    DEFAULT_EPS,
    deviation_summary,
    logit_confidence,
    teacher_class_probabilities,
)
from kdlab.plan import teacher_run_spec
from kdlab.report.table import Table, render
from kdlab.runs import parse_experiment
from kdlab.store import Store, atomic_write_json

MODEL_FILE = "model.safetensors"  # as written by kdlab.study.runner
JSON_FILE = "deviations.json"
PLOT_FILE = "deviations.png"
SPLITS = ("train", "val", "test")


def _resolve(store: Store, run: str):
    matches = store.find(run)
    if len(matches) != 1:
        ids = ", ".join(r.run_id for r in matches[:5])
        raise KdlabError(f"{run!r} matches {len(matches)} runs ({ids}); give one run id")
    return matches[0]


def run_config(record) -> ExperimentConfig:
    """The ``ExperimentConfig`` of a stored run, parsed back from its resolved config."""
    raw = copy.deepcopy(record.config)
    seed = raw.pop("seed", 0)
    raw["seeds"] = [seed]
    raw["grid"] = {}
    _, specs = parse_experiment(raw)
    return specs[0].config


def _teacher_file(store: Store, record, cfg: ExperimentConfig) -> tuple[Path, dict, str]:
    """(weights file, load_model_file keyword arguments, description) of the run's teacher."""
    t = cfg.teacher
    if t.checkpoint is not None:
        return Path(t.checkpoint).expanduser(), {"model": t.model, "options": t.options}, f"checkpoint {t.checkpoint}"
    spec = teacher_run_spec(cfg)
    try:
        teacher = store.run(spec.run_id)
    except KdlabError:
        raise KdlabError(f"run {record.run_id}: its teacher run {spec.run_id} is not in {store.database_path}; "
                         "re-run the study (`kdlab run`) to train it") from None
    if teacher.status != "finished":
        raise KdlabError(f"run {record.run_id}: its teacher run {spec.run_id} is {teacher.status}; "
                         "finish it with `kdlab run` first")
    return Path(teacher.run_dir) / MODEL_FILE, {"key": f"teacher run {spec.run_id}"}, f"run {spec.run_id}"


def compute_deviations(store: Store, run_id: str, *, splits: Iterable[str] = ("train", "test"),
                       n_buckets: int = 10, eps: float = DEFAULT_EPS, confidence: float = 0.95) -> tuple[dict, dict]:
    """The numbers of :func:`analyze_deviations` without writing anything: ``(result, points)``.

    ``result`` lacks the ``json`` and ``plot`` paths; ``points[split] = (φ_teacher, φ_student)`` per
    sample, for :func:`kdlab.report.plots.deviation_scatter`.
    """
    from kdlab.engine.build import load_model_file
    from kdlab.engine.loop import predict
    from kdlab.engine.optim import resolve_device

    splits = tuple(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise KdlabError(f"splits {list(splits)}: choose among {', '.join(SPLITS)}")
    record = _resolve(store, run_id)
    if record.status != "finished":
        raise KdlabError(f"run {record.run_id} is {record.status}, not finished; finish it with `kdlab run` first")
    cfg = run_config(record)
    if cfg.teacher is None:
        raise KdlabError(f"run {record.run_id} has no teacher (teacher: null); "
                         "the deviation analysis compares a student with its teacher")
    run_dir = Path(record.run_dir)
    d = cfg.data
    data: Splits = build_splits(d.dataset, d.options, root=d.root, cache_dir=store.cache_folder,
                                val_fraction=d.val_fraction, split_seed=d.split_seed)
    if data.sequence is not None:
        # Its samples are (position, token) pairs of one sequence, not independent examples: a slope
        # over them would not measure what Nagarajan et al. measure, so the analysis refuses.
        raise KdlabError(f"run {record.run_id} is a sequence task (data.dataset: {d.dataset}); the deviation "
                         "analysis compares per-sample class confidences of a classifier and its teacher, "
                         "so it does not apply to sequence runs")
    student_file = run_dir / MODEL_FILE
    if not student_file.is_file():
        raise KdlabError(f"run {record.run_id}: {student_file} is missing; re-run it with `kdlab run --no-resume`")
    student, _ = load_model_file(student_file, data, key=f"run {record.run_id}")
    teacher_path, teacher_kwargs, teacher_desc = _teacher_file(store, record, cfg)
    teacher, _ = load_model_file(teacher_path, data, **teacher_kwargs)
    device = resolve_device(cfg.train.device)
    student.to(device)
    teacher.to(device)

    summaries, points = {}, {}
    for split in splits:
        inputs, _labels = getattr(data, split)
        if len(inputs) == 0:
            raise KdlabError(f"split {split!r} of run {record.run_id} is empty (data.val_fraction: "
                             f"{d.val_fraction}); leave it out of the splits")
        s_logits = predict(student, inputs, device=device)
        t_logits = predict(teacher, inputs, device=device)
        summaries[split] = deviation_summary(s_logits, t_logits, eps=eps, n_buckets=n_buckets, confidence=confidence)
        p_teacher, p_student = teacher_class_probabilities(s_logits, t_logits)
        points[split] = (logit_confidence(p_teacher, eps), logit_confidence(p_student, eps))
    result = {
        "run_id": record.run_id,
        "experiment": record.experiment,
        "label": record.label,
        "method": cfg.method.name,
        "teacher": teacher_desc,
        "eps": float(eps),
        "confidence": float(confidence),
        "bucketing": f"{n_buckets} equal-width buckets of the teacher's top-1 probability over [0, 1], "
                     "(low, high] with the first closed",
        "splits": summaries,
    }
    return result, points


def draw_deviations(result: dict, points: dict, path: Path) -> Path:
    """The deviation scatter of a :func:`compute_deviations` result, one panel per split."""
    from kdlab.report.plots import deviation_scatter

    return deviation_scatter(points, {s: summary["fit"] for s, summary in result["splits"].items()}, path,
                             eps=result["eps"],
                             title=f"{result['run_id']} [{result['label']}] vs teacher {result['teacher']}")


def analyze_deviations(store: Store | str | Path, run_id: str, *, out_dir: str | Path | None = None,
                       splits: Iterable[str] = ("train", "test"), n_buckets: int = 10, eps: float = DEFAULT_EPS,
                       confidence: float = 0.95, plot: bool = True) -> dict:
    """Teacher-vs-student confidence on the teacher's class, per split; writes JSON and PNG.

    ``store``: a :class:`Store` or a workspace folder. ``run_id``: a run id or
    unique prefix of a *finished* run that has a teacher. Returns
    ``{run_id, experiment, label, method, teacher, eps, confidence, splits:
    {split: deviation_summary(...)}, json, plot}`` (paths as strings, ``plot``
    None when ``plot=False``). A run without a teacher, an unfinished run, a
    sequence task or an unknown split raises :class:`KdlabError`.
    """
    if not isinstance(store, Store):
        store = Store(store)
    result, points = compute_deviations(store, run_id, splits=splits, n_buckets=n_buckets, eps=eps,
                                        confidence=confidence)
    out = Path(out_dir).expanduser() if out_dir is not None else Path(store.run(result["run_id"]).run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdlabError(f"--out {out}: cannot create the folder ({exc.strerror or exc}); pass a writable folder") \
            from None
    result["json"] = str(out / JSON_FILE)
    result["plot"] = str(out / PLOT_FILE) if plot else None
    if plot:
        draw_deviations(result, points, out / PLOT_FILE)
    atomic_write_json(out / JSON_FILE, result)
    return result


def deviation_frame(result: dict):
    """The bucket table of an :func:`analyze_deviations` result as a pandas DataFrame.

    One row per (split, bucket) with the split's slope and CI repeated.
    pandas is optional: without it this raises :class:`KdlabError` (use the dict).
    """
    try:
        import pandas
    except ImportError:
        raise KdlabError("pandas is not installed; use the dict returned by analyze_deviations "
                         "(or pip install pandas)") from None
    rows = []
    for split, summary in result["splits"].items():
        fit = summary["fit"]
        for bucket in summary["buckets"]:
            rows.append({"split": split, "slope": fit["slope"], "slope_low": fit["low"], "slope_high": fit["high"],
                         "bucket_low": bucket["low"], "bucket_high": bucket["high"], "n": bucket["n"],
                         "fraction_student_less_confident": bucket["fraction_student_less_confident"]})
    return pandas.DataFrame(rows)


def format_report(result: dict) -> list[str]:
    """Printable lines: slope ± CI per split, the bucket table, the file paths."""
    conf = round(100 * result["confidence"])
    lines = [f"deviation analysis of run {result['run_id']} [{result['label']}] (method {result['method']}) "
             f"against teacher {result['teacher']}",
             f"φ(p) = log(p/(1−p)) of each model's probability of the teacher's predicted class, "
             f"p clamped to [{result['eps']:g}, 1−{result['eps']:g}]; slope of φ_student on φ_teacher by OLS, "
             f"{conf}% t-CI; slope > 1: the student exaggerates the teacher's confidence"]
    for split, s in result["splits"].items():
        fit = s["fit"]
        hw = f"{fit['half_width']:.3f}" if math.isfinite(fit["half_width"]) else "n/a"
        clamped = sum(s["clamped"]["teacher"].values()) + sum(s["clamped"]["student"].values())
        lines.append(f"  {split:<5} slope {fit['slope']:.3f} ± {hw} ({s['verdict']}), intercept "
                     f"{fit['intercept']:.3f}, r² {fit['r2']:.3f}, n {s['n']}; student less confident on "
                     f"{100 * s['fraction_student_less_confident']:.1f}%; agreement {s['agreement']:.3f}"
                     + (f"; {clamped} φ values clamped" if clamped else ""))
    names = list(result["splits"])
    lines.append("fraction of samples where the student is less confident than the teacher, by teacher top-1 "
                 "probability (empty buckets omitted):")
    rows = []
    for i, bucket in enumerate(result["splits"][names[0]]["buckets"]):
        cells = [result["splits"][name]["buckets"][i] for name in names]
        if all(c["n"] == 0 for c in cells):
            continue
        row = [f"{'[' if i == 0 else '('}{bucket['low']:.2g}, {bucket['high']:.2g}]"]
        for c in cells:
            row += [str(c["n"]), f"{c['fraction_student_less_confident']:.3f}" if c["n"] else "-"]
        rows.append(row)
    columns = ["teacher p"] + [f"{name} {what}" for name in names for what in ("n", "less")]
    table = Table(columns, rows, numeric=[False] + [True] * (2 * len(names)))
    lines += ["  " + line for line in render(table).splitlines()]
    if result["plot"]:
        lines.append(f"plot: {result['plot']}")
    lines.append(f"json: {result['json']}")
    return lines
