"""The CUDA kernels of ``csrc/cuda`` run on the CPU, under the emulator of ``tests/cuda_emulator``.

CI has no GPU, so this is where the CUDA source is executed on every submission: the ``.cu`` files
are compiled as host C++ against an emulated CUDA runtime (threads as fibers; ``__syncthreads``,
shuffles and ``mma.sync`` as collectives with the PTX fragment layouts) and registered as
``torch.ops.sharedllm_emulated.*`` with the real bindings' checks and allocation. It checks the
kernels' indexing, tiling, masking, fragment bookkeeping and math against the reference, with
poisoned outputs and NaN-filled dynamic shared memory. It cannot check timing, races or the
hardware itself: ``tests/test_gpu.py`` does that on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ATTN_TOL, TOL, assert_close, assert_finite, cu_seqlens, grad_tol, nan_filled_empty, rotary_tables
from test_tree_topk import check_against_brute_force

import sharedllm_ops as so

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# the checked build (tests/cuda_emulator/include/emulator_checks.h): ThreadSanitizer's
# instrumentation, without its runtime, sends every load and store of the kernels to the
# emulator's race and shared-memory checks, UBSan's alignment check every misaligned pointer; -g
# for the source lines of a race, no auto-vectorisation (its accesses are not the kernels')
CHECKED_FLAGS = ["-DSHAREDLLM_EMULATOR_CHECKS", "-fsanitize=thread,alignment", "--param=tsan-instrument-func-entry-exit=0",
                 "-fno-tree-vectorize", "-fno-tree-slp-vectorize", "-g"]


def build_emulated(name: str, ops: tuple[str, ...], extra_cflags: list[str]):
    """Builds (cached under build/) and loads harnesses of ``ops`` as the torch.ops namespace ``name``."""
    from torch.utils import cpp_extension

    emulator = os.path.join(HERE, "cuda_emulator")
    build_dir = os.path.join(ROOT, "build", name)
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[os.path.join(emulator, f"harness_{op}.cpp") for op in ops],
        extra_include_paths=[os.path.join(emulator, "include"), os.path.join(ROOT, "csrc", "include"),
                             os.path.join(ROOT, "csrc", "torch")],
        # hidden: two builds loaded together must each keep their own emulator (its state, its
        # inline functions and templates), not bind to the first one's
        extra_cflags=["-O2", "-fvisibility=hidden", "-Wno-unused-function", "-Wno-unknown-pragmas",
                      f"-DSHAREDLLM_EMULATED_OPS={name}", *extra_cflags],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, name)


@pytest.fixture(scope="module")
def emulated():
    """The kernels under the checked emulator; returns their op namespace."""
    return build_emulated("sharedllm_emulated", ("attention", "chunk_pool", "tree_topk", "faults", "fragments"), CHECKED_FLAGS)


# ---------------------------------------------------------------------------------------------
# cross_inject_attention


def _attention_case(lq, lk, hq, hk, d, dv, dtype, rotary, layout="contiguous"):
    gen = torch.Generator().manual_seed(1)
    nq, nk = sum(lq), sum(lk)
    if layout == "contiguous":
        q = torch.randn(nq, hq, d, generator=gen).to(dtype)
        k = torch.randn(nk, hk, d, generator=gen).to(dtype)
        v = torch.randn(nk, hk, dv, generator=gen).to(dtype)
    else:  # rows and heads on odd strides: the general path
        q = torch.randn(nq, hq + 1, d + 3, generator=gen).to(dtype)[:, 1:, :d]
        k = torch.randn(nk, hk, d + 3, generator=gen).to(dtype)[:, :, :d]
        v = torch.randn(nk, hk, dv + 5, generator=gen).to(dtype)[:, :, 2 : 2 + dv]
    extra = dict(q_positions=None, k_positions=None, rotary_cos=None, rotary_sin=None)
    if rotary:
        cos, sin = rotary_tables(512, d)
        extra = dict(
            q_positions=torch.randint(0, 512, (nq,), generator=gen, dtype=torch.int32),
            k_positions=torch.randint(0, 512, (nk,), generator=gen, dtype=torch.int32),
            rotary_cos=cos, rotary_sin=sin,
        )
    return q, k, v, cu_seqlens(lq), cu_seqlens(lk), extra


# (lq, lk): several query tiles of 64 and key tiles of 64 / 32 with ragged ends, sequences without
# keys or without queries, single rows
LENGTHS = ([70, 0, 5, 1, 3], [130, 3, 0, 33, 0])
# the general path has no tiles (a warp per query row walks the keys one by one): the same kinds of
# sequences, shorter, keep it fast under the checked emulator
GENERAL_LENGTHS = ([6, 0, 5, 1, 3], [11, 3, 0, 4, 0])

ATTENTION_CASES = [
    # tensor-core path: 16-bit, D == Dv in {64, 128}, aligned
    pytest.param(torch.bfloat16, 64, 64, 4, 2, True, "contiguous", id="mma-bf16-d64-rotary-gqa2"),
    pytest.param(torch.float16, 64, 64, 3, 1, False, "contiguous", id="mma-fp16-d64-gqa3"),
    pytest.param(torch.bfloat16, 128, 128, 2, 2, False, "contiguous", id="mma-bf16-d128"),
    pytest.param(torch.float16, 128, 128, 2, 1, True, "contiguous", id="mma-fp16-d128-rotary-gqa2"),
    # general path: float32, odd head dims, Dv != D, unaligned strides
    pytest.param(torch.float32, 64, 64, 4, 2, True, "contiguous", id="general-fp32-d64-rotary"),
    pytest.param(torch.float16, 24, 40, 3, 1, True, "contiguous", id="general-fp16-d24-dv40-rotary"),
    pytest.param(torch.float32, 7, 5, 2, 2, False, "contiguous", id="general-fp32-d7-dv5"),
    pytest.param(torch.bfloat16, 64, 64, 2, 1, True, "strided", id="general-bf16-d64-strided"),
]


@pytest.mark.parametrize("dtype,d,dv,hq,hk,rotary,layout", ATTENTION_CASES)
def test_attention_forward_backward_match_reference(emulated, dtype, d, dv, hq, hk, rotary, layout):
    tensor_cores = dtype != torch.float32 and d == dv and d in (64, 128) and layout == "contiguous"
    lq, lk = LENGTHS if tensor_cores else GENERAL_LENGTHS
    q, k, v, cq, ck, extra = _attention_case(lq, lk, hq, hk, d, dv, dtype, rotary, layout)
    scale = d**-0.5
    args = (cq, ck, scale, extra["q_positions"], extra["k_positions"], extra["rotary_cos"], extra["rotary_sin"])
    with nan_filled_empty():
        out, lse = emulated.cross_inject_attention(q, k, v, *args)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = so.cross_inject_attention(*leaves, cq, ck, softmax_scale=scale, return_lse=True,
                                             backend="reference", **extra)
    assert_close(out, ref, ATTN_TOL[dtype], msg="out")
    lse_tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, **lse_tol)
    no_keys = slice(sum(lq[:2]), sum(lq[:3]))  # the third sequence has queries and no keys
    assert torch.all(torch.isneginf(lse[no_keys])) and torch.count_nonzero(out[no_keys]) == 0

    g = torch.randn_like(out)
    gl = torch.where(torch.isfinite(ref_lse), torch.randn_like(ref_lse), 0.0)
    exp = torch.autograd.grad(
        (ref.float() * g.float()).sum() + (torch.where(torch.isfinite(ref_lse), ref_lse, 0.0) * gl).sum(), leaves
    )
    with nan_filled_empty():
        got = emulated.cross_inject_attention_backward(g, gl, q, k, v, out, lse, *args)
    for name, a, b in zip("qkv", got, exp):
        assert_finite(a, f"d{name}")
        assert_close(a, b, grad_tol(dtype, float(b.abs().max())), msg=f"d{name}")


SPLIT_LENGTHS = ([70, 0, 5, 1, 3], [300, 3, 0, 200, 65])  # 5 and 4 key tiles, one, none, a query-less sequence


def _force_splits(monkeypatch, variable: str, splits: str | None) -> None:
    """``variable`` forces ``splits`` shares; None leaves the choice to the heuristic."""
    if splits:
        monkeypatch.setenv(variable, splits)
    else:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("splits,dtype,d,hq,hk,rotary", [
    pytest.param(None, torch.bfloat16, 64, 4, 2, True, id="default-bf16-d64-rotary"),
    pytest.param("3", torch.bfloat16, 64, 4, 2, True, id="3-bf16-d64-rotary"),
    pytest.param("2", torch.float16, 128, 2, 1, False, id="2-fp16-d128"),
])
def test_attention_forward_split_over_the_keys(emulated, monkeypatch, splits, dtype, d, hq, hk, rotary):
    """SHAREDLLM_ATTENTION_SPLITS=n: n blocks per (query tile, head) share the key tiles (shares without keys
    included: a sequence with none, sequences with fewer tiles than shares), merged by combine_splits into
    the reference's out and lse. default: 64 queries against 1024 keys, which fill 4 of 264 block slots on
    132 SMs, split by the heuristic."""
    lq, lk = SPLIT_LENGTHS if splits else ([64], [1024])
    _force_splits(monkeypatch, "SHAREDLLM_ATTENTION_SPLITS", splits)
    q, k, v, cq, ck, extra = _attention_case(lq, lk, hq, hk, d, d, dtype, rotary)
    args = (cq, ck, d**-0.5, extra["q_positions"], extra["k_positions"], extra["rotary_cos"], extra["rotary_sin"])
    with nan_filled_empty():  # the shares' scratch too: an unwritten share would read NaN
        out, lse = emulated.cross_inject_attention(q, k, v, *args)
    ref, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, softmax_scale=d**-0.5, return_lse=True,
                                             backend="reference", **extra)
    assert_close(out, ref, ATTN_TOL[dtype], msg="out")
    torch.testing.assert_close(lse, ref_lse, atol=5e-2, rtol=1e-2)


@pytest.mark.parametrize("splits,dtype,d,hq,hk,rotary", [
    pytest.param(None, torch.bfloat16, 64, 4, 1, True, id="default-bf16-d64-rotary-gqa4"),
    pytest.param("3", torch.bfloat16, 64, 4, 2, True, id="3-bf16-d64-rotary"),
    pytest.param("2", torch.float16, 128, 2, 1, False, id="2-fp16-d128"),
])
def test_attention_backward_split_of_the_dk_dv_work(emulated, monkeypatch, splits, dtype, d, hq, hk, rotary):
    """SHAREDLLM_ATTENTION_BACKWARD_SPLITS=n: n blocks per (key tile, kv head) share its (query head, query
    tile) pairs (shares without pairs included: sequences without queries, fewer pairs than shares), and
    sum_dkdv_splits adds their parts into the reference's dk and dv. default: 256 queries of 4 heads against
    64 keys of one kv head, one block for 132 SMs, split by the heuristic."""
    lq, lk = SPLIT_LENGTHS if splits else ([256], [64])
    _force_splits(monkeypatch, "SHAREDLLM_ATTENTION_BACKWARD_SPLITS", splits)
    q, k, v, cq, ck, extra = _attention_case(lq, lk, hq, hk, d, d, dtype, rotary)
    scale = d**-0.5
    args = (cq, ck, scale, extra["q_positions"], extra["k_positions"], extra["rotary_cos"], extra["rotary_sin"])
    out, lse = emulated.cross_inject_attention(q, k, v, *args)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = so.cross_inject_attention(*leaves, cq, ck, softmax_scale=scale, backend="reference", **extra)
    g = torch.randn_like(out)
    exp = torch.autograd.grad((ref.float() * g.float()).sum(), leaves)
    with nan_filled_empty():  # the shares' scratch too: an unwritten part would read NaN
        got = emulated.cross_inject_attention_backward(g, None, q, k, v, out, lse, *args)
    for name, a, b in zip("qkv", got, exp):
        assert_finite(a, f"d{name}")
        assert_close(a, b, grad_tol(dtype, float(b.abs().max())), msg=f"d{name}")


def test_attention_without_lse_gradient_and_empty_inputs(emulated):
    q, k, v, cq, ck, extra = _attention_case([17], [40], 2, 1, 64, 64, torch.bfloat16, False)
    out, lse = emulated.cross_inject_attention(q, k, v, cq, ck, 0.125, None, None, None, None)
    g = torch.randn_like(out)
    dq, dk, dv = emulated.cross_inject_attention_backward(g, None, q, k, v, out, lse, cq, ck, 0.125,
                                                          None, None, None, None)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = so.cross_inject_attention(*leaves, cq, ck, softmax_scale=0.125, backend="reference")
    for name, a, b in zip("qkv", (dq, dk, dv), torch.autograd.grad((ref.float() * g.float()).sum(), leaves)):
        assert_close(a, b, grad_tol(torch.bfloat16, float(b.abs().max())), msg=f"d{name}")
    # no queries at all, and no keys at all
    empty_q = q[:0]
    out0, lse0 = emulated.cross_inject_attention(empty_q, k, v, cu_seqlens([0]), ck, 0.125, None, None, None, None)
    assert out0.shape == (0, 2, 64) and lse0.shape == (0, 2)
    out1, lse1 = emulated.cross_inject_attention(q, k[:0], v[:0], cq, cu_seqlens([0]), 0.125, None, None, None, None)
    assert torch.count_nonzero(out1) == 0 and torch.all(torch.isneginf(lse1))


# ---------------------------------------------------------------------------------------------
# chunk_pool and tree_topk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["mean", "first"])
@pytest.mark.parametrize("head_dim", [16, 5], ids=["vector", "scalar"])
def test_chunk_pool_matches_reference(emulated, dtype, mode, head_dim):
    lengths = [9, 0, 1, 20]
    x = torch.randn(sum(lengths), 2, head_dim).to(dtype)
    cu = cu_seqlens(lengths)
    with nan_filled_empty():
        out = emulated.chunk_pool(x, cu, 4, mode)
    assert_close(out, so.chunk_pool(x, cu, 4, mode=mode, backend="reference"), TOL[dtype])
    g = torch.randn_like(out)
    xr = x.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad((so.chunk_pool(xr, cu, 4, mode=mode, backend="reference").float() * g.float()).sum(), xr)
    with nan_filled_empty():
        grad = emulated.chunk_pool_backward(g, cu, x.shape[0], 4, mode)
    assert_close(grad, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("depth,k,b", [(3, 1, 2), (2, 2, 3)])
@pytest.mark.parametrize("dim", [40, 37], ids=["vector", "scalar"])
def test_tree_topk_matches_reference(emulated, dtype, score, depth, k, b, dim):
    from sharedllm_ops import reference as R

    T = R.num_tree_nodes(depth, b)
    query = torch.randn(2, dim).to(dtype)
    emb = torch.randn(2, 3, T, dim).to(dtype)
    with nan_filled_empty():
        ids, scores = emulated.tree_topk(query, emb, depth, k, b, score)
    _, ref_scores = so.tree_topk(query, emb, depth, k=k, branching=b, score=score, backend="reference")
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    check_against_brute_force(ids, scores, depth, k, b)


# ---------------------------------------------------------------------------------------------
# the CUDA kernels' limits that build_info reports to Python's dispatch


@pytest.fixture(scope="module")
def reported_limits():
    info = so._ext.compiled_build_info()
    if not info:
        pytest.skip(f"the compiled extension is not loaded ({so._ext.load_error})")
    return int(info["cuda_tree_topk_max_nodes"]), int(info["cuda_attention_max_head_dims"])


def test_tree_topk_max_nodes_is_the_largest_tree_that_launches(emulated, reported_limits):
    """The emulator refuses a launch as sm_90 does, past 48 KiB of shared memory per block. A depth-1
    tree takes any node count: the reported maximum launches and is right, one node more does not."""
    max_nodes, _ = reported_limits
    query = torch.randn(1, 8)
    emb = torch.randn(1, 1, max_nodes, 8)
    ids, scores = emulated.tree_topk(query, emb, 1, 1, max_nodes, "dot")
    _, ref_scores = so.tree_topk(query, emb, 1, k=1, branching=max_nodes, score="dot", backend="reference")
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids[0, 0], torch.arange(max_nodes, dtype=torch.int32))  # depth 1 keeps every node
    with pytest.raises(RuntimeError, match="tree_topk failed to launch"):
        emulated.tree_topk(query, torch.randn(1, 1, max_nodes + 1, 8), 1, 1, max_nodes + 1, "dot")


def test_attention_max_head_dims_launch_forward_and_backward(emulated, reported_limits):
    """At the reported D + Dv (float32: the general path, whose per-warp staging the limit bounds)
    every kernel launches within the emulator's 48 KiB and matches the reference."""
    _, max_head_dims = reported_limits
    d = max_head_dims // 2
    q, k, v, cq, ck, _ = _attention_case([2], [3], 1, 1, d, max_head_dims - d, torch.float32, False)
    scale = d**-0.5
    args = (cq, ck, scale, None, None, None, None)
    out, lse = emulated.cross_inject_attention(q, k, v, *args)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = so.cross_inject_attention(*leaves, cq, ck, softmax_scale=scale, backend="reference")
    assert_close(out, ref, ATTN_TOL[torch.float32], msg="out")
    g = torch.randn_like(out)
    got = emulated.cross_inject_attention_backward(g, None, q, k, v, out, lse, *args)
    for name, a, b in zip("qkv", got, torch.autograd.grad((ref * g).sum(), leaves)):
        assert_close(a, b, grad_tol(torch.float32, float(b.abs().max())), msg=f"d{name}")


