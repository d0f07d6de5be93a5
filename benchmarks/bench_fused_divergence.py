#!/usr/bin/env python
"""Peak memory and step time of the sequence divergence: unfused vs chunked vs fused with the output layer.

What is measured
----------------
One training-style step of the last layer and the loss of an LLM distillation step: student hidden
states ``(B, T, H)`` and an output-layer weight ``(V, H)`` that require grad, fixed teacher logits
``(B, T, V)``, a ``(B, T)`` mask with ``--prompt`` masked positions per sequence, then forward +
backward of

* ``unfused``: ``logits = hidden @ weight.T`` (a (B, T, V) tensor), then
  ``kdlab.losses.sequence.sequence_divergence(logits, teacher, mask, ...)``;
* ``chunked``: the same logits, the divergence with ``chunk_size=--chunk`` positions (activation
  checkpointing per chunk, the existing ``method.chunk_size``);
* ``fused``: ``kdlab.losses.fused.fused_sequence_divergence(hidden, weight, teacher, mask, ...)`` in
  chunks of ``--fused-chunk`` token rows (None: its default): no (B, T, V) student tensor.

The inputs are the hidden states, the weight, the teacher logits and the mask; the gradients of the
hidden states and of the weight (``V·H`` floats: at H = 576 and V = 131,072, 0.56× one (B, T, V)
float32 tensor) are outputs every path must produce, and are counted in the peak.

How
---
Memory: each configuration runs in a FRESH subprocess (no allocator cache or heap growth carries
over). The worker allocates its inputs in place, runs one tiny forward+backward of the same code
(lazy imports, first-call setup), then reads the peak: on CPU ``ru_maxrss`` growth over its value
after the inputs; with ``MALLOC_MMAP_THRESHOLD_=131072`` (every block >= 128 KiB its own mmap,
returned on free) so that RSS follows live tensor bytes rather than glibc's retained heap (see
bench_seq_chunking.py, whose method this is); on CUDA ``torch.cuda.max_memory_allocated`` growth
over the memory allocated after the inputs. The memory runs take one step each.

Time: the configurations are timed SIDE BY SIDE in one further fresh process: after a warm-up step
of each, ``--repeats`` rounds each run one step of every configuration in a rotating order; each
round gives a time ratio to the unfused step of the same round (so load changes hit both), reported
as the median ratio with a bootstrap 95% interval. The loss and the gradient norms of every
configuration are compared with the unfused ones (float32 rounding) as a check of the same work.
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

from benchutil import bootstrap_median_ci, load, machine_lines

CONFIGS = ("unfused", "chunked", "fused")
LIVE_MMAP_THRESHOLD = 131072
RTOL = 1e-3  # float32 sums in different orders over 1e8 terms


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocab", type=int, default=131072, help="V")
    p.add_argument("--batch", type=int, default=8, help="B")
    p.add_argument("--length", type=int, default=128, help="T")
    p.add_argument("--hidden", type=int, default=576, help="H (SmolLM2-135M's width)")
    p.add_argument("--quick", action="store_true", help="a smaller size: V 32768, B 4, T 64 (for a loaded machine)")
    p.add_argument("--prompt", type=int, default=16, help="masked prompt positions per sequence")
    p.add_argument("--divergence", default="jsd")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--chunk", type=int, default=16, help="chunked: positions per chunk (method.chunk_size)")
    p.add_argument("--fused-chunk", type=int, default=None, help="fused: token rows per chunk (default: its own)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                   help="configurations to run (unfused is always run: the ratios are to it)")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (each runs every configuration once)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", choices=CONFIGS + ("time",), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.batch, args.length = 32768, 4, 64
    args.configs = [c for c in CONFIGS if c in args.configs or c == "unfused"]
    return args


# --------------------------------------------------------------------------- worker


def _setup(args):
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    b, t, h, v = args.batch, args.length, args.hidden, args.vocab
    hidden = torch.empty(b, t, h, device=device).normal_(0.0, 1.0, generator=g).requires_grad_()
    weight = torch.empty(v, h, device=device).normal_(0.0, 2.0 / h ** 0.5, generator=g).requires_grad_()
    teacher = torch.empty(b, t, v, device=device).normal_(0.0, 2.0, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[:, :args.prompt] = False
    return hidden, weight, teacher, mask


def _step_fn(args, config, hidden, weight, teacher, mask):
    from kdlab.losses.fused import fused_sequence_divergence
    from kdlab.losses.sequence import sequence_divergence

    options = dict(divergence=args.divergence, beta=args.beta)

    def step():
        hidden.grad = weight.grad = None
        if config == "fused":
            loss = fused_sequence_divergence(hidden, weight, teacher, mask, chunk_size=args.fused_chunk, **options)
        else:
            logits = hidden @ weight.T
            loss = sequence_divergence(logits, teacher, mask, chunk_size=args.chunk if config == "chunked" else None,
                                       **options)
            del logits
        loss.backward()
        return float(loss)

    return step


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _warm_tiny(args, config):
    """First-call costs (imports, setup) of the same code path, on a tiny input."""
    small = argparse.Namespace(**{**vars(args), "batch": 1, "length": 4, "vocab": 8, "hidden": 4, "prompt": 1,
                                  "chunk": 2, "fused_chunk": 2})
    _step_fn(small, config, *_setup(small))()


def rss_now_kib() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def memory_worker(args) -> dict:
    import torch

    _warm_tiny(args, args.worker)
    tensors = _setup(args)
    step = _step_fn(args, args.worker, *tensors)
    _sync(args.device)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_peak, base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss_now_kib()
    t0 = time.perf_counter()
    loss = step()
    _sync(args.device)
    seconds = time.perf_counter() - t0
    peak = ((torch.cuda.max_memory_allocated() - base) if cuda
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_peak) * 1024)
    hidden, weight = tensors[:2]
    return {"config": args.worker, "peak_mib": peak / 2**20, "seconds": seconds, "loss": loss,
            "grad_hidden_norm": float(hidden.grad.double().norm()),
            "grad_weight_norm": float(weight.grad.double().norm()),
            "base_peak_mib": base_peak / 1024, "base_rss_mib": base_rss / 1024}


def time_worker(args) -> dict:
    configs = args.configs
    for config in configs:
        _warm_tiny(args, config)
    tensors = _setup(args)
    steps = {config: _step_fn(args, config, *tensors) for config in configs}
    for config in configs:  # one full-size warm-up step each
        steps[config]()
    rounds = []
    for index in range(args.repeats):
        shift = index % len(configs)
        order = configs[shift:] + configs[:shift]
        row = {}
        for config in order:
            _sync(args.device)
            t0 = time.perf_counter()
            steps[config]()
            _sync(args.device)
            row[config] = time.perf_counter() - t0
        rounds.append(row)
    return {"rounds": rounds}


# --------------------------------------------------------------------------- driver


def run_worker(args, config: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--vocab", str(args.vocab),
               "--batch", str(args.batch), "--length", str(args.length), "--hidden", str(args.hidden),
               "--prompt", str(args.prompt), "--divergence", args.divergence, "--beta", str(args.beta),
               "--chunk", str(args.chunk), "--repeats", str(args.repeats), "--device", args.device,
               "--seed", str(args.seed), "--configs", *args.configs]
    for flag, value in (("--fused-chunk", args.fused_chunk), ("--threads", args.threads)):
        if value is not None:
            command += [flag, str(value)]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if config != "time" and args.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = str(LIVE_MMAP_THRESHOLD)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench: worker {config} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(time_worker(args) if args.worker == "time" else memory_worker(args)))
        return 0
    from kdlab.losses.fused import default_chunk_rows

    rows = args.batch * args.length
    fused_rows = args.fused_chunk or default_chunk_rows(args.vocab, rows)
    one = rows * args.vocab * 4 / 2**20
    header = machine_lines(args.device, threads=args.threads) + [f"load average at start (1/5/15 min): {load()}"]
    header.append(f"setup: B {args.batch} T {args.length} H {args.hidden} V {args.vocab}, float32, prompt "
                  f"{args.prompt} masked, {args.divergence} beta {args.beta}; chunked: {args.chunk} positions "
                  f"(= {args.chunk * args.batch} tokens) per chunk; fused: {fused_rows} token rows per chunk")
    header.append(f"one (B, T, V) float32 tensor = {one:.0f} MiB; the weight gradient (V, H) = "
                  f"{args.vocab * args.hidden * 4 / 2**20:.0f} MiB ({args.hidden / rows:.2f}x) is in every peak")
    header.append("memory: " + ("torch.cuda.max_memory_allocated growth over the inputs" if args.device == "cuda"
                                else f"ru_maxrss growth over the inputs, MALLOC_MMAP_THRESHOLD_={LIVE_MMAP_THRESHOLD}")
                  + "; one fresh process per configuration")
    for line in header:
        print(line, flush=True)
    memory = {}
    for config in args.configs:
        memory[config] = run_worker(args, config)
        print(f"  memory run {config}: peak {memory[config]['peak_mib']:.0f} MiB "
              f"({memory[config]['peak_mib'] / one:.2f}x), one step {memory[config]['seconds']:.1f} s", flush=True)
    timing = run_worker(args, "time")["rounds"]
    base = memory["unfused"]
    same = True
    print()
    print(f"{'config':<8} {'peak MiB':>9} {'x (B,T,V)':>9} {'s/step':>7} {'time / unfused (95% CI)':>26} "
          f"{'loss':>10} {'rel diff':>8}")
    results = []
    for config in args.configs:
        r = memory[config]
        rel = max(abs(r[k] - base[k]) / max(abs(base[k]), 1e-30) for k in ("loss", "grad_hidden_norm",
                                                                           "grad_weight_norm"))
        same &= rel <= RTOL
        ratios = [row[config] / row["unfused"] for row in timing]
        median = statistics.median(ratios)
        low, high = bootstrap_median_ci(ratios) if len(ratios) > 1 else (median, median)
        seconds = statistics.median(row[config] for row in timing)
        results.append({**r, "x_btv": r["peak_mib"] / one, "step_seconds": seconds, "time_ratio": median,
                        "time_ratio_ci": [low, high], "rel_diff": rel})
        print(f"{config:<8} {r['peak_mib']:>9.0f} {r['peak_mib'] / one:>9.2f} {seconds:>7.2f} "
              f"{median:>12.2f} [{low:.2f}, {high:.2f}]{'':>5} {r['loss']:>10.6f} {rel:>8.1e}")
    fused = results[-1]
    if args.configs[-1] != "fused":
        return 0 if same else 2
    print(f"goal fused: peak <= 1.0x one (B,T,V) tensor: {'met' if fused['x_btv'] <= 1.0 else 'NOT met'} "
          f"({fused['x_btv']:.2f}x); time <= 1.3x unfused: {'met' if fused['time_ratio'] <= 1.3 else 'NOT met'} "
          f"({fused['time_ratio']:.2f}x)")
    print(f"sanity: loss and gradient norms agree with unfused (rtol {RTOL:g}): {'OK' if same else 'MISMATCH'}; "
          f"load average at end: {load()}")
    if args.json is not None:
        args.json.write_text(json.dumps({"header": header, "results": results, "rounds": timing,
                                         "same_work": same}, indent=2))
    return 0 if same else 2


if __name__ == "__main__":
    sys.exit(main())
