"""Teacher-output cache: a fixed teacher's logits (and tapped features) on the train split, computed once.

A KD step costs a student forward–backward plus a teacher forward; for a fixed teacher
in eval mode and a fixed input the teacher forward always gives the same answer, so it
can be stored. The cache lives on disk as float16 ``.npy`` files opened memory-mapped:

    <root>/<key>/meta.json                 what the key was made of (teacher, data, transform, taps)
    <root>/<key>/<view>/logits.npy         float16 (N, *logit_shape)
    <root>/<key>/<view>/feature-<i>.npy    float16 (N, *shape) per teacher tap, in ``taps`` order
    <root>/<key>/<view>/done.json          written last: rows and each array's size and SHA-256; a view
                                           without it is incomplete and rebuilt

``key`` hashes the teacher's weights (and architecture text), the train inputs, the
transform (augmentation kind), the teacher's precision and the taps, so a changed
teacher, dataset or transform never meets an old cache: it gets a new key. A view is
one deterministic rendering of the train split: ``plain`` (no augmentation) or
``aug-<seed>`` (each sample augmented with parameters drawn from ``seed``; the loop
uses one seed per epoch, ``kdlab.engine.seed.augment_seed``). Reusing a view checks it
twice: the live teacher is re-run on a random sample of rows (``verify``: a teacher
whose code changed under the same weights), and every array's SHA-256, recorded when
the view was built, is recomputed (``check_hashes``: any changed, truncated or swapped
row, not only the sampled ones). Hashing reads each file once at ~0.4 GB/s on the
shared dev machine: 2 ms for CIFAR-10's 50,000 × 10 logits, about 1 s for a 410 MB
feature tap, where the teacher pass it saves takes minutes. A file that is not a
float16 array of the expected rows (object dtype, truncated, unreadable) and a
``meta.json``/``done.json`` that is not what kdlab wrote are refused with one line.
Caches written before the hashes (format 1) have another key and are never reused:
a new one is built beside them.

For large vocabularies ``topk_compress`` / ``topk_probabilities`` keep the top-k
logits, their indices and the remaining probability mass instead of every logit.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from kdlab.errors import KdlabError

FORMAT_VERSION = 2  # 2: done.json records each array's SHA-256 (format 1 caches are rebuilt under a new key)
VERIFY_ROWS = 16  # rows re-run through the live teacher when a view is opened
# float16 keeps 11 significant bits: a stored value is within 2^-11 relative of the live one; the rest
# allows for autocast/kernel differences between the run that built the cache and this one.
VERIFY_RTOL, VERIFY_ATOL = 4e-3, 4e-3


# --------------------------------------------------------------------------- content hashes


def tensor_digest(tensor: torch.Tensor, digest=None):
    """Feed ``tensor``'s dtype, shape and raw bytes into a blake2b ``digest`` (a new one if None)."""
    digest = digest or hashlib.blake2b(digest_size=16)
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest


