#!/usr/bin/env bash
# One prepared check of fastcomp on a CUDA GPU machine with no network and little time. From the repo root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh          # ~7-9 min on an H100/H200
#     FASTCOMP_GPU_SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_check.sh   # every section on CPU, tiny, < 1 min
#
# Sections, each under its own `timeout` (one hang costs only its own budget) and each writing what it has
# as it goes: offline install (pip --no-deps --no-build-isolation --no-index -e .), `fastcomp build` and
# `fastcomp info`, the `gpu` and `triton` tests compiled natively (never the interpreter), then
# benchmarks/gpu_bench.py's env, lca, ddn, flex and profile sections, and its summary table last (the tail of
# the output is what a remote run returns). At most 8 flat files land in $OUT (default ./gpu-out):
#   check.log  pytest.txt  junit.xml  bench.json  bench.txt  profile.txt  triton_meta.json
# The exit status is 0 only when every section succeeded.
#
# Time: every section runs under `timeout`, with its nominal budget plus whatever the sections before it
# left unused, while the budgets of the sections still to come stay reserved: the whole check ends by
# FASTCOMP_GPU_CHECK_SECONDS (default 530 s, inside 9 minutes) even if every section hangs, and a section
# that runs long eats only the slack, never a later section's share. Nominal budgets, in order:
#   install 30, build 110, info 15, tests 120, env 15, lca 60, ddn 50, flex 100, profile 25  (525 s)
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
deadline=${FASTCOMP_GPU_CHECK_SECONDS:-530}
declare -A nominal=([install]=30 [build]=110 [info]=15 [tests]=120 [env]=15 [lca]=60 [ddn]=50 [flex]=100
                    [profile]=25)
reserved=0
for n in "${nominal[@]}"; do reserved=$(( reserved + n )); done
# run NAME CMD...: CMD under a timeout of its nominal budget plus the slack so far (see the top); its
# status decides the check's. A section with under 5 s left is skipped.
run() {
  local name=$1; shift
  reserved=$(( reserved - ${nominal[$name]:-0} ))
  local limit=$(( deadline - ($(date +%s) - t0) - reserved - 5 ))  # 5 s: the kill grace below
  if (( limit < 5 )); then stamp "$name: SKIPPED (no time left)"; status=1; return 0; fi
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then stamp "$name: TIMED OUT after $limit s"; status=1
  elif [[ $rc != 0 ]]; then stamp "$name: FAILED (rc $rc)"; status=1
  else stamp "$name: ok"; fi
  return 0
}
# skip NAME WHY: a section not run in this mode (its budget becomes slack)
skip() { reserved=$(( reserved - ${nominal[$1]:-0} )); stamp "$1: skipped: $2"; }

{ date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  echo "smoke=$SMOKE nproc=$(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  $PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
  command -v nvcc >/dev/null && nvcc --version | tail -1; } >"$log" 2>&1

# 1. install, offline (package-dir maps kernels/ -> fastcomp.kernels; the scripts below run from benchmarks/).
#    Smoke mode resolves it without installing (the dev environment keeps its own install).
pip_args=(-m pip install -q --no-deps --no-build-isolation --no-index -e .)
if [[ $SMOKE == 1 ]]; then
  skip install "smoke mode (would run: $PY ${pip_args[*]})"
else
  run install $PY "${pip_args[@]}" >>"$log" 2>&1
fi

# 2. build the C++ and CUDA extensions once, before the test workers would all wait on the build lock
if [[ $SMOKE == 1 ]]; then
  skip build "smoke mode (the suite builds the CPU extension on first use)"
else
  run build $PY -m fastcomp.cli build >>"$log" 2>&1
fi
run info $PY -m fastcomp.cli info >>"$log" 2>&1

# 3. the gpu- and triton-marked tests, natively compiled; parallel where pytest-xdist is installed
#    (Triton/ptxas compiles dominate them), each test bounded where pytest-timeout is
targets=(tests)
[[ $SMOKE == 1 ]] && targets=(tests/test_attention_triton.py -k test_custom_scale)  # the plumbing, not the suite
pytest_args=(-m pytest "${targets[@]}" -q -rfEs -m "gpu or triton" -p no:cacheprovider --junitxml="$OUT/junit.xml")
$PY -c "import xdist" 2>/dev/null && [[ $SMOKE == 0 ]] && pytest_args+=(-n 8)
$PY -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 150)
run tests $PY "${pytest_args[@]}" >"$OUT/pytest.txt" 2>&1

# 4. benchmarks, one section per process (smoke: one process for all, they are tiny); flex after ddn: its
#    inductor compiles are the likeliest to run long, and ours vs the references matters most
bench=(benchmarks/gpu_bench.py --out "$OUT")
[[ $SMOKE == 1 ]] && bench+=(--smoke)
: >"$OUT/bench.txt"
if [[ $SMOKE == 1 ]]; then  # one process: on a busy CPU each Python start costs seconds
  for n in env lca ddn flex profile; do skip "$n" "smoke mode: run together below"; done
  run bench $PY "${bench[@]}" --section env,lca,flex,ddn,profile --summary >>"$OUT/bench.txt" 2>&1
else
  for section in env lca ddn flex profile; do
    run "$section" $PY "${bench[@]}" --section "$section" >>"$OUT/bench.txt" 2>&1
  done
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
