"""What every benchmark script shares: machine description, device sync and the ratio statistics.

Imported by the scripts beside it (``python benchmarks/bench_*.py`` puts this folder on the path).
"""
from __future__ import annotations

import os
import platform
import random
import statistics
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load() -> str:
    """The 1/5/15-minute load averages: a shared machine slows both arms of a paired benchmark."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_lines(device, *, threads: int | None = None) -> list[str]:
    """Two header lines: the CPU and its usable cores; torch, Python, threads and the device."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    device = torch.device(device)
    threads = torch.get_num_threads() if threads is None else threads
    return [
        f"cpu: {cpu_model()} | logical cores: {os.cpu_count()} (usable by this process: {affinity})",
        f"torch {torch.__version__} | python {platform.python_version()} | threads {threads} "
        f"(interop {torch.get_num_interop_threads()}) | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    ]


def sync(device) -> None:
    """Wait for queued CUDA work, so a clock read after it measures the work (no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of ``values``."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bootstrap_median_ci(values: list[float], *, draws: int = 5000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the median."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]