# ---------------------------------------------------------------------------------------------
# the emulator's own checks (include/emulator_checks.h): each finds the mistake it is for


def _line_of(path: str, text: str) -> int:
    """The 1-based line of ``path`` holding ``text`` (exactly one)."""
    with open(path) as f:
        lines = [i + 1 for i, line in enumerate(f) if text in line]
    assert len(lines) == 1, f"{text!r} in {path}: lines {lines}"
    return lines[0]


FAULTS = os.path.join(HERE, "cuda_emulator", "harness_faults.cpp")


def _published_lines() -> tuple[int, int]:
    """The lines of the "published" fault kernel's shared write and of its readers' read."""
    return _line_of(FAULTS, "value = x[0]"), _line_of(FAULTS, "out[threadIdx.x] = value")


@pytest.mark.parametrize("seed", ["0", "1", "2"])
def test_a_missing_barrier_is_reported_in_any_schedule(emulated, seed, monkeypatch):
    """Thread 0 publishes a value through shared memory; with the barrier every thread reads it,
    without it the detector reports the race whatever order the threads run in."""
    monkeypatch.setenv("SHAREDLLM_EMULATOR_SCHEDULE_SEED", seed)
    x = torch.arange(68, dtype=torch.float32) + 7
    assert torch.equal(emulated.emulator_fault(x, "published", 1), torch.full((64,), 7.0))
    write, read = _published_lines()
    with pytest.raises(RuntimeError, match=rf"shared-memory race \((read after write|write after read)\).*"
                                           rf"(harness_faults.cpp:{write}\b.*harness_faults.cpp:{read}\b|"
                                           rf"harness_faults.cpp:{read}\b.*harness_faults.cpp:{write}\b)"):
        emulated.emulator_fault(x, "published", 0)


