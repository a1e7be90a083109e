"""The GPU backends on a real GPU: the CUDA kernels, and the Triton kernels compiled for the device
(``TRITON_INTERPRET=0``), against the reference on the same device at sizes the CPU tests cannot
reach, with opcheck, ``torch.compile``, CUDA-graph capture (CUDA) and autotuning (Triton). CI has
no GPU: there these tests skip (the Triton kernels are tested under the interpreter in the per-op
test files; the CUDA sources are compiled). ``bench/gpu_check.sh`` runs them on a GPU machine."""

import math
import warnings

import pytest
import torch
from conftest import ATTN_TOL, TOL, assert_close, assert_finite, cu_seqlens, grad_tol, nan_filled_empty, rotary_tables
from test_tree_topk import check_against_brute_force

import sharedllm_ops as so
from sharedllm_ops import triton as so_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gpu_backends(op: str) -> list:
    """``triton`` and ``cuda``, each skipped with its reason where this build or setting lacks it."""
    triton_ok = so_triton.has_op(op) and not so_triton.interpreting()
    cuda_ok = so._ext.compiled_kernels[op]["cuda"]
    return [
        pytest.param("triton", marks=pytest.mark.skipif(not triton_ok, reason=f"no compiled Triton {op} (TRITON_INTERPRET=1?)")),
        pytest.param("cuda", marks=pytest.mark.skipif(not cuda_ok, reason=f"this build has no CUDA kernel for {op}")),
    ]


def _cu(lengths):
    return cu_seqlens(lengths).to(DEV)


# ---------------------------------------------------------------------------------------------
# chunk_pool


