#!/usr/bin/env bash
# The check for a lent GPU machine, in one call of at most 8 minutes (issue 17). Six stages, each under
# its own timeout; each appends to the result files below and prints one summary line; a failed or
# timed-out stage never stops the stages after it. Run from the repository root:
#
#     OUT=/some/dir bash bench/gpu_check.sh              # on the GPU machine (carry dist/ with a wheel)
#     OUT=/tmp/check bash bench/gpu_check.sh --dry-run   # anywhere: every stage runs, skips what needs a GPU
#
# Stage budget (the timeouts, seconds of device time; they add up to 470 s = 7 min 50 s):
STAGE_BUDGET_environment=10   # 1. GPU, driver, torch/triton/CUDA, Python.h, compute-sanitizer
STAGE_BUDGET_cuda=120         # 2. the carried wheel's CUDA tests (from outside the tree); a source
                              #    build runs meanwhile in the background, in a copy of the tree
STAGE_BUDGET_triton=90        # 3. Triton tests, compiled, autotuning off (one config)
STAGE_BUDGET_sanitizer=90     # 4. compute-sanitizer memcheck, racecheck, synccheck on bench/sanitize_kernels.py
STAGE_BUDGET_bench=100        # 5. the kernel benchmarks (bench/bench_gpu_kernels.py; table printed last). The
                              #    7B-shaped prefill rows (bench/bench_model.py -k gpu) need a call of their own
STAGE_BUDGET_compile=60       # 6. torch.compile and CUDA-graph tests, if time is left
#
# Result files under $OUT (six at most: only eight come back from a device call): summary.txt (the
# stage lines), environment.txt, tests.log (wheel install, source build, every pytest run),
# sanitizer.log, bench.json, bench.md.
#
# Device time measured: never run on a GPU yet (no session has had one). The dry run takes about a
# minute on a 2-core CPU (tests/test_gpu_check.py runs it in CI).
set -uo pipefail
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
REPO=$PWD
WORK=$(mktemp -d)
mkdir -p "$OUT"
# absolute paths: the stages run from a neutral folder
OUT=$(cd "$OUT" && pwd)
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
: > "$OUT/summary.txt"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TRITON_INTERPRET=0 SHAREDLLM_TRITON_AUTOTUNE=0 PYTHONDONTWRITEBYTECODE=1
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1  # no GPU: Triton may only interpret
fi
export DRY_RUN OUT PY REPO WORK
START=$SECONDS

say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# stage NAME COMMAND...: run COMMAND (a shell function) under the stage's timeout, then one line
stage() {
  local name=$1 budget_var="STAGE_BUDGET_$1" began=$SECONDS rc limit
  shift
  # a dry run checks the plumbing on a CPU that may be loaded (CI: two pytest processes on two
  # cores, where importing torch alone took over 10 s), not the device budget: it gets 5x the time
  limit=${!budget_var}
  [ "$DRY_RUN" = 1 ] && limit=$((limit * 5))
  # the stage runs in a child shell (its own timeout kills it and whatever it started)
  timeout --kill-after=5 "$limit" bash -c "$(declare -f); $*" > "$WORK/stage.txt" 2>&1
  rc=$?
  local what
  what=$(tail -1 "$WORK/stage.txt")
  case $rc in
    0) say "stage $name: ok in $((SECONDS - began)) s (budget ${!budget_var} s): $what" ;;
    124|137) say "stage $name: TIMEOUT after $limit s: $what" ;;
    *) say "stage $name: FAILED rc=$rc in $((SECONDS - began)) s: $what" ;;
  esac
}

# The sharedllm_ops a stage tests: the carried wheel when it installed, else the source build, else
# (dry run) the tree as it is. It is found through PYTHONPATH from a neutral folder, and pytest puts
# its own paths last (--import-mode=append: bench/ is a package, whose parent, the unbuilt tree,
# would otherwise come first).
use_install() {
  if [ -f "$WORK/use_wheel" ]; then
    export PYTHONPATH=$WORK/wheel
  elif [ -f "$WORK/use_source" ]; then
    export PYTHONPATH=$WORK/src
  else
    export PYTHONPATH=$REPO
  fi
  cd "$WORK"
}

run_pytest() {
  use_install
  $PY -m pytest "$REPO/tests/test_gpu.py" -q -p no:cacheprovider --import-mode=append -rs "$@" >> "$OUT/tests.log" 2>&1
  local rc=$?
  echo "pytest $*: $(tail -1 "$OUT/tests.log")"
  return $rc
}

