"""Shared pieces of the benchmark suites: collection of ``bench_*.py`` and the bookkeeping that
turns the medians of one run into speed-up ratios. The realistic inputs and the torch peer are in
``sharedllm_ops.workloads`` (shared with ``sharedllm-ops demo`` and the tests).

Run from the repository root: ``.venv/bin/python -m pytest bench --benchmark-only``
(add ``--benchmark-json=bench/results/cpu.json`` and run ``bench/report.py`` for the markdown table).
"""

from __future__ import annotations

import pytest
import torch

# The backends every benchmark group is compared against, when they were timed in the same run.
PEERS = ("reference", "torch_sdpa", "torch_copy", "torch_read", "torch_unfused", "cuda")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` as test modules.

    pyproject.toml keeps pytest's default ``python_files`` (``test_*.py``) for tests/, and an ini
    file inside bench/ would be ignored because the rootdir is the repository root, so the suites
    are collected by this hook, which only applies below bench/. Files named on the command line
    are already collected by pytest itself, whatever their name.
    """
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ---------------------------------------------------------------------------------------------
# timing bookkeeping


@pytest.fixture(scope="session")
def session_medians() -> dict:
    """``(group, backend) -> (median seconds, timer)`` of every benchmark of this run."""
    return {}


GPU_TIMERS = ("flush_l2", "graph")


def gpu_median_seconds(fn, timer: str) -> float:
    """Median seconds of ``fn`` on the GPU with Triton's ``do_bench``: ``"flush_l2"`` clears the L2 cache
    before every call (memory-bound ops read their inputs from HBM, as in a model); ``"graph"`` replays
    the calls captured in a CUDA graph (no launch overhead; for ops without host synchronisation)."""
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    torch.cuda.synchronize()  # do_bench_cudagraph runs on a fresh stream that would not wait for the inputs
    if timer == "graph":
        return do_bench_cudagraph(fn, rep=50, return_mode="median") / 1e3
    return do_bench(fn, warmup=25, rep=50, return_mode="median") / 1e3


@pytest.fixture
def timed(benchmark, session_medians):
    """``timed(fn, group=..., backend=..., info={...}, pedantic=None, gpu_timer=None, graph_too=False)``
    benchmarks ``fn`` in ``group`` and records ``info``, the backend and the speed-up over each peer of the
    group that already ran in this session (so every ratio compares timings of the same run).

    ``gpu_timer`` (``"flush_l2"`` or ``"graph"``, see ``gpu_median_seconds``) times a GPU op with
    ``do_bench`` instead: its median goes to ``extra_info["median_s"]`` (``bench/report.py`` reads it
    before pytest-benchmark's own, which then times one synchronised call). Speed-ups only compare rows
    of the same timer. ``graph_too`` adds the CUDA-graph median as ``extra_info["median_graph_s"]``."""

    def run(fn, *, group: str, backend: str, info: dict, pedantic: dict | None = None, gpu_timer: str | None = None,
            graph_too: bool = False):
        benchmark.group = group
        benchmark.extra_info.update(info)
        benchmark.extra_info["backend"] = backend
        median, timer = None, "pytest-benchmark"
        if gpu_timer is not None:
            import torch

            if gpu_timer not in GPU_TIMERS:
                raise ValueError(f"gpu_timer must be one of {GPU_TIMERS}, got {gpu_timer!r}")
            if pedantic is not None:
                raise ValueError("give either pedantic or gpu_timer")
            median, timer = gpu_median_seconds(fn, gpu_timer), f"do_bench ({gpu_timer})"
            benchmark.extra_info.update(median_s=median, timer=timer)
            if graph_too and gpu_timer != "graph":
                benchmark.extra_info["median_graph_s"] = gpu_median_seconds(fn, "graph")
            result = benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize())[0], rounds=1, iterations=1)
        else:
            result = benchmark.pedantic(fn, **pedantic) if pedantic else benchmark(fn)
            stats = getattr(benchmark, "stats", None)
            if stats is not None:  # None under --benchmark-disable
                median = stats.stats.median
        if median is not None:
            session_medians[(group, backend)] = (median, timer)
            for peer in PEERS:
                other = session_medians.get((group, peer))
                if peer != backend and other is not None and other[1] == timer:
                    benchmark.extra_info[f"speedup_vs_{peer}"] = round(other[0] / median, 3)
        return result

    return run


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the timings depend on beyond the CPU: torch, its thread count, the build."""
    import sharedllm_ops

    info = sharedllm_ops.build_info()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["sharedllm_ops"] = {key: info[key] for key in ("version", "compiled_torch", "compiler", "kernels")}
