#!/usr/bin/env bash
# `make gpu-all`: the second command of a GPU visit, after `make gpu-smoke` (budget GPU_ALL_BUDGET_S, default
# 510 s, so that it ends inside the 10-minute limit of one command with room for the report):
#   1. build (make install; a no-op after gpu-smoke; a CUDA torch of python3 is reused, nothing downloaded)
#   2. peers from wheels/ when it exists (make wheels-install)
#   3. the benchmarks at real shapes, peers side by side, in order of value (logprobs, grpo, dpo, sampling,
#      rollout, trainer vs TRL), each suite in its own slice of the time (GPU_ALL_SUITES: name:weight ...);
#      FASTRL_BENCH_DEADLINE skips the benchmarks that would start after a slice, so every suite writes its JSON
#   4. the GPU tests (make gpu-test) in what is left, stopped at the budget (their log says what passed)
#   5. REPORT.md and the plots (after the benchmarks)
# Everything lands in benchmarks/results/<gpu>/: bench_*.json, REPORT.md, *.png and gpu-all.log (when $OUT is set,
# as each step ends: that folder as $OUT/gpu-all-results.tar.gz, and the log). A failing step does not stop the later ones; the exit status says
# whether all passed.
set -uo pipefail
MAKE=${1:-make}
PY=${2:-.venv/bin/python}
BUDGET=${GPU_ALL_BUDGET_S:-510}
BENCH_SHARE=${GPU_ALL_BENCH_SHARE:-0.7}  # of the budget left after the build, for the benchmarks
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

PYTHON_FOR_NAME=$([ -x "$PY" ] && echo "$PY" || echo "${PYTHON:-python3}")
dir=$("$PYTHON_FOR_NAME" benchmarks/device.py) || { echo "gpu-all: cannot import torch" >&2; exit 1; }
mkdir -p "$dir"
log="$dir/gpu-all.log"
exec > >(tee "$log") 2>&1
start=$(date +%s)
declare -a summary
status=0

mirror() {  # what exists so far, to $OUT (the device machine's return folder: at most 8 files come back)
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/gpu-all-results.tar.gz.tmp" -C "$dir" . 2>/dev/null && mv -f "$OUT/gpu-all-results.tar.gz.tmp" \
    "$OUT/gpu-all-results.tar.gz"
  cp -f "$log" "$OUT/" 2>/dev/null
  return 0
}
trap mirror EXIT

left() { echo $(( BUDGET - ($(date +%s) - start) )); }

step() {  # step NAME COMMAND...
  local name=$1; shift
  local t0=$(date +%s)
  echo; echo "=== gpu-all: $name ($(date -u +%H:%M:%S) UTC, +$((t0 - start)) s, $(left) s left) ==="
  "$@"
  local rc=$?
  summary+=("$(printf '%-28s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
  [ $rc -eq 0 ] || status=1
  mirror
  return $rc
}

gpu_state() {
  command -v nvidia-smi >/dev/null && nvidia-smi \
    --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu,memory.used \
    --format=csv || true
}

echo "gpu-all: budget ${BUDGET} s, results into $dir"
gpu_state
step "build" $MAKE --no-print-directory install || { echo "gpu-all: build failed, stopping"; exit 1; }
step "peers from wheels/" $MAKE --no-print-directory wheels-install
"$PY" - <<'EOF'
import importlib.util, torch, triton
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__}",
      f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")
for name in ("liger_kernel", "trl", "flashinfer", "flash_attn", "xformers", "pynvml", "matplotlib", "pytest_timeout"):
    print(f"  {name}: {'yes' if importlib.util.find_spec(name) else 'no'}")
EOF

# The benchmarks' share of the budget, split between the suites in order of value by weight; time a suite
# does not use passes to the next ones. Within its slice a suite skips what would start late
# (FASTRL_BENCH_DEADLINE) and still writes its JSON.
bench_s=$("$PY" -c "print(int($(left) * $BENCH_SHARE))")
SUITES=${GPU_ALL_SUITES:-"bench_logprobs:25 bench_grpo:12 bench_dpo:8 bench_sampling:15 bench_rollout:10 bench_image_rollout:6 bench_trainer:30"}
timeout_arg=""
if "$PY" -c "import pytest_timeout" 2>/dev/null; then timeout_arg="--timeout=${BENCH_TEST_TIMEOUT:-120}"; fi
bench_end=$(( $(date +%s) + bench_s ))
weights_left=0; for s in $SUITES; do weights_left=$(( weights_left + ${s#*:} )); done
for s in $SUITES; do
  name=${s%%:*}; weight=${s#*:}
  now=$(date +%s); slice=$(( (bench_end - now) * weight / weights_left )); weights_left=$(( weights_left - weight ))
  [ "$slice" -gt 0 ] || { summary+=("$(printf '%-28s skipped: benchmark time spent' "$name")"); continue; }
  step "$name (${slice} s)" env FASTRL_BENCH_SCALE=gpu FASTRL_BENCH_DEADLINE=$(( now + slice )) \
    "$PY" -m pytest "benchmarks/$name.py" --benchmark-only --benchmark-max-time="${BENCH_MAX_TIME:-0.3}" \
    --benchmark-min-rounds="${BENCH_MIN_ROUNDS:-5}" --benchmark-json="$dir/$name.json" $timeout_arg -q -rs
done
step "report" $MAKE --no-print-directory bench-report

test_s=$(( $(left) - 15 ))  # 15 s kept for the summary and the copy back
if [ "$test_s" -gt 20 ]; then
  step "gpu tests (${test_s} s)" timeout --signal=INT --kill-after=10 "$test_s" \
    $MAKE --no-print-directory gpu-test PYTEST_ARGS="-q -ra --durations=10"
else
  summary+=("gpu tests                    skipped: no time left")
fi
gpu_state

echo; echo "=== gpu-all: summary ($(( $(date +%s) - start )) s in all) ==="
printf '%s\n' "${summary[@]}"
ls -la "$dir"
exit $status
