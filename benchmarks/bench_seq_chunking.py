#!/usr/bin/env python
"""Peak memory of ``sequence_divergence`` forward+backward, with and without sequence chunking.

What is measured
----------------
One training-style call: student logits ``(B, T, V)`` that require grad and
fixed teacher logits of the same shape (float32 by default), a ``(B, T)`` mask
with a masked prompt of ``--prompt`` positions per sequence, then
``sequence_divergence(..., divergence="jsd", beta=0.5, chunk_size=c).backward()``.
The configurations are ``chunk_size=None`` (unchunked: the softmaxes, log ratios
and mixtures for all ``B·T·V`` entries are saved for backward) and each
``--chunk`` size (each chunk under non-reentrant activation checkpointing: the
backward recomputes one chunk at a time).

How
---
Each configuration runs in fresh subprocesses, so no allocator cache or heap
growth from one configuration shows up in another. The worker allocates the
inputs in place (``empty().normal_()``, no temporary) and, before the
baseline, runs one forward+backward of the same configuration on a tiny input
to take the one-time costs (lazy imports, first-call setup: tens of MiB of RSS
for checkpointing) out of the measurement. Then:

* on CPU it reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's
  peak resident set so far) before and after the forward+backward runs: the
  difference is the peak memory the call adds on top of its inputs (it
  includes the gradient of the student logits, ``B·T·V`` floats, which any
  method must hold). ``ru_maxrss`` is a high-water mark: a peak before the
  baseline would hide part of a smaller later one, so the baseline peak and
  the resident set at the baseline are printed; they should be equal.
  glibc's malloc serves blocks below a *dynamic* mmap threshold (it rises up to
  32 MiB after large frees) from its heap and keeps freed heap memory resident,
  so the default-allocator RSS overstates the live memory of configurations
  that churn through medium-sized blocks (the chunks). Each CPU configuration
  is therefore run twice: once with the default allocator (the "glibc" column
  and the time), once, one step only, with ``MALLOC_MMAP_THRESHOLD_=131072``
  (every block >= 128 KiB is its own mmap, returned on free: the "live"
  column, close to the peak of live tensor bytes; slower, not timed).
* on CUDA it reads ``torch.cuda.max_memory_allocated()`` minus the memory
  allocated at the baseline (after ``reset_peak_memory_stats``): live tensor
  bytes, independent of the caching allocator's reserve.

The time is the median over ``--repeats`` of one forward+backward (synchronised
on CUDA). The loss and the gradient norm of every configuration are compared
with the unchunked one (they must agree up to float32 rounding) as a check
that the same work is done.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from benchutil import load, machine_lines

LOSS_RTOL = 1e-4  # float32 sums in a different order (per-chunk pieces)
LIVE_MMAP_THRESHOLD = 131072  # bytes: glibc's default initial threshold, pinned (no dynamic rise)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000, help="V")
    p.add_argument("--batch", type=int, default=4, help="B")
    p.add_argument("--length", type=int, default=256, help="T (positions after the shift)")
    p.add_argument("--chunk", type=int, nargs="+", default=[16, 64], help="chunk sizes to compare with unchunked")
    p.add_argument("--prompt", type=int, default=32, help="masked prompt positions at the start of each sequence")
    p.add_argument("--divergence", default="jsd")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the logits (computation is at least float32)")
    p.add_argument("--repeats", type=int, default=3, help="forward+backward runs per configuration")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", type=int, default=None, metavar="CHUNK",
                   help=argparse.SUPPRESS)  # internal: run one configuration (0 = unchunked), print JSON
    args = p.parse_args(argv)
    if min(args.vocab, args.batch, args.length, args.repeats, *args.chunk) < 1 or args.prompt < 0:
        p.error("--vocab, --batch, --length, --repeats and --chunk must be >= 1, --prompt >= 0")
    return args


# --------------------------------------------------------------------------- worker (one configuration)


def rss_now_kib() -> int:
    """Current resident set in KiB (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def worker(args) -> dict:
    import torch

    from kdlab.losses.sequence import sequence_divergence

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    chunk_size = args.worker or None
    generator = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.batch, args.length, args.vocab)
    student = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 2.0, generator=generator)
    teacher = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 2.0, generator=generator)
    student.requires_grad_()
    mask = torch.ones(args.batch, args.length, dtype=torch.bool, device=device)
    mask[:, :args.prompt] = False

    def step():
        student.grad = None
        loss = sequence_divergence(student, teacher, mask, divergence=args.divergence, beta=args.beta,
                                   chunk_size=chunk_size)
        loss.backward()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # One-time costs out of the baseline: lazy imports and first-call setup of the same code path
    # (checkpointing pulls in modules worth tens of MiB of RSS), on a tiny input.
    tiny = torch.zeros(1, 4, 8, device=device, dtype=dtype, requires_grad=True)
    sequence_divergence(tiny, tiny.detach(), None, divergence=args.divergence, beta=args.beta,
                        chunk_size=chunk_size and 2).backward()
    del tiny
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_bytes = torch.cuda.memory_allocated(device)
    base_peak_kib, base_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss_now_kib()
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loss = step()
        sync()
        seconds.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated(device) - base_bytes) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_peak_kib) / 1024
    return {
        "chunk": chunk_size, "peak_mib": peak_mib, "seconds": seconds, "loss": float(loss),
        "grad_norm": float(student.grad.double().norm()),
        "base_peak_mib": base_peak_kib / 1024, "base_rss_mib": base_rss_kib / 1024,
        "inputs_mib": 2 * student.numel() * student.element_size() / 2**20,
    }


