#!/usr/bin/env bash
# The GPU checks on one CUDA device: layer and model equivalence on cuda in fp32/bf16 against the CPU
# in fp32, grouped_mm on cuda, a training step, generation, quantized generation and
# `moge generate --device cuda` and the serving engine (the tests marked `gpu`, tests/gpu/test_gpu.py), then a table of
# their numbers. Usage: bash scripts/gpu_check.sh [extra pytest args]
#
# It needs a CUDA build of torch (>= 2.6) that sees a GPU. scripts/setup.sh pins torch 2.13.0, which
# may be a CPU-only build: the script uses .venv's torch when it has CUDA, else the first of
# $PYTHON, python3 whose torch has CUDA (moge is then taken from src/ without installing it), and
# otherwise says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

PY=""
for cand in ${PYTHON:-} .venv/bin/python python3; do
    if command -v "$cand" >/dev/null 2>&1 && has_cuda "$cand"; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: no Python here has a CUDA build of torch that sees a GPU." >&2
    echo "  checked: ${PYTHON:-} .venv/bin/python python3" >&2
    echo "  install one, e.g.: .venv/bin/python -m pip install torch --index-url https://download.pytorch.org/whl/<CUDA tag, e.g. cu128>" >&2
    echo "  (nvidia-smi must list the GPU; then re-run this script)" >&2
    exit 2
fi
missing=$("$PY" -c '
import importlib.util as u
print(" ".join(m for m in ("numpy", "safetensors", "pytest", "tqdm", "tokenizers", "sentencepiece", "matplotlib")
               if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
    echo "gpu_check: $PY has CUDA torch but lacks: $missing (pip install them, or install moge: pip install -e '.[dev]')" >&2
    exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'

report=$(mktemp -t moge-gpu-XXXXXX.json)
trap 'rm -f "$report"' EXIT
start=$(date +%s)
status=0
MOGE_GPU_REPORT="$report" PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs "$@" || status=$?
echo "gpu_check: pytest took $(( $(date +%s) - start )) s (exit $status)"
if [ -s "$report" ]; then
    "$PY" - "$report" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\n{r['device']} (torch {r['torch']})")
print(f"{'check':<58} {'max |diff|':>11} {'tol':>9} {'ms':>9} {'tok/s':>9}")
for c in r["checks"]:
    ms = f"{c['ms']:.2f}" if c.get("ms") is not None else "-"
    tok = f"{c['decode_tok_s']:.0f}" if c.get("decode_tok_s") is not None else "-"
    print(f"{c['check']:<58} {c['max_abs_diff']:>11.3g} {c['tol']:>9.3g} {ms:>9} {tok:>9}")
PYEOF
fi
exit $status
