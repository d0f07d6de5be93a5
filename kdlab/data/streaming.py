"""Streamed training data: images decoded per item by ``torch.utils.data`` workers, for sets too big for memory.

Resident data (``data/resident.py``) holds a split as one tensor; a streamed split is a ``LazyImages``:
the files and how to decode one, nothing decoded until asked. ``StreamingData`` serves it to the loop
through the same interface as ``ResidentData`` (``start_epoch``, ``batch(j)``, ``render``, ``view_seed``),
so the loop has one way of drawing batches, and the same seed gives the same batches on both paths:

* the epoch's order is the same ``randperm`` of the epoch generator, cut into the same batches;
* the augmentation's random numbers are drawn in the main process before the epoch starts, exactly as
  ``ResidentData`` draws them (per batch from the epoch generator, after the order; or per sample from
  ``augment_seed(seed, epoch)`` with the teacher cache), and applied to the decoded batch on the device
  (``augment.apply_params``). Workers only decode: nothing they compute depends on how many there are,
  so results do not change with ``workers`` and a resumed run (which restarts at an epoch) is exact;
* a batch is ``(train-row indices, inputs, labels)``, the indices as CRD's memory bank needs them.

Workers get a seed fixed by (seed, epoch) (``DataLoader(generator=...)``), batches come in pinned memory
on CUDA and are copied without blocking. Indexing a ``LazyImages`` with an index tensor gives a lazy
subset (splits are carved without decoding), with a slice or an int the decoded images (evaluation
decodes chunk by chunk).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdlab.data.augment import apply_params, check_kind, draw_params
from kdlab.data.resident import ResidentData, augment_seed

# ``streaming: auto`` streams a dataset whose decoded float32 images would take more than this.
STREAM_ABOVE_BYTES = 2 << 30
# The per-channel statistics of a streamed train split: over every image up to this many, else over a
# seeded sample of this many (one decode pass over ImageNet would take hours).
STATS_SAMPLE = 4096
_STATS_SEED = 0


def should_stream(streaming: str | bool, *, images: int, sample_shape: Sequence[int]) -> bool:
    """``data.streaming``: true/false as said; auto above ``STREAM_ABOVE_BYTES`` of decoded float32 images."""
    if streaming == "auto":
        return images * int(np.prod(sample_shape)) * 4 > STREAM_ABOVE_BYTES
    return bool(streaming)


class LazyImages:
    """``len(files)`` images of ``sample_shape`` (C, H, W), each decoded by ``reader(path)`` (uint8 C, H, W)
    when asked; float32 in [0, 1] like a resident split. ``workers``: the loader processes that decode."""

    dtype = torch.float32

    def __init__(self, files: Sequence[Path], *, reader: Callable[[Path], np.ndarray],
                 sample_shape: Sequence[int], workers: int = 0):
        self.files, self.reader, self.workers = list(files), reader, workers
        self.sample_shape = tuple(sample_shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), *self.sample_shape))

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, row: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.reader(self.files[row]))).to(torch.float32).div_(255.0)

    def rows(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The decoded images of ``index`` as one (n, C, H, W) tensor."""
        rows = [self.decode(int(i)) for i in index]
        return torch.stack(rows) if rows else torch.empty((0, *self.sample_shape))

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.rows(range(*key.indices(len(self))))
        if isinstance(key, int):
            return self.decode(range(len(self))[key])
        index = torch.as_tensor(key)
        if index.dim() == 0:  # a numpy or tensor scalar: one image, as an int
            return self.decode(range(len(self))[int(index)])
        if index.dtype == torch.bool:
            index = index.nonzero()[:, 0]
        return LazyImages([self.files[int(i)] for i in index], reader=self.reader, sample_shape=self.sample_shape,
                          workers=self.workers)

    def fingerprint(self) -> str:
        """A content hash that stands for the decoded images without decoding them: every file's path, size and
        modification time, the sample shape and the reader's settings (a changed file changes it)."""
        digest = hashlib.sha256(f"{self.sample_shape}|{getattr(self.reader, 'keywords', '')}".encode())
        for path in self.files:
            stat = Path(path).stat()
            digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and population std (``stats.channel_mean_std``'s rule) over every image, or over a
        seeded sample of ``STATS_SAMPLE`` of them in a larger split; accumulated in float64, chunk by chunk."""
        rows = torch.arange(len(self))
        if len(rows) > STATS_SAMPLE:
            rows = torch.randperm(len(rows), generator=torch.Generator().manual_seed(_STATS_SEED))[:STATS_SAMPLE]
        total = squares = 0
        for start in range(0, len(rows), 256):
            chunk = self.rows(rows[start:start + 256]).double().transpose(0, 1).reshape(self.sample_shape[0], -1)
            total, squares = total + chunk.sum(1), squares + chunk.square().sum(1)
        count = len(rows) * int(np.prod(self.sample_shape[1:]))
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        std = torch.where(std < 1e-12, torch.ones_like(std), std)
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class _Items(Dataset):
    """``(row, image)`` of a ``LazyImages``: what a worker decodes."""

    def __init__(self, images: LazyImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int):
        return row, self.images.decode(row)


def _seed_worker(worker_id: int) -> None:
    """Python's and numpy's generators of a worker from torch's (fixed by the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class StreamingData(ResidentData):
    """A streamed train split served in shuffled batches of ``batch_size``: ``ResidentData``'s interface
    and random streams; the images are decoded by ``workers`` processes (the main process with 0)."""

    def __init__(self, inputs: LazyImages, labels: torch.Tensor, *, device: torch.device, batch_size: int,
                 augment: str = "none", per_sample: bool = False, seed: int = 0, workers: int = 0):
        self.inputs, self.labels = inputs, labels
        self.device, self.batch_size, self.augment = torch.device(device), batch_size, augment
        self.per_sample, self.seed, self.workers = per_sample, seed, workers
        self.view_seed = None
        self._order = self._params = self._batches = None
        check_kind(augment, inputs.sample_shape)

    def start_epoch(self, epoch: int, generator: torch.Generator) -> None:
        """The epoch's order and augmentation numbers (as ``ResidentData`` draws them); a fresh loader."""
        self._order = torch.randperm(len(self.inputs), generator=generator)
        chunks = self._order.split(self.batch_size)
        if self.augment != "none" and self.per_sample:  # by row, from the epoch's view seed (the cache's key)
            self.view_seed = augment_seed(self.seed, epoch)
            self._params = self.view_params(self.view_seed)
        elif self.augment != "none":  # per batch, right after the order: the resident path's stream
            drawn = [draw_params(self.augment, len(c), shape=self.inputs.sample_shape, generator=generator)
                     for c in chunks]
            self._params = [torch.cat(parts) for parts in zip(*drawn)]  # by position in the epoch's order
        loader = DataLoader(_Items(self.inputs), batch_sampler=[c.tolist() for c in chunks],
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            worker_init_fn=_seed_worker if self.workers else None,
                            generator=torch.Generator().manual_seed(augment_seed(self.seed, epoch)))
        self._batches, self._next = iter(loader), 0

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``i`` of the current epoch (batches are asked for in order): (indices, inputs, labels)."""
        if i != self._next:
            raise RuntimeError(f"streamed batches come in order: asked for batch {i}, next is {self._next}")
        self._next += 1
        index, inputs = next(self._batches)
        non_blocking = self.device.type == "cuda"
        inputs, labels = inputs.to(self.device, non_blocking=non_blocking), self.labels[index].to(self.device)
        if self.augment != "none":
            rows = index if self.per_sample else slice(i * self.batch_size, i * self.batch_size + len(index))
            inputs = apply_params(self.augment, inputs, tuple(p[rows].to(self.device) for p in self._params))
        return index.to(self.device), inputs, labels

    def render(self, index: torch.Tensor, view_seed: int | None) -> torch.Tensor:
        """Rows ``index`` decoded and shown as the view ``view_seed`` shows them (None: unaugmented)."""
        index = index.cpu()
        inputs = self.inputs.rows(index).to(self.device)
        if view_seed is None or self.augment == "none":
            return inputs
        params = self._params if view_seed == self.view_seed else self.view_params(view_seed)
        return apply_params(self.augment, inputs, tuple(p[index].to(self.device) for p in params))


def train_data(inputs, labels: torch.Tensor, **options) -> ResidentData:
    """The loop's train data: streamed for a ``LazyImages`` split, else resident on the device."""
    if isinstance(inputs, LazyImages):
        return StreamingData(inputs, labels, workers=inputs.workers, **options)
    return ResidentData(inputs, labels, **options)