def model_hash(model: nn.Module) -> str:
    """Content hash of a network: its architecture text and every parameter and buffer (name, dtype, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(model).__qualname__.encode())
    digest.update(repr(model).encode())
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        tensor_digest(value, digest)
    return digest.hexdigest()


def data_hash(inputs: torch.Tensor) -> str:
    """Content hash of the train inputs (the teacher's outputs depend on nothing else of the data)."""
    if hasattr(inputs, "fingerprint"):  # a streamed split (kdlab.data.streaming): its files stand for its pixels
        return inputs.fingerprint()
    return tensor_digest(inputs).hexdigest()


def cache_key(*, teacher: str, data: str, transform: str, precision: str, taps: tuple[str, ...]) -> str:
    text = json.dumps({"version": FORMAT_VERSION, "teacher": teacher, "data": data, "transform": transform,
                       "precision": precision, "taps": list(taps)}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


# --------------------------------------------------------------------------- top-k storage


def topk_compress(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k storage of teacher logits ``(..., V)`` for large vocabularies.

    Returns ``values`` float16 ``(..., k)`` (the k largest logits), ``indices`` int32
    ``(..., k)`` and ``rest`` float32 ``(...)``: the softmax probability mass (T = 1) of the
    V − k classes left out, 1 − Σ_topk softmax(logits). ``topk_probabilities`` inverts it.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise KdlabError(f"teacher cache top-k: k must be in [1, {logits.shape[-1]}] (the vocabulary), got {k}")
    values, indices = logits.float().topk(k, dim=-1)
    log_z = torch.logsumexp(logits.float(), dim=-1)
    kept = torch.exp(values - log_z[..., None]).sum(-1)
    return values.half(), indices.int(), (1.0 - kept).clamp_min(0.0)


def topk_probabilities(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher distribution ``(..., V)`` (float32) from ``topk_compress``'s output.

    The k kept classes get softmax probabilities renormalised so that together they hold
    ``1 − rest`` (their share of the full softmax); ``rest`` is spread evenly over the
    V − k others (the cache no longer knows how it was split). With k = V it is the
    softmax itself, up to float16 rounding of the logits.
    """
    values = values.float()
    kept = torch.softmax(values, dim=-1) * (1.0 - rest)[..., None]
    others = vocab - values.shape[-1]
    fill = (rest / others)[..., None] if others else torch.zeros_like(rest)[..., None]
    probs = fill.expand(*values.shape[:-1], vocab).clone()
    return probs.scatter(-1, indices.long(), kept)


# --------------------------------------------------------------------------- the cache


@dataclass
class CachedView:
    """One view's outputs: ``logits`` and ``features`` (by tap name) as float16 tensors, rows = train samples."""

    name: str
    logits: torch.Tensor
    features: dict[str, torch.Tensor]

    def to(self, device: torch.device) -> "CachedView":
        return CachedView(self.name, self.logits.to(device),
                          {k: v.to(device) for k, v in self.features.items()})


def view_name(augment_seed: int | None) -> str:
    return "plain" if augment_seed is None else f"aug-{augment_seed}"


class TeacherCache:
    """A teacher's outputs on one train split, on disk under ``root/<key>``.

    ``run_teacher(inputs) -> (logits, {tap: feature})`` runs the live teacher on a batch of
    (already transformed) inputs; ``render(view, index) -> inputs`` gives the inputs of
    train rows ``index`` as that view shows them. Both are supplied by the loop, so the
    cache stores exactly what the loop would compute.
    """

    def __init__(self, root: str | Path, *, teacher: nn.Module, inputs: torch.Tensor, transform: str,
                 precision: str, taps: tuple[str, ...] = ()):
        self.taps = tuple(taps)
        self.meta = {"version": FORMAT_VERSION, "teacher": model_hash(teacher), "data": data_hash(inputs),
                     "transform": transform, "precision": precision, "taps": list(self.taps),
                     "rows": int(len(inputs))}
        self.key = cache_key(teacher=self.meta["teacher"], data=self.meta["data"], transform=transform,
                             precision=precision, taps=self.taps)
        self.path = Path(root) / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        meta_file = self.path / "meta.json"
        if meta_file.exists():
            check_meta(_read_json(meta_file), self.meta, self.path)
        else:
            _atomic_write(meta_file, json.dumps(self.meta, indent=1))

    def _files(self) -> list[str]:
        return ["logits.npy", *(f"feature-{i}.npy" for i in range(len(self.taps)))]

    def has(self, view: str) -> bool:
        return (self.path / view / "done.json").exists()

    def load(self, view: str) -> CachedView:
        """The stored view, memory-mapped (read-only); KdlabError if it is not complete."""
        folder = self.path / view
        if not self.has(view):
            raise KdlabError(f"teacher cache: view {view!r} is missing or incomplete in {self.path}")
        recorded = self._recorded(view)
        arrays = [_open_array(folder / name, rows=self.meta["rows"], size=recorded[name]["bytes"])
                  for name in self._files()]
        return CachedView(view, arrays[0], dict(zip(self.taps, arrays[1:])))

    def _recorded(self, view: str) -> dict:
        """``{file: {"bytes", "sha256"}}`` from the view's done.json; KdlabError if it is not what build wrote."""
        path = self.path / view / "done.json"
        done = _read_json(path)
        recorded = done.get("files") if isinstance(done, dict) else None
        if (not isinstance(recorded, dict) or done.get("rows") != self.meta["rows"]
                or set(recorded) != set(self._files())
                or not all(isinstance(entry, dict) and {"bytes", "sha256"} <= set(entry)
                           for entry in recorded.values())):
            raise _damaged(path, "does not list this cache's arrays, sizes and hashes (written by another kdlab?)")
        return recorded

    def check_hashes(self, view: str) -> None:
        """Recompute every array's SHA-256 and refuse the view if one differs from the one recorded at build time."""
        folder = self.path / view
        recorded = self._recorded(view)
        for name in self._files():
            if _file_sha256(folder / name) != recorded[name]["sha256"]:
                raise _damaged(folder / name, "changed since it was built (its SHA-256 differs from done.json)")

    def build(self, view: str, *, rows: int, render: Callable[[torch.Tensor], torch.Tensor],
              run_teacher: Callable, batch_size: int = 512) -> CachedView:
        """Run the teacher over every row of ``view`` and store its outputs (float16); return them."""
        tmp = self.path / f".{view}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        arrays: dict[str, np.memmap] = {}
        for start in range(0, rows, batch_size):
            index = torch.arange(start, min(rows, start + batch_size))
            logits, features = run_teacher(render(index))
            outputs = {"logits": logits, **{f"feature-{i}": features[name] for i, name in enumerate(self.taps)}}
            for file, value in outputs.items():
                if file not in arrays:
                    arrays[file] = np.lib.format.open_memmap(tmp / f"{file}.npy", mode="w+", dtype=np.float16,
                                                             shape=(rows, *value.shape[1:]))
                arrays[file][start:start + len(index)] = value.detach().float().cpu().numpy().astype(np.float16)
        for array in arrays.values():
            array.flush()
        del arrays
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _file_sha256(tmp / name)}
                 for name in self._files()}
        (tmp / "done.json").write_text(json.dumps({"rows": rows, "files": files}))
        final = self.path / view
        try:
            os.replace(tmp, final)
        except OSError:  # a concurrent builder (another run, another rank) finished first: theirs is as good
            if not (final / "done.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return self.load(view)

    def get(self, view: str, *, rows: int, render: Callable[[torch.Tensor], torch.Tensor], run_teacher: Callable,
            generator: torch.Generator | None = None, batch_size: int = 512) -> tuple[CachedView, bool]:
        """The view (built if missing, else verified against the live teacher) and whether it was a hit."""
        if not self.has(view):
            return self.build(view, rows=rows, render=render, run_teacher=run_teacher, batch_size=batch_size), False
        cached = self.load(view)
        verify(cached, render=render, run_teacher=run_teacher, taps=self.taps, path=self.path / view,
               generator=generator)
        self.check_hashes(view)  # the rows the live check did not sample
        return cached, True


def check_meta(stored: dict, expected: dict, path: Path) -> None:
    """Refuse a cache folder built for another teacher, dataset, transform or taps (one line, with the fix)."""
    if not isinstance(stored, dict):
        raise _damaged(path / "meta.json", "is not what kdlab wrote (not a JSON object)")
    for field, what in (("version", "format version"), ("teacher", "teacher weights"), ("data", "train data"),
                        ("transform", "augmentation"), ("precision", "teacher precision"), ("taps", "teacher taps"),
                        ("rows", "number of train rows")):
        if stored.get(field) != expected.get(field):
            raise KdlabError(f"teacher cache {path}: built for other {what} ({stored.get(field)!r}, now "
                             f"{expected.get(field)!r}); delete the folder or set train.teacher_cache: false")


def verify(cached: CachedView, *, render, run_teacher, taps: tuple[str, ...], path: Path,
           generator: torch.Generator | None = None, rows: int = VERIFY_ROWS) -> None:
    """Compare ``rows`` random rows of a stored view with the live teacher; KdlabError if they disagree."""
    total = len(cached.logits)
    index = torch.randperm(total, generator=generator)[:rows].sort().values
    logits, features = run_teacher(render(index))
    pairs = [("logits", logits, cached.logits)] + [(f"tap {name!r}", features[name], cached.features[name])
                                                     for name in taps]
    for what, live, stored in pairs:
        live = live.detach().float().cpu()
        stored = stored[index].float()
        if live.shape != stored.shape:  # checked first: the difference below would not broadcast
            raise KdlabError(f"teacher cache {path}: stale, its {what} have shape {tuple(stored.shape[1:])} per row, "
                             f"the live teacher's {tuple(live.shape[1:])}; delete the folder to rebuild it, or set "
                             "train.teacher_cache: false")
        scale = live.abs().amax().clamp_min(1.0)
        error = (live - stored).abs().amax()
        if not bool(error <= VERIFY_ATOL * scale + VERIFY_RTOL * live.abs().amax()):
            raise KdlabError(f"teacher cache {path}: stale, its {what} differ from the live teacher's (max |diff| "
                             f"{float(error)}); delete the folder to rebuild it, or set train.teacher_cache: false")


def _damaged(path: Path, what: str) -> KdlabError:
    return KdlabError(f"teacher cache {path}: {what}; delete the folder {path.parent} to rebuild it, "
                      "or set train.teacher_cache: false")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise _damaged(path, f"is unreadable ({str(error)[:80]})") from None


def _file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()  # SHA-256: 2.3x blake2b's speed here (SHA-NI); hashlib.file_digest needs 3.11
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _open_array(path: Path, *, rows: int, size) -> torch.Tensor:
    """A stored float16 array of ``rows`` rows, memory-mapped; one-line KdlabError for anything else."""
    try:
        actual = path.stat().st_size
        if actual != size:
            raise ValueError(f"{actual} bytes, {size!r} when built: truncated or replaced")
        # Copy-on-write map: torch wants a writable array, and nothing is ever written back. allow_pickle
        # stays False, so an object array is refused rather than unpickled.
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise _damaged(path, f"is not a readable array ({str(error)[:80]})") from None
    if array.dtype != np.float16 or array.ndim < 1 or array.shape[0] != rows:
        raise _damaged(path, f"holds {array.dtype} {array.shape}, not float16 with {rows} rows")
    return torch.from_numpy(array)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