@pytest.mark.parametrize("backend", gpu_backends("chunk_pool"))
@pytest.mark.parametrize("mode", ["mean", "first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_pool_gpu_matches_reference(dtype, mode, backend):
    lengths = [0, 1, 31, 32, 4095, 1000, 3, 0, 131072]
    cu = _cu(lengths)
    x = torch.randn(int(cu[-1]), 2, 128, device=DEV, dtype=dtype, requires_grad=True)
    with nan_filled_empty():  # an output element the kernel skips reads back as NaN
        out = so.chunk_pool(x, cu, 32, mode, backend=backend)
    ref = so.chunk_pool(x, cu, 32, mode, backend="reference")
    assert_finite(out)
    assert_close(out, ref, TOL[dtype])
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert_close(gx, gr, TOL[dtype])


@pytest.mark.parametrize("backend", gpu_backends("chunk_pool"))
def test_chunk_pool_gpu_opcheck(backend):
    cu = _cu([0, 5, 70, 1])
    x = torch.randn(76, 3, 64, device=DEV, requires_grad=True)
    ops = torch.ops.sharedllm_triton if backend == "triton" else torch.ops.sharedllm
    torch.library.opcheck(ops.chunk_pool.default, (x, cu, 8, "mean"))
    torch.library.opcheck(ops.chunk_pool_backward.default, (torch.randn(32, 3, 64, device=DEV), cu, 76, 8, "mean"))


@pytest.mark.parametrize("layout", ["odd_dim", "padded_rows"])
def test_chunk_pool_cuda_scalar_path(layout):
    """Shapes the 16-byte vector path cannot take (D not a multiple of the vector, unaligned rows)."""
    if not so._ext.compiled_kernels["chunk_pool"]["cuda"]:
        pytest.skip("this build has no CUDA kernel for chunk_pool")
    cu = _cu([0, 1, 33, 7])
    x = torch.randn(41, 3, 33, device=DEV) if layout == "odd_dim" else torch.randn(41, 3, 70, device=DEV)[:, :, 3:67]
    for mode in ("mean", "first"):
        assert_close(so.chunk_pool(x, cu, 8, mode, backend="cuda"), so.chunk_pool(x, cu, 8, mode, backend="reference"))


def test_chunk_pool_cuda_more_than_2_31_elements():
    """64-bit offsets: 2^31 + 2^20 bf16 elements (4 GiB) in one tensor."""
    if not so._ext.compiled_kernels["chunk_pool"]["cuda"]:
        pytest.skip("this build has no CUDA kernel for chunk_pool")
    rows = (2**31 + 2**20) // (8 * 128)
    x = torch.randn(rows, 8, 128, device=DEV, dtype=torch.bfloat16)
    cu = _cu([rows - 1000, 1000])
    out = so.chunk_pool(x, cu, 4, "mean", backend="cuda")
    tail = x[rows - 1000:].float().reshape(4, 250, 8, 128).mean(1)  # the last segment, windows of 250 rows
    torch.testing.assert_close(out[4:].float(), tail, atol=2e-2, rtol=2e-2)


def test_chunk_pool_cuda_graph_capture_and_bad_inputs(monkeypatch):
    if not so._ext.compiled_kernels["chunk_pool"]["cuda"]:
        pytest.skip("this build has no CUDA kernel for chunk_pool")
    cu = _cu([5, 0, 70])
    x = torch.randn(75, 4, 64, device=DEV)
    expected = so.chunk_pool(x, cu, 8, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = so.chunk_pool(x, cu, 8, backend="cuda")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, so.chunk_pool(x, cu, 8, backend="reference"))
    assert not torch.equal(captured, expected)
    with pytest.raises(ValueError, match="cu_seqlens.*device"):
        so.chunk_pool(x, cu.cpu(), 8, backend="cuda")
    monkeypatch.setenv("SHAREDLLM_HOST_CHECKS", "1")  # values on the host: a ValueError, not a device assert
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]"):
        so.chunk_pool(x, _cu([5, 0, 69]), 8, backend="cuda")


# ---------------------------------------------------------------------------------------------
# tree_topk


@pytest.mark.parametrize("backend", gpu_backends("tree_topk"))
@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tree_topk_gpu_matches_reference(dtype, score, backend):
    """The 128K-context shape of the issue: 128 chunks, depth 3, D = 4096."""
    query = torch.randn(2, 4096, device=DEV, dtype=dtype)
    emb = torch.randn(2, 128, 14, 4096, device=DEV, dtype=dtype)
    with nan_filled_empty():
        ids, scores = so.tree_topk(query, emb, 3, backend=backend, score=score)
    ref_ids, ref_scores = so.tree_topk(query, emb, 3, backend="reference", score=score)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4 if score == "cosine" else 5e-3, rtol=1e-4)
    # the descent is checked against the kernel's own scores: siblings whose scores differ by a
    # rounding may rank either way, which an equality with the reference's ids would flag
    check_against_brute_force(ids.cpu(), scores.cpu(), 3, 1, 2)
    assert (ids == ref_ids).float().mean() > 0.99


@pytest.mark.parametrize("backend", gpu_backends("tree_topk"))
@pytest.mark.parametrize("depth,k,b", [(1, 1, 2), (3, 1, 2), (4, 2, 3), (2, 3, 4)])
def test_tree_topk_gpu_trees_and_opcheck(backend, depth, k, b):
    T = sum(b**level for level in range(1, depth + 1))
    query, emb = torch.randn(3, 40, device=DEV), torch.randn(3, 5, T, 40, device=DEV)
    ids, scores = so.tree_topk(query, emb, depth, k, b, backend=backend)
    ref_ids, ref_scores = so.tree_topk(query, emb, depth, k, b, backend="reference")
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    check_against_brute_force(ids.cpu(), scores.cpu(), depth, k, b)
    ops = torch.ops.sharedllm_triton if backend == "triton" else torch.ops.sharedllm
    torch.library.opcheck(ops.tree_topk.default, (query, emb, depth, k, b, "cosine"))


