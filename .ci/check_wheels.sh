#!/usr/bin/env bash
# The wheels, checked the way users install them (issue 6); run by .ci/run after `make test`:
#  1. the CUDA wheel of this machine (archs: TORCH_CUDA_ARCH_LIST, 9.0 in CI) in a fresh venv with
#     torch 2.14.1: installs, imports, reports its build and runs every op on CPU tensors;
#  2. the CPU-only wheel, built against torch 2.14.1, in a fresh venv with torch 2.13.0 (CPU build):
#     one binary across torch versions, through the stable ABI; the CPU kernel tests pass there;
#  3. the sdist, installed from source (CPU-only) into that torch 2.13.0 venv: it compiles there.
# Both test venvs run from outside the repo, so `import sharedllm_ops` is the installed wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TEST_DEPS="numpy pytest pytest-benchmark expecttest"

fresh_venv() {  # fresh_venv DIR TORCH_SPEC
  python3 -m venv "$1"
  "$1/bin/pip" install --quiet --no-cache-dir "$2" $TEST_DEPS
}

start=$SECONDS
make wheel TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
mv dist/*.whl "$WORK/"
SHAREDLLM_OPS_CPU_ONLY=1 make wheel
mv dist/*.whl "$WORK/"
ls -l "$WORK"/*.whl
echo "wheels built in $((SECONDS - start)) s"

cuda_wheel=$(ls "$WORK"/*+cu*.whl 2>/dev/null || true)
cpu_wheel=$(ls "$WORK"/*+cpu*.whl)
for w in $cuda_wheel $cpu_wheel; do
  case "$(basename "$w")" in *-cp310-abi3-*) ;; *) echo "not an abi3 wheel: $w"; exit 1 ;; esac
  # exactly one binary, the limited-API one, and the build record beside it
  $PY - "$w" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
binaries = [n for n in names if n.startswith("sharedllm_ops/_C")]
assert binaries == ["sharedllm_ops/_C.abi3.so"], binaries
assert "sharedllm_ops/_build_meta.json" in names
PYEOF
done

if [ -n "$cuda_wheel" ]; then
  fresh_venv "$WORK/venv-cuda" "torch==2.14.1"
  "$WORK/venv-cuda/bin/pip" install --quiet --no-deps "$cuda_wheel"
  (cd "$WORK" && "$WORK/venv-cuda/bin/python" "$REPO/.ci/wheel_smoke.py")
  rm -rf "$WORK/venv-cuda"  # a CUDA torch takes gigabytes; CI's disk must hold only one at a time
fi

fresh_venv "$WORK/venv-cpu" "torch==2.13.0"
"$WORK/venv-cpu/bin/pip" install --quiet --no-deps "$cpu_wheel"
(cd "$WORK" && "$WORK/venv-cpu/bin/python" "$REPO/.ci/wheel_smoke.py")
(cd "$WORK" && "$WORK/venv-cpu/bin/pytest" -q -p no:cacheprovider "$REPO/tests/test_api.py" \
  "$REPO/tests/test_chunk_pool.py" "$REPO/tests/test_tree_topk.py" "$REPO/tests/test_cross_inject_attention.py")

make sdist
sdist=$(ls dist/*.tar.gz)
"$WORK/venv-cpu/bin/pip" install --quiet setuptools wheel ninja
(cd "$WORK" && SHAREDLLM_OPS_CPU_ONLY=1 "$WORK/venv-cpu/bin/pip" install --quiet --no-build-isolation --no-deps "$REPO/$sdist")
(cd "$WORK" && "$WORK/venv-cpu/bin/python" "$REPO/.ci/wheel_smoke.py")
rm -f "$sdist"
echo "wheel checks passed in $((SECONDS - start)) s"
