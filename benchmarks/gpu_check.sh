#!/usr/bin/env bash
# One prepared check of fastcomp on a CUDA GPU machine with no network and little time. From the repo root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh          # ~7-9 min on an H100/H200
#     FASTCOMP_GPU_SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_check.sh   # every section on CPU, tiny, < 1 min
#
# Sections, each under its own `timeout` (one hang costs only its own budget) and each writing what it has
# as it goes: offline install (pip --no-deps --no-build-isolation --no-index -e .), `fastcomp build` and
# `fastcomp info`, the `gpu` and `triton` tests compiled natively (never the interpreter), then
# benchmarks/gpu_bench.py's env, lca, ddn and profile sections, and its summary table last (the tail of
# the output is what a remote run returns). At most 8 flat files land in $OUT (default ./gpu-out):
#   check.log  pytest.txt  junit.xml  bench.json  bench.txt  profile.txt  triton_meta.json
# The exit status is 0 only when every section succeeded.
#
# Budgets (seconds, wall): install 60, build 150, tests 170, env 30, lca 150, ddn 90, profile 40: 690 in
# all at worst, 9 min = 540 leaves the typical run (build cached or ~60 s, tests ~120 s) inside.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
SMOKE=${FASTCOMP_GPU_SMOKE:-0}
[[ $SMOKE == 0 || -z $SMOKE ]] && SMOKE=0 || SMOKE=1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ $SMOKE == 1 ]]; then
  export TRITON_INTERPRET=1          # CPU tensors through the Triton interpreter
else
  unset TRITON_INTERPRET             # compiled kernels, never the interpreter
fi
log=$OUT/check.log
t0=$(date +%s)
status=0
exec 3>&1  # the terminal (or the remote run's captured output), whatever a section's output goes to
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$log" >&3; }
# run NAME SECONDS CMD...: CMD under a timeout; its status decides the check's
run() {
  local name=$1 limit=$2; shift 2
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then stamp "$name: TIMED OUT after $limit s"; status=1
  elif [[ $rc != 0 ]]; then stamp "$name: FAILED (rc $rc)"; status=1
  else stamp "$name: ok"; fi
  return 0
}

{ date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  echo "smoke=$SMOKE nproc=$(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  $PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
  command -v nvcc >/dev/null && nvcc --version | tail -1; } >"$log" 2>&1

# 1. install, offline (package-dir maps kernels/ -> fastcomp.kernels, benchmarks/ -> fastcomp.benchmarks).
#    Smoke mode resolves it without installing (the dev environment keeps its own install).
pip_args=(-m pip install -q --no-deps --no-build-isolation --no-index -e .)
if [[ $SMOKE == 1 ]]; then
  stamp "install: skipped in smoke mode (would run: $PY ${pip_args[*]})"
else
  run install 60 $PY "${pip_args[@]}" >>"$log" 2>&1
fi

# 2. build the C++ and CUDA extensions once, before the test workers would all wait on the build lock
if [[ $SMOKE == 1 ]]; then
  stamp "build: skipped in smoke mode (the suite builds the CPU extension on first use)"
else
  run build 150 $PY -m fastcomp.cli build >>"$log" 2>&1
fi
run info 60 $PY -m fastcomp.cli info >>"$log" 2>&1

# 3. the gpu- and triton-marked tests, natively compiled; parallel where pytest-xdist is installed
#    (Triton/ptxas compiles dominate them), each test bounded where pytest-timeout is
targets=(tests)
[[ $SMOKE == 1 ]] && targets=(tests/test_attention_triton.py -k test_custom_scale)  # the plumbing, not the suite
pytest_args=(-m pytest "${targets[@]}" -q -rfEs -m "gpu or triton" -p no:cacheprovider --junitxml="$OUT/junit.xml")
$PY -c "import xdist" 2>/dev/null && [[ $SMOKE == 0 ]] && pytest_args+=(-n 8)
$PY -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 150)
run tests 170 $PY "${pytest_args[@]}" >"$OUT/pytest.txt" 2>&1

# 4. benchmarks, one section per process (smoke: one process for all, they are tiny)
bench=(benchmarks/gpu_bench.py --out "$OUT")
[[ $SMOKE == 1 ]] && bench+=(--smoke)
: >"$OUT/bench.txt"
if [[ $SMOKE == 1 ]]; then  # one process: on a busy CPU each Python start costs seconds
  run bench 150 $PY "${bench[@]}" --section env,lca,ddn,profile --summary >>"$OUT/bench.txt" 2>&1
else
  run env 30 $PY "${bench[@]}" --section env >>"$OUT/bench.txt" 2>&1
  run lca 150 $PY "${bench[@]}" --section lca >>"$OUT/bench.txt" 2>&1
  run ddn 90 $PY "${bench[@]}" --section ddn >>"$OUT/bench.txt" 2>&1
  run profile 40 $PY "${bench[@]}" --section profile >>"$OUT/bench.txt" 2>&1
fi
[[ -f $OUT/triton_meta.json ]] || echo "[]" >"$OUT/triton_meta.json"
[[ -f $OUT/profile.txt ]] || echo "profile section did not finish" >"$OUT/profile.txt"

# 5. the short table last
stamp "done, status $status"
grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -3
if [[ $SMOKE == 1 ]]; then
  sed -n '/^env: /,$p' "$OUT/bench.txt"
else
  $PY benchmarks/gpu_bench.py --out "$OUT" --summary 2>&1 | tee -a "$OUT/bench.txt"
fi
exit $status
