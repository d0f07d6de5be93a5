#!/usr/bin/env python
"""Generated tokens/s of ``kdlab.seq.sampling.generate`` with and without the KV cache.

What is compared
----------------
A (``cache``): ``generate(..., use_cache=True)``: one forward over the prompts
(prefill), then one forward of ONE new token per step over the cached keys and
values. B (``no cache``): ``generate(..., use_cache=False)``, the reference
path: every step recomputes the forward over the whole sequence so far.
Both arms get the same TinyGPT (one freshly initialised model: its speed does
not depend on its weights), the same prompts and the same decoding options.

The work is identical in both arms
----------------------------------
* Greedy decoding (``temperature=0``): no random numbers, so the two arms must
  emit exactly the same tokens. Every timed run's tokens are compared with the
  other arm's; a mismatch is reported (float rounding differs between a cached
  and a full forward, so a near-tie in the argmax could in principle flip one
  token; the verdict line says whether any did).
* No row ever stops early: ``eos_id`` is set to -1, an id that ``argmax`` over
  the vocabulary (ids 0..V-1) can never return, so every row generates exactly
  ``max_new_tokens`` tokens and the loop never exits early. The script checks
  that every row's ``response_lengths`` equals ``max_new_tokens``. Both arms
  therefore generate ``batch x length`` tokens per run.
* Prompts: random token ids (2..V-1, i.e. no pad/EOS), lengths drawn uniformly
  in ``[prompt // 2, prompt]`` per row (seeded), so the left-padding mask path
  that GKD's batched sampling takes is exercised. The model's context is
  ``prompt + max(lengths)``.

Timing and statistics
---------------------
The wall time of one whole ``generate`` call (prefill, decoding steps, packing
into the canonical layout) is measured; on CUDA the device is synchronised
before each clock read. tokens/s = batch x length / seconds. Per configuration
(length, batch): one untimed warm-up pair, then ``--repeats`` timed pairs whose
order alternates (cache first, then no-cache first, ...) so a drift of the
machine's load biases neither arm. Reported: median tokens/s per arm, and the
speed-up cache/no-cache as the median of the per-pair ratios with a bootstrap
95% interval (and the ratio of medians).

The uncached arm costs O(length^2) forwards per run; configurations whose
uncached arm would process more than ``--max-uncached-positions`` token
positions (batch x sum over steps of the sequence length) are skipped with a
note and only the cached arm is timed for them (the default skips the
uncached arm only at batch 32 x 256 tokens, minutes per run on one core of
the 2-core VM this was written on).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchutil import bootstrap_median_ci, load, machine_lines, sync

from kdlab.seq.sampling import generate
from kdlab.seq.tinygpt import TinyGPT

NEVER_EOS = -1  # argmax over the vocabulary returns 0..V-1: no row ever emits it


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=51, help="vocabulary size (51 = kdlab's character tokenizer)")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256], help="new tokens generated per row")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt", type=int, default=16, help="longest prompt (lengths uniform in [prompt//2, prompt])")
    p.add_argument("--repeats", type=int, default=5, help="timed (cache, no-cache) pairs per configuration")
    p.add_argument("--max-uncached-positions", type=float, default=2e5,
                   help="skip configurations whose uncached run processes more token positions than this")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if min(args.layers + 1, args.width, args.heads, args.vocab - 2, args.prompt, args.repeats, *args.lengths,
           *args.batch_sizes) < 1:
        p.error("--width, --heads, --prompt, --repeats, --lengths and --batch-sizes must be >= 1, --layers >= 0, "
                "--vocab >= 3")
    if args.width % args.heads:
        p.error("--heads must divide --width")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    return args


# --------------------------------------------------------------------------- one configuration


def make_prompts(batch: int, longest: int, vocab: int, seed: int, device: torch.device):
    generator = torch.Generator().manual_seed(seed)
    low = max(1, longest // 2)
    lengths = torch.randint(low, longest + 1, (batch,), generator=generator)
    prompts = torch.randint(2, vocab, (batch, longest), generator=generator)
    prompts = torch.where(torch.arange(longest)[None, :] < lengths[:, None], prompts, torch.zeros_like(prompts))
    return prompts.to(device), lengths.to(device)


def uncached_positions(lengths: torch.Tensor, new_tokens: int) -> int:
    """Token positions the uncached arm runs through the model: W + (W+1) + ... per row, W = the padded width."""
    width = int(lengths.max())
    return len(lengths) * sum(width + i for i in range(new_tokens))


def timed_generate(model, prompts, lengths, *, new_tokens: int, use_cache: bool, device: torch.device):
    gc.collect()
    sync(device)
    start = time.perf_counter()
    out = generate(model, prompts, lengths, max_new_tokens=new_tokens, eos_id=NEVER_EOS, pad_id=0,
                   temperature=0.0, use_cache=use_cache)
    sync(device)
    seconds = time.perf_counter() - start
    if not bool((out.response_lengths == new_tokens).all()):
        raise SystemExit(f"bench: a row stopped before {new_tokens} tokens (response lengths "
                         f"{out.response_lengths.tolist()}); the no-EOS setup is broken")
    return seconds, out.tokens


def run_config(model, args, device, new_tokens: int, batch: int, *, cache_only: bool = False) -> dict:
    prompts, lengths = make_prompts(batch, args.prompt, args.vocab, args.seed + 1000 * batch + new_tokens, device)
    generated = batch * new_tokens
    times = {"cache": [], "no_cache": []}
    mismatched_tokens = 0
    for r in range(-1, args.repeats):  # r = -1: the untimed warm-up pair
        order = ("cache", "no_cache") if r % 2 == 0 else ("no_cache", "cache")
        tokens = {}
        for arm in order:
            if cache_only and arm == "no_cache":
                continue
            seconds, tokens[arm] = timed_generate(model, prompts, lengths, new_tokens=new_tokens,
                                                  use_cache=arm == "cache", device=device)
            if r >= 0:
                times[arm].append(seconds)
        if not cache_only:
            mismatched_tokens += int((tokens["cache"] != tokens["no_cache"]).sum())
    rate = {arm: [generated / s for s in v] for arm, v in times.items()}
    if cache_only:
        return {"length": new_tokens, "batch": batch, "generated_tokens_per_run": generated,
                "uncached_positions": uncached_positions(lengths, new_tokens), "seconds": times,
                "tokens_per_s": rate, "median_tokens_per_s": {"cache": statistics.median(rate["cache"])}}
    ratios = [u / c for c, u in zip(times["cache"], times["no_cache"])]  # tokens/s cache / tokens/s no-cache
    low, high = bootstrap_median_ci(ratios)
    return {
        "length": new_tokens, "batch": batch, "generated_tokens_per_run": generated,
        "uncached_positions": uncached_positions(lengths, new_tokens),
        "seconds": times, "tokens_per_s": rate,
        "median_tokens_per_s": {arm: statistics.median(v) for arm, v in rate.items()},
        "speedup_ratios": ratios, "speedup_median": statistics.median(ratios), "speedup_ci95": [low, high],
        "speedup_of_medians": statistics.median(rate["cache"]) / statistics.median(rate["no_cache"]),
        "mismatched_tokens": mismatched_tokens, "compared_tokens": (args.repeats + 1) * generated,
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
    torch.manual_seed(args.seed)
    context = args.prompt + max(args.lengths)
    model = TinyGPT(args.vocab, context, layers=args.layers, width=args.width, heads=args.heads).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"setup: tinygpt layers {args.layers} width {args.width} heads {args.heads} vocab {args.vocab} "
          f"({params / 1e6:.2f}M params), context {context}; prompts of {max(1, args.prompt // 2)}-{args.prompt} "
          f"tokens; greedy, eos_id {NEVER_EOS} (never emitted: every row generates the full length); "
          f"{args.repeats} timed pair(s) per configuration after 1 warm-up pair, alternating order")
    sys.stdout.flush()

    results, skipped = [], []
    for batch in args.batch_sizes:
        for new_tokens in args.lengths:
            positions = uncached_positions(torch.full((batch,), args.prompt), new_tokens)  # upper bound
            if positions > args.max_uncached_positions:
                result = run_config(model, args, device, new_tokens, batch, cache_only=True)
                skipped.append(result)
                print(f"cache only: batch {batch} length {new_tokens}: {result['median_tokens_per_s']['cache']:.1f} "
                      f"tok/s; the uncached arm (~{positions:.2e} token positions per run > "
                      f"--max-uncached-positions {args.max_uncached_positions:.0e}) skipped")
                sys.stdout.flush()
                continue
            result = run_config(model, args, device, new_tokens, batch)
            results.append(result)
            m = result["median_tokens_per_s"]
            print(f"done: batch {batch:>3} length {new_tokens:>4}: cache {m['cache']:>10.1f} tok/s  "
                  f"no cache {m['no_cache']:>10.1f} tok/s  speed-up {result['speedup_median']:.2f}x")
            sys.stdout.flush()
    end_load = load()

    print()
    print(f"{'batch':>5} {'new tok':>7} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speed-up':>9} "
          f"{'95% CI':>15} {'of medians':>10} {'pairs':>5} {'token mismatches':>17}")
    for r in results:
        m = r["median_tokens_per_s"]
        low, high = r["speedup_ci95"]
        print(f"{r['batch']:>5} {r['length']:>7} {m['cache']:>12.1f} {m['no_cache']:>15.1f} "
              f"{r['speedup_median']:>8.2f}x {low:>7.2f}-{high:<7.2f} {r['speedup_of_medians']:>9.2f}x "
              f"{len(r['speedup_ratios']):>5} {r['mismatched_tokens']:>7}/{r['compared_tokens']:<9}")
    for r in skipped:
        print(f"{r['batch']:>5} {r['length']:>7} {r['median_tokens_per_s']['cache']:>12.1f} {'skipped':>15}   "
              f"(uncached arm would run {r['uncached_positions']:.2e} positions; raise --max-uncached-positions)")
    identical = all(r["mismatched_tokens"] == 0 for r in results)
    print("speed-up = median over pairs of (no-cache seconds / cache seconds) = cache tok/s / no-cache tok/s; "
          "CI: bootstrap 95% of that median")
    print(f"sanity: greedy tokens identical in both arms: {'OK' if identical else 'MISMATCH'}; every row generated "
          "the full length: OK")
    print(f"load average at end (1/5/15 min): {end_load}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "header": machine_lines(device),
            "load_start": start_load, "load_end": end_load, "params": params, "context": context,
            "results": results, "skipped": skipped, "identical_tokens": identical,
        }, indent=2))
    return 0 if identical else 2


if __name__ == "__main__":
    sys.exit(main())
