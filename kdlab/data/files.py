"""Finding a dataset's files under data.root, with errors that say what to put where."""
from __future__ import annotations

from pathlib import Path

from kdlab.errors import KdlabError


def require_root(root: Path | None, *, dataset: str, expected: str, source: str) -> Path:
    """``root`` as an existing folder, or KdlabError telling how to set data.root.

    expected: what the folder should hold (e.g. ``"cifar-10-batches-py/"``);
    source: where to download it.
    """
    if root is None:
        raise KdlabError(
            f"data.root: dataset {dataset!r} reads {expected} from disk but data.root is not set; "
            f"set data.root to the folder holding it (download from {source})"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KdlabError(
            f"data.root: folder {root} does not exist; create it and put {expected} in it (download from {source})"
        )
    return root


def find_folder(candidates: list[Path], markers: tuple[str, ...]) -> Path | None:
    """The first folder of ``candidates`` holding a file named one of ``markers``, else None."""
    for folder in candidates:
        if any((folder / marker).is_file() for marker in markers):
            return folder
    return None