def test_in_thread_order_the_report_names_both_threads_and_lines(emulated):
    x = torch.zeros(68)
    write, read = _published_lines()
    with pytest.raises(RuntimeError, match=rf"block \(0, 0, 0\): shared-memory race \(read after write\) at 0x[0-9a-f]+: "
                                           rf"thread 0 at harness_faults.cpp:{write}\b.*, thread 1 at "
                                           rf"harness_faults.cpp:{read}\b.*, with no barrier between them"):
        emulated.emulator_fault(x, "published", 0)


def test_unwritten_static_shared_memory_reads_as_nan(emulated):
    assert torch.equal(emulated.emulator_fault(torch.zeros(68), "unwritten", 1), torch.ones(64))
    assert torch.isnan(emulated.emulator_fault(torch.zeros(68), "unwritten", 0)).all()


def test_a_misaligned_vector_load_faults(emulated):
    x = torch.arange(68, dtype=torch.float32)
    assert x.data_ptr() % 16 == 0  # torch's CPU allocations are 64-byte aligned
    assert torch.equal(emulated.emulator_fault(x, "vector_load", 4), torch.full((64,), 4.0))
    line = _line_of(FAULTS, "const uint4 v = ")
    with pytest.raises(RuntimeError, match=rf"misaligned [a-z ]+ 'const struct uint4' \(needs 16-byte alignment\) "
                                           rf"at 0x[0-9a-f]+ by thread 0 at harness_faults.cpp:{line}\n"):
        emulated.emulator_fault(x, "vector_load", 1)