environment() {
  {
    echo "dry run: $DRY_RUN"
    if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'
    $PY -c 'import triton; print("triton", triton.__version__)' 2>&1
    $PY -c 'import sysconfig, os; p = os.path.join(sysconfig.get_paths()["include"], "Python.h"); print("Python.h", "present" if os.path.exists(p) else "missing", p)'
    ls "$CUDA_HOME/bin/compute-sanitizer" 2>&1
  } > "$OUT/environment.txt" 2>&1
  echo "$(grep -m1 '^python' "$OUT/environment.txt"); $(grep -m1 '^Python.h' "$OUT/environment.txt" | cut -d' ' -f1-2)"
}

start_source_build() {
  # a copy of the tree, so that the carried wheel stays the only sharedllm_ops seen by stage 2
  if [ "$DRY_RUN" = 1 ]; then
    echo "source build: skipped (dry run)" >> "$OUT/tests.log"
    return
  fi
  mkdir -p "$WORK/src"
  tar -C "$REPO" --exclude=./.venv --exclude=./dist --exclude=./build --exclude=./.git -cf - . | tar -C "$WORK/src" -xf -
  (cd "$WORK/src" && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) \
     $PY setup.py --quiet build_ext --inplace > "$WORK/build.log" 2>&1 && touch "$WORK/source_built") &
  echo $! > "$WORK/build.pid"
}

cuda_tests() {
  local wheel
  wheel=$(ls "$REPO"/dist/sharedllm_ops-*+cu*-abi3-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ]; then
    $PY -m pip install -q --no-deps --no-index --target "$WORK/wheel" "$wheel" >> "$OUT/tests.log" 2>&1 \
      && touch "$WORK/use_wheel"
  else
    echo "no carried wheel in dist/: waiting for the source build" >> "$OUT/tests.log"
    if [ "$DRY_RUN" = 0 ]; then
      while [ ! -f "$WORK/source_built" ] && kill -0 "$(cat "$WORK/build.pid")" 2>/dev/null; do sleep 2; done
      [ -f "$WORK/source_built" ] && touch "$WORK/use_source"
    fi
  fi
  run_pytest -k "cuda"
}

triton_tests() {
  run_pytest -k "triton and not compile and not graph"
}

sanitizer() {
  local san="$CUDA_HOME/bin/compute-sanitizer" rc=0
  use_install
  if [ "$DRY_RUN" = 1 ] || [ ! -x "$san" ]; then
    $PY "$REPO/bench/sanitize_kernels.py" --dry-run >> "$OUT/sanitizer.log" 2>&1 || rc=$?
    echo "compute-sanitizer skipped ($([ "$DRY_RUN" = 1 ] && echo dry run || echo not found)); cases on the CPU: $(tail -1 "$OUT/sanitizer.log")"
    return $rc
  fi
  local line=""
  for tool in memcheck racecheck synccheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 30 "$san" --tool "$tool" --error-exitcode 9 \
      $PY "$REPO/bench/sanitize_kernels.py" >> "$OUT/sanitizer.log" 2>&1
    local t=$?
    [ $t -ne 0 ] && rc=$t
    line="$line $tool rc=$t;"
  done
  echo "$line $(grep -c 'ERROR SUMMARY: [1-9]' "$OUT/sanitizer.log") tools with errors"
  return $rc
}

benchmarks() {
  use_install
  $PY -m pytest "$REPO/bench/bench_gpu_kernels.py" --benchmark-only -q -p no:cacheprovider --import-mode=append \
    --benchmark-json="$OUT/bench.json" >> "$OUT/tests.log" 2>&1
  local rc=$?
  if [ -s "$OUT/bench.json" ]; then $PY "$REPO/bench/report.py" "$OUT/bench.json" > "$OUT/bench.md" 2>&1; fi
  echo "benchmarks: $(tail -1 "$OUT/tests.log")"
  return $rc
}

compile_tests() {
  run_pytest -k "compile or graph"
}

stage environment environment
start_source_build
stage cuda cuda_tests
stage triton triton_tests
stage sanitizer sanitizer
stage bench benchmarks
stage compile compile_tests
if [ -f "$WORK/build.pid" ]; then
  kill "$(cat "$WORK/build.pid")" 2>/dev/null
  { echo "--- source build"; tail -20 "$WORK/build.log" 2>/dev/null; } >> "$OUT/tests.log"
  say "source build: $([ -f "$WORK/source_built" ] && echo built || echo 'not finished or failed (tail in tests.log)')"
fi
say "total: $((SECONDS - START)) s$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
[ -s "$OUT/bench.md" ] && cat "$OUT/bench.md"
rm -rf "$WORK"
exit 0
