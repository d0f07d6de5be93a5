"""Seeding and RNG state capture, so that a resumed run replays the same random numbers."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch's shuffling and augmentation.

    Derived from (seed, epoch) alone, not from the global RNG, so the data order
    of epoch k is the same whether or not the run was resumed before it.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The global RNG states as (tensors, JSON-able state) for a checkpoint."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, state


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8).cpu())
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Compute on ``threads`` intra-op threads inside the block, then restore the previous count.

    Reductions split over threads sum in another order, so a run's numbers depend on its thread
    count: fixing it per run (``train.threads``) makes them independent of how many runs share the
    machine (``--workers``). None keeps whatever the process uses."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
