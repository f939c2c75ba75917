#!/usr/bin/env bash
# `make gpu-smoke`: the first command of a GPU visit (budget GPU_SMOKE_BUDGET_S, default 240 s, from a bare
# machine holding only the working tree and the carried wheels):
#   1. build (make install: the CUDA torch of python3 is reused, nothing downloaded; the CUDA sampler compiled
#      for this GPU with MAX_JOBS parallel jobs)
#   2. benchmarks/gpu_smoke.py with what is left of the budget: every op once at a real shape against its torch
#      reference, then the headline ratios, each result written as it finishes
# Results: benchmarks/results/<gpu>/smoke/ (NN-<check>.json, smoke.jsonl, gpu-smoke.log), copied to $OUT/smoke/
# as well when $OUT is set, so whatever finished before a time-out comes back.
set -uo pipefail
MAKE=${1:-make}
PY=${2:-.venv/bin/python}
shift $(( $# < 2 ? $# : 2 ))  # the rest goes to gpu_smoke.py (e.g. --only sampler)
BUDGET=${GPU_SMOKE_BUDGET_S:-240}
cd "$(dirname "$0")/.."
start=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

PYTHON_FOR_NAME=$([ -x "$PY" ] && echo "$PY" || echo "${PYTHON:-python3}")
dir=$("$PYTHON_FOR_NAME" benchmarks/device.py)/smoke || { echo "gpu-smoke: cannot import torch" >&2; exit 1; }
mkdir -p "$dir"
log="$dir/gpu-smoke.log"
exec > >(tee "$log") 2>&1
mirror() { [ -n "${OUT:-}" ] && mkdir -p "$OUT/smoke" && cp -f "$log" "$OUT/smoke/" 2>/dev/null; true; }
finish() { exec >&- 2>&-; sleep 1; mirror; }  # let tee write the last lines before the copy
trap finish EXIT

echo "gpu-smoke: budget ${BUDGET} s, results into $dir ($(date -u +%H:%M:%S) UTC)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.used \
  --format=csv || true
# ninja (carried in wheels/) lets torch compile the extension's sources in parallel
if ! command -v ninja >/dev/null && ls wheels/ninja-*.whl >/dev/null 2>&1; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --target /tmp/fastrl-ninja wheels/ninja-*.whl \
    && export PATH=/tmp/fastrl-ninja/bin:$PATH && echo "gpu-smoke: ninja from wheels/"
fi
t0=$(date +%s)
$MAKE --no-print-directory install || { echo "gpu-smoke: build failed after $(( $(date +%s) - t0 )) s"; exit 1; }
echo "gpu-smoke: build took $(( $(date +%s) - t0 )) s"
mirror
left=$(( BUDGET - ($(date +%s) - start) ))
# checks that would start after the budget are recorded as skipped; one running past it is stopped 30 s later
# (a build that overran the budget still runs the script once: it records every check as skipped)
timeout --signal=INT --kill-after=10 $(( left > 0 ? left + 30 : 30 )) "$PY" benchmarks/gpu_smoke.py --budget-s "$left" \
  --out "$dir" "$@"
rc=$?
echo "gpu-smoke: done in $(( $(date +%s) - start )) s (rc $rc)"
exit $rc
