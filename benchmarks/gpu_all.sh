#!/usr/bin/env bash
# `make gpu-all`: everything a GPU machine's short visit is for, in one command (budget: ~10 min on an H100).
#   1. build (make install; a CUDA torch of python3 is reused, nothing downloaded)
#   2. peers from wheels/ when it exists (make wheels-install)
#   3. the GPU tests (make gpu-test) and the ahead-of-time kernel checks with this machine's Triton
#   4. the benchmarks at real shapes (make bench-gpu: few rounds, BENCH_MAX_TIME seconds per benchmark,
#      a per-benchmark timeout where pytest-timeout is installed)
#   5. REPORT.md and the plots
# Everything lands in benchmarks/results/<gpu>/: bench_*.json, REPORT.md, *.png and gpu-all.log. A failing
# step does not stop the later ones; the exit status says whether all passed.
set -uo pipefail
MAKE=${1:-make}
PY=${2:-.venv/bin/python}
cd "$(dirname "$0")/.."

PYTHON_FOR_NAME=$([ -x "$PY" ] && echo "$PY" || echo "${PYTHON:-python3}")
dir=$("$PYTHON_FOR_NAME" benchmarks/device.py) || { echo "gpu-all: cannot import torch" >&2; exit 1; }
mkdir -p "$dir"
log="$dir/gpu-all.log"
exec > >(tee "$log") 2>&1
start=$(date +%s)
declare -a summary
status=0

step() {  # step NAME COMMAND...
  local name=$1; shift
  local t0=$(date +%s)
  echo; echo "=== gpu-all: $name ($(date -u +%H:%M:%S) UTC, +$((t0 - start)) s) ==="
  "$@"
  local rc=$?
  summary+=("$(printf '%-28s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
  [ $rc -eq 0 ] || status=1
  return $rc
}

gpu_state() {
  command -v nvidia-smi >/dev/null && nvidia-smi \
    --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu,memory.used \
    --format=csv || true
}

echo "gpu-all: results into $dir"
gpu_state
step "build" $MAKE --no-print-directory install || { echo "gpu-all: build failed, stopping"; exit 1; }
step "peers from wheels/" $MAKE --no-print-directory wheels-install
"$PY" - <<'EOF'
import importlib.util, torch, triton
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__}",
      f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")
for name in ("liger_kernel", "trl", "flashinfer", "pynvml", "matplotlib", "pytest_timeout"):
    print(f"  {name}: {'yes' if importlib.util.find_spec(name) else 'no'}")
EOF
step "gpu tests" $MAKE --no-print-directory gpu-test PYTEST_ARGS="-q -ra"
step "AOT kernel checks" "$PY" -m pytest tests/test_gpu_compile.py -q -p no:cacheprovider

timeout_arg=""
if "$PY" -c "import pytest_timeout" 2>/dev/null; then timeout_arg="--timeout=${BENCH_TEST_TIMEOUT:-120}"; fi
step "benchmarks" $MAKE --no-print-directory bench-gpu BENCH_MAX_TIME="${BENCH_MAX_TIME:-0.5}" \
  BENCH_MIN_ROUNDS="${BENCH_MIN_ROUNDS:-5}" BENCH_ARGS="$timeout_arg -q"
gpu_state

echo; echo "=== gpu-all: summary ($(( $(date +%s) - start )) s in all) ==="
printf '%s\n' "${summary[@]}"
ls -la "$dir"
exit $status
