"""Guards for the files of a run folder: no symbolic links followed, leftovers cleaned, damage named.

Every write or delete under a run folder goes through ``safe_path`` (or ``remove_path``):
a path that leaves the folder, or that crosses a symbolic link inside it, is refused
with one line, so a link planted in a workspace never makes kdlab truncate, append to
or delete a file elsewhere. Damage found in a run folder raises ``RunFolderError``: like a
full disk it is not the run's fault, so the run is left resumable and the study stops (exit 2).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from kdlab.errors import WorkspaceError


class RunFolderError(WorkspaceError):
    """A run folder holds a link, a damaged or an inconsistent file: one line naming it and the fix."""


def safe_path(base: Path, path: Path) -> Path:
    """``path`` after checking that it lies inside ``base`` and that no part of it below ``base`` is a link."""
    base, path = Path(base), Path(path)
    try:
        parts = path.relative_to(base).parts
    except ValueError:
        raise RunFolderError(f"{path} lies outside {base}; kdlab writes a run's files only inside its folder") from None
    current = base
    for part in parts:
        if part in ("..", "."):
            raise RunFolderError(f"{path} leaves {base} through {part!r}; kdlab writes a run's files only inside "
                                 "its folder")
        current = current / part
        if current.is_symlink():
            raise RunFolderError(f"{current} is a symbolic link; kdlab never writes or deletes through a link in a "
                                 f"workspace: remove the link (rm {current}) and run again")
    return path


def remove_path(base: Path, path: Path) -> None:
    """Delete ``path`` (a file or a folder tree) under ``base``; a link is removed itself, never its target."""
    safe_path(base, path.parent)
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # removes links inside the tree without following them
    else:
        path.unlink(missing_ok=True)


# Temporary names: atomic_write_* (".<name>.<random>.tmp") and save_checkpoint (".tmp-epoch-NNNN-<pid>").
_ATOMIC_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
_EPOCH_TMP = re.compile(r"^\.tmp-epoch-\d+-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove what killed writers left in ``run_dir`` (and its checkpoint and epoch folders); return it.

    Called by the run's new owner right after its claim, before it writes: a checkpoint folder
    is removed only if its writer's pid is dead and not this process; an atomic write's
    temporary file has no pid in its name and, the run being claimed, no live writer.
    """
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "best", run_dir / "epochs"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for entry in folder.iterdir():
            epoch_tmp = _EPOCH_TMP.match(entry.name)
            if epoch_tmp is not None:
                pid = int(epoch_tmp.group(1))
                if pid == os.getpid() or _alive(pid):
                    continue
            elif not (_ATOMIC_TMP.match(entry.name) and not entry.is_dir()):
                continue
            remove_path(run_dir, entry)
            removed.append(entry)
    return removed
