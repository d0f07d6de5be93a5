"""Data-parallel training across processes started by ``torchrun`` (one process per device).

``torchrun --nproc_per_node N -m kdlab run CONFIG`` starts N copies of the CLI with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set. ``init_from_environment``
joins them into one process group (gloo on the CPU, NCCL for CUDA tensors) and records
the process's place in it; ``current()`` answers it for the loop and the runner, so
neither needs a new argument.

The semantics are those of one process with the same global batch:

* every rank draws the same epoch permutation and augmentation (same seed), takes the
  same global batch of ``train.batch_size`` samples and keeps its contiguous share
  (``shard``): per-rank batch = global batch / world size;
* the student is wrapped in ``DistributedDataParallel``, which averages gradients over
  ranks; each rank's loss terms are weighted by ``local_n · world / global_n``
  (``shard_weight``), so that average is exactly the global-batch mean even when the
  last batch does not split evenly;
* parameters outside the student (a method's projectors, an adversary) are averaged
  by ``average_gradients``.

What stays per rank: BatchNorm statistics (as in plain DDP; no SyncBatchNorm), and
the randomness of methods that draw their own samples in ``make_batch``.

``train.sharding: fsdp`` shards the student instead of replicating it (``kdlab.engine.fsdp``), with
the same shares and weights.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from kdlab.errors import KdlabError

# Seconds to wait for every rank to reach the rendezvous (store connection and join) before a clear
# error; collectives after that may wait much longer (rank 0 evaluates while the others wait).
RENDEZVOUS_TIMEOUT_ENV = "KDLAB_DIST_TIMEOUT"
DEFAULT_RENDEZVOUS_SECONDS = 60.0
COLLECTIVE_TIMEOUT_ENV = "KDLAB_DIST_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_SECONDS = 1800.0


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT: DistContext | None = None


def current() -> DistContext | None:
    """The process group this process joined (None: a single process, the usual case)."""
    return _CONTEXT


def launched_by_torchrun() -> bool:
    """Whether the launcher asked for several processes (``WORLD_SIZE`` > 1 in the environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise KdlabError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number; "
                         "start several processes with torchrun --nproc_per_node N") from None


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise KdlabError(f"{name}={text!r}: expected a positive number of seconds, e.g. {name}=60")
    return value


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    if text is None:
        raise KdlabError(f"{name} is not set; start data-parallel runs with torchrun --nproc_per_node N -m kdlab run")
    try:
        return int(text)
    except ValueError:
        raise KdlabError(f"{name}={text!r} is not a whole number; start the processes with torchrun") from None


def init_from_environment() -> DistContext:
    """Join the process group described by torchrun's environment; a clear error when it cannot be reached.

    The rendezvous waits ``$KDLAB_DIST_TIMEOUT`` seconds (default 60) for the store and every
    rank; collectives afterwards wait ``$KDLAB_DIST_COLLECTIVE_TIMEOUT`` (default 1800).
    CUDA processes use device ``cuda:$LOCAL_RANK``.
    """
    global _CONTEXT
    import torch.distributed as dist

    if _CONTEXT is not None:
        return _CONTEXT
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0"))
    rendezvous = _seconds(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_SECONDS)
    collective = _seconds(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_SECONDS)
    if not dist.is_available():
        raise KdlabError("torch.distributed is not available in this torch build; run without torchrun")
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    # A CUDA machine gets NCCL for CUDA tensors and gloo for CPU ones (the batch order, the
    # runner's decisions); a CPU-only one gloo for everything.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise KdlabError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); use torchrun --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
    try:
        # The store first, with the short timeout: an unreachable MASTER_ADDR/MASTER_PORT or a rank that
        # never comes fails here instead of hanging for the collective timeout.
        store, rank, world = next(dist.rendezvous("env://", rank, world,
                                                  timeout=datetime.timedelta(seconds=rendezvous)))
        store.set_timeout(datetime.timedelta(seconds=collective))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=collective))
    except (RuntimeError, ValueError, OSError) as exc:  # DistNetworkError / DistStoreError are RuntimeErrors
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdlabError(f"torchrun rendezvous at {address} (rank {rank} of {world}) failed within "
                         f"{rendezvous:g} s: {detail[:200]}; check MASTER_ADDR/MASTER_PORT (torchrun "
                         f"--master_addr/--master_port or --rdzv-endpoint), that every node started, or raise "
                         f"{RENDEZVOUS_TIMEOUT_ENV}") from None
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local_rank)
    return _CONTEXT


def shutdown(*, synchronize: bool = True) -> None:
    """Leave the process group (end of the CLI command).

    ``synchronize``: first wait until every rank got here, so no rank tears gloo down while another is
    still finishing (seen as "terminate called without an active exception"); False after an error,
    when the other ranks may never arrive.
    """
    global _CONTEXT
    import torch.distributed as dist

    if _CONTEXT is not None and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
    _CONTEXT = None


def device_for(device: torch.device, ctx: DistContext) -> torch.device:
    """A CUDA run uses this process's GPU, ``cuda:LOCAL_RANK``; other devices as configured."""
    if device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    if device.type == "mps":
        raise KdlabError("train.device: mps does not take part in torchrun data-parallel runs; use cpu or cuda")
    return device


def shard(index: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, float]:
    """This rank's contiguous share of a global batch ``index`` and the weight of its loss.

    Shares differ by at most one sample (``tensor_split``). With DDP averaging gradients
    over ranks, weighting rank r's mean loss by ``n_r · world / N`` makes the average
    Σ_r (n_r / N) · mean_r = the mean over all N samples — the one-process gradient.
    A rank left without a sample (a last batch smaller than the world) takes one sample
    with weight 0, so it still joins the gradient all-reduce.
    """
    total = len(index)
    local = index.tensor_split(world_size)[rank]
    if len(local) == 0:
        return index[:1], 0.0
    return local, len(local) * world_size / total


def wrap_student(student: nn.Module, device: torch.device) -> nn.Module:
    """``student`` in DistributedDataParallel (gradients averaged over ranks during backward)."""
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in student.parameters()):
        return student
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids)


def average_gradients(parameters: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``parameters`` over ranks in one all-reduce (those outside the DDP student)."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,) one collective for all of them
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over ranks (a new tensor; the input is unchanged)."""
    import torch.distributed as dist

    out = tensor.clone()
    dist.all_reduce(out)
    return out


def broadcast(value, ctx: DistContext | None):
    """Rank 0's ``value`` on every rank (any picklable object); unchanged without a process group."""
    if ctx is None:
        return value
    import torch.distributed as dist

    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None:
        import torch.distributed as dist

        dist.barrier()
