#!/usr/bin/env python
"""One on-policy GKD step on SmolLM2: kdlab against TRL's GKDTrainer and DistillationTrainer, CPU.

What is measured
----------------
One optimiser step of on-policy GKD (λ = 1: the student samples every batch's
responses; generalised JSD, β = 0.5) on the same teacher, student and prompts:

* teacher: SmolLM2-135M-Instruct (30 layers), the bundled 4-bit GGUF dequantized
  to float32 by kdlab's loader (``kdlab.seq.hf_load``: converted once, cached as
  safetensors);
* student: kdlab's ``init: teacher, keep_layers: 6`` (``drop_layers``: teacher
  layers 0, 6, 12, 17, 23, 29; 49.6 M parameters);
* both written once as Hugging Face folders in a temporary directory, which
  every arm loads (the same weights everywhere);
* prompts: the first ``batch × steps`` of kdlab's built-in docstring prompts
  ("Explain what `module.function` does."), chat template applied by the
  teacher's tokenizer, fed in the same order to every arm (batch i = the same 8
  prompts in every arm; TRL's samplers are made sequential for that);
* at most ``--max-new-tokens`` (64) sampled tokens per response, batch 8,
  AdamW, gradient clipping at 1.0 (TRL's ``max_grad_norm`` default), float32,
  ``--threads`` intra-op threads in every arm.

Arms (``--arms``):

* ``kdlab``: ``kdlab.engine.loop`` step (``_Fit.step``: the method's
  ``make_batch``, which samples through the model's own ``generate`` with the
  KV cache, teacher forward, student forward, divergence, backward, clip,
  AdamW, schedule) with kdlab's defaults (eager attention, sampling
  temperature 1, no activation checkpointing, float32). kdlab's defaults are
  already the matched settings, so it is one arm.
* ``gkd_default``: ``trl.experimental.gkd.GKDTrainer`` at ``GKDConfig``'s
  defaults except batch, ``lmbda`` 1, ``beta`` 0.5, ``max_new_tokens`` and
  ``bf16`` (see below): gradient checkpointing on, hence generation with
  ``use_cache=False`` (GKDTrainer's rule), sampling temperature 0.9.
* ``gkd_matched``: the same with ``gradient_checkpointing=False`` (so the KV
  cache is used) and temperature 1.
* ``distill_default``: ``trl.DistillationTrainer`` (always on-policy) at
  ``DistillationConfig``'s defaults except batch, ``beta`` 0.5,
  ``max_completion_length`` and ``bf16``: gradient checkpointing on (its
  generation keeps the KV cache), chunked loss on the completion positions.
* ``distill_matched``: the same with ``gradient_checkpointing=False``.

``bf16``: TRL's configs default to bf16 mixed precision; on a CPU without native
bf16 (AVX2 only, like the 2-core VM here) a bf16 matmul is ~70x slower than a
float32 one, which would make TRL's default step minutes long and the ratio
meaningless; every arm runs float32 (``--trl-bf16`` keeps TRL's default).

How
---
Each arm runs in its own fresh Python process (a worker: this script with
``--worker ARM``), so peak memory is per arm and no arm warms another's caches.
The parent loads every worker first, then drives them step by step, interleaved
(each round, one step of every arm in a rotating order), so load drift on a
shared machine hits every arm alike; idle workers wait on a pipe and use no
CPU. ``--warmup`` steps per arm are not timed. A TRL worker runs
``trainer.train()``; a callback blocks in ``on_train_begin`` / ``on_step_end``
until the parent asks for the next step, and a step's time runs from that
release to the next ``on_step_end`` (data collation, generation, forwards,
backward, clip, optimiser and schedule step; TRL logs every 10 steps, none fall
in the window). A kdlab worker times ``_Fit.step``. Phase times come from
hooks that are the same in every arm: the student's ``generate`` (on-policy
sampling) and the teacher's decoder backbone forward; the rest of the step is
the student's forward/backward, the divergence and the optimiser.

Memory: RSS after setup, and the peak RSS while stepping (``VmHWM`` reset via
``/proc/self/clear_refs`` after setup, read after the last step), per worker.

Output: per arm the median step time and IQR, phase medians, decode steps per
generation (a batch decodes until its last row stops) and the mean sequence
width trained on, peak RSS; then every arm's step time and peak RSS as a ratio
to each TRL arm (kdlab / TRL: median of per-round ratios, bootstrap 95% CI).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TAG = "@@BENCH "
ARMS = ("kdlab", "gkd_default", "gkd_matched", "distill_default", "distill_matched")
HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--keep-layers", type=int, default=6, help="student: this many teacher layers, evenly spaced")
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every arm")
    p.add_argument("--kdlab-attn", default="eager", help="kdlab's attn_implementation (its default: eager)")
    p.add_argument("--trl-bf16", action="store_true", help="keep TRL's bf16 default (very slow on CPUs without bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the model folders here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", choices=ARMS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.max_new_tokens, args.threads, args.keep_layers) < 1 or args.warmup < 0:
        p.error("--batch, --steps, --max-new-tokens, --threads, --keep-layers must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- memory


def _status(field: str) -> float:
    """A ``/proc/self/status`` field in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --------------------------------------------------------------------------- preparation (parent)


