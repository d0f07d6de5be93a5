"""What reusing a teacher-output cache costs: the SHA-256 check of every array against a teacher pass.

    .venv/bin/python benchmarks/bench_teacher_cache_check.py [--rows 5000] [--model resnet20] [--threads 1]

Builds a plain view of ``--rows`` CIFAR-shaped (3×32×32) inputs with a zoo teacher (timing the
teacher pass that the cache saves), then reopens it (timing the live 16-row spot-check and the
hash check of every array), and hashes a 410 MB file, the size of one 50,000 × 64×8×8 float16
feature tap. The numbers go in docs/reliability.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdlab.engine.teacher_cache import TeacherCache, _file_sha256


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    from kdlab.data import build_splits
    from kdlab.engine.build import build_model

    with tempfile.TemporaryDirectory() as folder:
        splits = build_splits("synthetic", {"num_classes": 10, "input_shape": [3, 32, 32], "num_train": args.rows,
                                            "num_test": 10}, root=None, cache_dir=Path(folder) / "data",
                              val_fraction=0.0, split_seed=0)
        x = splits.train[0]
        teacher = build_model(args.model, {}, splits).eval()

        def run_teacher(inputs):
            with torch.inference_mode():
                return teacher(inputs), {}

        open_cache = lambda: TeacherCache(Path(folder) / "tc", teacher=teacher, inputs=x, transform="none",  # noqa
                                          precision="fp32/same")
        start = time.perf_counter()
        open_cache().get("plain", rows=len(x), render=lambda i: x[i], run_teacher=run_teacher)
        build = time.perf_counter() - start
        cache = open_cache()
        start = time.perf_counter()
        cache.get("plain", rows=len(x), render=lambda i: x[i], run_teacher=run_teacher)
        reuse = time.perf_counter() - start
        start = time.perf_counter()
        cache.check_hashes("plain")
        hashes = time.perf_counter() - start
        size = (cache.path / "plain" / "logits.npy").stat().st_size
        print(f"{args.rows} rows, {args.model}: teacher pass + build {build:.2f} s "
              f"({build / args.rows * 50000:.0f} s per 50,000 rows); reuse (16-row check + hashes) {reuse:.3f} s; "
              f"hash check alone {hashes * 1e3:.1f} ms for {size / 1e6:.2f} MB of logits")
        tap = Path(folder) / "tap.npy"
        np.save(tap, np.zeros((50000, 64 * 8 * 8 // 8), dtype=np.float16).repeat(8, axis=1))
        _file_sha256(tap)  # into the page cache, as a cache in use would be
        start = time.perf_counter()
        _file_sha256(tap)
        seconds = time.perf_counter() - start
        print(f"SHA-256 of a {tap.stat().st_size / 1e6:.0f} MB feature tap: {seconds:.2f} s "
              f"({tap.stat().st_size / 1e6 / seconds:.0f} MB/s)")


if __name__ == "__main__":
    main()
