#!/usr/bin/env python
"""Seconds per ``kd`` training epoch: kdlab's ``fit`` against a plain PyTorch loop, in one process.

What is compared
----------------
A (``plain``): a hand-written loop. Per step: index the batch out of the
training tensors, teacher forward (eval mode, ``torch.no_grad()``), student
forward, ``loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE`` written
inline with ``torch.nn.functional`` (``log_softmax`` + ``kl_div(reduction=
"batchmean", log_target=True)`` + ``cross_entropy``), ``zero_grad``,
``backward``, ``Adam.step``. The loss is summed on the device and read back
once per epoch (the cheapest honest way to report a training loss).

B (``kdlab``): ``kdlab.engine.loop.fit`` with method ``kd`` and a
``TrainConfig`` of adam, the same lr, ``schedule="constant"``, ``run_dir=None``
(no checkpoints), ``selection="last"``.

Both get the same work: the same architecture and initial weights (one state
dict loaded into both students before every run), the same teacher module, the
same train tensors, batch size and per-epoch shuffle (``randperm`` from a
generator seeded ``seed * 1_000_003 + epoch``, as ``kdlab.engine.seed`` does),
the same optimiser and hyperparameters. The script checks that it is the same
work: the loss of the first batch must agree tightly, and the mean training
loss of every epoch loosely (the two KL formulas differ in rounding, and Adam
carries that along).

What is timed, and why this design
----------------------------------
``fit`` always does work besides training: it predicts the teacher's val/test
logits before the first epoch and evaluates val (+ test) after the last one.
Timing a whole ``fit(epochs=1)`` call would add that fixed cost to kdlab only,
or (if the plain loop copied it) dilute the ratio towards 1 by adding identical
work to both sides. Differencing ``fit(E+1) − fit(E)`` cancels it but doubles
the noise. Instead the training part of ``fit`` is bracketed exactly, without
touching loop.py: for the duration of a kdlab run the benchmark wraps two names
in ``kdlab.engine.loop``'s namespace:

* ``epoch_generator`` — called once at the start of every epoch, before its
  ``randperm``: the clock is read there (epoch starts);
* ``evaluate`` — first called right after the last epoch's last step (with
  ``eval_every > epochs`` no epoch but the last evaluates): the clock is read
  there (end of training).

So kdlab's time per epoch covers the shuffle, every step (including the
loop's per-step bookkeeping: loss-term accumulation, the NaN checks, the LR
schedule step) and its per-epoch metrics; it excludes the model/optimiser setup
and the evaluation, which are not training. The plain loop's clock brackets
exactly the same span of its own loop (its optimiser is also built outside).
On CUDA the device is synchronised before every clock read. The two wrappers
cost one Python call per epoch.

Noise control
-------------
Both loops are warmed up first (untimed). Then each repeat is a pair (plain
run, kdlab run); the order alternates between pairs (AB, BA, AB, ...) so a
slow drift of the machine's load biases neither side; ``gc.collect()`` runs
before each timed run. Reported: the median and spread (IQR, min–max) of
seconds per epoch for each, the ratio of medians, the median of the per-pair
ratios with a bootstrap 95% interval, and how many pairs had kdlab slower.
The goal is a per-pair median ratio kdlab/plain ≤ 1.05.

The teacher is freshly initialised, not trained: its compute does not depend
on its weights, and a random teacher still gives a well-defined KD loss.

Run ``--profile`` to also print cProfile tables of one kdlab and one plain run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import hashlib
import io
import json
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchutil import bootstrap_median_ci, load, machine_lines, quantile, sync
import torch.nn.functional as F

import kdlab.engine.loop as loop
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model

GOAL_RATIO = 1.05
FIRST_BATCH_RTOL = 1e-5  # same formula, same weights, same batch: only summation order differs
EPOCH_LOSS_RTOL = 1e-2  # mean train loss per epoch: rounding differences grow through the Adam updates
# The machine was too noisy to judge when, for either loop, more than OUTLIER_SHARE of the epochs took over
# OUTLIER_FACTOR x its median (stalls), or the IQR exceeds UNSTABLE_IQR of the median.
OUTLIER_FACTOR, OUTLIER_SHARE, UNSTABLE_IQR = 1.5, 0.1, 0.15


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist1d")
    p.add_argument("--teacher-width", type=int, default=64, help="cnn1d teacher width")
    p.add_argument("--student-width", type=int, default=8, help="cnn1d student width")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed run (the time is divided by it)")
    p.add_argument("--repeats", type=int, default=20, help="timed (plain, kdlab) pairs")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each loop before timing (at least 1 always runs: it gives the sanity losses)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="dataset cache folder (default: a temporary folder, removed at exit)")
    p.add_argument("--profile", action="store_true", help="also print cProfile tables of one run of each")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if the goal ratio is not met")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--epochs, --repeats and --batch-size must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    return args


# --------------------------------------------------------------------------- environment


def source_fingerprint() -> str:
    """Short hashes of the files whose speed is measured (the working tree may differ from HEAD)."""
    root = Path(loop.__file__).resolve().parents[1]
    parts = []
    for rel in ("engine/loop.py", "losses/divergences.py", "methods/kd.py"):
        try:
            parts.append(f"{rel}={hashlib.sha256((root / rel).read_bytes()).hexdigest()[:10]}")
        except OSError:
            parts.append(f"{rel}=?")
    return " ".join(parts)


def header(args: argparse.Namespace, device: torch.device) -> list[str]:
    return machine_lines(device) + [
        f"load average at start (1/5/15 min): {load()}",
        f"kdlab sources: {source_fingerprint()}",
    ]


# --------------------------------------------------------------------------- the plain loop


def plain_kd_epochs(student, teacher, x_train, y_train, *, epochs, batch_size, lr, temperature, alpha, seed,
                    device) -> tuple[float, list[float]]:
    """Train ``student`` for ``epochs``; return (training seconds, mean loss per epoch)."""
    student.to(device)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    x, y = x_train.to(device), y_train.to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    n = len(x)
    steps = math.ceil(n / batch_size)
    soft_weight = alpha * temperature ** 2
    hard_weight = 1.0 - alpha
    losses = []
    sync(device)
    start = time.perf_counter()
    for epoch in range(epochs):
        student.train()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator).to(device)
        total = torch.zeros((), device=device)
        for i in range(steps):
            index = order[i * batch_size:(i + 1) * batch_size]
            inputs, labels = x[index], y[index]
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            logits = student(inputs)
            soft = F.kl_div(F.log_softmax(logits / temperature, dim=-1),
                            F.log_softmax(teacher_logits / temperature, dim=-1),
                            reduction="batchmean", log_target=True)
            loss = soft_weight * soft + hard_weight * F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        losses.append(total.item() / steps)
    sync(device)
    return time.perf_counter() - start, losses


def plain_first_batch_loss(student, teacher, x_train, y_train, *, batch_size, temperature, alpha, seed, device):
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 0)
    index = torch.randperm(len(x_train), generator=generator)[:batch_size]
    inputs, labels = x_train[index].to(device), y_train[index].to(device)
    with torch.no_grad():
        t = teacher(inputs)
        s = student(inputs)
        soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        reduction="batchmean", log_target=True)
        return float(alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(s, labels)), (inputs, labels, s, t)


# --------------------------------------------------------------------------- kdlab's loop


@contextlib.contextmanager
def epoch_marks(device: torch.device):
    """Clock reads at each epoch start (``epoch_generator``) and at the end of training (first ``evaluate``)."""
    starts: list[float] = []
    end: list[float] = []
    real_generator, real_evaluate = loop.epoch_generator, loop.evaluate

    def marked_generator(seed, epoch):
        sync(device)
        starts.append(time.perf_counter())
        return real_generator(seed, epoch)

    def marked_evaluate(*args, **kwargs):
        if starts and not end:
            sync(device)
            end.append(time.perf_counter())
        return real_evaluate(*args, **kwargs)

    loop.epoch_generator, loop.evaluate = marked_generator, marked_evaluate
    try:
        yield starts, end
    finally:
        loop.epoch_generator, loop.evaluate = real_generator, real_evaluate


def kdlab_kd_epochs(student, teacher, splits, *, epochs, batch_size, lr, temperature, alpha, seed,
                    device) -> tuple[float, list[float], float]:
    """Train with ``fit``; return (training seconds, mean loss per epoch, whole fit() seconds)."""
    method = build_method(MethodConfig(name="kd", options={"temperature": temperature, "alpha": alpha}),
                          student=student, teacher=teacher)
    train = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adam", lr=lr, schedule="constant",
                        eval_every=epochs + 1, selection="last", device=str(device), precision="fp32")
    losses: list[float] = []
    with epoch_marks(device) as (starts, end):
        sync(device)
        t0 = time.perf_counter()
        loop.fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=seed,
                 run_dir=None, resume=False, on_epoch=lambda epoch, metrics: losses.append(metrics["train/loss"]))
        sync(device)
        whole = time.perf_counter() - t0
    if len(starts) != epochs or len(end) != 1 or len(losses) != epochs:
        raise SystemExit(f"bench: expected {epochs} epoch start(s) and one end of training in fit, got "
                         f"{len(starts)} and {len(end)}; loop.py's structure changed, update epoch_marks()")
    return end[0] - starts[0], losses, whole


# --------------------------------------------------------------------------- statistics


def describe(values: list[float]) -> str:
    return (f"median {statistics.median(values):.4f}  IQR [{quantile(values, 0.25):.4f}, "
            f"{quantile(values, 0.75):.4f}]  min {min(values):.4f}  max {max(values):.4f}")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for line in header(args, device):
        print(line)
    print(f"setup: {args.dataset}, teacher cnn1d width {args.teacher_width}, student cnn1d width "
          f"{args.student_width}, batch {args.batch_size}, adam lr {args.lr}, T {args.temperature}, "
          f"alpha {args.alpha}, {args.epochs} epoch(s) per run, {args.repeats} pair(s), {args.warmup} warm-up")
    sys.stdout.flush()

    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdlab-bench-")))
        splits = build_splits(args.dataset, {}, root=None, cache_dir=cache_dir, val_fraction=0.1, split_seed=0)
        return run(args, device, splits)


def run(args, device, splits) -> int:
    torch.manual_seed(args.seed)
    teacher = build_model("cnn1d", {"width": args.teacher_width}, splits).to(device).eval()
    teacher.requires_grad_(False)
    student_plain = build_model("cnn1d", {"width": args.student_width}, splits)
    student_kdlab = copy.deepcopy(student_plain)
    init_state = copy.deepcopy(student_plain.state_dict())
    x_train, y_train = splits.train
    steps = math.ceil(len(x_train) / args.batch_size)
    print(f"data: {len(x_train)} train samples -> {steps} steps per epoch; "
          f"student {sum(p.numel() for p in student_plain.parameters())} params, "
          f"teacher {sum(p.numel() for p in teacher.parameters())} params")
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
                  alpha=args.alpha, seed=args.seed, device=device)

    def run_plain():
        student_plain.load_state_dict(init_state)
        return plain_kd_epochs(student_plain, teacher, x_train, y_train, **common)

    def run_kdlab():
        student_kdlab.load_state_dict(init_state)
        return kdlab_kd_epochs(student_kdlab, teacher, splits, **common)

    # Sanity 1: the loss of the first batch, from the same weights (tight).
    probe = copy.deepcopy(student_plain).to(device).train()
    plain_loss0, (inputs, labels, s_logits, t_logits) = plain_first_batch_loss(
        probe, teacher, x_train, y_train, batch_size=args.batch_size, temperature=args.temperature,
        alpha=args.alpha, seed=args.seed, device=device)
    method = build_method(MethodConfig(name="kd", options={"temperature": args.temperature, "alpha": args.alpha}),
                          student=probe, teacher=teacher)
    from kdlab.methods.base import Batch, Outputs
    with torch.no_grad():
        terms = method.loss_terms(Batch(inputs, labels), Outputs(s_logits), Outputs(t_logits))
    kdlab_loss0 = float(sum(terms.values()))
    del probe, method

    # Warm-up (untimed); the first kdlab run also gives the per-epoch losses for sanity 2.
    for _ in range(max(args.warmup, 1)):
        _, plain_losses = run_plain()
        _, kdlab_losses, _ = run_kdlab()

    first_ok = math.isclose(plain_loss0, kdlab_loss0, rel_tol=FIRST_BATCH_RTOL)
    epoch_ok = all(math.isclose(a, b, rel_tol=EPOCH_LOSS_RTOL) for a, b in zip(plain_losses, kdlab_losses))
    print(f"sanity: first-batch loss plain {plain_loss0:.6f} kdlab {kdlab_loss0:.6f} "
          f"(rel diff {abs(plain_loss0 - kdlab_loss0) / abs(plain_loss0):.1e}, tol {FIRST_BATCH_RTOL:g}) "
          f"{'OK' if first_ok else 'MISMATCH'}")
    for e, (a, b) in enumerate(zip(plain_losses, kdlab_losses), start=1):
        print(f"sanity: epoch {e} mean train loss plain {a:.6f} kdlab {b:.6f} "
              f"(rel diff {abs(a - b) / abs(a):.1e}, tol {EPOCH_LOSS_RTOL:g})")
    print(f"sanity: same work {'OK' if first_ok and epoch_ok else 'MISMATCH'}")
    sys.stdout.flush()

    plain_s, kdlab_s, fit_whole = [], [], []
    for r in range(args.repeats):
        order = ("plain", "kdlab") if r % 2 == 0 else ("kdlab", "plain")
        for which in order:
            gc.collect()
            if which == "plain":
                seconds, _ = run_plain()
                plain_s.append(seconds / args.epochs)
            else:
                seconds, _, whole = run_kdlab()
                kdlab_s.append(seconds / args.epochs)
                fit_whole.append(whole)
        print(f"pair {r + 1:>3}/{args.repeats} ({order[0]} first): plain {plain_s[-1]:.4f} s/epoch  "
              f"kdlab {kdlab_s[-1]:.4f} s/epoch  ratio {kdlab_s[-1] / plain_s[-1]:.3f}")
        sys.stdout.flush()

    ratios = [k / p for k, p in zip(kdlab_s, plain_s)]
    median_ratio = statistics.median(ratios)
    low, high = bootstrap_median_ci(ratios)
    fixed = [w - k * args.epochs for w, k in zip(fit_whole, kdlab_s)]
    print()
    print(f"plain  s/epoch: {describe(plain_s)}")
    print(f"kdlab  s/epoch: {describe(kdlab_s)}")
    print(f"ratio kdlab/plain: of medians {statistics.median(kdlab_s) / statistics.median(plain_s):.3f} | "
          f"median of per-pair ratios {median_ratio:.3f} (bootstrap 95% CI {low:.3f}-{high:.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}) | kdlab slower in {sum(x > 1 for x in ratios)}"
          f"/{len(ratios)} pairs | n = {len(ratios)}")
    print(f"(not in the ratio) fit() setup + evaluation per call: median {statistics.median(fixed):.4f} s")
    print(f"load average at end (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    met = median_ratio <= GOAL_RATIO
    verdict = "MET" if met else ("NOT MET" if low > GOAL_RATIO else "NOT MET (within noise: CI reaches the goal)")
    unstable = []
    for name, v in (("plain", plain_s), ("kdlab", kdlab_s)):
        slow = sum(t > OUTLIER_FACTOR * statistics.median(v) for t in v)
        spread = (quantile(v, 0.75) - quantile(v, 0.25)) / statistics.median(v)
        if slow:
            print(f"note: {slow} {name} epoch(s) took over {OUTLIER_FACTOR}x its median (machine stalls)")
        if slow > OUTLIER_SHARE * len(v) or spread > UNSTABLE_IQR:
            unstable.append(f"{name}: {slow}/{len(v)} stalled epochs, IQR {100 * spread:.0f}% of the median")
    if unstable:
        verdict += (" -- UNRELIABLE: timings unstable (" + "; ".join(unstable) + "); rerun on a quieter machine, "
                    "with more --repeats, or with --threads 1")
    print(f"goal: median per-pair ratio <= {GOAL_RATIO}: {verdict}")

    if args.profile:
        profile_runs(run_plain, run_kdlab)

    if args.json is not None:
        args.json.write_text(json.dumps({
            "plain_s_per_epoch": plain_s, "kdlab_s_per_epoch": kdlab_s, "ratios": ratios,
            "median_ratio": median_ratio, "ratio_ci95": [low, high], "goal": GOAL_RATIO, "met": met,
            "unstable": bool(unstable),
            "sanity_ok": first_ok and epoch_ok, "args": {k: str(v) for k, v in vars(args).items()},
            "header": header(args, torch.device(args.device)),
        }, indent=2))
    if not (first_ok and epoch_ok):
        return 2
    return 1 if (args.strict and not met) else 0


def profile_runs(run_plain, run_kdlab, top: int = 30) -> None:
    for name, fn in (("plain", run_plain), ("kdlab", run_kdlab)):
        profiler = cProfile.Profile()
        gc.collect()
        profiler.enable()
        fn()
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime")
        stats.print_stats(top)
        print(f"\n===== cProfile: {name} (sorted by own time, top {top}) =====")
        print(out.getvalue())


if __name__ == "__main__":
    sys.exit(main())
