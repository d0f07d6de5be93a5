"""Offline teacher targets for sequence KD: sparse per-token targets computed once, memory-mapped.

GKD's supervised arms (λ = 0, forward KL; with ``seqkd`` the teacher's greedy responses) see the same
responses every epoch, so the teacher's next-token distribution at each response token is fixed. With
``method.teacher_targets: topk | sampled`` the teacher runs once over the train split and keeps, per
response token, ``method.teacher_targets_k`` numbers instead of V:

* ``topk``: the k most probable token ids, their log-probabilities and the log of the remaining tail
  mass (``kdlab.losses.sparse_targets.topk_targets``, loss ``topk_tail_kl``);
* ``sampled``: k ids drawn with replacement from the teacher (seeded by the run seed) and their
  log-probabilities (``sample_targets``, the unbiased estimator ``sampled_kl``).

On disk (ids uint16 up to 65,536 tokens else int32, log-probabilities float16, ``save_sparse_targets``)::

    <root>/<key>/meta.json            what the key was made of
    <root>/<key>/targets/offsets.npy  int64 (rows + 1,): row r's response tokens are [offsets[r], offsets[r+1])
    <root>/<key>/targets/ids.npy, log_probs.npy (N_tokens, k), tail_log_mass.npy (N_tokens,) (top-k only)
    <root>/<key>/targets/sequences.npy, sequence_offsets.npy   SeqKD only: the teacher's responses (int32)
    <root>/<key>/targets/done.json    written last (the folder is renamed into place): sizes and SHA-256s

The key hashes the teacher (``teacher_cache.model_hash``: architecture and weights), the tokenizer
(vocabulary size, pad and EOS ids, task name), the train tokens and labels, the kind, k, the teacher
temperature, the teacher precision, SeqKD, and the seed (sampled targets only): another teacher,
tokenizer or data gets another key and a cache of its own is built. Opening a complete cache checks its
meta.json and every file's size and SHA-256 (as the classification cache, ``kdlab.engine.teacher_cache``,
whose helpers this reuses); a mismatch is one line naming the folder to delete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from kdlab.engine.teacher_cache import _atomic_write, _damaged, _file_sha256, _read_json, data_hash, model_hash
from kdlab.errors import KdlabError
from kdlab.losses.sequence import response_mask
from kdlab.losses.sparse_targets import (id_dtype, load_sparse_targets, sample_targets, save_sparse_targets,
                                         targets_to_torch, topk_targets)
from kdlab.methods.base import Batch

FORMAT_VERSION = 1
KINDS = ("topk", "sampled")
BUILD_ROWS = 8  # train rows per teacher forward while building


def check_k(k: int, vocab: int) -> None:
    """``k`` larger than the vocabulary: one line (before any work)."""
    if k > vocab:
        raise KdlabError(f"method.teacher_targets_k: {k} is larger than the vocabulary ({vocab} tokens); "
                         f"set it to at most {vocab}")


class SeqTargetCache:
    """One run's offline teacher targets under ``root/<key>``: ``complete``, ``build``, ``open``, ``targets``."""

    def __init__(self, root, *, teacher, splits, kind: str, k: int, seed: int, temperature: float,
                 precision: str, seqkd: bool):
        if kind not in KINDS:
            raise KdlabError(f"method.teacher_targets: {kind!r} is not cached; use one of {', '.join(KINDS)}")
        vocab = int(splits.num_classes)
        check_k(k, vocab)
        tokens, labels = splits.train
        info = splits.sequence
        self.vocab, self.kind, self.k, self.seed, self.temperature = vocab, kind, k, seed, temperature
        self.rows = int(len(tokens))
        self.meta = {"version": FORMAT_VERSION, "teacher": model_hash(teacher),
                     "tokenizer": [splits.name, vocab, info.pad_id, info.eos_id],
                     "data": [data_hash(tokens), data_hash(labels)], "kind": kind, "k": k,
                     "seed": seed if kind == "sampled" else None, "temperature": temperature,
                     "precision": precision, "seqkd": seqkd, "rows": self.rows}
        key = hashlib.blake2b(json.dumps(self.meta, sort_keys=True).encode(), digest_size=12).hexdigest()
        self.path = Path(root) / key
        self.folder = self.path / "targets"
        self.stored: dict | None = None

    def _files(self) -> list[str]:
        names = ["offsets.npy", "ids.npy", "log_probs.npy"]
        names += ["tail_log_mass.npy"] if self.kind == "topk" else []
        return names + (["sequences.npy", "sequence_offsets.npy"] if self.meta["seqkd"] else [])

    def complete(self) -> bool:
        return (self.folder / "done.json").exists()

    # ------------------------------------------------------------------ building

    def build(self, method, train, run_teacher, *, device) -> None:
        """Run the teacher once over every train row (SeqKD: over its own greedy responses) and store the targets.

        ``run_teacher(tokens) -> (logits, features)`` is the loop's teacher forward; ``method`` the GKD
        instance (its SeqKD responses and prompts)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "meta.json", json.dumps(self.meta, indent=1))
        generator = torch.Generator().manual_seed(self.seed)  # sampled targets: one stream, rows in order
        tokens, labels = train
        counts, ids, log_probs, tails, sequences = [], [], [], [], []
        for start in range(0, self.rows, BUILD_ROWS):
            index = torch.arange(start, min(self.rows, start + BUILD_ROWS))
            batch = Batch(tokens[index].to(device), labels[index].to(device), index.to(device))
            if self.meta["seqkd"]:
                batch = method._teacher_batch(batch, *method.prompts(batch))
                sequences += [method._teacher_cache[int(i)] for i in index]
            logits, _ = run_teacher(batch.inputs)
            mask = response_mask(batch.labels)
            flat = logits[:, :-1][mask].detach().cpu().double()  # (tokens, V); float64 for the targets
            if flat.shape[-1] != self.vocab:
                raise KdlabError(f"method.teacher_targets: the teacher's logits have {flat.shape[-1]} classes, the "
                                 f"task's vocabulary {self.vocab}; teacher and student must share the tokenizer")
            if self.kind == "topk":
                row_ids, row_lp, row_tail = topk_targets(flat, self.k, temperature=self.temperature)
                tails.append(row_tail)
            else:
                row_ids, row_lp = sample_targets(flat, self.k, generator=generator, temperature=self.temperature)
            ids.append(row_ids)
            log_probs.append(row_lp)
            counts += mask.sum(1).tolist()
        tmp = self.path / f".targets.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_sparse_targets(tmp, torch.cat(ids), torch.cat(log_probs), torch.cat(tails) if tails else None,
                            vocab_size=self.vocab)
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        if self.meta["seqkd"]:
            lengths = [len(s) for s in sequences]
            np.save(tmp / "sequences.npy", np.array([t for s in sequences for t in s], dtype=np.int32))
            np.save(tmp / "sequence_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _file_sha256(tmp / name)}
                 for name in self._files()}
        (tmp / "done.json").write_text(json.dumps({"rows": self.rows, "files": files}))
        try:
            os.replace(tmp, self.folder)
        except OSError:  # another builder (run, rank) finished first: theirs holds the same targets
            if not self.complete():
                raise
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ reading

    def open(self) -> None:
        """Check meta.json and every file's size and SHA-256, then memory-map the targets."""
        stored = _read_json(self.path / "meta.json")
        if stored != self.meta:
            field = next((f for f in self.meta if not isinstance(stored, dict) or stored.get(f) != self.meta[f]),
                         "meta")
            raise _damaged(self.path / "meta.json", f"was built for another {field} than this run's")
        done = _read_json(self.folder / "done.json")
        recorded = done.get("files") if isinstance(done, dict) else None
        if not isinstance(recorded, dict) or set(recorded) != set(self._files()):
            raise _damaged(self.folder / "done.json", "does not list this cache's files (written by another kdlab?)")
        for name in self._files():
            entry, path = recorded[name], self.folder / name
            if not isinstance(entry, dict) or _file_sha256(path) != entry.get("sha256"):
                raise _damaged(path, "changed since it was built (its SHA-256 differs from done.json)")
        try:
            self.stored = load_sparse_targets(self.folder)
            self.offsets = np.load(self.folder / "offsets.npy", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise _damaged(self.folder, f"is not readable ({str(error)[:80]})") from None
        ids = self.stored["ids"]
        if (ids.dtype != id_dtype(self.vocab) or ids.ndim != 2 or ids.shape[1] != self.k
                or self.offsets.shape != (self.rows + 1,) or int(self.offsets[-1]) != ids.shape[0]):
            raise _damaged(self.folder / "ids.npy", f"holds {ids.dtype} {ids.shape}, not {self.k} targets per token")

    def responses(self) -> dict[int, list[int]]:
        """SeqKD: the teacher's stored response (prompt + response tokens) per train row."""
        seqs = np.load(self.folder / "sequences.npy", mmap_mode="r", allow_pickle=False)
        offsets = np.load(self.folder / "sequence_offsets.npy", allow_pickle=False)
        return {r: seqs[offsets[r]:offsets[r + 1]].astype(np.int64).tolist() for r in range(self.rows)}

    def targets(self, indices: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense targets ``(B, T, k)`` (``tail_log_mass`` ``(B, T)``) for train rows ``indices`` at ``mask``'s
        response positions (``(B, T)``, the logits' shifted mask); zeros elsewhere (the losses mask them)."""
        rows = indices.cpu().numpy()
        starts, stops = self.offsets[rows], self.offsets[rows + 1]
        found = mask.sum(1).cpu().numpy()
        if not np.array_equal(stops - starts, found):
            raise KdlabError(f"method.teacher_targets: cache {self.path} holds other responses than this batch's "
                             f"({(stops - starts).tolist()} vs {found.tolist()} tokens); delete the folder to rebuild")
        flat = targets_to_torch(self.stored, np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]))
        out = {}
        for name, value in flat.items():
            dense = value.new_zeros((*mask.shape, *value.shape[1:]))
            dense[mask.cpu()] = value
            out[name] = dense.to(mask.device)
        return out

    @property
    def bytes_per_token(self) -> float:
        """Disk bytes of the targets (ids, log-probabilities, tail) per response token."""
        tokens = max(int(self.offsets[-1]), 1)
        return sum((self.folder / f"{n}.npy").stat().st_size for n in ("ids", "log_probs", "tail_log_mass")
                   if (self.folder / f"{n}.npy").exists()) / tokens


def attach(method, splits, *, run_teacher, root, seed: int, precision: str, device) -> SeqTargetCache:
    """The run's cache of offline targets, built first if missing (the teacher's only use in training)."""
    h = method.hparams
    cache = SeqTargetCache(Path(root) / "sequence_targets", teacher=method._networks["teacher"], splits=splits,
                           kind=h.teacher_targets, k=h.teacher_targets_k, seed=seed,
                           temperature=h.teacher_temperature, precision=precision, seqkd=h.seqkd)
    if not cache.complete():
        cache.build(method, splits.train, run_teacher, device=device)
    cache.open()
    if h.seqkd:
        method._teacher_cache.update(cache.responses())
    return cache