def prepare(workdir: Path, args) -> dict:
    """Teacher and student HF folders (kdlab's loader and layer dropping) and the prompt list, in ``workdir``."""
    from kdlab.data.prompt_sets import docstring_prompts
    from kdlab.seq.hf import load_hf_causal_lm
    from kdlab.seq.hf_export import drop_layers, export_student, layers_to_keep
    from kdlab.seq.hf_load import resolve_source

    source = resolve_source(bundled="smollm2")  # the GGUF, dequantized and cached as safetensors once
    teacher_dir, student_dir = workdir / "teacher", workdir / "student"
    teacher = load_hf_causal_lm(path=source)
    layers = layers_to_keep(args.keep_layers, int(teacher.config.num_hidden_layers))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    student = drop_layers(teacher, layers)
    if not (teacher_dir / "config.json").exists():
        export_student(teacher, teacher_dir, tokenizer_source=source, overwrite=True)
    if not (student_dir / "config.json").exists():
        export_student(student, student_dir, tokenizer_source=source, overwrite=True)
    records, _ = docstring_prompts()
    needed = args.batch * (args.warmup + args.steps)
    if len(records) < needed:
        raise SystemExit(f"only {len(records)} docstring prompts, {needed} needed")
    prompts = [{"prompt": r.prompt, "reference": r.reference} for r in records[:needed]]
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    return {"teacher_params": count(teacher), "student_params": count(student), "student_layers": layers,
            "hf_folder": str(source)}


# --------------------------------------------------------------------------- worker side