def test_tree_topk_cuda_graph_capture():
    """One launch and no host synchronisation: the op can be captured into a CUDA graph."""
    if not so._ext.compiled_kernels["tree_topk"]["cuda"]:
        pytest.skip("this build has no CUDA kernel for tree_topk")
    query, emb = torch.randn(2, 256, device=DEV), torch.randn(2, 16, 14, 256, device=DEV)
    so.tree_topk(query, emb, 3, backend="cuda")  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, scores = so.tree_topk(query, emb, 3, backend="cuda")
    emb.copy_(torch.randn_like(emb))
    graph.replay()
    _, ref_scores = so.tree_topk(query, emb, 3, backend="reference")
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)  # the replay saw the new emb
    check_against_brute_force(ids.cpu(), scores.cpu(), 3, 1, 2)


def test_cuda_limits_of_build_info_hold_on_the_gpu():
    """The limits dispatch reads from build_info: the largest tree and the largest head dims launch
    and match the reference; one node or one head dim more is refused by the binding with its
    message, before any launch. (Through torch.ops, so that Python's dispatch does not refuse first.)"""
    if not (so._ext.compiled_kernels["tree_topk"]["cuda"] and so._ext.compiled_kernels["cross_inject_attention"]["cuda"]):
        pytest.skip("this build has no CUDA kernels")
    info = so._ext.compiled_build_info()
    max_nodes, max_head_dims = int(info["cuda_tree_topk_max_nodes"]), int(info["cuda_attention_max_head_dims"])
    ops = torch.ops.sharedllm
    query = torch.randn(2, 64, device=DEV)
    emb = torch.randn(2, 3, max_nodes, 64, device=DEV)
    _, scores = ops.tree_topk(query, emb, 1, 1, max_nodes, "cosine")
    _, ref_scores = so.tree_topk(query, emb, 1, k=1, branching=max_nodes, score="cosine", backend="reference")
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=f"trees of up to {max_nodes} nodes"):
        ops.tree_topk(query, torch.randn(2, 3, max_nodes + 1, 64, device=DEV), 1, 1, max_nodes + 1, "cosine")

    d = max_head_dims // 2
    cq, ck = _cu([3, 1]), _cu([5, 2])
    q = torch.randn(4, 2, d, device=DEV, requires_grad=True)
    k = torch.randn(7, 1, d, device=DEV, requires_grad=True)
    v = torch.randn(7, 1, max_head_dims - d, device=DEV, requires_grad=True)
    out = so.cross_inject_attention(q, k, v, cq, ck, backend="cuda")
    ref = so.cross_inject_attention(q, k, v, cq, ck, backend="reference")
    assert_close(out, ref, ATTN_TOL[torch.float32])
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert_close(a, b, grad_tol(torch.float32, float(b.abs().max())), msg=f"d{name}")
    wide_v = torch.randn(7, 1, max_head_dims - d + 1, device=DEV)
    with pytest.raises(ValueError, match=rf"q.shape\[2\] \+ v.shape\[2\] <= {max_head_dims}"):
        ops.cross_inject_attention(q.detach(), k.detach(), wide_v, cq, ck, d**-0.5, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# cross_inject_attention


LSE_TOL_16BIT = dict(atol=5e-2, rtol=1e-2)


def _attention_inputs(lq, lk, hq, hk, d, dtype, rotary=True, max_pos=4096):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), hq, d, generator=gen).to(DEV, dtype)
    k = torch.randn(sum(lk), hk, d, generator=gen).to(DEV, dtype)
    v = torch.randn(sum(lk), hk, d, generator=gen).to(DEV, dtype)
    extra = {}
    if rotary:
        cos, sin = rotary_tables(max_pos, d)
        extra = dict(
            q_positions=torch.randint(0, max_pos, (sum(lq),), generator=gen, dtype=torch.int32).to(DEV),
            k_positions=torch.randint(0, max_pos, (sum(lk),), generator=gen, dtype=torch.int32).to(DEV),
            rotary_cos=cos.to(DEV), rotary_sin=sin.to(DEV),
        )
    return q, k, v, _cu(lq), _cu(lk), extra


TRITON_ATTENTION = pytest.mark.skipif(
    not so_triton.has_op("cross_inject_attention") or so_triton.interpreting(),
    reason="no compiled Triton cross_inject_attention (TRITON_INTERPRET=1?)",
)


