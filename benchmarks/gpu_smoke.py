"""GPU smoke check: the CUDA paths of the loop (fp16 with a gradient scaler, bf16 autocast), an adversary
optimiser, a generator and feature taps, each through a short real run on the synthetic dataset; and GKD
(KV-cached on-policy sampling, SeqKD generation, chunked divergence under bf16) on the reverse task.

    python benchmarks/gpu_smoke.py [WORKSPACE]

Prints one line per run (method, precision, status, test accuracy, seconds) and exits 1 if any failed.
Not a unit test: CI has no GPU.
"""
from __future__ import annotations

import sys
import tempfile
import time

import torch

import kdlab

BASE = {
    "data": {"dataset": "synthetic", "num_classes": 4, "input_shape": [1, 16], "num_train": 2048, "num_test": 512,
             "separation": 3.0},
    "teacher": {"model": "cnn1d", "width": 32, "train": {"epochs": 3, "batch_size": 128, "device": "cuda"}},
    "student": {"model": "cnn1d", "width": 8},
    "train": {"epochs": 3, "batch_size": 128, "device": "cuda"},
    "seeds": [0],
}
ARMS = {
    "kd_fp16": ({"name": "kd"}, "fp16"),
    "kd_bf16": ({"name": "kd"}, "bf16"),
    "distill_fitnet_bf16": ({"name": "distill", "terms": {"ce": 0.1, "kl": {"weight": 0.9},
                                                          "hint": {"loss": "fitnet", "student": "pool",
                                                                   "teacher": "pool"}}}, "bf16"),
    "adversarial_kd_fp32": ({"name": "adversarial_kd"}, "fp32"),
    "dfad_fp32": ({"name": "dfad"}, "fp32"),
    "miles_fp32": ({"name": "miles"}, "fp32"),
}

# Sequence distillation on the GPU: tinygpt teacher/student, KV-cached on-policy sampling, SeqKD generation.
SEQ_BASE = {
    "data": {"dataset": "reverse", "num_train": 1024, "num_test": 128},
    "teacher": {"model": "tinygpt", "layers": 2, "width": 64,
                "train": {"steps": 200, "batch_size": 64, "optimizer": "adamw", "lr": 0.003, "device": "cuda"}},
    "student": {"model": "tinygpt", "layers": 1, "width": 32},
    "train": {"steps": 60, "batch_size": 64, "optimizer": "adamw", "lr": 0.003, "device": "cuda"},
    "seeds": [0],
}
SEQ_ARMS = {
    "gkd_onpolicy_fp32": ({"name": "gkd", "on_policy_fraction": 1.0, "divergence": "reverse_kl"}, "fp32"),
    "gkd_mixed_bf16": ({"name": "gkd", "on_policy_fraction": 0.5, "chunk_size": 8}, "bf16"),
    "seqkd_fp32": ({"name": "gkd", "seqkd": True, "divergence": "ce", "on_policy_fraction": 0.0}, "fp32"),
}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    workspace = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kdlab-gpu-")
    failed = 0
    arms = [(BASE, name, arm) for name, arm in ARMS.items()] + [(SEQ_BASE, name, arm) for name, arm in SEQ_ARMS.items()]
    for base, name, (method, precision) in arms:
        cfg = dict(base, name=f"gpu-{name}", method=method)
        cfg["train"] = dict(base["train"], precision=precision)
        started = time.perf_counter()
        try:
            (record,) = kdlab.run(cfg, workspace=workspace)
            status, acc = record.status, record.final.get("test/acc", float("nan"))
        except Exception as exc:  # report every arm, then fail
            status, acc = f"error: {type(exc).__name__}: {exc}", float("nan")
        failed += status != "finished"
        print(f"{name:<22} {precision:<5} {status:<10} test/acc {acc:.4f}  {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