class Channel:
    """The worker's end of the pipe: commands on stdin, tagged JSON lines on stdout."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # library prints go to stderr, not into the protocol

    def send(self, **message) -> None:
        self.out.write(TAG + json.dumps(message) + "\n")
        self.out.flush()

    def wait(self) -> str:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)
        return line.strip()


class Probes:
    """Times the phases every arm shares: the student's ``generate`` and the teacher backbone's forward."""

    def __init__(self, student_hf, teacher_hf):
        self.generation = 0.0
        self.teacher = 0.0
        self.decode_steps: list[int] = []
        self.widths: list[int] = []
        original = student_hf.generate

        def generate(*a, **kw):
            start = time.perf_counter()
            out = original(*a, **kw)
            self.generation += time.perf_counter() - start
            sequences = out if hasattr(out, "shape") else out.sequences
            given = kw.get("input_ids", a[0] if a else None)
            self.decode_steps.append(int(sequences.shape[1] - (given.shape[1] if given is not None else 0)))
            return out

        student_hf.generate = generate
        backbone = teacher_hf.get_decoder() if hasattr(teacher_hf, "get_decoder") else teacher_hf.model
        self._start = None

        def before(module, inputs, kwargs):
            self._start = time.perf_counter()
            ids = kwargs.get("input_ids", inputs[0] if inputs else None)
            if ids is not None:
                self.widths.append(int(ids.shape[1]))

        def after(module, inputs, output):
            self.teacher += time.perf_counter() - self._start

        backbone.register_forward_pre_hook(before, with_kwargs=True)
        backbone.register_forward_hook(after)

    def take(self) -> dict:
        out = {"generation": self.generation, "teacher": self.teacher,
               "decode_steps": self.decode_steps[-1] if self.decode_steps else 0,
               "width": self.widths[-1] if self.widths else 0}
        self.generation = self.teacher = 0.0
        return out


def _load_inputs(workdir: Path):
    return json.loads((workdir / "prompts.json").read_text())


def kdlab_worker(args, channel: Channel) -> None:
    import torch

    from kdlab.config import MethodConfig, TrainConfig
    from kdlab.data.base import Splits
    from kdlab.data.prompts import PromptRecord, special_ids, tokenize_records
    from kdlab.data.sequence import SequenceInfo
    from kdlab.engine.build import build_method
    from kdlab.engine.loop import _Fit
    from kdlab.seq.hf import load_hf_causal_lm
    from kdlab.seq.hf_load import load_generation_config, load_tokenizer

    workdir = args.workdir
    teacher_dir, student_dir = workdir / "teacher", workdir / "student"
    teacher = load_hf_causal_lm(path=teacher_dir, attn_implementation=args.kdlab_attn)
    student = load_hf_causal_lm(path=student_dir, attn_implementation=args.kdlab_attn)
    tokenizer = load_tokenizer(teacher_dir)
    pad_id, eos_id, _ = special_ids(tokenizer, load_generation_config(teacher_dir))
    records = [PromptRecord(prompt=r["prompt"], reference=r["reference"], where=f"prompt {i}")
               for i, r in enumerate(_load_inputs(workdir))]
    tokenized = tokenize_records(records, tokenizer, eos_id=eos_id, pad_id=pad_id, chat_template=True,
                                 max_prompt_tokens=256, max_new_tokens=args.max_new_tokens)
    info = SequenceInfo(task="bench", pad_id=pad_id, eos_id=eos_id, decode=tokenizer.decode,
                        is_correct=lambda p, r: False, answer_correct=lambda p, r: False,
                        max_response_tokens=args.max_new_tokens, context_length=256 + args.max_new_tokens,
                        generation_room=0)
    tokens, labels = tokenized.tokens, tokenized.labels
    empty = (tokens[:0], labels[:0])  # no val/test: nothing is evaluated before the steps
    splits = Splits(name="bench", train=(tokens, labels), val=empty, test=empty, num_classes=teacher.vocab_size,
                    input_shape=(tokens.shape[1],), mean=(0.0,), std=(1.0,), sequence=info)
    total = args.warmup + args.steps
    torch.manual_seed(args.seed)
    method = build_method(MethodConfig(name="gkd", options={"on_policy_fraction": 1.0, "divergence": "jsd",
                                                             "beta": args.beta}),
                          student=student, teacher=teacher, sequence=info)
    train = TrainConfig(steps=total, batch_size=args.batch, optimizer="adamw", lr=2e-5, grad_clip=1.0,
                        device="cpu", precision="fp32", threads=args.threads)
    run = _Fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=args.seed,
               run_dir=None, resume=False, augment="none", progress=False, label="", teacher_cache_dir=None)
    probes = Probes(student.model, teacher.model)
    student.train()
    method.train()
    run.data.start_epoch(0, torch.Generator().manual_seed(args.seed))
    run.data._order = torch.arange(len(tokens))  # the same prompts per step as the TRL arms (no shuffle)
    channel.send(ready=True, rss_setup_mib=_status("VmRSS"),
                 prompt_tokens=float(tokenized.prompt_lengths.float().mean()))
    reset_peak()
    for i in range(total):
        channel.wait()
        start = time.perf_counter()
        terms = run.step(i, {})
        seconds = time.perf_counter() - start
        channel.send(seconds=seconds, loss=float(sum(v.detach() for v in terms.values())), **probes.take())
    channel.wait()
    channel.send(peak_mib=_status("VmHWM"), maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def trl_worker(args, channel: Channel) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from torch.utils.data import SequentialSampler

    arm = args.worker
    workdir = args.workdir
    teacher_dir, student_dir = workdir / "teacher", workdir / "student"
    rows = _load_inputs(workdir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    total = args.warmup + args.steps
    matched = arm.endswith("matched")
    common = dict(output_dir=str(workdir / f"out-{arm}"), per_device_train_batch_size=args.batch, max_steps=total,
                  report_to="none", save_strategy="no", seed=args.seed, beta=args.beta, use_cpu=True)
    if not args.trl_bf16:
        common["bf16"] = False
    if matched:
        common["gradient_checkpointing"] = False

    class Stepper(TrainerCallback):
        """Blocks until the parent asks for a step; times from that release to the step's end."""

        def __init__(self):
            self.released = None

        def _wait(self):
            channel.wait()
            self.released = time.perf_counter()

        def on_train_begin(self, *a, **kw):
            channel.send(ready=True, rss_setup_mib=_status("VmRSS"), prompt_tokens=prompt_tokens)
            reset_peak()
            self._wait()

        def on_step_end(self, cb_args, state, control, **kw):
            seconds = time.perf_counter() - self.released
            channel.send(seconds=seconds, loss=None, **probes.take())
            if state.global_step < total:
                self._wait()

    prompt_tokens = statistics.mean(
        len(tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]) for r in rows)
    if arm.startswith("gkd"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class SequentialGKD(GKDTrainer):
            def _get_train_sampler(self, *a, **kw):  # same prompts per step in every arm
                return SequentialSampler(self.train_dataset)

        config = GKDConfig(lmbda=1.0, max_new_tokens=args.max_new_tokens, **common,
                           **({"temperature": 1.0} if matched else {}))
        data = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                                {"role": "assistant", "content": r["reference"]}]} for r in rows])
        trainer = SequentialGKD(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                processing_class=tokenizer)
    else:
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(max_completion_length=args.max_new_tokens, shuffle_dataset=False, **common)
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                      processing_class=tokenizer)
    probes = Probes(trainer.accelerator.unwrap_model(trainer.model), teacher)
    trainer.add_callback(Stepper())
    trainer.train()
    channel.wait()
    channel.send(peak_mib=_status("VmHWM"), maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 # None: not set, so generate's default (the KV cache) applies
                 use_cache_in_generation=getattr(trainer.generation_config, "use_cache", None),
                 gradient_checkpointing=bool(config.gradient_checkpointing), bf16=bool(config.bf16),
                 temperature=float(config.temperature))


