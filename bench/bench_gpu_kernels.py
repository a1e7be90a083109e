"""The GPU kernels (Triton, and CUDA where this build has it) against their PyTorch peers and the
roofline, on one GPU. Skipped without CUDA; ``bench/gpu_check.sh`` runs it.

Every timed call ends with ``torch.cuda.synchronize()`` (the kernels run for milliseconds, so the
~10 us of the synchronisation is noise). Inputs are far larger than the L2 cache (50 MB on an
H200) except where noted, so each call reads them from HBM.

* ``roofline``: a device-to-device copy of 2 GiB (GB/s = bytes read + written) and a bf16
  8192^3 matmul (TFLOP/s): the measured peaks the report divides by.
* ``chunk_pool``: the keys of one layer for a 512K-token context (1 GiB bf16, 8 KV heads, head dim
  128) in the paper's tree nodes (512/256/128/128 per 1024-token chunk) pooled to 32 rows each.
  Peer: ``torch_copy`` of the same input (the bandwidth bound).
* ``tree_topk``: 128 chunks of depth 3 (14 nodes), D = 4096, bf16 (a 128K-token context). Peer:
  ``torch_read``, one reduction over ``node_emb`` (the issue's bound: 2x of reading it once), and
  the reference.
* ``cross_inject_attention``: bf16, 32 query heads, 8 KV heads, head dim 128, 4096 queries against
  2K..128K pooled keys. Peers: ``torch_sdpa`` (SDPA on pre-rotated inputs, its flash backend) and
  ``torch_unfused`` (rotary in PyTorch, then SDPA).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import sharedllm_ops as so
from sharedllm_ops import triton as so_triton
from sharedllm_ops.reference import apply_rotary
from sharedllm_ops.workloads import attention_inputs, chunk_pool_input, paper_tree_lengths, tree_topk_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks: no CUDA device")
GPU_ROUNDS = dict(rounds=20, iterations=1, warmup_rounds=3)


def synced(fn):
    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


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
    timed(synced(lambda: y.copy_(x)), group="roofline copy 2 GiB", backend="torch_copy",
          info={"op": "roofline", "pass": "copy", "shape": "2 GiB", "dtype": "bfloat16", "bytes": 2 * x.nbytes},
          pedantic=GPU_ROUNDS)


def test_roofline_gpu_bf16_matmul(timed):
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    timed(synced(lambda: a @ b), group="roofline matmul 8192^3 bf16", backend="torch_matmul",
          info={"op": "roofline", "pass": "matmul", "shape": "8192^3", "dtype": "bfloat16", "flops": 2 * 8192**3},
          pedantic=GPU_ROUNDS)


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
    timed(synced(fn), group=f"chunk_pool forward gpu {mode}", backend=backend,
          info={"op": "chunk_pool", "pass": "forward", "mode": mode, "dtype": "bfloat16", "bytes": moved,
                "shape": f"x {x.shape[0]}x{POOL_HEADS}x{POOL_DIM} ({x.nbytes / 2**30:.1f} GiB), {len(lengths)} nodes -> P={POOL_P}"},
          pedantic=GPU_ROUNDS)


@pytest.mark.parametrize("backend", gpu_backends("chunk_pool"))
def test_chunk_pool_backward_gpu(timed, backend):
    lengths, x, cu = pool_input()
    x = x.detach().requires_grad_(True)
    out = so.chunk_pool(x, cu, POOL_P, "mean", backend=backend)
    grad = torch.randn_like(out)
    moved = (x.shape[0] + out.shape[0]) * POOL_HEADS * POOL_DIM * x.element_size()
    timed(synced(lambda: torch.autograd.grad(out, x, grad, retain_graph=True)), group="chunk_pool backward gpu mean",
          backend=backend, info={"op": "chunk_pool", "pass": "backward", "mode": "mean", "dtype": "bfloat16",
                                 "bytes": moved, "shape": f"x {x.shape[0]}x{POOL_HEADS}x{POOL_DIM}"},
          pedantic=GPU_ROUNDS)


# ---------------------------------------------------------------------------------------------
# tree_topk


@pytest.mark.parametrize("backend", ["torch_read", "reference"] + gpu_backends("tree_topk"))
def test_tree_topk_gpu(timed, backend):
    query, emb = tree_topk_input(1, 128, 14, 4096, torch.bfloat16, device="cuda")
    if backend == "torch_read":
        fn = lambda: emb.sum(dim=-1)  # noqa: E731
    else:
        fn = lambda: so.tree_topk(query, emb, 3, backend=backend)  # noqa: E731
    timed(synced(fn), group="tree_topk gpu 128 chunks depth 3 D=4096", backend=backend,
          info={"op": "tree_topk", "pass": "forward", "dtype": "bfloat16", "bytes": emb.nbytes,
                "shape": "B=1 C=128 T=14 D=4096 (fits in L2: latency-bound)"},
          pedantic=GPU_ROUNDS)


# ---------------------------------------------------------------------------------------------
# cross_inject_attention

KEY_LENGTHS = (2048, 16384, 131072)


def _pre_rotated(inp):
    q = apply_rotary(inp.q, inp.q_pos, inp.cos, inp.sin).to(inp.q.dtype)
    k = apply_rotary(inp.k, inp.k_pos, inp.cos, inp.sin).to(inp.k.dtype)
    # [N, H, D] -> [1, H, N, D]: one sequence, as SDPA wants it
    return q.transpose(0, 1)[None], k.transpose(0, 1)[None], inp.v.transpose(0, 1)[None]


def _attention_fn(backend, inp, q=None, k=None, v=None):
    q, k, v = (inp.q, inp.k, inp.v) if q is None else (q, k, v)
    if backend == "torch_sdpa":  # pre-rotated once, outside the timing: SDPA alone
        qr, kr, vr = _pre_rotated(inp)
        return lambda: F.scaled_dot_product_attention(qr, kr, vr, scale=inp.scale, enable_gqa=True)
    if backend == "torch_unfused":
        def unfused():
            qr = apply_rotary(q, inp.q_pos, inp.cos, inp.sin).to(q.dtype).transpose(0, 1)[None]
            kr = apply_rotary(k, inp.k_pos, inp.cos, inp.sin).to(k.dtype).transpose(0, 1)[None]
            return F.scaled_dot_product_attention(qr, kr, v.transpose(0, 1)[None], scale=inp.scale, enable_gqa=True)
        return unfused
    return lambda: so.cross_inject_attention(q, k, v, inp.cu_q, inp.cu_k, None, inp.q_pos, inp.k_pos, inp.cos, inp.sin,
                                             backend=backend)


@pytest.mark.parametrize("backend", ["torch_sdpa", "torch_unfused"] + gpu_backends("cross_inject_attention"))
@pytest.mark.parametrize("keys", KEY_LENGTHS)
def test_attention_forward_gpu(timed, keys, backend):
    inp = attention_inputs([4096], [keys], dtype=torch.bfloat16, device="cuda")
    timed(synced(_attention_fn(backend, inp)), group=f"cross_inject_attention forward gpu 4096x{keys}",
          backend=backend, info={"op": "cross_inject_attention", "pass": "forward", "dtype": "bfloat16",
                                 "shape": inp.describe(), "flops": inp.forward_flops()},
          pedantic=GPU_ROUNDS)


@pytest.mark.parametrize("backend", ["torch_sdpa", "torch_unfused"] + gpu_backends("cross_inject_attention"))
@pytest.mark.parametrize("keys", KEY_LENGTHS[:2])
def test_attention_backward_gpu(timed, keys, backend):
    """The backward alone: the forward runs once, the timed call re-runs autograd on its graph."""
    inp = attention_inputs([4096], [keys], dtype=torch.bfloat16, device="cuda")
    if backend == "torch_sdpa":
        leaves = [t.detach().requires_grad_(True) for t in _pre_rotated(inp)]
        out = F.scaled_dot_product_attention(*leaves, scale=inp.scale, enable_gqa=True)
    else:
        leaves = list(inp.leaves())
        out = _attention_fn(backend, inp, *leaves)()
    grad = torch.randn_like(out)
    timed(synced(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)),
          group=f"cross_inject_attention backward gpu 4096x{keys}", backend=backend,
          info={"op": "cross_inject_attention", "pass": "backward", "dtype": "bfloat16", "shape": inp.describe(),
                "flops": int(2.5 * inp.forward_flops())},
          pedantic=GPU_ROUNDS)

