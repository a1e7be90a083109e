"""The sm_90 build's per-kernel resources (``bench/resource_table.py``, from ``ptxas -v``): no kernel
spills registers, none asks for more static shared memory than a block may have, and the table
committed in ``bench/results/resources_sm90.md`` is the one the current source compiles to.
Needs nvcc (not a GPU); skipped without it."""

from __future__ import annotations

import os

import pytest

from bench import resource_table as rt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def resources():
    if rt.nvcc() is None:
        pytest.skip("nvcc not found: the resource table needs the CUDA compiler")
    return rt.all_resources()


def test_every_kernel_is_in_the_table(resources):
    names = {rt._kernel_name(r.kernel) for r in resources}
    expected = {"attention_forward_general", "attention_backward_delta", "attention_backward_dq_general",
                "attention_backward_dkdv_general", "attention_forward_mma", "attention_backward_dq_mma",
                "attention_backward_dkdv_mma", "chunk_pool_forward_kernel", "chunk_pool_backward_kernel",
                "tree_topk_kernel"}
    assert expected <= names, f"missing: {sorted(expected - names)}"


def test_no_kernel_spills_or_exceeds_the_static_shared_memory_limit(resources):
    spilling = [f"{r.kernel}: {r.spill_stores}/{r.spill_loads} B" for r in resources if r.spills]
    assert not spilling, f"register spills: {spilling}"
    over = [f"{r.kernel}: {r.shared} B" for r in resources if r.shared > rt.STATIC_SHARED_MAX]
    assert not over, f"static shared memory over {rt.STATIC_SHARED_MAX} B: {over}"
    assert all(r.registers <= rt.REGISTERS_PER_THREAD_MAX for r in resources)


def test_launch_bounded_kernels_fit_at_least_one_block_per_sm(resources):
    for r in resources:
        if r.threads is not None:
            assert r.blocks_per_sm() >= 1, r


def test_the_committed_table_is_current(resources):
    with open(os.path.join(ROOT, "bench", "results", "resources_sm90.md")) as f:
        committed = f.read()
    assert rt.format_table(resources) in committed, "rerun: python -m bench.resource_table"


def test_ptxas_log_parsing():
    """A log in ptxas's format (one function with spills, one without) gives those numbers."""
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, 352 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3bazv' for 'sm_90'
ptxas info    : Function properties for _Z3bazv
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 45 registers, 11688 bytes cumulative stack size, 64 bytes smem, 352 bytes cmem[0]
"""
    foo, bar, baz = rt.parse_ptxas(log, "x.cu", {"foo": 256})
    assert (baz.registers, baz.stack, baz.shared) == (45, 32, 64)  # smem after a stack size
    assert (foo.registers, foo.spill_stores, foo.spill_loads, foo.stack, foo.shared, foo.threads) == (40, 8, 12, 16, 2048, 256)
    assert (bar.registers, bar.spills, bar.shared, bar.threads) == (8, 0, 0, None)
    # 40 registers x 32 lanes = 1280 per warp, 8 warps: 6 blocks by registers; 2048 threads / 256 = 8
    assert foo.blocks_per_sm() == 6
