"""Device-resident training data: the train tensors live on the training device, batches are index gathers.

Small datasets (MNIST-1D, digits, CIFAR: well under a GiB as float32) fit in device
memory, so there is no DataLoader, no worker process and no host→device copy per
step, in the manner of the fast CIFAR-10 training scripts: the epoch's order is one
``randperm`` (copied to the device once), a batch is ``x[index]``, and random
augmentation runs on the device as one gather or resample (``augment.apply_params``).

Two ways of drawing the augmentation, both fixed by the seed:

* ``per_batch`` (the loop's default): each batch draws its crop offsets and flips from
  the epoch generator right after the previous batch's — the random stream the loop has
  always used, so existing runs keep their results;
* ``per_sample``: once per epoch, one (top, left, flip) per train *sample* is drawn from
  its own generator seeded ``augment_seed(seed, epoch)``, so a sample's view in an
  epoch does not depend on which batch it lands in. The teacher-output cache needs
  this: it stores the teacher's outputs of every sample's view under that seed.
"""
from __future__ import annotations

import torch

from kdlab.data.augment import apply_params, augment_batch, draw_params


def augment_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of ``epoch`` in a run with ``seed`` (``per_sample`` views; the cache's key)."""
    return 10**9 + seed * 1_000_003 + epoch  # disjoint from epoch_generator's seeds for any realistic run


class ResidentData:
    """Train ``inputs``/``labels`` on ``device``, served in shuffled batches of ``batch_size``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, *, device: torch.device, batch_size: int,
                 augment: str = "none", per_sample: bool = False, seed: int = 0):
        self.inputs, self.labels = inputs.to(device), labels.to(device)
        self.device, self.batch_size, self.augment = torch.device(device), batch_size, augment
        self.per_sample, self.seed = per_sample, seed
        self.view_seed: int | None = None  # the per-sample augmentation seed of the current epoch
        self._order = self._params = self._generator = None
        if augment != "none" and per_sample and len(self.inputs):
            # Checks the kind and the input shape once (a clear error); its random draw is discarded.
            augment_batch(self.inputs[:1], kind=augment, generator=torch.Generator())

    def __len__(self) -> int:
        return len(self.inputs)

    def start_epoch(self, epoch: int, generator: torch.Generator) -> None:
        """Shuffle with ``generator`` (the epoch's); with ``per_sample`` draw every sample's augmentation."""
        self._generator = generator
        self._order = torch.randperm(len(self.inputs), generator=generator).to(self.device)
        if self.augment != "none" and self.per_sample:
            self.view_seed = augment_seed(self.seed, epoch)
            self._params = tuple(p.to(self.device) for p in self.view_params(self.view_seed))

    def view_params(self, view_seed: int):
        """Every sample's augmentation numbers of the view with ``view_seed`` (on the CPU; ``draw_params``)."""
        return draw_params(self.augment, len(self.inputs), shape=tuple(self.inputs.shape[1:]),
                           generator=torch.Generator().manual_seed(view_seed))

    def render(self, index: torch.Tensor, view_seed: int | None) -> torch.Tensor:
        """Rows ``index`` as the view ``view_seed`` shows them (None: unaugmented); on the device."""
        index = index.to(self.device)
        inputs = self.inputs[index]
        if view_seed is None or self.augment == "none":
            return inputs
        if view_seed == self.view_seed and self._params is not None:  # the current epoch's view: drawn already
            params = tuple(p[index] for p in self._params)
        else:
            params = tuple(p[index.cpu()].to(self.device) for p in self.view_params(view_seed))
        return apply_params(self.augment, inputs, params)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``i`` of the current epoch: (train-row indices, inputs, labels), all on the device."""
        index = self._order[i * self.batch_size:(i + 1) * self.batch_size]
        inputs, labels = self.inputs[index], self.labels[index]
        if self.augment != "none":
            if self.per_sample:
                inputs = apply_params(self.augment, inputs, tuple(p[index] for p in self._params))
            else:
                inputs = augment_batch(inputs, kind=self.augment, generator=self._generator)
        return index, inputs, labels
