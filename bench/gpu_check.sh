#!/usr/bin/env bash
# The one script for a lent GPU machine (no internet there; its torch is 2.11 with Python 3.12):
# test the carried wheel if there is one, build the extension from source for the local GPU, run
# the GPU tests, then the benchmarks, and leave logs and results under $OUT. Run from the repository root:
#     OUT=/some/dir bash bench/gpu_check.sh
# Not yet run on a GPU: the sessions so far had none. Model tests and benchmarks need
# transformers; where it is missing they are skipped (see tests.log), carry a wheel to add it.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# compiled Triton on the GPU (tests/conftest.py defaults to the CPU interpreter otherwise)
export TRITON_INTERPRET=0
{ nvidia-smi; $PY -c 'import torch, sys; print(sys.version, torch.__version__, torch.version.cuda)'; } > "$OUT/machine.txt" 2>&1

start=$SECONDS
# The wheel built on the CPU machine, if carried (`make wheel TORCH_CUDA_ARCH_LIST=9.0`, then
# carry dist/): it must run here, on this torch and Python, without a rebuild. Installed into its
# own folder and tested from outside the tree, so that the import is the wheel's.
WHEEL=$(ls dist/sharedllm_ops-*+cu*-cp310-abi3-*.whl 2>/dev/null | head -1)
if [ -n "$WHEEL" ]; then
  REPO=$PWD
  rm -rf /tmp/sharedllm_wheel
  $PY -m pip install -q --no-deps --no-index --target /tmp/sharedllm_wheel "$WHEEL" > "$OUT/wheel.log" 2>&1
  (cd /tmp && PYTHONPATH=/tmp/sharedllm_wheel $PY -m sharedllm_ops info \
     && PYTHONPATH=/tmp/sharedllm_wheel $PY -m pytest "$REPO/tests/test_gpu.py" -q -p no:cacheprovider -rs) >> "$OUT/wheel.log" 2>&1
  echo "carried wheel $(basename "$WHEEL"), GPU tests: rc=$? ($(tail -1 "$OUT/wheel.log"))"
fi
$PY setup.py --quiet build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed, see build.log"; tail -30 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
$PY -m sharedllm_ops info | tee "$OUT/info.txt"

# the tests that touch the GPU (the CPU ones ran in CI), then the benchmarks
$PY -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs > "$OUT/tests_gpu.log" 2>&1
echo "GPU kernel tests: rc=$? ($(tail -1 "$OUT/tests_gpu.log"))"
$PY -m pytest tests -q -p no:cacheprovider -k "cuda or model" --deselect tests/test_gpu.py --ignore tests/test_cuda_emulated.py > "$OUT/tests.log" 2>&1
echo "other CUDA and model tests: rc=$? ($(tail -1 "$OUT/tests.log"))"
# memory errors and shared-memory races of the kernels, on a small selection
SAN="$CUDA_HOME/bin/compute-sanitizer"
if [ -x "$SAN" ]; then
  for tool in memcheck racecheck; do
    "$SAN" --tool "$tool" --error-exitcode 9 $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider \
      -k "opcheck or trees or scalar_path" > "$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: rc=$? ($(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer_$tool.log"))"
  done
fi
$PY -m pytest bench --benchmark-only -q -p no:cacheprovider -k "gpu" --benchmark-json="$OUT/gpu.json" > "$OUT/bench.log" 2>&1
echo "bench: rc=$? ($(tail -1 "$OUT/bench.log"))"
$PY bench/report.py "$OUT/gpu.json" > "$OUT/gpu.md" 2>&1 && cat "$OUT/gpu.md"
# long-context compression (bench/bench_long.py): embedded SmolLM2 + shipped injector in bf16, 8K-128K
# tokens, one fresh process per size (about a minute); without transformers or the model it says "skipped"
timeout 180 $PY -m bench.bench_long --device cuda --dtype bfloat16 --sizes 8192 32768 131072 \
  --output "$OUT/long_gpu.md" > "$OUT/long_gpu.log" 2>&1
echo "long-context compression: rc=$? ($(grep -m1 '^skipped' "$OUT/long_gpu.log" || echo "table in long_gpu.md"))"
echo "total: $((SECONDS - start)) s"
