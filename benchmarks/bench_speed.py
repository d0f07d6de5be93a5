#!/usr/bin/env python
"""Training-step speed and peak memory: student-only vs KD (live teacher) vs KD (cached teacher) vs plain loops.

Suites (``--suite``):

* ``mnist1d``: MNIST-1D, cnn1d teacher (width 64) → cnn1d student (width 8), Adam;
* ``cifar``: CIFAR-shaped synthetic data (uniform noise in [0, 1], 3×32×32, 100 classes),
  resnet32x4 → resnet8x4, SGD with momentum; channels-last on every arm (``--no-channels-last``).

Arms, each under every ``--configs`` entry (``PRECISION:MODE``, e.g. ``fp32:eager bf16:compiled``):

* ``student``      kdlab ``fit`` with method ``scratch`` (no teacher): the floor;
* ``kd_live``      kdlab ``fit`` with method ``kd`` and the teacher run every step;
* ``kd_cached``    kdlab ``fit`` with ``kd`` and ``train.teacher_cache`` (built in the warm-up epoch);
* ``plain_student`` / ``plain_kd``  a hand-written loop of the same work (same weights, data order,
  optimiser, fused kernel, autocast, channels-last, ``torch.compile`` of both networks, KD loss
  written inline with ``torch.nn.functional``).

Timing: every arm trains ``--epochs`` epochs of ``--steps`` steps (the train split is cut to
``steps × batch`` samples). The first epoch is warm-up (compilation, cudnn autotuning, the cache
build); the last is dropped too (kdlab evaluates the tiny val split in it); the epochs between are
timed with a device sync at each epoch boundary, and the median ms/step is reported (over all
``--rounds``, which repeat every arm in alternating order). Peak memory:
CUDA ``max_memory_allocated`` (reset before each arm); on the CPU the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each arm) above its resident set at the
arm's start. Sanity: the plain and kdlab KD loops must give the same mean loss in the first epoch.

    python benchmarks/bench_speed.py --suite mnist1d --configs fp32:eager bf16:eager
    python benchmarks/bench_speed.py --suite cifar --device cuda --batch-size 1024 --configs fp32:eager bf16:compiled
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchutil import load, machine_lines, sync
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import Splits, build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.loop import fit
from kdlab.engine.seed import epoch_generator

ARMS = ("student", "kd_live", "kd_cached", "plain_student", "plain_kd")
TEMPERATURE, ALPHA = 4.0, 0.9
CACHED_GOAL, LIVE_GOAL = 0.95, 1.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("mnist1d", "cifar"), default="mnist1d")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 (mnist1d), 64 (cifar)")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=5, help="epochs per arm (the first and last are not timed)")
    p.add_argument("--configs", nargs="+", default=["fp32:eager", "bf16:eager"],
                   help="PRECISION:MODE entries, precision fp32|bf16|fp16, mode eager|compiled")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--rounds", type=int, default=1,
                   help="run every arm this many times per config, in alternating order (medians over all)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be >= 3 (one warm-up, at least one timed, one dropped)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    for entry in args.configs:
        precision, _, mode = entry.partition(":")
        if precision not in ("fp32", "bf16", "fp16") or mode not in ("eager", "compiled"):
            p.error(f"--configs: {entry!r} is not PRECISION:MODE (fp32|bf16|fp16 : eager|compiled)")
        if precision == "fp16" and args.device != "cuda":
            p.error("--configs: fp16 needs --device cuda")
    args.batch_size = args.batch_size or (128 if args.suite == "mnist1d" else 64)
    return args


# --------------------------------------------------------------------------- data and models


def suite_setup(args, cache_dir: Path):
    rows = args.steps * args.batch_size
    if args.suite == "mnist1d":
        splits = build_splits("mnist1d", {}, root=None, cache_dir=cache_dir, val_fraction=0.1, split_seed=0)
        x, y = splits.train
        if len(x) < rows:
            raise SystemExit(f"--steps x --batch-size = {rows} exceeds MNIST-1D's {len(x)} train samples")
        small = (splits.val[0][:64], splits.val[1][:64])
        splits = Splits(name="mnist1d", train=(x[:rows], y[:rows]), val=small, test=small,
                        num_classes=splits.num_classes, input_shape=splits.input_shape, mean=splits.mean,
                        std=splits.std)
        models = (("cnn1d", {"width": 64}), ("cnn1d", {"width": 8}))
        optimizer = dict(optimizer="adam", lr=0.01)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(rows + 64, 3, 32, 32, generator=g)
        y = torch.randint(0, 100, (rows + 64,), generator=g)
        small = (x[rows:], y[rows:])
        splits = Splits(name="cifar_shaped", train=(x[:rows], y[:rows]), val=small, test=small, num_classes=100,
                        input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.29,) * 3)
        models = (("resnet32x4", {}), ("resnet8x4", {}))
        optimizer = dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True)
    torch.manual_seed(0)
    teacher = build_model(*models[0], splits).eval()
    teacher.requires_grad_(False)
    torch.manual_seed(1)
    student = build_model(*models[1], splits)
    return splits, teacher, student, models, optimizer


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of one arm: CUDA max_memory_allocated, or the CPU process's peak RSS above its start."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.base = _status_kib("VmRSS")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(0, _status_kib("VmHWM") - self.base) / 1024


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- the arms


def kdlab_arm(arm, *, splits, teacher, student, args, precision, compiled, channels_last, optimizer, cache_dir,
              device):
    method = build_method(MethodConfig("scratch" if arm == "student" else "kd",
                                       {} if arm == "student" else {"temperature": TEMPERATURE, "alpha": ALPHA}),
                          student=student, teacher=None if arm == "student" else teacher)
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, schedule="constant", eval_every=args.epochs + 1,
                        checkpoint_every=args.epochs + 1, selection="last", device=str(device), precision=precision,
                        compile=compiled, channels_last=channels_last, fused_optimizer=True,
                        teacher_cache=arm == "kd_cached", **optimizer)
    marks, losses = [], []

    def on_epoch(epoch, metrics):
        sync(device)
        marks.append(time.perf_counter())
        losses.append(metrics["train/loss"])

    fit(student=student, method=method, teacher=None if arm == "student" else teacher, splits=splits, train=train,
        seed=0, run_dir=None, resume=False, on_epoch=on_epoch, teacher_cache_dir=cache_dir)
    return [(b - a) / args.steps for a, b in zip(marks[:-2], marks[1:-1])], losses[0]


def plain_arm(arm, *, splits, teacher, student, args, precision, compiled, channels_last, optimizer, device):
    """The same work written out by hand: resident tensors, index batches, autocast, inline KD loss."""
    x, y = (t.to(device) for t in splits.train)
    student.to(device).train()
    teacher.to(device).eval()
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    kind = optimizer["optimizer"]
    if kind == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=optimizer["lr"], momentum=optimizer["momentum"],
                              nesterov=optimizer["nesterov"], fused=True)
    else:
        opt = torch.optim.Adam(student.parameters(), lr=optimizer["lr"], fused=True)
    s_net = torch.compile(student) if compiled else student
    t_net = torch.compile(teacher) if compiled else teacher
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else None)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    soft_w, hard_w = ALPHA * TEMPERATURE ** 2, 1.0 - ALPHA
    marks, losses = [], []
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=epoch_generator(0, epoch)).to(device)
        total = torch.zeros((), device=device)
        for i in range(args.steps):
            index = order[i * args.batch_size:(i + 1) * args.batch_size]
            inputs, labels = x[index], y[index]
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
                logits = s_net(inputs)
                if arm == "plain_kd":
                    with torch.no_grad():
                        t_logits = t_net(inputs)
                    soft = F.kl_div(F.log_softmax(logits.float() / TEMPERATURE, -1),
                                    F.log_softmax(t_logits.float() / TEMPERATURE, -1),
                                    reduction="batchmean", log_target=True)
                    loss = soft_w * soft + hard_w * F.cross_entropy(logits.float(), labels)
                else:
                    loss = F.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total += loss.detach()
        losses.append(total.item() / args.steps)
        sync(device)
        marks.append(time.perf_counter())
    return [(b - a) / args.steps for a, b in zip(marks[:-2], marks[1:-1])], losses[0]


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both loops; convolution algorithms autotuned in the warm-up
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-speed-") as tmp:
        splits, teacher, student0, models, optimizer = suite_setup(args, Path(tmp) / "data")
        channels_last = args.suite == "cifar" and not args.no_channels_last
        init = copy.deepcopy(student0.state_dict())
        lines = machine_lines(device) + [f"load average at start (1/5/15 min): {load()}"]
        lines.append(f"suite {args.suite}: teacher {models[0][0]} {models[0][1] or ''} -> student {models[1][0]} "
                     f"{models[1][1] or ''} | batch {args.batch_size} | {args.steps} steps/epoch x {args.epochs} "
                     f"epochs (timed: {args.epochs - 2}) | {optimizer['optimizer']} | channels-last "
                     f"{'on' if channels_last else 'off'} | fused optimiser on")
        lines.append("memory: " + ("CUDA max_memory_allocated per arm" if device.type == "cuda" else
                                   "CPU peak RSS above the arm's start (VmHWM reset via /proc/self/clear_refs)"))
        for line in lines:
            print(line)
        sys.stdout.flush()
        memory = PeakMemory(device)
        results = {}
        for entry in args.configs:
            precision, _, mode = entry.partition(":")
            # Rounds alternate the arms' order (forward, backward, ...) so a drift of the machine's load
            # biases no arm; a later round of a compiled arm reuses nothing but the on-disk inductor cache.
            runs = [arm for r in range(args.rounds) for arm in (args.arms if r % 2 == 0 else args.arms[::-1])]
            for arm in runs:
                student = copy.deepcopy(student0)
                student.load_state_dict(init)
                common = dict(splits=splits, teacher=teacher, student=student, args=args, precision=precision,
                              compiled=mode == "compiled", channels_last=channels_last, optimizer=optimizer,
                              device=device)
                if mode == "compiled":
                    # Each arm compiles fresh modules; without a reset their guards pile up in dynamo's
                    # per-code cache until it falls back to eager (recompile_limit). The on-disk
                    # inductor cache keeps the second compile of the same graph cheap.
                    torch._dynamo.reset()
                memory.start()
                if arm.startswith("plain"):
                    times, first_loss = plain_arm(arm, **common)
                else:
                    times, first_loss = kdlab_arm(arm, cache_dir=Path(tmp) / "teacher_cache", **common)
                entry_result = results.setdefault((entry, arm), {"spread": [], "mem": 0.0, "loss": first_loss})
                entry_result["spread"] += times
                entry_result["ms"] = 1000 * statistics.median(entry_result["spread"])
                entry_result["mem"] = max(entry_result["mem"], memory.peak_mib())
                print(f"  {entry:<14} {arm:<14} {1000 * statistics.median(times):9.2f} ms/step  "
                      f"peak {memory.peak_mib():8.1f} MiB  first-epoch loss {first_loss:.4f}")
                sys.stdout.flush()
                del student
        print(f"load average at end (1/5/15 min): {load()}")
        print()
        print(table(results, args))
    return 0


def table(results, args) -> str:
    rows = ["| config | arm | ms/step | min–max ms | × student-only throughput | × best plain KD time | peak MiB |",
            "|---|---|---:|---:|---:|---:|---:|"]
    plain_kd = [v["ms"] for (entry, arm), v in results.items() if arm == "plain_kd"]
    best_plain = min(plain_kd) if plain_kd else math.nan
    verdicts = []
    for entry in args.configs:
        floor = results.get((entry, "student"), {}).get("ms", math.nan)
        for arm in args.arms:
            v = results[(entry, arm)]
            rows.append(f"| {entry} | {arm} | {v['ms']:.2f} | {1000 * min(v['spread']):.2f}–"
                        f"{1000 * max(v['spread']):.2f} | {floor / v['ms']:.3f} | {v['ms'] / best_plain:.3f} | "
                        f"{v['mem']:.1f} |")
        if (entry, "kd_cached") in results and not math.isnan(floor):
            ratio = floor / results[(entry, "kd_cached")]["ms"]
            verdicts.append(f"{entry}: cached KD throughput = {ratio:.3f} x student-only (goal >= {CACHED_GOAL}): "
                            f"{'MET' if ratio >= CACHED_GOAL else 'NOT MET'}")
        if (entry, "kd_live") in results and (entry, "plain_kd") in results:
            live, plain = results[(entry, "kd_live")], results[(entry, "plain_kd")]
            verdicts.append(f"{entry}: kdlab live KD / plain KD (same config) = {live['ms'] / plain['ms']:.3f}; "
                            f"first-epoch loss kdlab {live['loss']:.5f} plain {plain['loss']:.5f}")
    lives = [v["ms"] for (entry, arm), v in results.items() if arm == "kd_live"]
    if lives and plain_kd:
        ratio = min(lives) / best_plain
        verdicts.append(f"best kdlab live KD / best plain KD = {ratio:.3f} (goal <= {LIVE_GOAL}): "
                        f"{'MET' if ratio <= LIVE_GOAL else 'NOT MET'}")
    return "\n".join(rows + [""] + verdicts)


if __name__ == "__main__":
    sys.exit(main())
