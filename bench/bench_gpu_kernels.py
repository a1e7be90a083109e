"""The GPU kernels (Triton, and CUDA where this build has it) against their PyTorch peers and the
roofline, on one GPU. Skipped without CUDA; ``bench/gpu_check.sh`` runs it.

Timing: ``triton.testing.do_bench`` medians (``timed(..., gpu_timer=...)`` in ``bench/conftest.py``),
with the L2 cache flushed before every call (memory-bound inputs are also larger than L2, 50 MB on an
H200), the same timer for every row of a group; the attention forwards that need no host
synchronisation (the CUDA kernels, the torch peers; not Triton's, which builds its tile table on the
host) also get their median over CUDA-graph replays (``median_graph_s``). SDPA is pinned to its flash backend
(``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``, FlashAttention-2); the report gives TFLOP/s and GB/s
against the matmul and copy peaks measured in the same run.

* ``roofline``: a device-to-device copy of 2 GiB (GB/s = bytes read + written) and a bf16
  8192^3 matmul (TFLOP/s): the measured peaks the report divides by.
* ``chunk_pool``: the keys of one layer for a 512K-token context (1 GiB bf16, 8 KV heads, head dim
  128) in the paper's tree nodes (512/256/128/128 per 1024-token chunk) pooled to 32 rows each.
  Peer: ``torch_copy`` of the same input (the bandwidth bound).
* ``tree_topk``: 8 sequences of 128 chunks of depth 3 (14 nodes), D = 4096, bf16 (eight 128K-token
  contexts: 117 MB, more than L2). Peer: ``torch_read``, one reduction over ``node_emb`` (the issue's
  bound: 2x of reading it once), and the reference.
* ``cross_inject_attention``: bf16, 32 query heads, 8 KV heads, head dim 128, 4096 queries against
  2K..128K pooled keys, and 64 queries against 128K (the forward splits the keys), plain (inputs
  already rotated) and with the fused rotary. Peers:
  ``torch_sdpa`` (SDPA flash on pre-rotated inputs) and, with rotary, ``torch_unfused`` (rotary in
  PyTorch, then SDPA flash).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharedllm_ops as so
from sharedllm_ops import triton as so_triton
from sharedllm_ops.reference import apply_rotary
from sharedllm_ops.workloads import attention_inputs, chunk_pool_input, paper_tree_lengths, tree_topk_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks: no CUDA device")

def gpu_backends(op: str) -> list[str]:
    """The kernels to time: Triton, and CUDA when this build compiled one for ``op``."""
    backends = []
    if so_triton.has_op(op) and not so_triton.interpreting():
        backends.append("triton")
    if so._ext.compiled_kernels[op]["cuda"]:
        backends.append("cuda")
    return backends or ["triton"]  # a missing kernel shows up as a failed benchmark, not a silent gap


# ---------------------------------------------------------------------------------------------
# roofline


def test_roofline_gpu_copy_bandwidth(timed):
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    timed(lambda: y.copy_(x), group="roofline copy 2 GiB", backend="torch_copy",
          info={"op": "roofline", "pass": "copy", "shape": "2 GiB", "dtype": "bfloat16", "bytes": 2 * x.nbytes},
          gpu_timer="flush_l2")


def test_roofline_gpu_bf16_matmul(timed):
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    timed(lambda: a @ b, group="roofline matmul 8192^3 bf16", backend="torch_matmul",
          info={"op": "roofline", "pass": "matmul", "shape": "8192^3", "dtype": "bfloat16", "flops": 2 * 8192**3},
          gpu_timer="graph")


# ---------------------------------------------------------------------------------------------
# chunk_pool

POOL_CHUNKS, POOL_HEADS, POOL_DIM, POOL_P = 512, 8, 128, 32


@functools.lru_cache(maxsize=1)
def pool_input():
    """The 1 GiB input, drawn once for all the chunk_pool cases (drawing it takes seconds)."""
    lengths = paper_tree_lengths(POOL_CHUNKS)
    x, cu = chunk_pool_input(lengths, POOL_HEADS, POOL_DIM, torch.bfloat16, device="cuda")
    return lengths, x, cu


@pytest.mark.parametrize("backend", ["torch_copy"] + gpu_backends("chunk_pool"))
@pytest.mark.parametrize("mode", ["mean", "first"])
def test_chunk_pool_gpu(timed, mode, backend):
    lengths, x, cu = pool_input()
    rows_out = len(lengths) * POOL_P
    rows_in = x.shape[0] if mode == "mean" else rows_out
    if backend == "torch_copy":
        y = torch.empty_like(x)
        fn, moved = (lambda: y.copy_(x)), 2 * x.nbytes
    else:
        fn = lambda: so.chunk_pool(x, cu, POOL_P, mode, backend=backend)  # noqa: E731
        moved = (rows_in + rows_out) * POOL_HEADS * POOL_DIM * x.element_size()
    timed(fn, group=f"chunk_pool forward gpu {mode}", backend=backend,
          info={"op": "chunk_pool", "pass": "forward", "mode": mode, "dtype": "bfloat16", "bytes": moved,
                "shape": f"x {x.shape[0]}x{POOL_HEADS}x{POOL_DIM} ({x.nbytes / 2**30:.1f} GiB), {len(lengths)} nodes -> P={POOL_P}"},
          gpu_timer="flush_l2")


@pytest.mark.parametrize("backend", gpu_backends("chunk_pool"))
def test_chunk_pool_backward_gpu(timed, backend):
    lengths, x, cu = pool_input()
    x = x.detach().requires_grad_(True)
    out = so.chunk_pool(x, cu, POOL_P, "mean", backend=backend)
    grad = torch.randn_like(out)
    moved = (x.shape[0] + out.shape[0]) * POOL_HEADS * POOL_DIM * x.element_size()
    timed(lambda: torch.autograd.grad(out, x, grad, retain_graph=True), group="chunk_pool backward gpu mean",
          backend=backend, info={"op": "chunk_pool", "pass": "backward", "mode": "mean", "dtype": "bfloat16",
                                 "bytes": moved, "shape": f"x {x.shape[0]}x{POOL_HEADS}x{POOL_DIM}"},
          gpu_timer="flush_l2")


# ---------------------------------------------------------------------------------------------
# tree_topk


TOPK_BATCH, TOPK_CHUNKS, TOPK_DIM = 8, 128, 4096


@pytest.mark.parametrize("backend", ["torch_read", "reference"] + gpu_backends("tree_topk"))
def test_tree_topk_gpu(timed, backend):
    query, emb = tree_topk_input(TOPK_BATCH, TOPK_CHUNKS, 14, TOPK_DIM, torch.bfloat16, device="cuda")
    if backend == "torch_read":
        fn = lambda: emb.sum(dim=-1)  # noqa: E731
    else:
        fn = lambda: so.tree_topk(query, emb, 3, backend=backend)  # noqa: E731
    timed(fn, group=f"tree_topk gpu {TOPK_BATCH}x{TOPK_CHUNKS} chunks depth 3 D={TOPK_DIM}", backend=backend,
          info={"op": "tree_topk", "pass": "forward", "dtype": "bfloat16", "bytes": emb.nbytes,
                "shape": f"B={TOPK_BATCH} C={TOPK_CHUNKS} T=14 D={TOPK_DIM} ({emb.nbytes / 2**20:.0f} MiB, more than L2)"},
          gpu_timer="flush_l2")


# ---------------------------------------------------------------------------------------------
# cross_inject_attention

# (queries, keys): a 4096-token decoder window against growing compressed contexts, and a short decoder
# against a long one (too few query tiles to fill the GPU: the forward splits the keys)
ATTENTION_SHAPES = ((4096, 2048), (4096, 16384), (4096, 131072), (64, 131072))
# every attention row is timed with do_bench's L2 flush (the same timer for every peer of a group); the
# backends without host synchronisation also get their CUDA-graph median (extra_info median_graph_s)
GRAPH_CAPABLE = ("torch_sdpa", "torch_unfused", "cuda")


@functools.lru_cache(maxsize=2)
def attention_case(queries: int, keys: int):
    """The inputs of one shape, drawn once for all its rows (128K keys take seconds to draw on the host)."""
    return attention_inputs([queries], [keys], dtype=torch.bfloat16, device="cuda")


def _pre_rotated(inp):
    q = apply_rotary(inp.q, inp.q_pos, inp.cos, inp.sin).to(inp.q.dtype)
    k = apply_rotary(inp.k, inp.k_pos, inp.cos, inp.sin).to(inp.k.dtype)
    return q, k


def _heads_first(x):
    return x.transpose(0, 1)[None]  # [N, H, D] -> [1, H, N, D]: one sequence, as SDPA wants it


@functools.lru_cache(maxsize=None)
def flash_takes_gqa(device: str = "cuda") -> bool:
    """Whether SDPA's flash backend accepts fewer KV heads than query heads (else K/V are expanded to the
    query heads before timing, which costs SDPA the extra reads)."""
    q = torch.randn(1, 4, 64, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 64, 64, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except RuntimeError:
        return False


def kv_for_flash(q, k, v):
    """k and v (``[1, H, N, D]``) as SDPA's flash backend takes them: as they are where it has native GQA
    (or there is no grouping), else repeated to the query heads."""
    if k.shape[1] == q.shape[1] or flash_takes_gqa(q.device.type):
        return k, v
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


def sdpa_flash(q, k, v, scale):
    """SDPA pinned to FlashAttention-2 on ``[1, H, N, D]`` tensors (GQA native or expanded, see above)."""
    k, v = kv_for_flash(q, k, v)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _attention_fn(backend, inp, rotary: bool, q=None, k=None, v=None):
    """The call to time. Plain: every backend gets q and k already rotated (no positions). Rotary: the
    fused kernels get the positions; ``torch_sdpa`` still gets pre-rotated inputs (SDPA alone, a lower
    bound); ``torch_unfused`` rotates in PyTorch first."""
    q, k, v = (inp.q, inp.k, inp.v) if q is None else (q, k, v)
    if backend == "torch_sdpa" or (not rotary and backend != "torch_unfused"):
        q, k = _pre_rotated(inp) if q is inp.q else (q, k)
    if backend == "torch_sdpa":
        qh = _heads_first(q)
        kh, vh = kv_for_flash(qh, _heads_first(k), _heads_first(v))  # expanded once, outside the timing
        return lambda: sdpa_flash(qh, kh, vh, inp.scale)
    if backend == "torch_unfused":
        def unfused():
            qr = apply_rotary(q, inp.q_pos, inp.cos, inp.sin).to(q.dtype)
            kr = apply_rotary(k, inp.k_pos, inp.cos, inp.sin).to(k.dtype)
            return sdpa_flash(_heads_first(qr), _heads_first(kr), _heads_first(v), inp.scale)
        return unfused
    rotary_args = (inp.q_pos, inp.k_pos, inp.cos, inp.sin) if rotary else (None, None, None, None)
    return lambda: so.cross_inject_attention(q, k, v, inp.cu_q, inp.cu_k, None, *rotary_args, backend=backend)


def _attention_info(inp, rotary: bool, flops: int, pass_: str) -> dict:
    return {"op": "cross_inject_attention", "pass": pass_, "dtype": "bfloat16", "rotary": rotary,
            "shape": inp.describe().removesuffix(" rotary") + (", rotary" if rotary else ", plain"), "flops": flops,
            "sdpa_flash_gqa": flash_takes_gqa(inp.q.device.type)}


@pytest.mark.parametrize("backend", ["torch_sdpa", "torch_unfused"] + gpu_backends("cross_inject_attention"))
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("queries,keys", ATTENTION_SHAPES, ids=[f"{q}x{k}" for q, k in ATTENTION_SHAPES])
def test_attention_forward_gpu(timed, queries, keys, rotary, backend):
    if backend == "torch_unfused" and not rotary:
        pytest.skip("without rotary the unfused peer is torch_sdpa")
    inp = attention_case(queries, keys)
    timed(_attention_fn(backend, inp, rotary),
          group=f"cross_inject_attention forward gpu {queries}x{keys} {'rotary' if rotary else 'plain'}",
          backend=backend, info=_attention_info(inp, rotary, inp.forward_flops(), "forward"),
          gpu_timer="flush_l2", graph_too=backend in GRAPH_CAPABLE)


@pytest.mark.parametrize("backend", ["torch_sdpa"] + gpu_backends("cross_inject_attention"))
@pytest.mark.parametrize("queries,keys", ATTENTION_SHAPES[:2], ids=[f"{q}x{k}" for q, k in ATTENTION_SHAPES[:2]])
def test_attention_backward_gpu(timed, queries, keys, backend):
    """The backward alone (plain: inputs already rotated): the forward runs once, the timed call re-runs
    autograd on its graph. (Where SDPA's flash backend has no native GQA, its K/V expansion and the
    reduction of their gradients are in SDPA's timing.)"""
    inp = attention_case(queries, keys)
    q, k = _pre_rotated(inp)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, inp.v)]
    if backend == "torch_sdpa":
        heads = [_heads_first(t) for t in leaves]
        out = sdpa_flash(*heads, inp.scale)
    else:
        out = _attention_fn(backend, inp, False, *leaves)()
    grad = torch.randn_like(out)
    timed(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True),
          group=f"cross_inject_attention backward gpu {queries}x{keys} plain", backend=backend,
          info=_attention_info(inp, False, int(2.5 * inp.forward_flops()), "backward"), gpu_timer="flush_l2")
