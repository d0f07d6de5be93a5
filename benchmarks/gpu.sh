#!/usr/bin/env bash
# The CIFAR-shaped speed suite on a CUDA machine (resnet32x4 -> resnet8x4, batch 1024), in under 5 minutes:
# student-only / live KD / cached KD / plain loops, fp32 eager vs bf16 eager vs bf16 + channels-last + compile.
# Usage: benchmarks/gpu.sh [extra bench_speed.py flags]     (PYTHON=... picks the interpreter)
# Record the printed table, with the machine lines, in docs/results/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"${PYTHON:-python}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: CUDA is not available here')"
exec "${PYTHON:-python}" benchmarks/bench_speed.py --suite cifar --device cuda --batch-size 1024 --steps 12 \
    --epochs 5 --configs fp32:eager bf16:eager bf16:compiled "$@"