def test_cp_async_lands_at_the_wait_that_covers_its_group(emulated):
    """Copied, waited for and synced, every thread reads what another copied; with two groups and
    wait_group 1 the older group has landed and the newer one still reads as the emulator's NaN."""
    x = torch.arange(68, dtype=torch.float32) + 1
    assert torch.equal(emulated.emulator_fault(x, "async_copy", 0), x[(torch.arange(64) + 1) % 64])
    out = emulated.emulator_fault(x, "async_copy", 3)
    assert torch.equal(out[:16], x[0:64:4])
    assert torch.isnan(out[16:32]).all()


@pytest.mark.parametrize("seed", ["0", "1"])
@pytest.mark.parametrize("mode", [1, 2], ids=["sync-without-wait", "wait-without-sync"])
def test_reading_a_cp_async_tile_without_wait_and_sync_is_reported(emulated, mode, seed, monkeypatch):
    """__syncthreads does not wait for copies, and a wait makes them visible to the issuing thread
    only: either one alone lets another thread read a tile the copy may not have reached."""
    monkeypatch.setenv("SHAREDLLM_EMULATOR_SCHEDULE_SEED", seed)
    x = torch.arange(68, dtype=torch.float32) + 1
    read = _line_of(FAULTS, "out[t] = tile[(t + 1) % kThreads]")
    with pytest.raises(RuntimeError, match=rf"shared-memory race \((access while a cp.async to it was in flight|"
                                           rf"read after write)\).*harness_faults.cpp:{read}\b"):
        emulated.emulator_fault(x, "async_copy", mode)