# --------------------------------------------------------------------------- driver


def header(args) -> list[str]:
    return machine_lines(args.device, threads=args.threads) + [f"load average at start (1/5/15 min): {load()}"]


def run_config(args, chunk: int, *, live: bool = False) -> dict:
    """One configuration in a fresh subprocess; ``live``: one step under a fixed 128 KiB mmap threshold."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(chunk),
               "--vocab", str(args.vocab), "--batch", str(args.batch), "--length", str(args.length),
               "--prompt", str(args.prompt), "--divergence", args.divergence, "--beta", str(args.beta),
               "--dtype", args.dtype, "--repeats", str(1 if live else args.repeats), "--device", args.device,
               "--seed", str(args.seed)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = str(LIVE_MMAP_THRESHOLD)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench: worker for chunk {chunk or None} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda: CUDA is not available here")
    cpu = args.device == "cpu"
    for line in header(args):
        print(line)
    elements = args.batch * args.length * args.vocab
    print(f"setup: B {args.batch} T {args.length} V {args.vocab} ({elements / 1e6:.1f}M logits per model, "
          f"{args.dtype}), prompt {args.prompt} masked, {args.divergence} beta {args.beta}, "
          f"{args.repeats} forward+backward run(s) per configuration, fresh subprocesses")
    if cpu:
        print("memory: ru_maxrss growth over the inputs; 'glibc' = default malloc (also timed), 'live' = "
              f"MALLOC_MMAP_THRESHOLD_={LIVE_MMAP_THRESHOLD} (close to live tensor bytes)")
    else:
        print("memory: torch.cuda.max_memory_allocated growth over the inputs")
    print(f"one (B, T, V) float32 tensor is {elements * 4 / 2**20:.0f} MiB (the student gradient is one of them)")
    sys.stdout.flush()

    results = []
    for chunk in [0, *args.chunk]:
        result = run_config(args, chunk)
        if cpu:
            result["live"] = run_config(args, chunk, live=True)
        results.append(result)
    base = results[0]
    print()
    columns = f"{'config':<12} {'glibc MiB' if cpu else 'peak MiB':>10} {'ratio':>6}"
    if cpu:
        columns += f" {'live MiB':>9} {'ratio':>6}"
    print(columns + f" {'s/step':>8} {'loss':>10} {'rel diff':>9} {'host base peak/RSS MiB':>23}")
    same_work = True
    for r in results:
        name = "unchunked" if r["chunk"] is None else f"chunk {r['chunk']}"
        checks = [r] + ([r["live"]] if cpu else [])
        rel = max(abs(c["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-30) for c in checks)
        grad_rel = max(abs(c["grad_norm"] - base["grad_norm"]) / max(base["grad_norm"], 1e-30) for c in checks)
        same_work &= rel <= LOSS_RTOL and grad_rel <= LOSS_RTOL
        line = f"{name:<12} {r['peak_mib']:>10.1f} {r['peak_mib'] / base['peak_mib']:>6.3f}"
        if cpu:
            line += f" {r['live']['peak_mib']:>9.1f} {r['live']['peak_mib'] / base['live']['peak_mib']:>6.3f}"
        print(line + f" {statistics.median(r['seconds']):>8.3f} {r['loss']:>10.6f} {max(rel, grad_rel):>9.1e} "
                     f"{r['base_peak_mib']:>13.0f}/{r['base_rss_mib']:<8.0f}")
    print(f"sanity: loss and gradient norm agree with unchunked (rtol {LOSS_RTOL:g}): "
          f"{'OK' if same_work else 'MISMATCH'}")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "header": header(args), "results": results, "same_work": same_work},
                                        indent=2))
    return 0 if same_work else 2


if __name__ == "__main__":
    sys.exit(main())
