#!/usr/bin/env bash
# One run on a lent GPU machine (no package index there), from the repository root:
#   OUT=<results dir> bash benchmarks_gpu/run_on_device.sh
# Carry along `.devdeps/` made here with
#   python -m pip install --target .devdeps pytest hypothesis liger-kernel ml_dtypes --no-deps
# (ml_dtypes: bfloat16 device arrays; a binary wheel, so for the device's Python version)
# Everything lands in $OUT as it is measured (preflight.json, cache.json, bench.jsonl, parity.jsonl,
# pytest_gpu.log, junit.xml, summary.md), so a run cut short still reports.
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT" /tmp/fastce_sc
# Some device images pair numba-cuda with a NumPy that dropped row_stack (numba-cuda imports it).
cat > /tmp/fastce_sc/sitecustomize.py <<'PY'
import numpy
if not hasattr(numpy, "row_stack"):
    numpy.row_stack = numpy.vstack
PY
export PYTHONPATH="/tmp/fastce_sc:$PWD:$PWD/.devdeps${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1
timeout "${LIMIT_S:-540}" python -m fastce.gpu_check --out "$OUT" --deadline "${DEADLINE_S:-480}"
echo "gpu_check exit $?" | tee -a "$OUT/gpu_check.log"