def test_a_misaligned_cp_async_faults(emulated):
    line = _line_of(FAULTS, "if (t < 16) cp_async_16(tile + 4 * t")
    with pytest.raises(RuntimeError, match=rf"cp.async address not 16-byte aligned \(thread 0\) at "
                                           rf"harness_faults.cpp:{line}\b"):
        emulated.emulator_fault(torch.zeros(68), "async_copy", 4)


def test_static_plus_dynamic_shared_memory_past_48_kib_is_reported(emulated):
    x = torch.zeros(68)
    out = emulated.emulator_fault(x, "big_static", 8 * 1024)  # 40 KiB static + 8 KiB dynamic: the limit
    assert torch.equal(out, ((torch.arange(64) + 1) % 64).float())
    with pytest.raises(RuntimeError, match=r"static shared memory touched \(40960 bytes\) plus dynamic \(8196\) "
                                           r"exceeds the 49152 bytes"):
        emulated.emulator_fault(x, "big_static", 8 * 1024 + 4)


@pytest.mark.parametrize("kind,good,bad", [("grid_y", 3, 65536), ("block_threads", 1024, 1056)])
def test_launches_past_sm90_limits_fail(emulated, kind, good, bad):
    x = torch.arange(68, dtype=torch.float32) + 7
    out = emulated.emulator_fault(x, kind, good)
    assert torch.equal(out, torch.full_like(out, 7.0))
    with pytest.raises(RuntimeError, match=f"{kind} failed to launch: invalid configuration"):
        emulated.emulator_fault(x, kind, bad)


