"""The one training loop. Every method trains through ``fit``.

Per step, top to bottom: pick the batch (device-resident, ``data/resident.py``) →
(augment) → teacher forward (eval and inference mode, its taps; or its verified
cached outputs, ``train.teacher_cache``) → student forward (its taps; both optionally
compiled, ``engine/speed.py``) → ``method.loss_terms`` →
sum → backward → clip → optimiser step → schedule step. Per epoch: the method's
own ``metrics()`` if it defines one (logged as ``method/<name>``), validate,
report, checkpoint. Resuming loads the latest checkpoint and replays the same
data order and random numbers, so a resumed run ends where an uninterrupted one
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
from kdlab.data import SequenceInfo, Splits
from kdlab.data.resident import ResidentData
from kdlab.engine import distributed
from kdlab.engine.checkpoint import flatten_optimizer, load_latest_checkpoint, save_checkpoint, unflatten_optimizer
from kdlab.engine.optim import build_optimizer, build_scheduler, resolve_device
from kdlab.engine.seed import epoch_generator, rng_state, set_rng_state
from kdlab.engine.speed import (TappedForward, check_device_options, check_teacher_cache, compile_forward,
                                default_cache_root, teacher_network, use_channels_last)
from kdlab.errors import KdlabError, NonFiniteLossError
from kdlab.methods.base import Batch, Method, Outputs
from kdlab.metrics import classification_metrics

# How often (in steps) the accumulated loss terms are read back: each read is a
# device sync, and a NaN is caught at the latest this many steps after it appears.
CHECK_EVERY = 16


@dataclass
class FitResult:
    final: dict[str, float]  # test/* and val/* metrics of the selected epoch, selected_epoch, ...
    epochs_run: int  # epochs trained in this call (0 if the run was already complete)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise KdlabError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, *, device: torch.device, precision: str = "fp32",
            batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode logits for ``inputs`` (float32, on the CPU); the model's mode is restored."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(inputs), batch_size):
        with _autocast(device, precision):
            chunks.append(model(inputs[start:start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def evaluate(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor], *, prefix: str, device: torch.device,
             precision: str, teacher_logits=None, sequence: SequenceInfo | None = None,
             final: bool = False) -> dict[str, float]:
    """Metrics of ``model`` on one split, keyed ``<prefix>/<name>``.

    Sequence tasks (``sequence`` set) are scored by generation (kdlab.seq.evaluate), where
    ``teacher_logits`` holds the teacher's greedy responses; ``final`` adds the sampled exact match.
    """
    inputs, labels = split
    if len(inputs) == 0:
        return {}
    if sequence is not None:
        from kdlab.seq.evaluate import sequence_metrics

        with _autocast(device, precision):
            metrics = sequence_metrics(model, split, sequence, device=device, teacher_responses=teacher_logits,
                                       sampled=final)
        return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    logits = predict(model, inputs, device=device, precision=precision)
    metrics = classification_metrics(logits, labels, teacher_logits=teacher_logits)
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}


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


def _state_tensors(student: nn.Module, method: Method) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v for k, v in student.state_dict().items()}
    out.update({f"method.{k}": v for k, v in method.state_dict().items()})
    return out


def _load_state_tensors(tensors: dict[str, torch.Tensor], student: nn.Module, method: Method) -> None:
    student.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
    method.load_state_dict({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")})


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

    Under torchrun (``distributed.current()`` set) every rank calls ``fit`` alike: each takes
    its share of every global batch, the student trains inside DistributedDataParallel, and
    only rank 0 evaluates, writes checkpoints, calls ``on_epoch`` and returns final metrics
    (the other ranks return an empty ``final``).
    ``teacher_cache_dir`` holds the teacher-output cache (``train.teacher_cache``; default
    ``kdlab.engine.speed.default_cache_root()``).
    """
    dist_ctx = distributed.current()
    main_rank = dist_ctx is None or dist_ctx.is_main
    device = resolve_device(train.device)
    if dist_ctx is not None:
        if method.per_sample_state:
            raise KdlabError(f"method {type(method).__name__} keeps per-sample state that torchrun's processes would "
                             "split between them; run it in one process (kdlab run without torchrun)")
        device = distributed.device_for(device, dist_ctx)
        if train.batch_size % dist_ctx.world_size:
            raise KdlabError(f"train.batch_size: {train.batch_size} does not split over {dist_ctx.world_size} "
                             "processes; the global batch must be a multiple of torchrun's --nproc_per_node")
    check_device_options(train, device)
    student.to(device)
    method.to(device)
    uses_teacher = teacher is not None and method.needs_teacher and method.teacher_in_loop
    if teacher is not None:
        teacher.to(device).eval()
        teacher.requires_grad_(False)
    if train.teacher_cache:
        check_teacher_cache(method, teacher, splits, train)
    # The train split lives on the device; with the teacher cache every sample's augmentation is drawn
    # per epoch from its own seed (the cached views' key), else per batch as always (same results as before).
    data = ResidentData(*splits.train, device=device, batch_size=train.batch_size, augment=augment,
                        per_sample=train.teacher_cache, seed=seed)
    num_train = len(data)
    if num_train == 0:
        raise KdlabError(f"data: dataset {splits.name!r} has an empty train split; check data.val_fraction")
    steps_per_epoch = math.ceil(num_train / train.batch_size)
    total_steps = train.steps if train.steps is not None else train.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    method.steps_per_epoch = steps_per_epoch

    # An adversary (discriminator / generator) owned by the method gets its own optimiser: the main
    # one never touches it, and its step never moves the student.
    adversary = list(method.adversary_parameters())
    adversary_ids = {id(p) for p in adversary}
    main_parameters = list(student.parameters()) + [p for p in method.parameters() if id(p) not in adversary_ids]
    optimizer = build_optimizer(main_parameters, train)
    adversary_optimizer = None
    if adversary:
        adversary_train = dataclasses.replace(train, lr=method.adversary_lr or train.lr, weight_decay=0.0)
        adversary_optimizer = build_optimizer(adversary, adversary_train)
    scheduler = build_scheduler(optimizer, train, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if train.precision == "fp16" else None
    ckpt_root = run_dir / "checkpoints" if run_dir is not None else None

    start_epoch, step, best, best_epoch = 0, 0, None, None
    loaded = load_latest_checkpoint(ckpt_root) if (resume and ckpt_root is not None) else None
    if loaded is not None:
        tensors, state = loaded
        _load_state_tensors(tensors, student, method)
        optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
        if adversary_optimizer is not None:
            adversary_optimizer.load_state_dict(unflatten_optimizer(tensors, state["adversary_optimizer"],
                                                                    prefix="adversary_optimizer"))
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(tensors, state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        best, best_epoch = state["best"], state["best_epoch"]

    # The teacher is fixed: its val/test logits are computed once for agreement metrics.
    # For sequence tasks, the teacher's greedy responses instead (agreement = same response).
    teacher_logits = {}
    sequence = splits.sequence
    if sequence is not None and augment != "none":
        raise KdlabError(f"data.augment: {augment!r} applies to images, not to the token sequences of "
                         f"{splits.name!r}; set data.augment: none")
    if teacher is not None and main_rank:  # for metrics, which only rank 0 computes
        for name in ("val", "test"):
            inputs = getattr(splits, name)[0]
            if len(inputs) and sequence is not None:
                from kdlab.seq.evaluate import generate_responses

                with _autocast(device, train.precision):
                    teacher_logits[name] = generate_responses(teacher, inputs, getattr(splits, name)[1], sequence,
                                                              device=device)
            elif len(inputs):
                teacher_logits[name] = predict(teacher, inputs, device=device, precision=train.precision)

    # The forwards the step runs: features come back beside the logits (taps), optionally compiled.
    channels_last = train.channels_last and use_channels_last(student, tuple(splits.input_shape), role="student")
    # Taps hook the unwrapped modules (their paths stay as configured); DDP forwards through them.
    forward_student = distributed.wrap_student(student, device) if dist_ctx is not None else student
    student_ids = {id(p) for p in student.parameters()}
    outside_ddp = [p for p in main_parameters if id(p) not in student_ids]  # the method's own parameters
    student_forward = TappedForward(forward_student, method.student_taps, tap_model=student,
                                    channels_last=channels_last)
    teacher_forward = cached = cache = None
    if uses_teacher:
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        teacher_net, teacher_input_dtype = teacher_network(teacher, train, device)
        teacher_forward = TappedForward(teacher_net, method.teacher_taps, detach=True,
                                        input_dtype=teacher_input_dtype, channels_last=channels_last)
    student_step = compile_forward(student_forward) if train.compile else student_forward
    teacher_step = compile_forward(teacher_forward) if (train.compile and teacher_forward is not None) else teacher_forward

    def run_teacher(inputs: torch.Tensor, *, compiled: bool = train.compile):
        """The teacher's (logits, features) on a batch: eval mode, no autograd; plain tensors out.

        ``compiled=False`` runs the eager forward (the cache's one pass over the data is not worth a compile)."""
        if compiled:  # a compiled graph is traced under no_grad (inference mode would add a guard)
            with torch.no_grad(), _autocast(device, train.precision):
                return teacher_step(inputs)
        with torch.inference_mode(), _autocast(device, train.precision):
            logits, features = teacher_forward(inputs)
        # Inference tensors cannot be saved for the student's backward (e.g. as an MSE target): clone out.
        return logits.clone(), {name: value.clone() for name, value in features.items()}

    if train.teacher_cache and uses_teacher:
        from kdlab.engine.teacher_cache import TeacherCache, view_name

        transform = "none" if augment == "none" else f"{augment}/per_sample"
        cache = TeacherCache(teacher_cache_dir or default_cache_root(), teacher=teacher, inputs=splits.train[0],
                             transform=transform, precision=f"{train.precision}/{train.teacher_dtype}",
                             taps=tuple(method.teacher_taps))
    bar = _Progress(progress and main_rank, label)
    method_metrics = getattr(method, "metrics", None)
    method_metrics = method_metrics if callable(method_metrics) else None
    autocast = _autocast(device, train.precision)
    epochs_run = 0
    try:
        for epoch in range(start_epoch, epochs):
            student.train()
            method.train()
            generator = epoch_generator(seed, epoch)
            data.start_epoch(epoch, generator)
            if cache is not None and (cached is None or data.view_seed is not None):
                view_seed = data.view_seed
                if dist_ctx is not None and not main_rank:
                    distributed.barrier(dist_ctx)  # rank 0 builds the view first; the others then find a hit
                cached, _ = cache.get(view_name(view_seed), rows=num_train,
                                      render=lambda index: data.render(index, view_seed),
                                      run_teacher=functools.partial(run_teacher, compiled=False),
                                      generator=torch.Generator().manual_seed(seed))
                if dist_ctx is not None and main_rank:
                    distributed.barrier(dist_ctx)
                cached = cached.to(device)
            sums = bad_steps = None
            adversary_sums: dict[str, list[float]] = {}
            steps_this_epoch = min(steps_per_epoch, total_steps - step)
            for i in range(steps_this_epoch):
                index, inputs, labels = data.batch(i)
                weight = None
                if dist_ctx is not None:  # this rank's share of the global batch (see distributed.shard)
                    positions, weight = distributed.shard(torch.arange(len(index), device=device),
                                                          dist_ctx.rank, dist_ctx.world_size)
                    index, inputs, labels = index[positions], inputs[positions], labels[positions]
                method.set_progress(step, total_steps)
                batch = method.make_batch(Batch(inputs=inputs, labels=labels, indices=index))
                inputs = batch.inputs
                with autocast:
                    teacher_out = None
                    if uses_teacher and method.teacher_needed():
                        if cached is not None:  # float16 on disk, float32 to the method
                            teacher_out = Outputs(cached.logits[index].float(),
                                                  {k: v[index].float() for k, v in cached.features.items()})
                        else:
                            teacher_out = Outputs(*run_teacher(inputs))
                    student_out = Outputs(*student_step(inputs))
                    if adversary_optimizer is not None and step % method.adversary_every == 0:
                        _adversary_step(method, adversary_optimizer, batch, student_out, teacher_out,
                                        adversary_sums)
                    terms = method.loss_terms(batch, student_out, teacher_out)
                    if weight is not None and weight != 1.0:
                        terms = {k: v * weight for k, v in terms.items()}
                loss = functools.reduce(operator.add, terms.values())  # not sum(): no extra 0 + ... op
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if dist_ctx is not None and outside_ddp:
                    distributed.average_gradients(outside_ddp, dist_ctx.world_size)
                if train.grad_clip is not None:
                    nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], train.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                step += 1
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
                    step_sums, step_bad = sums, bad_steps
                    if dist_ctx is not None:  # every rank sees the same (global-batch) means and stops alike
                        # Rank terms carry the shard weights (mean over ranks = the global batch's loss): divide
                        # the sums by the world size; a NaN reaches every rank's weights, so the counts agree.
                        reduced = distributed.all_sum(torch.cat([sums, bad_steps.to(sums.dtype)])) / dist_ctx.world_size
                        step_sums, step_bad = reduced[:len(names)], reduced[len(names):].ceil().long()
                    means = dict(zip(names, (step_sums / (i + 1)).tolist()))
                    if not all(math.isfinite(v) for v in means.values()):
                        counts = dict(zip(names, step_bad.tolist()))
                        first = max(counts, key=counts.get)
                        raise NonFiniteLossError(
                            f"loss term {first!r} became non-finite in epoch {epoch + 1} (at step "
                            f"{step - counts[first] + 1} of the run); lower train.lr, set train.grad_clip, "
                            "or check the method's hyperparameters")
                    bar.update(epoch + 1, epochs, i + 1, steps_this_epoch, means)
            metrics = {f"train/loss/{k}": v for k, v in means.items()}
            metrics["train/loss"] = sum(means.values())
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            metrics.update({f"adv/{k}": sum(v) / len(v) for k, v in adversary_sums.items() if v})
            if method_metrics is not None:  # a method's own state (e.g. MTARD's balance), once per epoch
                metrics.update({f"method/{k}": float(v) for k, v in method_metrics().items()})
            last = epoch + 1 == epochs
            if main_rank and ((epoch + 1) % train.eval_every == 0 or last):
                val = evaluate(student, splits.val, prefix="val", device=device, precision=train.precision,
                               teacher_logits=teacher_logits.get("val"), sequence=sequence)
                metrics.update(val)
                if train.selection == "best_val" and val and _better(val, best):
                    best, best_epoch = {k: val[k] for k in ("val/acc", "val/nll")}, epoch + 1
                    if ckpt_root is not None:
                        save_checkpoint(ckpt_root / "best", epoch + 1, _state_tensors(student, method), {},
                                        keep_last=1)
                    else:
                        best_state = {k: v.detach().clone() for k, v in _state_tensors(student, method).items()}
            if on_epoch is not None and main_rank:
                on_epoch(epoch + 1, metrics)
            epochs_run += 1
            if ckpt_root is not None and main_rank and ((epoch + 1) % train.checkpoint_every == 0 or last):
                opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
                rng_tensors, rng_meta = rng_state()
                tensors = {**_state_tensors(student, method), **opt_tensors, **rng_tensors}
                if adversary_optimizer is not None:
                    adv_tensors, adv_meta = flatten_optimizer(adversary_optimizer.state_dict(),
                                                              prefix="adversary_optimizer")
                    tensors.update(adv_tensors)
                state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                         "adversary_optimizer": adv_meta if adversary_optimizer is not None else None,
                         "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_meta,
                         "best": best, "best_epoch": best_epoch}
                save_checkpoint(ckpt_root, epoch + 1, tensors, state)
    finally:
        bar.close()
        for forward in (student_forward, teacher_forward):
            if forward is not None:
                forward.close()
        del student_forward, student_step, forward_student  # DDP's gradient hooks go with them
        if train.compile:  # compiled code keeps its modules (a DDP wrapper too) alive and shares one
            torch._dynamo.reset()  # recompile limit across runs in this process: start the next run afresh

    if not main_rank:
        return FitResult(final={}, epochs_run=epochs_run)

    selected_epoch = epochs
    if train.selection == "best_val" and best_epoch is not None:
        selected_epoch = best_epoch
        if ckpt_root is not None:
            tensors, _ = load_latest_checkpoint(ckpt_root / "best")
            _load_state_tensors(tensors, student, method)
        else:
            _load_state_tensors(best_state, student, method)
    final = evaluate(student, splits.val, prefix="val", device=device, precision=train.precision,
                     teacher_logits=teacher_logits.get("val"), sequence=sequence)
    final.update(evaluate(student, splits.test, prefix="test", device=device, precision=train.precision,
                          teacher_logits=teacher_logits.get("test"), sequence=sequence, final=True))
    final["selected_epoch"] = float(selected_epoch)
    return FitResult(final=final, epochs_run=epochs_run)
