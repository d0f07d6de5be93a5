"""The one training loop. Every method trains through ``fit``, which reads in phases (``_Fit``):

setup (``__init__``: device, resident data, optimisers, resume) → per epoch ``train_epoch`` (each
``step``: pick the batch (device-resident or streamed, ``data/streaming.py``) → (augment) → teacher forward (eval
and inference mode, its taps; or its verified cached outputs, ``train.teacher_cache``) → student
forward (its taps; both optionally compiled, ``engine/speed.py``) → ``method.loss_terms`` → sum →
backward (a ``SplitGradientOptimizer``, DOT's, backpropagates the named terms itself) → clip → optimiser step → schedule step; with ``train.grad_accum_steps`` = k a step first
makes its k micro-batches, weighs each by its share of the step's loss units (``Method.loss_count``),
then forwards and backpropagates each before the one clip and optimiser step; then the method's own
``metrics()`` if it defines one, logged as ``method/<name>``) → ``evaluate`` → report → ``checkpoint`` →
``final_metrics``.
What a checkpoint holds is defined once, in ``engine/state.py``. Resuming loads the latest checkpoint
and replays the same data order and random numbers, so a resumed run ends where an uninterrupted one
would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdlab.config import TrainConfig
from kdlab.data import Splits
from kdlab.data.streaming import train_data
from kdlab.engine import distributed, fsdp
from kdlab.engine.checkpoint import load_latest_checkpoint, save_checkpoint
from kdlab.engine.evaluate import _autocast, evaluate, predict  # noqa: F401  (predict: importable from here too)
from kdlab.engine.optim import SplitGradientOptimizer, build_optimizer, build_scheduler, resolve_device
from kdlab.engine.run_files import safe_path
from kdlab.engine.seed import epoch_generator
from kdlab.engine.speed import (TappedForward, check_device_options, check_teacher_cache, compile_forward,
                                default_cache_root, teacher_network, use_channels_last)
from kdlab.engine.state import TrainingState, load_model_tensors, model_tensors, restore_model
from kdlab.engine.teacher import cache_precision, place_teacher
from kdlab.errors import KdlabError, NonFiniteLossError
from kdlab.methods.base import Batch, Method, Outputs

# How often (in steps) the accumulated loss terms are read back: each read is a
# device sync, and a NaN is caught at the latest this many steps after it appears.
CHECK_EVERY = 16


@dataclass
class FitResult:
    final: dict[str, float]  # test/* and val/* of the selected weights, selected_epoch (selected_step with train.steps)
    epochs_run: int  # epochs trained in this call (0 if the run was already complete)


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label

    def update(self, epoch: int, epochs: int, step: int, steps: int, terms: dict[str, float]) -> None:
        if self.enabled:
            shown = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
            sys.stderr.write(f"\r{self.label} epoch {epoch}/{epochs} step {step}/{steps} {shown}\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _adversary_step(method: Method, optimizer, batch: Batch, student_out: Outputs, teacher_out: Outputs | None,
                    sums: dict[str, list[float]]) -> None:
    """``method.adversary_steps`` optimiser steps on ``method.adversary_loss`` (the student's outputs detached)."""
    detached = Outputs(student_out.logits.detach(), {k: v.detach() for k, v in student_out.features.items()})
    for _ in range(method.adversary_steps):
        terms = method.adversary_loss(batch, detached, teacher_out)
        loss = functools.reduce(operator.add, terms.values())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"adversary loss became non-finite ({ {k: float(v.detach()) for k, v in terms.items()} }); "
                                     "lower the method's adversary learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx = distributed.current()
        if ctx is not None:  # the adversary sees each rank's share: average, so every replica stays equal
            distributed.average_gradients([p for group in optimizer.param_groups for p in group["params"]],
                                          ctx.world_size)
        optimizer.step()
        for name, value in {**{k: float(v.detach()) for k, v in terms.items()}, **method.adversary_metrics}.items():
            sums.setdefault(name, []).append(value)


def _better(candidate: dict[str, float], best: dict[str, float] | None) -> bool:
    """Best-val rule: higher val accuracy; ties go to lower val NLL."""
    if best is None:
        return True
    if candidate["val/acc"] != best["val/acc"]:
        return candidate["val/acc"] > best["val/acc"]
    return candidate["val/nll"] < best["val/nll"]



def fit(*, student: nn.Module, method: Method, teacher: nn.Module | None, splits: Splits, train: TrainConfig,
        seed: int, run_dir: Path | None = None, resume: bool = True, augment: str = "none",
        on_epoch: Callable[[int, dict[str, float]], None] | None = None, progress: bool = False,
        label: str = "", teacher_cache_dir: Path | None = None) -> FitResult:
    """Train ``student`` (and ``method``'s own parameters) with ``method``; return the selected metrics.

    ``run_dir`` receives checkpoints (none when it is None); with ``resume`` the
    latest checkpoint there is continued. ``on_epoch(epoch, metrics)`` is called
    after each epoch (1-based) with train loss terms and, when evaluated, val
    metrics. The caller seeds the global RNG before building the models.

    Under torchrun (``distributed.current()`` set) every rank calls ``fit`` alike, takes its share of every
    global batch, trains the student in DistributedDataParallel (or sharded, ``kdlab.engine.fsdp``); only rank 0
    writes, calls ``on_epoch`` and returns final metrics (the other ranks an empty ``final``).
    ``teacher_cache_dir``: the teacher-output cache (``train.teacher_cache``; default ``speed.default_cache_root()``).
    """
    run = _Fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=seed,
               run_dir=run_dir, resume=resume, augment=augment, progress=progress, label=label,
               teacher_cache_dir=teacher_cache_dir)
    epochs_run = 0
    try:
        for epoch in range(run.state.epoch, run.epochs):
            metrics = run.train_epoch(epoch)
            run.evaluate(metrics)
            if on_epoch is not None and run.main_rank:
                on_epoch(epoch + 1, metrics)
            epochs_run += 1
            run.checkpoint()
    finally:
        run.close()
    final = run.final_metrics() if run.main_rank or run.sharded else {}  # sharded: every rank evaluates
    fsdp.unshard_for_good(student)  # sharded: a plain module again, which the runner saves on rank 0 alone
    return FitResult(final=final if run.main_rank else {}, epochs_run=epochs_run)