@pytest.mark.parametrize("backend", gpu_backends("cross_inject_attention"))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_gpu_matches_reference(dtype, rotary, d, backend):
    lq, lk = [300, 0, 1000, 1, 64], [2000, 5, 0, 17, 1]
    q, k, v, cq, ck, extra = _attention_inputs(lq, lk, 32, 8, d, dtype, rotary)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with nan_filled_empty():
        out, lse = so.cross_inject_attention(*leaves, cq, ck, return_lse=True, backend=backend, **extra)
    ref, ref_lse = so.cross_inject_attention(*leaves, cq, ck, return_lse=True, backend="reference", **extra)
    assert_finite(out)
    assert_close(out, ref, ATTN_TOL[dtype])
    # 16-bit kernels round the rotated q and k to the input dtype for the tensor cores
    torch.testing.assert_close(lse, ref_lse, **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else LSE_TOL_16BIT))
    assert torch.all(torch.isneginf(lse[300:1300])) and torch.count_nonzero(out[300:1300]) == 0  # no keys
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    finite = lambda t: torch.where(torch.isfinite(t), t, 0.0)  # noqa: E731
    got = torch.autograd.grad((out.float() * g).sum() + (finite(lse) * gl).sum(), leaves)
    exp = torch.autograd.grad((ref.float() * g).sum() + (finite(ref_lse) * gl).sum(), leaves)
    for name, a, b in zip("qkv", got, exp):
        assert_close(a, b, grad_tol(dtype, float(b.abs().max())), msg=f"d{name}")


@pytest.mark.parametrize("backend", gpu_backends("cross_inject_attention"))
def test_attention_gpu_128k_keys(backend):
    """One sequence of 128K pooled keys (64-bit row offsets in the kernel's key loop)."""
    q, k, v, cq, ck, extra = _attention_inputs([64], [131072], 8, 2, 128, torch.bfloat16, max_pos=200_000)
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend, **extra)
    ref, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="reference", **extra)
    assert_close(out, ref, ATTN_TOL[torch.bfloat16])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL_16BIT)


@pytest.mark.parametrize("backend", gpu_backends("cross_inject_attention"))
@pytest.mark.parametrize("d,dv,layout", [(80, 80, "contiguous"), (64, 32, "contiguous"), (128, 128, "strided")])
def test_attention_gpu_other_head_dims_and_layouts(d, dv, layout, backend):
    """Shapes off the CUDA tensor-core path (D not in {64, 128}, Dv != D, unaligned strides)."""
    lq, lk = [100, 3], [700, 0]
    gen = torch.Generator().manual_seed(1)
    pad = 3 if layout == "strided" else 0
    q = torch.randn(sum(lq), 8, d + pad, generator=gen).to(DEV, torch.bfloat16)[..., :d]
    k = torch.randn(sum(lk), 2, d + pad, generator=gen).to(DEV, torch.bfloat16)[..., :d]
    v = torch.randn(sum(lk), 2, dv + pad, generator=gen).to(DEV, torch.bfloat16)[..., :dv]
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with nan_filled_empty():
        out, lse = so.cross_inject_attention(*leaves, _cu(lq), _cu(lk), return_lse=True, backend=backend)
    ref, ref_lse = so.cross_inject_attention(*leaves, _cu(lq), _cu(lk), return_lse=True, backend="reference")
    assert_close(out, ref, ATTN_TOL[torch.bfloat16])
    g = torch.randn_like(out)
    got = torch.autograd.grad((out.float() * g).sum(), leaves)
    exp = torch.autograd.grad((ref.float() * g).sum(), leaves)
    for name, a, b in zip("qkv", got, exp):
        assert_close(a, b, grad_tol(torch.bfloat16, float(b.abs().max())), msg=f"d{name}")


