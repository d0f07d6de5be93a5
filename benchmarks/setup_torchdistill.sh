#!/usr/bin/env bash
# A separate virtual environment for benchmarks/bench_torchdistill.py: torchdistill (PyPI) needs
# torchvision, which does not import beside the CPU torch pinned in kdlab's own venv.
#
#   bash benchmarks/setup_torchdistill.sh            # then: benchmarks/.venv-torchdistill/bin/python benchmarks/bench_torchdistill.py
#
# If this machine's python already has torch >= 2.12 with torchvision (a GPU machine's own CUDA
# build), the venv reuses them (--system-site-packages) and installs only torchdistill and kdlab.
# Otherwise it installs torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB on x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-benchmarks/.venv-torchdistill}
TORCHDISTILL=${TORCHDISTILL:-torchdistill==1.1.5}

if "$PY" - <<'PYEOF' 2>/dev/null
import torch, torchvision
major, minor = (int(p) for p in torch.__version__.split(".")[:2])
raise SystemExit(0 if (major, minor) >= (2, 12) else 1)
PYEOF
then
    echo "reusing $("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
else
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1
fi
# Hold torch where it is: torchdistill and kdlab accept it, and pip must not swap in another build.
PIN=$(mktemp)
"$VENV/bin/python" -c 'import torch, torchvision; print("torch==" + torch.__version__.split("+")[0]); print("torchvision==" + torchvision.__version__.split("+")[0])' > "$PIN"
"$VENV/bin/pip" install --quiet -c "$PIN" "$TORCHDISTILL"
"$VENV/bin/pip" install --quiet -c "$PIN" -e .
rm -f "$PIN"
"$VENV/bin/python" -c 'import torch, torchdistill, kdlab; print("ready: torch", torch.__version__, "| torchdistill", torchdistill.__version__, "| cuda", torch.cuda.is_available())'