def test_the_race_detector_finds_a_barrier_removed_from_the_attention_kernel(emulated, monkeypatch):
    """Barrier 1: thread 0 finds the block's tile and publishes it through shared memory. In thread
    order the others read it after it is written, so the results stay right without the barrier:
    only the detector can tell. Barrier 2: between the wait for a V tile's cp.async copies and the
    warps' reads of it (and the next K tile's copies over the K tile they have just read)."""
    q, k, v, cq, ck, _ = _attention_case([70, 5], [140, 3], 2, 1, 64, 64, torch.bfloat16, False)
    args = (cq, ck, 0.125, None, None, None, None)
    out, _ = emulated.cross_inject_attention(q, k, v, *args)
    ref = so.cross_inject_attention(q, k, v, cq, ck, softmax_scale=0.125, backend="reference")
    assert_close(out, ref, ATTN_TOL[torch.bfloat16], msg="out")
    source = os.path.join(ROOT, "csrc", "cuda", "cross_inject_attention.cu")
    read = _line_of(source, "seq = found[0];")
    monkeypatch.setenv("SHAREDLLM_EMULATOR_DROP_BARRIER", "1")
    with pytest.raises(RuntimeError, match=rf"race \(read after write\).*thread 0 at cross_inject_attention.cu:\d+.*"
                                           rf"thread 1 at cross_inject_attention.cu:{read}\b"):
        emulated.cross_inject_attention(q, k, v, *args)
    monkeypatch.setenv("SHAREDLLM_EMULATOR_DROP_BARRIER", "2")
    with pytest.raises(RuntimeError, match=r"shared-memory race \((access while a cp.async to it was in flight|"
                                           r"read after write|write after read)\).*cross_inject_attention.cu"):
        emulated.cross_inject_attention(q, k, v, *args)


