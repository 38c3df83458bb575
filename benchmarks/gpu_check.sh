#!/usr/bin/env bash
# The GPU check: GPU tests and GPU benchmarks in one call, under 10 minutes, a table printed last.
# Runs on the lent GPU machine from the repo root. That machine has its own torch (not our pinned CPU wheel)
# and no internet, so dgserve is put on the path without pip, and transformers 5.23.0 (the parity reference)
# comes as a carried wheel in .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the `dgserve` namespace without installing: dgserve/model -> model/, dgserve/cluster -> cluster/, kernels
NS=/tmp/dgserve_ns; rm -rf "$NS"; mkdir -p "$NS/dgserve"
ln -s "$PWD/model" "$NS/dgserve/model"; ln -s "$PWD/cluster" "$NS/dgserve/cluster"
ln -s "$PWD/kernels" "$NS/dgserve/kernels"
export PYTHONPATH="$NS:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

status=0
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/gpu tests/model/test_parity.py -x 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout 60 $PY benchmarks/fit.py --json > "$OUT/fit.json" 2> "$OUT/fit.err" || status=1
tail -4 "$OUT/fit.json" | head -3
for dev in cuda; do
  timeout 240 $PY benchmarks/generate.py --device "$dev" --dtype bfloat16 --json --threads 8 \
    > "$OUT/bench_${dev}_bf16.json" 2> "$OUT/bench_${dev}_bf16.err" || status=1
  timeout 120 $PY benchmarks/generate.py --device "$dev" --dtype float32 --quick --json --threads 8 \
    > "$OUT/bench_${dev}_fp32.json" 2> "$OUT/bench_${dev}_fp32.err" || status=1
done
timeout 180 $PY benchmarks/engine.py --device cuda --dtype bfloat16 --quick --json > "$OUT/engine_cuda_bf16.json" \
  2> "$OUT/engine_cuda_bf16.err" || status=1
$PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("\n== GPU check ==")
print(f"{'run':<22}{'dgserve tok/s':>15}{'reference tok/s':>17}{'speedup':>9}{'threads r/d':>13}{'token_exact':>13}"
      f"{'contended':>11}")
for f in sorted(out.glob("bench_*.json")):
    lines = [l for l in f.read_text().splitlines() if l.startswith("{")]
    if not lines:
        print(f"{f.stem:<22} no result: see {f.with_suffix('.err').name}")
        continue
    r = json.loads(lines[-1])
    threads = f"{r['threads_reference']}/{r['threads_dgserve']}"
    print(f"{f.stem:<22}{r['dgserve']['tokens_per_s']:>15.1f}{r['reference']['tokens_per_s']:>17.1f}"
          f"{r['speedup_vs_reference']:>9.2f}{threads:>13}{str(r['token_exact']):>13}{str(r['contended']):>11}")
for f in sorted(out.glob("engine_*.json")):
    lines = [l for l in f.read_text().splitlines() if l.startswith("{")]
    if not lines:
        print(f"{f.stem:<22} no result: see {f.with_suffix('.err').name}")
        continue
    r = json.loads(lines[-1])
    tps = "  ".join(f"N={lv['concurrency']}: {lv['tokens_per_s']:.1f} tok/s" for lv in r["levels"])
    print(f"{f.stem:<22} {tps}  batching_gain {r['batching_gain']:.2f}x  contended {r['contended']}")
tests = (out / "tests.log").read_text().strip().splitlines()
print("tests:", tests[-1] if tests else "no output")
PY
exit $status
