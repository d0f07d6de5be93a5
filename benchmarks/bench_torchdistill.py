#!/usr/bin/env python
"""KD training throughput: kdlab's ``fit`` against torchdistill's ``DistillationBox``, in one process.

Setup (torchdistill needs torchvision, which kdlab's own venv does not hold)::

    bash benchmarks/setup_torchdistill.sh
    benchmarks/.venv-torchdistill/bin/python benchmarks/bench_torchdistill.py            # CPU: small defaults
    benchmarks/.venv-torchdistill/bin/python benchmarks/bench_torchdistill.py --device cuda --batch-size 1024 \
        --train-size 16384 --rounds 5

The same KD work on both sides
------------------------------
* models: kdlab's zoo ``resnet32x4`` teacher (eval mode, frozen, live: a forward every step) and
  ``resnet8x4`` student, CIFAR-shaped synthetic data (3×32×32, 100 classes); the same module
  instances and the same initial student weights (reloaded before every run);
* loss: Hinton KD, ``α·T²·KL + (1−α)·CE`` — kdlab's ``kd`` method (α weighs the soft term) and
  torchdistill's ``KDLoss`` (its ``alpha`` weighs the hard term, so it gets 1 − α) inside its
  ``WeightedSumLoss``, teacher and student outputs taken through its I/O-dict path ('.' output);
* optimiser: SGD, the same lr and momentum, no schedule; the same batch size, one epoch of
  ``--train-size`` samples (full batches only), fp32 eager on both sides.

How each side is driven
-----------------------
kdlab: ``fit`` with empty val/test splits (so it only trains: no teacher predictions, no
evaluation) on tensors already on the device — that is kdlab's data path. torchdistill: the loop of
its examples — ``pre_epoch_process``, then per batch of its ``DataLoader`` (over a ``TensorDataset``
of the same device tensors, ``num_workers=0``; its dataset wrapper adds the supp dict)
``forward_process`` and ``post_forward_process`` (backward, step, zero_grad). kdlab's timing
includes its whole ``fit`` call (optimiser construction and all); torchdistill's excludes building
the box. The arms alternate in every round; the ratio of medians and a bootstrap interval of the
per-round ratios are printed (benchutil).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=256, help="samples per timed epoch (whole batches)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each: one kdlab and one torchdistill epoch)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term (kdlab's convention)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def make_splits(args, device):
    from kdlab.data import Splits

    g = torch.Generator().manual_seed(0)
    n = args.train_size - args.train_size % args.batch_size
    if n == 0:
        raise SystemExit("--train-size must hold at least one --batch-size batch")
    x = torch.rand(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, args.classes, (n,), generator=g).to(device)
    empty = (x[:0], y[:0])
    return Splits(name="cifar-shaped", train=(x, y), val=empty, test=empty, num_classes=args.classes,
                  input_shape=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def run_kdlab(student, teacher, splits, args, device) -> float:
    from kdlab.config import MethodConfig, TrainConfig
    from kdlab.engine.build import build_method
    from kdlab.engine.loop import fit

    method = build_method(MethodConfig("kd", {"temperature": args.temperature, "alpha": args.alpha}),
                          student=student, teacher=teacher)
    train = TrainConfig(epochs=1, batch_size=args.batch_size, optimizer="sgd", lr=args.lr, momentum=0.9,
                        weight_decay=0.0, schedule="constant", selection="last", device=str(device), precision="fp32")
    benchutil.sync(device)
    t0 = time.perf_counter()
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0, run_dir=None,
        resume=False)
    benchutil.sync(device)
    return time.perf_counter() - t0


def torchdistill_box(student, teacher, splits, args, device):
    from torch.utils.data import RandomSampler, TensorDataset
    from torchdistill.core.distillation import DistillationBox

    dataset = TensorDataset(*splits.train)
    train_config = {
        "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": args.batch_size, "num_workers": 0, "drop_last": True},
                              "requires_supp": True},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "forward_hook": {"input": [], "output": []}, "wrapper": None,
                    "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [], "frozen_modules": [],
                    "forward_hook": {"input": [], "output": []}, "wrapper": None, "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": args.lr, "momentum": 0.9, "weight_decay": 0.0}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                "teacher_module_io": "output", "temperature": args.temperature, "alpha": 1.0 - args.alpha,
                "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    return DistillationBox(teacher, student, {"train": dataset}, train_config, device, None, False, 1)


def check_same_loss(student, teacher, box, splits, args) -> None:
    """The same KD work: kdlab's kd terms and torchdistill's criterion agree on one batch's outputs."""
    from kdlab.config import MethodConfig
    from kdlab.engine.build import build_method
    from kdlab.methods.base import Batch, Outputs

    x, y = splits.train[0][:args.batch_size], splits.train[1][:args.batch_size]
    with torch.no_grad():
        s, t = student(x), teacher(x)
    method = build_method(MethodConfig("kd", {"temperature": args.temperature, "alpha": args.alpha}),
                          student=student, teacher=teacher)
    ours = sum(method.loss_terms(Batch(inputs=x, labels=y), Outputs(s, {}), Outputs(t, {})).values())
    theirs = box.criterion({"student": {".": {"output": s}}, "teacher": {".": {"output": t}}}, None, y)
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"bench: the two KD losses differ on one batch (kdlab {float(ours):.6f}, torchdistill "
                         f"{float(theirs):.6f}); the arms would not do the same work")
    print(f"same loss on one batch: kdlab {float(ours):.6f} = torchdistill {float(theirs):.6f}")