class _Fit:
    """One call of ``fit``: set up once (``__init__``), then one method per phase of an epoch."""

    # ------------------------------------------------------------------ setup

    def __init__(self, *, student: nn.Module, method: Method, teacher: nn.Module | None, splits: Splits,
                 train: TrainConfig, seed: int, run_dir: Path | None, resume: bool, augment: str, progress: bool,
                 label: str, teacher_cache_dir: Path | None):
        self.student, self.method, self.teacher, self.splits, self.train, self.seed = (student, method, teacher,
                                                                                      splits, train, seed)
        self.dist = dist_ctx = distributed.current()
        self.main_rank = dist_ctx is None or dist_ctx.is_main
        self.sharded = train.sharding == "fsdp"  # FSDP2 (kdlab.engine.fsdp): the student's forwards are collective
        self.device = device = self._device()
        student.to(device)
        if self.sharded:  # before the optimiser is built: it must hold the sharded parameters
            fsdp.shard_student(student, device, method=method, train=train, dist_ctx=dist_ctx)
        method.to(device)
        self.uses_teacher = teacher is not None and method.needs_teacher and method.teacher_in_loop
        # The teacher's device and dtype (teacher.device/dtype; the student's device by default), frozen, eval.
        self.placed = place_teacher(teacher, train, device) if teacher is not None else None
        if train.teacher_cache:
            check_teacher_cache(method, teacher, splits, train)
        # On the device, or streamed (data/streaming.py, same batches); with the teacher cache every sample's
        # augmentation is drawn per epoch from its own seed (the cached views' key), else per batch as always.
        self.data = train_data(*splits.train, device=device, batch_size=train.batch_size, augment=augment,
                                 per_sample=train.teacher_cache, seed=seed)
        self.num_train = len(self.data)
        if self.num_train == 0:
            raise KdlabError(f"data: dataset {splits.name!r} has an empty train split; check data.val_fraction")
        # batch_size is the micro-batch; an optimiser step takes grad_accum_steps of them (fewer at an epoch's
        # end), and every count below (steps, schedule, epochs, checkpoints, set_progress) is of optimiser steps.
        self.accum = train.grad_accum_steps
        self.micro_batches = math.ceil(self.num_train / train.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_batches / self.accum)
        self.total_steps = train.steps if train.steps is not None else train.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        method.steps_per_epoch = self.steps_per_epoch
        self.state = self._training_state()
        self.ckpt_root = safe_path(run_dir, run_dir / "checkpoints") if run_dir is not None else None
        self.best_state: dict[str, torch.Tensor] | None = None  # the best-val weights when there is no run_dir
        loaded = load_latest_checkpoint(self.ckpt_root) if (resume and self.ckpt_root is not None) else None
        if loaded is not None:
            tensors, state = loaded
            self.state.restore(tensors, state, folder=self.ckpt_root / f"epoch-{state['epoch']:04d}",
                               expected_step=self._steps_after)
        self.sequence = splits.sequence
        if self.sequence is not None and augment != "none":
            raise KdlabError(f"data.augment: {augment!r} applies to images, not to the token sequences of "
                             f"{splits.name!r}; set data.augment: none")
        self.teacher_logits = self._teacher_predictions()
        self._forwards()
        if self.uses_teacher and hasattr(method, "attach_offline_targets"):  # GKD's offline targets: built once
            method.attach_offline_targets(splits, run_teacher=functools.partial(self.run_teacher, compiled=False),
                                          root=teacher_cache_dir or default_cache_root(), seed=seed,
                                          precision=cache_precision(teacher, train), device=device)
        self.cache = self.cached = None
        if train.teacher_cache and self.uses_teacher:
            from kdlab.engine.teacher_cache import TeacherCache

            transform = "none" if augment == "none" else f"{augment}/per_sample"
            self.cache = TeacherCache(teacher_cache_dir or default_cache_root(), teacher=teacher,
                                      inputs=splits.train[0], transform=transform,
                                      precision=cache_precision(teacher, train),
                                      taps=tuple(method.teacher_taps))
        self.bar = _Progress(progress and self.main_rank, label)
        method_metrics = getattr(method, "metrics", None)
        self.method_metrics = method_metrics if callable(method_metrics) else None
        self.autocast = _autocast(device, train.precision)

    def _device(self) -> torch.device:
        train, dist_ctx = self.train, self.dist
        device = resolve_device(train.device)
        if dist_ctx is not None:
            if self.method.per_sample_state:
                raise KdlabError(f"method {type(self.method).__name__} keeps per-sample state that torchrun's "
                                 "processes would split between them; run it in one process (kdlab run without "
                                 "torchrun)")
            device = distributed.device_for(device, dist_ctx)
            if train.batch_size % dist_ctx.world_size:
                raise KdlabError(f"train.batch_size: {train.batch_size} does not split over {dist_ctx.world_size} "
                                 "processes; the global batch must be a multiple of torchrun's --nproc_per_node")
        check_device_options(train, device)
        return device

    def _training_state(self) -> TrainingState:
        """Optimisers, schedule and scaler: what a checkpoint saves beside the weights.

        An adversary (discriminator / generator) owned by the method gets its own optimiser: the main
        one never touches it, and its step never moves the student."""
        train, method = self.train, self.method
        adversary = list(method.adversary_parameters())
        adversary_ids = {id(p) for p in adversary}
        # A frozen student base (a LoRA student, kdlab.seq.peft) is not the optimiser's: only what trains is.
        self.main_parameters = ([p for p in self.student.parameters() if p.requires_grad]
                                + [p for p in method.parameters() if id(p) not in adversary_ids])
        # The method's own optimiser (DOT's), else the one train names.
        optimizer = method.make_optimizer(self.main_parameters, train)
        optimizer = optimizer if optimizer is not None else build_optimizer(self.main_parameters, train)
        adversary_optimizer = None
        if adversary:
            adversary_train = dataclasses.replace(train, lr=method.adversary_lr or train.lr, weight_decay=0.0)
            adversary_optimizer = build_optimizer(adversary, adversary_train)
        scheduler = build_scheduler(optimizer, train, total_steps=self.total_steps,
                                    steps_per_epoch=self.steps_per_epoch)
        scaler = torch.amp.GradScaler("cuda") if train.precision == "fp16" else None
        return TrainingState(self.student, method, optimizer, adversary_optimizer, scheduler, scaler)

    def _steps_after(self, epoch: int) -> int | None:
        """Optimiser steps a run has taken after ``epoch`` epochs (None: not an epoch of this run)."""
        return min(epoch * self.steps_per_epoch, self.total_steps) if 0 <= epoch <= self.epochs else None

    def _teacher_predictions(self) -> dict:
        """The fixed teacher's val/test logits, computed once for agreement metrics (rank 0 alone).
        For sequence tasks, the teacher's greedy responses instead (agreement = same response)."""
        out = {}
        if self.teacher is None or not self.main_rank:
            return out
        device = self.placed.device
        input_dtype = None if self.placed.training_copy else self.placed.input_dtype  # the copy trains only
        for name in ("val", "test"):
            inputs, labels = getattr(self.splits, name)
            if len(inputs) and self.sequence is not None:
                from kdlab.seq.evaluate import generate_responses

                with torch.inference_mode(), _autocast(self.device, self.train.precision):
                    out[name] = generate_responses(self.teacher, inputs, labels, self.sequence, device=device)
            elif len(inputs):
                with torch.inference_mode():
                    out[name] = predict(self.teacher, inputs, device=device, precision=self.train.precision,
                                        input_dtype=input_dtype)
        return out

    def _forwards(self) -> None:
        """The forwards a step runs: features come back beside the logits (taps), optionally compiled."""
        train, student, teacher, method, device = self.train, self.student, self.teacher, self.method, self.device
        channels_last = train.channels_last and use_channels_last(student, tuple(self.splits.input_shape),
                                                                  role="student")
        # Taps hook the unwrapped modules (their paths stay as configured); DDP forwards through them.
        self.forward_student = distributed.wrap_student(student, device) if self.dist and not self.sharded else student
        student_ids = {id(p) for p in student.parameters()}
        self.outside_ddp = [p for p in self.main_parameters if id(p) not in student_ids]  # the method's own
        self.student_forward = TappedForward(self.forward_student, method.student_taps, tap_model=student,
                                             channels_last=channels_last)
        self.teacher_forward = None
        if self.uses_teacher:
            if channels_last:
                teacher.to(memory_format=torch.channels_last)
            placed = self.placed  # another device: inputs there, outputs back here as float32
            self.teacher_forward = TappedForward(teacher_network(teacher, placed), method.teacher_taps, detach=True,
                                                 input_dtype=placed.input_dtype, channels_last=channels_last,
                                                 device=placed.device if placed.placed else None,
                                                 output_device=device if placed.placed else None)
        self.student_step = compile_forward(self.student_forward) if train.compile else self.student_forward
        self.teacher_step = (compile_forward(self.teacher_forward) if (train.compile and self.teacher_forward
                                                                       is not None) else self.teacher_forward)

    def run_teacher(self, inputs: torch.Tensor, *, compiled: bool | None = None):
        """The teacher's (logits, features) on a batch: eval mode, no autograd; plain tensors out.

        ``compiled=False`` runs the eager forward (the cache's one pass over the data is not worth a compile)."""
        device, precision = self.device, self.train.precision
        if self.train.compile if compiled is None else compiled:  # traced under no_grad (inference mode adds a guard)
            with torch.no_grad(), _autocast(device, precision):
                return self.teacher_step(inputs)
        with torch.inference_mode(), _autocast(device, precision):
            logits, features = self.teacher_forward(inputs)
        # Inference tensors cannot be saved for the student's backward (e.g. as an MSE target): clone out.
        return logits.clone(), {name: value.clone() for name, value in features.items()}

    # ------------------------------------------------------------------ one epoch, one step

    def _load_cached_view(self) -> None:
        """This epoch's cached teacher outputs (one view without augmentation, else one per epoch)."""
        from kdlab.engine.teacher_cache import view_name

        if self.cache is None or (self.cached is not None and self.data.view_seed is None):
            return
        data, dist_ctx, view_seed = self.data, self.dist, self.data.view_seed
        if dist_ctx is not None and not self.main_rank:
            distributed.barrier(dist_ctx)  # rank 0 builds the view first; the others then find a hit
        cached, _ = self.cache.get(view_name(view_seed), rows=self.num_train,
                                   render=lambda index: data.render(index, view_seed),
                                   run_teacher=functools.partial(self.run_teacher, compiled=False),
                                   generator=torch.Generator().manual_seed(self.seed))
        if dist_ctx is not None and self.main_rank:
            distributed.barrier(dist_ctx)
        self.cached = cached.to(self.device)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch; return its mean loss terms, learning rate and adversary/method metrics."""
        self.student.train()
        self.method.train()
        self.data.start_epoch(epoch, epoch_generator(self.seed, epoch))
        self._load_cached_view()
        sums = bad_steps = names = None
        adversary_sums: dict[str, list[float]] = {}
        steps_this_epoch = min(self.steps_per_epoch, self.total_steps - self.state.step)
        for i in range(steps_this_epoch):
            terms = self.step(i, adversary_sums)
            # One stacked tensor per step (a few ops whatever the number of terms): running sums, and
            # per term the count of non-finite steps — the term that failed first has the largest count.
            stacked = torch.stack([value.detach().float() for value in terms.values()])
            if sums is None:
                names = list(terms)
                sums, bad_steps = stacked, (~torch.isfinite(stacked)).long()
            else:
                sums = sums + stacked
                bad_steps = bad_steps + ~torch.isfinite(stacked)
            if (i + 1) % CHECK_EVERY == 0 or i + 1 == steps_this_epoch:
                means = self._check_finite(names, sums, bad_steps, steps=i + 1, epoch=epoch)
                self.bar.update(epoch + 1, self.epochs, i + 1, steps_this_epoch, means)
        self.state.epoch = epoch + 1
        metrics = {f"train/loss/{k}": v for k, v in means.items()}
        metrics["train/loss"] = sum(means.values())
        metrics["lr"] = self.state.optimizer.param_groups[0]["lr"]
        metrics.update({f"adv/{k}": sum(v) / len(v) for k, v in adversary_sums.items() if v})
        if self.method_metrics is not None:  # a method's own state (e.g. MTARD's balance), once per epoch
            metrics.update({f"method/{k}": float(v) for k, v in self.method_metrics().items()})
        return metrics

    def step(self, i: int, adversary_sums: dict[str, list[float]]) -> dict[str, torch.Tensor]:
        """Optimiser step ``i`` of the epoch: its micro-batches (``train.grad_accum_steps`` of them, fewer at
        an epoch's end) are made first (generation included), weighted by their share of the step's loss
        units (``Method.loss_count``), then each is forwarded and backpropagated; clip, step, schedule.

        Returns the step's loss terms (the weighted sums over its micro-batches, detached)."""
        method, state, dist_ctx = self.method, self.state, self.dist
        optimizer, scaler = state.optimizer, state.scaler
        method.set_progress(state.step, self.total_steps)
        if method.resets_optimizer():  # a new stage of the method's recipe: fresh moments, same schedule
            optimizer.state.clear()
        first = i * self.accum
        micro = range(first, min(first + self.accum, self.micro_batches))
        made = []
        for m, j in enumerate(micro):
            method.micro_batch = m  # its own sampling stream (GenerationMethod.step_generator)
            made.append(self._make_batch(j))
        method.micro_batch = 0
        weights = self._accumulation_weights(made)
        terms: dict[str, torch.Tensor] = {}
        for m, ((batch, index, shard_weight), weight) in enumerate(zip(made, weights)):
            last = m == len(made) - 1
            # DDP all-reduces on the last micro-batch's backward only (the sum is what it averages).
            sync = self.forward_student.no_sync() if dist_ctx and not (last or self.sharded) else contextlib.nullcontext()
            with sync:
                micro_terms = self._forward_backward(batch, index, shard_weight, weight, first=m == 0,
                                                     adversary_sums=adversary_sums)
            for name, value in micro_terms.items():
                terms[name] = terms[name] + value.detach() if name in terms else value.detach()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if dist_ctx is not None and self.outside_ddp:
            distributed.average_gradients(self.outside_ddp, dist_ctx.world_size)
        if self.train.grad_clip is not None:
            fsdp.clip_grad_norm_(optimizer.param_groups[0]["params"], self.train.grad_clip)  # a sharded student too
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state.scheduler.step()
        state.step += 1
        return terms

    def _make_batch(self, j: int) -> tuple[Batch, torch.Tensor, float | None]:
        """Micro-batch ``j`` of the epoch as the method trains on it: (batch, train-row indices, rank weight)."""
        dist_ctx = self.dist
        index, inputs, labels = self.data.batch(j)
        weight = None
        if dist_ctx is not None:  # this rank's share of the global batch (see distributed.shard)
            positions, weight = distributed.shard(torch.arange(len(index), device=self.device),
                                                  dist_ctx.rank, dist_ctx.world_size)
            index, inputs, labels = index[positions], inputs[positions], labels[positions]
        return self.method.make_batch(Batch(inputs=inputs, labels=labels, indices=index)), index, weight

    def _accumulation_weights(self, made: list[tuple[Batch, torch.Tensor, float | None]]
                              ) -> list[torch.Tensor | None]:
        """Each micro-batch's share of its optimiser step's loss units (None: a step of one batch).

        Weighting micro-batch j's mean loss by count_j / Σ count makes the step's gradient that of one
        batch of all its samples, response tokens or sequences, counted on the batches as trained on
        (after generation). Under torchrun the total is summed over ranks and the weight takes the place
        of the rank's shard weight (times the world size, which DDP's average divides out), so the step is
        exact over the global batch too. All counts 0 (all-masked responses) weigh each by 0: no NaN."""
        if len(made) == 1:
            return [None]
        counts = []
        for batch, _, shard_weight in made:
            count = torch.as_tensor(self.method.loss_count(batch), device=self.device).to(torch.float64)
            counts.append(count if shard_weight is None or shard_weight > 0 else count * 0)  # a placeholder row
        total = functools.reduce(operator.add, counts)
        scale = 1.0
        if self.dist is not None:
            total, scale = distributed.all_sum(total), float(self.dist.world_size)
        total = total.clamp_min(1)
        return [count * scale / total for count in counts]

    def _forward_backward(self, batch: Batch, index: torch.Tensor, shard_weight: float | None,
                          weight: torch.Tensor | None, *, first: bool,
                          adversary_sums: dict[str, list[float]]) -> dict[str, torch.Tensor]:
        """Forwards, loss terms (times the micro-batch's weights) and their backward into the gradients.

        The step's first micro-batch runs the adversary when due and clears the gradients after it (its
        fresh forwards may reach the student's parameters)."""
        method, state = self.method, self.state
        inputs = batch.inputs
        with self.autocast:
            teacher_out = None
            if self.uses_teacher and method.teacher_needed():
                if self.cached is not None:  # float16 on disk, float32 to the method
                    teacher_out = Outputs(self.cached.logits[index].float(),
                                          {k: v[index].float() for k, v in self.cached.features.items()})
                else:
                    teacher_out = Outputs(*self.run_teacher(inputs))
            student_out = Outputs(*self.student_step(inputs))
            if first and state.adversary_optimizer is not None and state.step % method.adversary_every == 0:
                _adversary_step(method, state.adversary_optimizer, batch, student_out, teacher_out, adversary_sums)
            terms = method.loss_terms(batch, student_out, teacher_out)
            if weight is not None:  # accumulation: the micro-batch's share of the (global) step
                terms = {k: v * weight.to(v.dtype) for k, v in terms.items()}
            elif shard_weight is not None and shard_weight != 1.0:
                terms = {k: v * shard_weight for k, v in terms.items()}
        loss = functools.reduce(operator.add, terms.values())  # not sum(): no extra 0 + ... op
        if first:
            state.optimizer.zero_grad(set_to_none=True)
        if isinstance(state.optimizer, SplitGradientOptimizer):  # DOT: the terms' gradients taken apart
            state.optimizer.backward(terms)
        elif state.scaler is not None:
            state.scaler.scale(loss).backward()
        else:
            loss.backward()
        return terms

    def _check_finite(self, names: list[str], sums: torch.Tensor, bad_steps: torch.Tensor, *, steps: int,
                      epoch: int) -> dict[str, float]:
        """The epoch's mean terms so far (one device sync); a non-finite one stops the run naming the term."""
        dist_ctx = self.dist
        if dist_ctx is not None:  # every rank sees the same (global-batch) means and stops alike
            # Rank terms carry the shard weights (mean over ranks = the global batch's loss): divide
            # the sums by the world size; a NaN reaches every rank's weights, so the counts agree.
            reduced = distributed.all_sum(torch.cat([sums, bad_steps.to(sums.dtype)])) / dist_ctx.world_size
            sums, bad_steps = reduced[:len(names)], reduced[len(names):].ceil().long()
        means = dict(zip(names, (sums / steps).tolist()))
        if not all(math.isfinite(v) for v in means.values()):
            counts = dict(zip(names, bad_steps.tolist()))
            first = max(counts, key=counts.get)
            raise NonFiniteLossError(
                f"loss term {first!r} became non-finite in epoch {epoch + 1} (at step "
                f"{self.state.step - counts[first] + 1} of the run); lower train.lr, set train.grad_clip, "
                "or check the method's hyperparameters")
        return means

    # ------------------------------------------------------------------ evaluate, checkpoint, finish

    def evaluate(self, metrics: dict[str, float]) -> None:
        """Validate after the epoch when due (rank 0), adding val metrics and tracking the best epoch."""
        epoch, train, state = self.state.epoch, self.train, self.state
        if not (self.main_rank or self.sharded) or (epoch % train.eval_every != 0 and epoch != self.epochs):
            return
        val = evaluate(self.student, self.splits.val, prefix="val", device=self.device, precision=train.precision,
                       teacher_logits=self.teacher_logits.get("val"), sequence=self.sequence)
        val = distributed.broadcast(val, self.dist) if self.sharded else val  # every rank evaluated; rank 0 decides
        metrics.update(val)
        if train.selection == "best_val" and val and _better(val, state.best):
            state.best, state.best_epoch = {k: val[k] for k in ("val/acc", "val/nll")}, epoch
            if self.ckpt_root is not None:
                tensors = fsdp.gathered(model_tensors(self.student, self.method))  # collective when sharded
                if self.main_rank:
                    save_checkpoint(safe_path(self.ckpt_root, self.ckpt_root / "best"), epoch, tensors, {}, keep_last=1)
            else:
                self.best_state = {k: v.detach().clone() for k, v in model_tensors(self.student, self.method).items()}

    def checkpoint(self) -> None:
        """Save the training state when due (every ``checkpoint_every`` epochs and after the last; rank 0)."""
        epoch = self.state.epoch
        if self.ckpt_root is None or not (self.main_rank or self.sharded):
            return
        if epoch % self.train.checkpoint_every == 0 or epoch == self.epochs:
            tensors, state = self.state.save()  # sharded: every rank joins the gather, rank 0 writes
            if self.main_rank:
                save_checkpoint(self.ckpt_root, epoch, tensors, state)

    def close(self) -> None:
        self.bar.close()
        for forward in (self.student_forward, self.teacher_forward):
            if forward is not None:
                forward.close()
        del self.student_forward, self.student_step, self.forward_student  # DDP's gradient hooks go with them
        if self.train.compile:  # compiled code keeps its modules (a DDP wrapper too) alive and shares one
            torch._dynamo.reset()  # recompile limit across runs in this process: start the next run afresh

    def final_metrics(self) -> dict[str, float]:
        """val/test metrics of the selected epoch's weights (loaded into the student), and that epoch."""
        train, state = self.train, self.state
        selected_epoch = self.epochs
        if train.selection == "best_val" and state.best_epoch is not None:
            selected_epoch = state.best_epoch
            if self.ckpt_root is not None:
                best = safe_path(self.ckpt_root, self.ckpt_root / "best")
                tensors, _ = load_latest_checkpoint(best)
                restore_model(tensors, self.student, self.method, folder=best)
            else:
                load_model_tensors(self.best_state, self.student, self.method)
        kwargs = dict(device=self.device, precision=train.precision, sequence=self.sequence)
        final = evaluate(self.student, self.splits.val, prefix="val", teacher_logits=self.teacher_logits.get("val"),
                         **kwargs)
        final.update(evaluate(self.student, self.splits.test, prefix="test", final=True,
                              teacher_logits=self.teacher_logits.get("test"), **kwargs))
        if train.steps is None:
            final["selected_epoch"] = float(selected_epoch)
        else:  # a step budget: name the optimiser step whose weights were tested, not a partial "epoch"
            final["selected_step"] = float(min(selected_epoch * self.steps_per_epoch, self.total_steps))
        return final
