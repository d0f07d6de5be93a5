#!/usr/bin/env python
"""Wall time of one GKD training step, split into on-policy generation, teacher forward and student update.

What is measured
----------------
One optimiser step of method ``gkd`` (``kdlab.methods.gkd``) on the
``arithmetic`` task, done with the same calls, in the same order, as
``kdlab.engine.loop.fit``'s step (the method's ``set_progress`` and
``make_batch``, the teacher forward under ``no_grad``, the student forward,
``loss_terms``, ``zero_grad``/``backward``/``step``), with a clock read
between the phases (on CUDA after ``torch.cuda.synchronize()``):

1. ``generation``: ``method.make_batch``. With λ = 1 (``on_policy_fraction``)
   every batch is on-policy: the student samples the responses to the batch's
   prompts (``kdlab.seq.sampling.generate`` with the KV cache, temperature 1,
   up to ``max_new_tokens`` = longest reference response + 4) and the result is
   packed into the canonical layout. With λ = 0 it only wraps the data batch.
2. ``teacher``: the teacher forward on the (generated) sequences, ``no_grad``.
3. ``student update``: the student forward, the divergence (``loss_terms``:
   generalised JSD, β 0.5, per-sequence mean), ``zero_grad`` + ``backward``,
   and ``optimizer.step()`` (Adam); shown as one phase and as its four parts.

Not timed: the loop's per-step bookkeeping (loss-term stacking, NaN checks,
LR schedule step) and the batch indexing, which are the same for every method.

Setup
-----
Teacher and student are freshly initialised TinyGPTs (the compute does not
depend on the weights), except in the generation phase: an untrained student
samples EOS at random (about 1/V per token), so nearly every batch has a row
that runs all ``max_new_tokens`` decoding steps (the batch decodes until its
last row stops) and the mean response is long — the cost of early training; a
trained student stops after its answer. The mean response length, the longest
response per batch (= decoding steps) and the sequence width per arm are
printed so the cost can be scaled.

Each ``--lambdas`` value is one arm with its own copy of the student (same
initial weights) and its own optimiser; the arms see the same batch at each
step (one seeded shuffle) and run interleaved, the order rotating every step,
so load drift on a shared machine biases none of them. ``--warmup`` steps per
arm are untimed. Reported per arm: median ms per phase (and IQR), and each
phase's share of the step (median over steps of phase / step time; the medians
need not add up to 100%). With λ = 1 and λ = 0 both present, the per-step
ratio of the two step times (paired by step) gives the on-policy overhead,
median with a bootstrap 95% interval.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import operator
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchutil import bootstrap_median_ci, load, machine_lines, quantile, sync

from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.optim import build_optimizer
from kdlab.data.sequence import prompt_lengths
from kdlab.methods.base import Batch, Outputs
from kdlab.seq.evaluate import max_new_tokens

PHASES = ("generation", "teacher", "student_update")
PARTS = ("student_forward", "divergence", "backward", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--teacher-heads", type=int, default=4)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-width", type=int, default=128)
    p.add_argument("--student-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 0.0],
                   help="on_policy_fraction of each arm (1 = every batch sampled by the student, 0 = none)")
    p.add_argument("--divergence", default="jsd")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--num-train", type=int, default=4000, help="arithmetic examples drawn (90%% train)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.num_train, args.teacher_width, args.student_width) < 1 or args.warmup < 0:
        p.error("--batch, --steps, --num-train and the widths must be >= 1, --warmup >= 0")
    if any(not 0.0 <= lam <= 1.0 for lam in args.lambdas):
        p.error("--lambdas must lie in [0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    return args


# --------------------------------------------------------------------------- one arm


class Arm:
    """One value of λ: its own student copy, GKD method and Adam optimiser."""

    def __init__(self, lam: float, student, teacher, splits, args, device):
        self.lam = lam
        self.student = student.to(device)
        self.method = build_method(
            MethodConfig(name="gkd", options={"on_policy_fraction": lam, "divergence": args.divergence,
                                              "beta": args.beta}),
            student=self.student, teacher=teacher, sequence=splits.sequence).to(device)
        self.teacher = teacher
        params = list(self.student.parameters()) + list(self.method.parameters())
        self.optimizer = build_optimizer(params, TrainConfig(optimizer="adam", lr=args.lr))
        self.device = device
        self.times: dict[str, list[float]] = {k: [] for k in ("step", *PHASES, *PARTS)}
        self.sources: list[str] = []
        self.response_tokens: list[float] = []
        self.widths: list[int] = []
        self.longest_responses: list[int] = []  # decoding steps run when the batch is on-policy
        self.max_new_tokens: list[int] = []
        self.losses: list[float] = []

    def step(self, step: int, total: int, inputs, labels, index, *, record: bool) -> None:
        device, method, student = self.device, self.method, self.student
        student.train()
        method.train()
        sync(device)
        t0 = time.perf_counter()
        method.set_progress(step, total)
        batch = method.make_batch(Batch(inputs=inputs, labels=labels, indices=index))
        sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            teacher_logits = self.teacher(batch.inputs)
        teacher_out = Outputs(teacher_logits, {})
        sync(device)
        t2 = time.perf_counter()
        student_out = Outputs(student(batch.inputs), {})
        sync(device)
        t3 = time.perf_counter()
        terms = method.loss_terms(batch, student_out, teacher_out)
        loss = functools.reduce(operator.add, terms.values())
        sync(device)
        t4 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t5 = time.perf_counter()
        self.optimizer.step()
        sync(device)
        t6 = time.perf_counter()
        if not record:
            return
        for name, value in (("step", t6 - t0), ("generation", t1 - t0), ("teacher", t2 - t1),
                            ("student_update", t6 - t2), ("student_forward", t3 - t2), ("divergence", t4 - t3),
                            ("backward", t5 - t4), ("optimizer", t6 - t5)):
            self.times[name].append(value)
        self.sources.append(method.last_source)
        self.response_tokens.append(float((batch.labels != -100).sum(dim=1).float().mean()))
        self.widths.append(int(batch.inputs.shape[1]))
        self.longest_responses.append(int((batch.labels != -100).sum(dim=1).max()))
        self.max_new_tokens.append(max_new_tokens(method.sequence, int(prompt_lengths(labels).max())))
        self.losses.append(float(loss.detach()))

    def summary(self) -> dict:
        step = self.times["step"]
        rows = {}
        for name in (*PHASES, *PARTS):
            values = self.times[name]
            rows[name] = {"median_ms": 1e3 * statistics.median(values), "q25_ms": 1e3 * quantile(values, 0.25),
                          "q75_ms": 1e3 * quantile(values, 0.75),
                          "share": statistics.median(v / s for v, s in zip(values, step))}
        return {
            "lambda": self.lam, "steps": len(step),
            "step_median_ms": 1e3 * statistics.median(step), "step_q25_ms": 1e3 * quantile(step, 0.25),
            "step_q75_ms": 1e3 * quantile(step, 0.75), "phases": rows,
            "sources": {s: self.sources.count(s) for s in sorted(set(self.sources))},
            "mean_response_tokens": statistics.mean(self.response_tokens),
            "mean_width": statistics.mean(self.widths),
            "mean_longest_response": statistics.mean(self.longest_responses),
            "mean_max_new_tokens": statistics.mean(self.max_new_tokens), "losses": self.losses,
            "step_ms": [1e3 * v for v in step],
        }


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start_load = load()
    for line in machine_lines(device):
        print(line)
    print(f"load average at start (1/5/15 min): {start_load}")
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-") as cache_dir:
        splits = build_splits("arithmetic", {"num_train": args.num_train}, root=None, cache_dir=Path(cache_dir),
                              val_fraction=0.1, split_seed=0)
    info = splits.sequence
    torch.manual_seed(args.seed)
    teacher = build_model("tinygpt", {"layers": args.teacher_layers, "width": args.teacher_width,
                                      "heads": args.teacher_heads}, splits).to(device).eval()
    teacher.requires_grad_(False)
    student = build_model("tinygpt", {"layers": args.student_layers, "width": args.student_width,
                                      "heads": args.student_heads}, splits)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    x_train, y_train = (t.to(device) for t in splits.train)
    print(f"setup: arithmetic ({len(x_train)} train sequences, width {x_train.shape[1]}, context "
          f"{info.context_length}, vocab {splits.num_classes}, longest reference response "
          f"{info.max_response_tokens} tokens incl. EOS); teacher tinygpt {args.teacher_layers}x{args.teacher_width} "
          f"({count(teacher) / 1e6:.2f}M params), student tinygpt {args.student_layers}x{args.student_width} "
          f"({count(student) / 1e6:.2f}M params); batch {args.batch}; gkd {args.divergence} beta {args.beta}, "
          f"sampling temperature 1; Adam lr {args.lr}; lambdas {args.lambdas}; {args.warmup} warm-up + "
          f"{args.steps} timed steps per arm, arms interleaved (rotating order)")
    sys.stdout.flush()

    # One rng state for every arm's method: GKD's schedule/sampling generators derive from torch.initial_seed().
    arms = [Arm(lam, copy.deepcopy(student), teacher, splits, args, device) for lam in args.lambdas]
    shuffle = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x_train), generator=shuffle)
    total = args.warmup + args.steps
    for s in range(total):
        start = (s * args.batch) % max(1, len(x_train) - args.batch + 1)
        index = order[start:start + args.batch].to(device)
        inputs, labels = x_train[index], y_train[index]
        rotation = s % len(arms)
        gc.collect()
        for arm in arms[rotation:] + arms[:rotation]:
            arm.step(s, total, inputs, labels, index, record=s >= args.warmup)
    end_load = load()

    summaries = [arm.summary() for arm in arms]
    labels = {"generation": "(1) generation", "teacher": "(2) teacher forward",
              "student_update": "(3) student update", "student_forward": "    student forward",
              "divergence": "    divergence (jsd)", "backward": "    backward", "optimizer": "    optimizer step"}
    for summary in summaries:
        print()
        print(f"lambda = {summary['lambda']:g}: step median {summary['step_median_ms']:.1f} ms "
              f"(IQR {summary['step_q25_ms']:.1f}-{summary['step_q75_ms']:.1f}), {summary['steps']} steps; "
              f"sources {summary['sources']}; mean response {summary['mean_response_tokens']:.1f} tokens, "
              + (f"longest in batch {summary['mean_longest_response']:.1f} = decoding steps (max_new_tokens "
                 f"{summary['mean_max_new_tokens']:.1f}), " if "student" in summary["sources"] else "")
              + f"mean sequence width {summary['mean_width']:.1f}")
        print(f"  {'phase':<24} {'median ms':>10} {'IQR ms':>17} {'share':>7}")
        for name in (*PHASES, *PARTS):
            row = summary["phases"][name]
            print(f"  {labels[name]:<24} {row['median_ms']:>10.1f} {row['q25_ms']:>8.1f}-{row['q75_ms']:<8.1f} "
                  f"{100 * row['share']:>6.1f}%")
    overhead = None
    by_lambda = {s["lambda"]: s for s in summaries}
    if 1.0 in by_lambda and 0.0 in by_lambda:
        ratios = [a / b for a, b in zip(by_lambda[1.0]["step_ms"], by_lambda[0.0]["step_ms"])]
        low, high = bootstrap_median_ci(ratios)
        overhead = {"median": statistics.median(ratios), "ci95": [low, high], "n": len(ratios)}
        print()
        print(f"step time lambda 1 / lambda 0 (paired by step): median {overhead['median']:.2f}x "
              f"(bootstrap 95% CI {low:.2f}-{high:.2f}, n {len(ratios)})")
    print(f"load average at end (1/5/15 min): {end_load}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "header": machine_lines(device),
            "load_start": start_load, "load_end": end_load, "arms": summaries, "lambda1_over_lambda0": overhead,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
