#!/usr/bin/env bash
# The CMake build (CMakeLists.txt), which pip never runs: configured with the venv's torch and built
# into a temporary folder (with CUDA for sm_90 where nvcc exists, as `make build`), then loaded in a
# fresh interpreter that must find every op's kernels and the CUDA limits in build_info. Run by
# .ci/run after `make test` (which creates .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# ninja from the venv (the Makefile installs it); the venv's Python is the one whose torch is used
export PATH="$REPO/.venv/bin:$PATH"
if ! command -v cmake >/dev/null 2>&1; then
  pip install --quiet cmake  # where .ci/run could not install it with apt-get
fi
if [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
launchers=()
if command -v ccache >/dev/null 2>&1; then
  launchers=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi

start=$SECONDS
cmake -S . -B "$WORK/build" -G Ninja -DPython3_EXECUTABLE="$REPO/.venv/bin/python" "${launchers[@]}" \
  > "$WORK/configure.log" 2>&1 || { tail -40 "$WORK/configure.log"; exit 1; }
cmake --build "$WORK/build" -j "$(nproc)" > "$WORK/build.log" 2>&1 || { grep -B2 -A20 -m3 "error" "$WORK/build.log"; exit 1; }
echo "CMake build ($(grep -c '^\[' "$WORK/build.log") steps) in $((SECONDS - start)) s"

# outside the repo and without importing sharedllm_ops: the CMake binary alone
(cd "$WORK" && python - "$WORK"/build/_C*.so <<'PYEOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
info = dict(line.split("=", 1) for line in torch.ops.sharedllm.build_info().splitlines())
keys = ["cuda" if info["cuda_version"] else None, "cpu"]
ops = ["chunk_pool", "chunk_pool_backward", "tree_topk", "cross_inject_attention", "cross_inject_attention_backward"]
for op in ops:
    for key in filter(None, keys):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sharedllm::{op}", key.upper()), (op, key)
assert int(info["cuda_tree_topk_max_nodes"]) > 0 and int(info["cuda_attention_max_head_dims"]) > 0, info
x = torch.arange(8.0).reshape(8, 1, 1)
pooled = torch.ops.sharedllm.chunk_pool(x, torch.tensor([0, 8], dtype=torch.int32), 4, "mean")
assert pooled.flatten().tolist() == [0.5, 2.5, 4.5, 6.5], pooled.flatten().tolist()
print("CMake extension loads:", ", ".join(f"{k}={v}" for k, v in info.items() if k != "compiler"))
PYEOF
)