def _kernel_results(ops) -> list[torch.Tensor]:
    """Every emulated kernel once, forward and backward, at small sizes."""
    results = []
    for dtype, d, dv, rotary, lengths in [(torch.bfloat16, 64, 64, True, ([70, 0, 5], [40, 3, 0])),
                                          (torch.float32, 7, 5, False, ([6, 0, 5], [11, 3, 0]))]:
        q, k, v, cq, ck, extra = _attention_case(*lengths, 2, 1, d, dv, dtype, rotary)
        args = (cq, ck, d**-0.5, extra["q_positions"], extra["k_positions"], extra["rotary_cos"], extra["rotary_sin"])
        out, lse = ops.cross_inject_attention(q, k, v, *args)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        results += [out, lse, *ops.cross_inject_attention_backward(g, None, q, k, v, out, lse, *args)]
    x = torch.randn(30, 2, 16, generator=torch.Generator().manual_seed(3))
    results.append(ops.chunk_pool(x, cu_seqlens([9, 0, 21]), 4, "mean"))
    emb = torch.randn(2, 3, 14, 40, generator=torch.Generator().manual_seed(4))
    results += list(ops.tree_topk(emb[:, 0, 0], emb, 3, 1, 2, "cosine"))
    return results


def test_results_do_not_depend_on_the_thread_schedule(emulated, monkeypatch):
    """Seeded random orders of a block's threads (the race checks on) give bit-identical results."""
    monkeypatch.setenv("SHAREDLLM_EMULATOR_SCHEDULE_SEED", "0")
    in_order = _kernel_results(emulated)
    for seed in ("1", "2", "3"):
        monkeypatch.setenv("SHAREDLLM_EMULATOR_SCHEDULE_SEED", seed)
        for i, (a, b) in enumerate(zip(_kernel_results(emulated), in_order)):
            assert torch.equal(a, b), f"seed {seed}: result {i} differs from the in-order schedule"


# ---------------------------------------------------------------------------------------------
# AddressSanitizer: out-of-bounds global memory, use after free, in a build of its own

ASAN_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.ops.load_library({library!r})
ops = torch.ops.sharedllm_emulated_asan
if {fault!r}:
    ops.emulator_fault(torch.zeros(68), "global_read", 68)  # the float just past the end
else:
    import test_cuda_emulated as t
    for case in t.ATTENTION_CASES:
        t.test_attention_forward_backward_match_reference(ops, *case.values)
    t.test_attention_without_lse_gradient_and_empty_inputs(ops)
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("mean", "first"):
            t.test_chunk_pool_matches_reference(ops, dtype, mode, 16)
        t.test_tree_topk_matches_reference(ops, dtype, "cosine", 3, 1, 2, 40)
print("finished")
"""


@pytest.fixture(scope="module")
def asan_library():
    """The unchecked emulator and every harness built with -fsanitize=address; returns its path.
    Built here, loaded only in processes that preload the ASan runtime (it must come first)."""
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("g++ has no AddressSanitizer runtime")
    name = "sharedllm_emulated_asan"
    try:  # builds, then fails to load into this process, which has no ASan runtime
        build_emulated(name, ("attention", "chunk_pool", "tree_topk", "faults"),
                       ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"])
    except OSError:
        pass
    library = os.path.join(ROOT, "build", name, f"{name}.so")
    assert os.path.isfile(library)
    # libstdc++ preloaded too: ASan's __cxa_throw interceptor needs the real one at start-up
    libstdcxx = subprocess.run(["g++", "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip()
    return library, f"{libasan} {libstdcxx}"


def _run_under_asan(asan_library, fault: bool) -> subprocess.CompletedProcess:
    library, preload = asan_library
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0")
    script = ASAN_RUN.format(tests=HERE, library=library, fault=fault)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200)


def test_every_kernel_runs_clean_under_addresssanitizer(asan_library):
    result = _run_under_asan(asan_library, fault=False)
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in result.stderr


def test_addresssanitizer_finds_a_read_past_the_end_of_a_tensor(asan_library):
    result = _run_under_asan(asan_library, fault=True)
    line = _line_of(FAULTS, "out[threadIdx.x] = x[index]")
    assert result.returncode != 0 and "finished" not in result.stdout
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr, result.stderr[-4000:]
    assert f"harness_faults.cpp:{line}" in result.stderr, result.stderr[-4000:]
