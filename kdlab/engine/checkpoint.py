"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A training checkpoint is a folder ``checkpoints/epoch-NNNN/`` holding
``weights.safetensors`` (student, method, optimiser and RNG tensors) and
``state.json`` (epoch, step, scheduler, best-so-far, optimiser hyperparameters).
The folder is written under a temporary name and renamed into place, then
``checkpoints/latest.json`` is replaced atomically to point at it, so a process
killed at any moment leaves the previous checkpoint intact and referenced.

A model file (``model.safetensors``) holds one network's weights and, in its
safetensors metadata, the architecture (zoo name + options) that rebuilds it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from kdlab.engine.run_files import RunFolderError, safe_path
from kdlab.errors import KdlabError
from kdlab.store.files import atomic_write_bytes, atomic_write_json, workspace_error

MODEL_METADATA_KEY = "kdlab_model"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; checkpoints are small next to training.
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def flatten_optimizer(state_dict: dict, prefix: str = "optimizer") -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (per-parameter buffers, keys ``prefix.i.name``) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, buffers in state_dict["state"].items():
        for name, value in buffers.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optimizer") -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: Path, epoch: int, tensors: dict[str, torch.Tensor], state: dict, *,
                    keep_last: int = 2) -> Path:
    """Write checkpoint ``epoch`` under ``root`` atomically and prune older ones (keeping ``keep_last``)."""
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".tmp-epoch-{epoch:04d}-{os.getpid()}"
    for path in (tmp, final, root / "latest.json"):  # never through a link planted in the folder
        safe_path(root, path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # Each file fsynced before the folder is renamed into place (atomic_write_*), so after a
        # power loss latest.json never points at a folder whose files are still only in the page cache.
        atomic_write_bytes(tmp / "weights.safetensors", save(_contiguous(tensors)))
        atomic_write_json(tmp / "state.json", {"epoch": epoch, **state})
        if final.exists():  # left by a run that crashed before pointing latest.json at it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_json(root / "latest.json", {"epoch": epoch, "dir": final.name})
    except BaseException as error:
        # A full disk or a kill mid-write: drop the half-written folder; latest.json still names the last good one.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and workspace_error(root, error) is not None:
            raise workspace_error(root, error) from None
        raise
    kept = sorted(p for p in root.glob("epoch-*") if p.is_dir() and not p.is_symlink())
    for old in kept[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_pointer(root: Path) -> tuple[int, Path] | None:
    """(epoch, folder) that ``root/latest.json`` names, checked: the folder is ``epoch-NNNN`` of that epoch,
    directly inside ``root`` and no link (a pointer never leads out of the run folder); None without one."""
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    safe_path(root, pointer)
    try:
        record = json.loads(pointer.read_text())
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"checkpoint {pointer} is unreadable ({exc}); run with --no-resume to start the run "
                             "over") from None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or record.get("dir") != f"epoch-{epoch:04d}":
        raise RunFolderError(f"checkpoint {pointer} is damaged (expected {{\"epoch\": N, \"dir\": \"epoch-NNNN\"}}, "
                             "the folder of that epoch); run with --no-resume to start the run over")
    return epoch, safe_path(root, root / record["dir"])


def load_latest_checkpoint(root: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The checkpoint ``latest.json`` points at, as (tensors, state); None if there is none.

    The state's epoch must be the pointer's (a checkpoint is one consistent epoch, or refused)."""
    found = read_pointer(root)
    if found is None:
        return None
    epoch, folder = found
    try:
        tensors = load_file(str(safe_path(root, folder / "weights.safetensors")))
        state = json.loads(safe_path(root, folder / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as exc:
        raise RunFolderError(f"checkpoint {folder} is unreadable ({exc}); run with --no-resume to start the run "
                             "over") from None
    if not isinstance(state, dict) or state.get("epoch") != epoch:
        found = state.get("epoch") if isinstance(state, dict) else state
        raise RunFolderError(f"checkpoint {folder / 'state.json'} is inconsistent (epoch {found!r}, but "
                             f"{root / 'latest.json'} names epoch {epoch}); run with --no-resume to start the run over")
    return tensors, state


def save_model(path: Path, model: torch.nn.Module, spec: dict) -> None:
    """Save one network's weights with its architecture ``spec`` in the metadata, atomically; a LoRA student's
    are its merged weights under the plain names (``kdlab.seq.peft``), which the spec rebuilds."""
    state = model.state_dict()
    if getattr(model, "kdlab_adapter", None) is not None:
        from kdlab.seq.peft import merged_state_dict

        state = merged_state_dict(model)
    atomic_write_bytes(path, save(_contiguous(state), metadata={MODEL_METADATA_KEY: json.dumps(spec)}))


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, architecture spec or None) of a safetensors model file."""
    path = Path(path)
    if not path.is_file():
        raise KdlabError(f"checkpoint {path} does not exist; check the path (teacher.checkpoint / student.checkpoint)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        spec = _model_spec(metadata.get(MODEL_METADATA_KEY), path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise KdlabError(f"checkpoint {path} is not a readable safetensors file ({exc}); "
                         "re-export it with safetensors.torch.save_file") from None
    flags = sorted(key for key, t in tensors.items() if t.dtype == torch.bool)
    if flags:
        raise KdlabError(f"checkpoint {path}: tensor {flags[0]} holds booleans, not weights; "
                         "re-export the model's state dict")
    return tensors, spec


def _model_spec(text: str | None, path: Path) -> dict | None:
    """The kdlab architecture record of a model file, validated like a config section (same bounds) before
    anything is built from it: a crafted file cannot ask for an unknown option or a huge width."""
    from kdlab import registry
    from kdlab.config import check_options  # the config's own checks and bounds

    if not text:
        return None
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        raise KdlabError(f"checkpoint {path}: its kdlab metadata is not JSON; re-export the model") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str) or \
            not isinstance(spec.get("options", {}), dict):
        raise KdlabError(f"checkpoint {path}: its kdlab metadata names no model (a mapping with model and "
                         "options); re-export the model")
    if spec["model"] not in registry.names("model"):
        return spec  # an unknown model: the builder names the choices (or the caller's model= is used)
    errors: list[str] = []
    spec["options"] = check_options(f"{path} model", "model", spec["model"], spec.get("options", {}), set(), errors)
    if errors:
        raise KdlabError(f"checkpoint {path}: its metadata is not a valid model section ({errors[0]}); re-export the model")
    return spec


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Load a state dict strictly; a mismatch is one line naming the file and the first differences."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    ints = sorted(k for k in set(own) & set(tensors) if own[k].is_floating_point() and not tensors[k].is_floating_point())
    if ints:
        raise KdlabError(f"checkpoint {source}: {ints[0]} holds {tensors[ints[0]].dtype} values where the model "
                         "has floating-point weights; re-export the model's state dict")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k} is {tuple(tensors[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        raise KdlabError(f"checkpoint {source} does not match the model ({'; '.join(parts)}); "
                         "check the model name and options it was trained with")
    model.load_state_dict(tensors)
