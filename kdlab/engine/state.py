"""What a training checkpoint holds, defined once: saving and resuming both go through ``TrainingState``.

A checkpoint is the student's and the method's tensors, each optimiser's buffers, the
scheduler, the fp16 gradient scaler, the global RNG streams, the epoch/step counters and
the best-validation record. ``state.json`` also lists every tensor in ``weights.safetensors``
with its shape and dtype, so a resume refuses a checkpoint that lost a tensor group (a
fresh Adam state would train on silently) or whose counters disagree, instead of
continuing from something else than what was saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdlab.engine import fsdp
from kdlab.engine.checkpoint import flatten_optimizer, unflatten_optimizer
from kdlab.engine.run_files import RunFolderError
from kdlab.engine.seed import rng_state, set_rng_state

# The JSON half of a checkpoint; "scaler" and "adversary_optimizer" are null when unused.
STATE_KEYS = ("epoch", "step", "optimizer", "adversary_optimizer", "scheduler", "scaler", "rng", "best", "best_epoch")


def model_tensors(student: nn.Module, method: nn.Module) -> dict[str, torch.Tensor]:
    """The student's and the method's tensors under ``student.``/``method.`` (also the best-val snapshot).

    A LoRA student (``kdlab.seq.peft``) gives its adapter's tensors only: its frozen base is rebuilt from its
    source, not saved."""
    state = student.state_dict()
    adapter = getattr(student, "kdlab_adapter", None)
    if adapter is not None:
        state = {k: state[k] for k in adapter.trained_keys}
    out = {f"student.{k}": v for k, v in state.items()}
    out.update({f"method.{k}": v for k, v in method.state_dict().items()})
    return out


def load_model_tensors(tensors: dict[str, torch.Tensor], student: nn.Module, method: nn.Module) -> None:
    adapter = getattr(student, "kdlab_adapter", None)  # a LoRA student loads its adapter onto its rebuilt base
    own = {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}
    loaded = student.load_state_dict(fsdp.shard_like(own, student.state_dict()), strict=adapter is None)
    if adapter is not None and loaded.unexpected_keys:
        raise RuntimeError(f"unexpected student tensors {loaded.unexpected_keys[:3]}")
    method.load_state_dict({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")})


def restore_model(tensors: dict[str, torch.Tensor], student: nn.Module, method: nn.Module, *, folder: Path) -> None:
    """``load_model_tensors`` after checking that every tensor is there with the model's shape."""
    own = model_tensors(student, method)
    lost = sorted(set(own) - set(tensors))
    problem = None
    if lost:
        problem = f"is incomplete: weights.safetensors lacks {', '.join(lost[:3])}"
    else:
        # The student's shapes are fixed; a method may resize its own buffers (loaded by its load_state_dict).
        wrong = sorted(k for k in own if k.startswith("student.") and tuple(tensors[k].shape) != tuple(own[k].shape))
        if wrong:
            problem = (f"does not match the model: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)} in the "
                       f"file, {tuple(own[wrong[0]].shape)} in the model")
    if problem is not None:
        raise RunFolderError(f"checkpoint {folder} {problem}; run with --no-resume to start the run over")
    try:
        load_model_tensors(tensors, student, method)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"checkpoint {folder} does not match the model ({detail}); run with --no-resume to "
                             "start the run over") from None


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _manifest(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {name: [list(value.shape), str(value.dtype).removeprefix("torch.")] for name, value in tensors.items()}


@dataclass
class TrainingState:
    """The objects a run trains and the counters that say how far it got."""

    student: nn.Module
    method: nn.Module
    optimizer: torch.optim.Optimizer
    adversary_optimizer: torch.optim.Optimizer | None
    scheduler: object
    scaler: object | None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best: dict[str, float] | None = None  # val/acc and val/nll of the best epoch so far (best_val selection)
    best_epoch: int | None = None

    def save(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON state) of a checkpoint after ``self.epoch`` epochs."""
        opt_tensors, opt_meta = flatten_optimizer(self.optimizer.state_dict())
        rng_tensors, rng_meta = rng_state()
        # A sharded student's tensors and optimiser buffers gathered whole (every rank calls save: collective).
        tensors = fsdp.gathered({**model_tensors(self.student, self.method), **opt_tensors, **rng_tensors})
        adv_meta = None
        if self.adversary_optimizer is not None:
            adv_tensors, adv_meta = flatten_optimizer(self.adversary_optimizer.state_dict(),
                                                      prefix="adversary_optimizer")
            tensors.update(adv_tensors)
        state = {"epoch": self.epoch, "step": self.step, "optimizer": opt_meta,
                 "adversary_optimizer": adv_meta, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rng_meta,
                 "best": self.best, "best_epoch": self.best_epoch, "tensors": _manifest(tensors)}
        adapter = getattr(self.student, "kdlab_adapter", None)
        if adapter is not None:  # the frozen base the adapter was trained on, checked at resume
            state["student_base_sha256"] = adapter.base_sha256
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict, *, folder: Path,
                expected_step: Callable[[int], int]) -> None:
        """Load a checkpoint saved by ``save``, or refuse it whole (nothing half-loaded is trained on).

        ``expected_step(epoch)`` is the step count a complete run reaches after ``epoch`` epochs.
        """
        def refuse(problem: str) -> RunFolderError:
            return RunFolderError(f"checkpoint {folder} {problem}; run with --no-resume to start the run over")

        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise refuse(f"is incomplete: state.json has no {', '.join(missing)}")
        manifest = state.get("tensors")
        if manifest is not None:  # written since the manifest exists: every tensor must be as saved
            if not isinstance(manifest, dict):
                raise refuse("is damaged: state.json's tensor list is not a mapping")
            lost = sorted(set(manifest) - set(tensors))
            extra = sorted(set(tensors) - set(manifest))
            if lost or extra:
                raise refuse(f"is incomplete: weights.safetensors {'lacks ' + ', '.join(lost[:3]) if lost else ''}"
                             f"{'; ' if lost and extra else ''}{'has unlisted ' + ', '.join(extra[:3]) if extra else ''}")
            changed = sorted(name for name, value in _manifest(tensors).items() if value != manifest[name])
            if changed:
                raise refuse(f"is damaged: tensor {changed[0]} is {_manifest(tensors)[changed[0]]} in "
                             f"weights.safetensors but {manifest[changed[0]]} in state.json")
        adapter = getattr(self.student, "kdlab_adapter", None)
        base, recorded = adapter.base_sha256 if adapter is not None else None, state.get("student_base_sha256")
        if recorded != base:  # an adapter is only meaningful on the base it was trained on
            raise refuse(f"was trained on another student base (SHA-256 {str(recorded)[:12]}, this LoRA student's "
                         f"base {str(base)[:12]}: its source or its library changed)")
        epoch, step = state["epoch"], state["step"]
        expected = expected_step(epoch) if _whole(epoch) else None
        if expected is None:
            raise refuse(f"is inconsistent: epoch {epoch!r} is not an epoch of this run")
        if not _whole(step) or step != expected:
            raise refuse(f"is inconsistent: {step!r} steps after epoch {epoch} where this run takes {expected}")
        if (manifest is None and step > 0 and isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
                and not any(name.startswith("optimizer.") for name in tensors)):  # written before the tensor list
            raise refuse(f"is incomplete: no optimiser state after {step} steps")
        try:
            restore_model(tensors, self.student, self.method, folder=folder)
            self.optimizer.load_state_dict(fsdp.shard_optimizer_state(unflatten_optimizer(tensors, state["optimizer"]),
                                                                      self.optimizer))
            if self.adversary_optimizer is not None:
                self.adversary_optimizer.load_state_dict(
                    unflatten_optimizer(tensors, state["adversary_optimizer"], prefix="adversary_optimizer"))
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(tensors, state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise refuse(f"cannot be restored ({type(exc).__name__}: {detail})") from None
        self.epoch, self.step = epoch, step
        self.best, self.best_epoch = state["best"], state["best_epoch"]
