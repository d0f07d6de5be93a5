"""What the datasets read from the user's own files share: finding a file, a test split, scaling to [0, 1]."""
from __future__ import annotations

from pathlib import Path

import torch

from kdlab.data.stratify import stratified_holdout
from kdlab.errors import KdlabError

# The test split carved out of train when the user's data has none: fixed, so every run sees the same one.
TEST_SPLIT_SEED = 0


def user_file(root: Path | None, name: str, *, key: str) -> Path:
    """``name`` (option ``key``) as an existing file: absolute or ``~``, else relative to data.root."""
    path = Path(name).expanduser()
    if not path.is_absolute():
        if root is None:
            raise KdlabError(f"data.{key}: {name!r} is a relative path but data.root is not set; set data.root "
                             "to the folder holding it, or give an absolute path")
        path = Path(root).expanduser() / path
    if not path.is_file():
        raise KdlabError(f"{path}: file not found (data.{key}); check the path, relative paths are under data.root")
    return path


def carve_test(x: torch.Tensor, y: torch.Tensor, fraction: float, *, source: str):
    """Hold out a stratified ``fraction`` of ``(x, y)`` as the test split: ``(x_train, y_train, x_test, y_test)``."""
    if len(x) < 2:
        raise KdlabError(f"{source}: {len(x)} sample(s), too few to carve a test split; add samples or give a "
                         "test file/folder")
    kept, held = stratified_holdout(y, fraction=fraction, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    return x[kept], y[kept], x[held], y[held]


def scale_to_unit(train: torch.Tensor, others: list[torch.Tensor], *, scale: float | None, normalize: str,
                  source: str, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """Float32 copies of ``[train, *others]`` in [0, 1], as the user said.

    ``scale``: divide by it (255 for 8-bit pixels). ``normalize``: "none" (the values must then already
    lie in [0, 1]) or a min-max over ``dims`` of the train split (per channel, per column), applied to
    every split; values of the other splits beyond train's range are clipped.
    """
    tensors = [t.to(torch.float32) for t in (train, *others)]
    if scale is not None:
        tensors = [t / scale for t in tensors]
    if normalize != "none" and train.numel():
        low = tensors[0].amin(dim=dims, keepdim=True)
        span = (tensors[0].amax(dim=dims, keepdim=True) - low).clamp_min(1e-12)
        tensors = [((t - low) / span).clamp_(0, 1) for t in tensors]
    ends = [float(v) for t in tensors if t.numel() for v in torch.aminmax(t)]
    if ends and not all(0.0 <= v <= 1.0 for v in ends):  # NaN fails too
        hint = "set scale: 255 for 8-bit values, or normalize: per_channel" if normalize == "none" else \
            "remove the NaN/infinite values"
        raise KdlabError(f"{source}: input values span [{min(ends):g}, {max(ends):g}], not [0, 1]; {hint}")
    return tensors