def worker(args) -> int:
    import torch
    import warnings

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    channel = Channel()
    (kdlab_worker if args.worker == "kdlab" else trl_worker)(args, channel)
    return 0


# --------------------------------------------------------------------------- parent side


class Worker:
    def __init__(self, arm: str, args, workdir: Path, log_dir: Path):
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--workdir", str(workdir),
                   "--threads", str(args.threads), "--batch", str(args.batch), "--max-new-tokens",
                   str(args.max_new_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup), "--beta",
                   str(args.beta), "--seed", str(args.seed), "--kdlab-attn", args.kdlab_attn] + \
            (["--trl-bf16"] if args.trl_bf16 else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
                       [str(HERE.parent), str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                        else [])))
        self.arm = arm
        self.log = log_dir / f"{arm}.log"
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=open(self.log, "w"), text=True, env=env)

    def receive(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                tail = self.log.read_text()[-3000:]
                raise SystemExit(f"worker {self.arm} ended early (exit {self.process.wait()}); its log:\n{tail}")
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    sys.path.insert(0, str(HERE))
    from benchutil import bootstrap_median_ci, load, machine_lines, quantile

    import torch

    torch.set_num_threads(args.threads)
    start_load = load()
    for line in machine_lines("cpu", threads=args.threads):
        print(line)
    import transformers
    import trl

    print(f"transformers {transformers.__version__} | trl {trl.__version__}")
    print(f"load average at start (1/5/15 min): {start_load}")
    with tempfile.TemporaryDirectory(prefix="kdlab-smollm2-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        setup = prepare(workdir, args)
        print(f"setup: teacher SmolLM2-135M-Instruct ({setup['teacher_params'] / 1e6:.1f}M params, GGUF dequantized "
              f"to fp32), student = teacher layers {setup['student_layers']} ({setup['student_params'] / 1e6:.1f}M "
              f"params); batch {args.batch}, at most {args.max_new_tokens} new tokens, lambda 1, jsd beta "
              f"{args.beta}; {args.warmup} warm-up + {args.steps} timed steps per arm, one process per arm, "
              f"steps interleaved (rotating order); prepared in {time.perf_counter() - started:.0f} s")
        sys.stdout.flush()
        args.workdir = workdir
        log_dir = workdir / "logs"
        log_dir.mkdir(exist_ok=True)
        workers = []
        try:
            for arm in args.arms:  # one at a time: loading is CPU-heavy
                w = Worker(arm, args, workdir, log_dir)
                w.ready = w.receive()
                workers.append(w)
                print(f"  {arm}: ready, RSS {w.ready['rss_setup_mib']:.0f} MiB, mean prompt "
                      f"{w.ready['prompt_tokens']:.1f} tokens")
                sys.stdout.flush()
            records = {w.arm: [] for w in workers}
            total = args.warmup + args.steps
            for s in range(total):
                rotation = s % len(workers)
                for w in workers[rotation:] + workers[:rotation]:
                    gc.collect()
                    reply = w.ask("step")
                    reply["timed"] = s >= args.warmup
                    records[w.arm].append(reply)
                line = "  ".join(f"{a} {r[-1]['seconds']:.1f}s/{r[-1]['decode_steps']}tok" for a, r in records.items())
                print(f"step {s + 1}/{total}{' (warm-up)' if s < args.warmup else ''}: {line}")
                sys.stdout.flush()
            finals = {w.arm: w.ask("stats") for w in workers}
        finally:
            for w in workers:
                w.close()
    end_load = load()

    summary = {}
    print()
    print(f"{'arm':<16} {'step s (median)':>15} {'IQR s':>13} {'generation s':>12} {'teacher s':>9} "
          f"{'rest s':>7} {'decode':>6} {'width':>6} {'RSS setup':>9} {'peak RSS':>9}")
    for arm, rows in records.items():
        timed = [r for r in rows if r["timed"]]
        step = [r["seconds"] for r in timed]
        gen = [r["generation"] for r in timed]
        teach = [r["teacher"] for r in timed]
        rest = [r["seconds"] - r["generation"] - r["teacher"] for r in timed]
        summary[arm] = {"step_s": step, "median_s": statistics.median(step), "q25_s": quantile(step, 0.25),
                        "q75_s": quantile(step, 0.75), "generation_s": statistics.median(gen),
                        "teacher_s": statistics.median(teach), "rest_s": statistics.median(rest),
                        "decode_steps": [r["decode_steps"] for r in timed], "widths": [r["width"] for r in timed],
                        "rss_setup_mib": workers_ready(workers, arm)["rss_setup_mib"],
                        "prompt_tokens": workers_ready(workers, arm)["prompt_tokens"], **finals[arm]}
        s = summary[arm]
        print(f"{arm:<16} {s['median_s']:>15.2f} {s['q25_s']:>6.2f}-{s['q75_s']:<6.2f} {s['generation_s']:>12.2f} "
              f"{s['teacher_s']:>9.2f} {s['rest_s']:>7.2f} {statistics.mean(s['decode_steps']):>6.1f} "
              f"{statistics.mean(s['widths']):>6.1f} {s['rss_setup_mib']:>9.0f} {s['peak_mib']:>9.0f}")
    for arm in summary:
        extra = {k: summary[arm][k] for k in ("use_cache_in_generation", "gradient_checkpointing", "bf16",
                                              "temperature") if k in summary[arm]}
        if extra:
            print(f"  {arm}: {extra}")
    ratios = {}
    if "kdlab" in summary:
        print()
        print("kdlab / TRL arm (per round ratio of step times: median, bootstrap 95% CI; peak RSS ratio):")
        base = summary["kdlab"]
        for arm in summary:
            if arm == "kdlab":
                continue
            paired = [a / b for a, b in zip(base["step_s"], summary[arm]["step_s"])]
            low, high = bootstrap_median_ci(paired)
            ratios[arm] = {"time_median": statistics.median(paired), "time_ci95": [low, high],
                           "time_ratio_of_medians": base["median_s"] / summary[arm]["median_s"],
                           "peak_rss": base["peak_mib"] / summary[arm]["peak_mib"]}
            r = ratios[arm]
            print(f"  vs {arm:<16} time {r['time_median']:.2f}x (CI {low:.2f}-{high:.2f}; ratio of medians "
                  f"{r['time_ratio_of_medians']:.2f}x)   peak RSS {r['peak_rss']:.2f}x")
    print(f"load average at end (1/5/15 min): {end_load}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "header": machine_lines("cpu", threads=args.threads),
            "load_start": start_load, "load_end": end_load, "setup": setup, "arms": summary, "ratios": ratios,
        }, indent=2))
    return 0


def workers_ready(workers, arm):
    return next(w.ready for w in workers if w.arm == arm)


if __name__ == "__main__":
    sys.exit(main())