def run_torchdistill(box, device) -> float:
    benchutil.sync(device)
    t0 = time.perf_counter()
    box.pre_epoch_process(epoch=0)
    for sample_batch, targets, supp_dict in box.train_data_loader:
        sample_batch, targets = sample_batch.to(device), targets.to(device)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
    benchutil.sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torchdistill
    except ImportError:
        raise SystemExit("torchdistill is not installed here: run `bash benchmarks/setup_torchdistill.sh` and use "
                         "benchmarks/.venv-torchdistill/bin/python") from None
    from kdlab.engine.build import build_model

    device = torch.device(args.device)
    splits = make_splits(args, device)
    torch.manual_seed(0)
    teacher = build_model(args.teacher, {}, splits).to(device).eval()
    student = build_model(args.student, {}, splits).to(device)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    box = torchdistill_box(student, teacher, splits, args, device)

    check_same_loss(student, teacher, box, splits, args)
    steps = len(splits.train[0]) // args.batch_size
    print(f"kdlab vs torchdistill {torchdistill.__version__}: KD, live teacher {args.teacher} -> student "
          f"{args.student}, CIFAR-shaped synthetic ({args.classes} classes), batch {args.batch_size}, "
          f"{steps} steps per epoch, SGD fp32 eager")
    for line in benchutil.machine_lines(device):
        print(line)
    print(f"load average {benchutil.load()} | rounds {args.rounds} (+{args.warmup} warm-up)")

    times = {"kdlab": [], "torchdistill": []}
    for round_index in range(args.warmup + args.rounds):
        order = ("kdlab", "torchdistill") if round_index % 2 == 0 else ("torchdistill", "kdlab")
        for arm in order:
            student.load_state_dict(initial)
            teacher.eval()
            seconds = (run_kdlab(student, teacher, splits, args, device) if arm == "kdlab"
                       else run_torchdistill(box, device))
            if round_index >= args.warmup:
                times[arm].append(seconds)
    samples = steps * args.batch_size
    print()
    print(f"{'arm':<13} {'median s/epoch':>15} {'samples/s':>11}")
    for arm, values in times.items():
        median = statistics.median(values)
        print(f"{arm:<13} {median:>15.4f} {samples / median:>11.1f}")
    ratios = [t / k for k, t in zip(times["kdlab"], times["torchdistill"])]
    low, high = benchutil.bootstrap_median_ci(ratios) if len(ratios) > 1 else (ratios[0], ratios[0])
    print(f"\nthroughput kdlab / torchdistill: median {statistics.median(ratios):.2f}x "
          f"(per-round ratios {', '.join(f'{r:.2f}' for r in ratios)}; bootstrap 95% CI of the median "
          f"[{low:.2f}, {high:.2f}], n={len(ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
