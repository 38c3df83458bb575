#!/usr/bin/env bash
# The GPU check, one prepared call of at most 6 minutes on one H200 (no internet): the GPU tests, the memory plan,
# then benchmarks/gpu_bench.py's stages on the real 26B-A4B config with random weights made on the GPU (kernels,
# the engine at batch 1/4/16/32, transformers at batch 1 with the same weights, the CUDA-parity probe). Each stage
# writes $OUT/gpu_bench.json as it ends, so a run cut short still reports; the table is printed last.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --dry-run   # the same stages at tiny size on the CPU (tested in CI)
#
# The GPU machine has its own torch (not our pinned CPU wheel) and no internet, so dgserve is put on the path
# without pip, and transformers 5.23.0 (the parity reference) comes as a carried wheel in .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  timeout 300 $PY benchmarks/gpu_bench.py --out "$OUT" --dry-run
  exit $?
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the `dgserve` namespace without installing: dgserve/model -> model/, dgserve/cluster -> cluster/, kernels
NS=/tmp/dgserve_ns; rm -rf "$NS"; mkdir -p "$NS/dgserve"
ln -s "$PWD/model" "$NS/dgserve/model"; ln -s "$PWD/cluster" "$NS/dgserve/cluster"
ln -s "$PWD/kernels" "$NS/dgserve/kernels"
export PYTHONPATH="$NS:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

status=0
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests.log" | tail -8
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout 20 $PY benchmarks/fit.py --json > "$OUT/fit.json" 2> "$OUT/fit.err" || status=1
timeout 270 $PY benchmarks/gpu_bench.py --out "$OUT" --device cuda 2>&1 | tee "$OUT/gpu_bench.log" | tail -30
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "tests: $(tail -1 "$OUT/tests.log")"
exit $status