@pytest.mark.parametrize("backend", gpu_backends("cross_inject_attention"))
def test_attention_gpu_backward_with_misaligned_grad_out(backend):
    """A contiguous grad_out that starts 2 bytes past a 16-byte boundary (the CUDA tensor-core
    backward reads dO in 16-byte vectors, so it must take its other path here)."""
    q, k, v, cq, ck, extra = _attention_inputs([70, 3], [130, 9], 8, 2, 128, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = so.cross_inject_attention(*leaves, cq, ck, backend=backend, **extra)
    ref = so.cross_inject_attention(*leaves, cq, ck, backend="reference", **extra)
    g = torch.randn(out.numel() + 1, device=DEV, dtype=out.dtype)[1:].view_as(out)
    got = torch.autograd.grad(out, leaves, g)
    exp = torch.autograd.grad(ref, leaves, g)
    for name, a, b in zip("qkv", got, exp):
        assert_close(a, b, grad_tol(torch.bfloat16, float(b.abs().max())), msg=f"d{name}")


def _check_graph_replay(lq, lk):
    """The CUDA forward captured in a graph, replayed after k changed: the reference's out and lse on the new
    k. Returns the inputs."""
    q, k, v, cq, ck, extra = _attention_inputs(lq, lk, 8, 2, 128, torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="cuda", **extra)
    k.copy_(torch.randn_like(k))
    graph.replay()
    ref, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="reference", **extra)
    assert_close(out, ref, ATTN_TOL[torch.bfloat16])  # the replay saw the new k
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL_16BIT)
    return q, k, v, cq, ck, extra


def test_attention_cuda_graph_capture_and_bad_inputs(monkeypatch):
    if not so._ext.compiled_kernels["cross_inject_attention"]["cuda"]:
        pytest.skip("this build has no CUDA kernel for cross_inject_attention")
    q, k, v, cq, ck, extra = _check_graph_replay([70, 0, 5], [130, 3, 0])
    with pytest.raises(ValueError, match="cu_seqlens_q.*device"):
        so.cross_inject_attention(q, k, v, cq.cpu(), ck, backend="cuda", **extra)
    monkeypatch.setenv("SHAREDLLM_HOST_CHECKS", "1")  # values on the host: a ValueError, not a device assert
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\]"):
        so.cross_inject_attention(q, k, v, cq, _cu([130, 2, 0]), backend="cuda", **extra)
    with pytest.raises(ValueError, match="k_positions"):
        so.cross_inject_attention(q, k, v, cq, ck, backend="cuda", **{**extra, "k_positions": extra["k_positions"] + 5000})


@pytest.mark.parametrize("splits", ["3", None], ids=["forced-3", "heuristic"])
def test_attention_split_over_the_keys_under_graph_capture(monkeypatch, splits):
    """The forward split over the keys (its shares and its combine kernel) captured in a CUDA graph: a short
    decoder against long keys (the heuristic splits it), or 3 shares forced."""
    if not so._ext.compiled_kernels["cross_inject_attention"]["cuda"]:
        pytest.skip("this build has no CUDA kernel for cross_inject_attention")
    if splits:
        monkeypatch.setenv("SHAREDLLM_ATTENTION_SPLITS", splits)
    _check_graph_replay([40, 0, 24], [9000, 70, 0])


def test_the_cuda_path_never_synchronises_and_checks_indices_on_the_device(monkeypatch):
    """No host synchronisation in the forward and backward of either op by default (PyTorch's sync debug mode
    warns on any, e.g. a copy of the index tensors to the host), and there is one with SHAREDLLM_HOST_CHECKS=1."""
    if not so._ext.compiled_kernels["cross_inject_attention"]["cuda"]:
        pytest.skip("this build has no CUDA kernels")
    q, k, v, cq, ck, extra = _attention_inputs([70, 0, 5], [130, 3, 0], 8, 2, 128, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    x = torch.randn(75, 4, 64, device=DEV, requires_grad=True)

    def both_ops():
        out = so.cross_inject_attention(*leaves, cq, ck, backend="cuda", **extra)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        pooled = so.chunk_pool(x, cq, 8, backend="cuda")
        torch.autograd.grad(pooled, x, torch.ones_like(pooled))

    both_ops()  # first call: loads, allocates
    monkeypatch.delenv("SHAREDLLM_HOST_CHECKS", raising=False)
    torch.cuda.set_sync_debug_mode("warn")  # "error" would raise through the C++ extension, a less stable path
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*synchroniz.*")
            both_ops()
        monkeypatch.setenv("SHAREDLLM_HOST_CHECKS", "1")
        with pytest.warns(UserWarning, match="synchroniz"):
            both_ops()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_bad_index_is_a_device_side_assert_naming_the_argument():
    """By default the values are checked on the device; a device-side assert leaves the CUDA context unusable,
    so this runs in a child process."""
    if not so._ext.compiled_kernels["cross_inject_attention"]["cuda"]:
        pytest.skip("this build has no CUDA kernel for cross_inject_attention")
    import os
    import subprocess
    import sys

    script = (
        "import torch, sharedllm_ops as so\n"
        "q = torch.randn(8, 2, 64, device='cuda', dtype=torch.bfloat16)\n"
        "k = torch.randn(6, 2, 64, device='cuda', dtype=torch.bfloat16)\n"
        "cq = torch.tensor([0, 8], dtype=torch.int32, device='cuda')\n"
        "ck = torch.tensor([0, 5], dtype=torch.int32, device='cuda')  # k has 6 rows\n"
        "so.cross_inject_attention(q, k, k, cq, ck, backend='cuda')\n"
        "torch.cuda.synchronize()\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "SHAREDLLM_HOST_CHECKS"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "device-side assert" in run.stderr, run.stderr
    assert "cu_seqlens_k must start at 0, never decrease and end at k.shape[0]" in run.stdout + run.stderr


@TRITON_ATTENTION
def test_attention_gpu_varlen_does_not_retune():
    """The autotuner's key holds head dims and the GQA group only: new lengths reuse its choice."""
    from sharedllm_ops.triton import cross_inject_attention as kernels

    tuner = kernels._TUNED[kernels._attn_fwd_kernel]
    entries = []
    for lq, lk in (([100], [3000]), ([7, 900], [50, 10000]), ([4096], [128])):
        q, k, v, cq, ck, extra = _attention_inputs(lq, lk, 32, 8, 128, torch.bfloat16)
        so.cross_inject_attention(q, k, v, cq, ck, backend="triton", **extra)
        entries.append(len(tuner.cache))
    assert entries[0] >= 1 and entries[1:] == [entries[0]] * 2, f"tuned entries after each call: {entries}"


@pytest.mark.parametrize("backend", gpu_backends("cross_inject_attention"))
def test_attention_gpu_opcheck_and_compile(backend):
    q, k, v, cq, ck, extra = _attention_inputs([30, 0, 17], [40, 9, 0], 8, 2, 64, torch.bfloat16)
    args = (q, k, v, cq, ck, 0.125, extra["q_positions"], extra["k_positions"], extra["rotary_cos"], extra["rotary_sin"])
    ops = torch.ops.sharedllm_triton if backend == "triton" else torch.ops.sharedllm
    torch.library.opcheck(ops.cross_inject_attention.default, args)

    def fn(q, k, v):
        out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend, **extra)
        return out.float().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()

    leaves = [t.requires_grad_() for t in (q, k, v)]
    eager = torch.autograd.grad(fn(*leaves), leaves)
    compiled = torch.compile(fn, fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", gpu_backends("cross_inject_attention"))
def test_attention_gpu_duplicated_keys(backend):
    """A timing-free check that the tiled kernel handles every key block: doubling the keys with a
    copy of themselves leaves the output unchanged and raises the lse by exactly log(2)."""
    q, k, v, cq, ck, _ = _attention_inputs([500], [3000], 16, 4, 128, torch.float32, rotary=False)
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend)
    out2, lse2 = so.cross_inject_attention(q, torch.cat((k, k)), torch.cat((v, v)), cq, _cu([6000]),
                                           return_lse=True, backend=backend)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse2, lse + math.log(2.0), atol=1e-5, rtol=1e-5)
