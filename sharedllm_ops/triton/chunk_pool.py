"""Triton ``chunk_pool`` (docs/DESIGN.md section 3.1), forward and backward, registered as ``sharedllm_triton::chunk_pool``.

Forward: one program per (output row, head, block of D); it reads the rows of its pooling window
once, accumulating in float32, and writes one output row (no atomics). Backward: one program per
(input row, head, block of D) gathers the gradient of the (at most ``ceil(P/L) + 1``) windows that
contain its row, so it needs no atomics either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.checks import check_chunk_pool_arguments, check_chunk_pool_backward_arguments, check_cu_seqlens_values
from ..core.registration import register_chunk_pool
from ..reference.chunk_pool import POOL_MODES
from ._common import check_launch, next_pow2

MAX_BLOCK_D = 256


@triton.jit
def _chunk_pool_fwd_kernel(
    x_ptr, cu_ptr, out_ptr,
    stride_xn, stride_xh, stride_on, stride_oh,
    D, P: tl.constexpr, MEAN: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row_out = tl.program_id(0)  # s * P + j
    head = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    seg = row_out // P
    j = row_out % P
    seg_start = tl.load(cu_ptr + seg).to(tl.int64)
    length = tl.load(cu_ptr + seg + 1).to(tl.int64) - seg_start
    start = (j * length) // P  # PyTorch's adaptive-pooling window [start, end)
    end = ((j + 1) * length + P - 1) // P
    base = x_ptr + head.to(tl.int64) * stride_xh + cols
    if MEAN:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(start, end):
            acc += tl.load(base + (seg_start + r) * stride_xn, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)  # an empty segment gives 0 / 1
    else:
        acc = tl.load(base + (seg_start + start) * stride_xn, mask=col_ok & (length > 0), other=0.0).to(tl.float32)
    out = out_ptr + row_out.to(tl.int64) * stride_on + head.to(tl.int64) * stride_oh + cols
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _chunk_pool_bwd_kernel(
    grad_out_ptr, cu_ptr, seg_of_row_ptr, grad_x_ptr,
    stride_gn, stride_gh, stride_xn, stride_xh,
    D, P: tl.constexpr, MEAN: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    seg = tl.load(seg_of_row_ptr + row)
    seg_start = tl.load(cu_ptr + seg).to(tl.int64)
    length = tl.load(cu_ptr + seg + 1).to(tl.int64) - seg_start
    r = row - seg_start  # row within its segment; length >= 1 here
    # windows j holding row r: start_j <= r < end_j; for "first", start_j == r
    j_hi = ((r + 1) * P + length - 1) // length - 1
    if MEAN:
        j_lo = (r * P) // length
    else:
        j_lo = (r * P + length - 1) // length
    j_hi = tl.minimum(j_hi, P - 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = grad_out_ptr + head * stride_gh + cols
    for j in range(j_lo, j_hi + 1):
        g = tl.load(base + (seg.to(tl.int64) * P + j) * stride_gn, mask=col_ok, other=0.0).to(tl.float32)
        if MEAN:
            count = ((j + 1) * length + P - 1) // P - (j * length) // P
            g = g / count.to(tl.float32)
        acc += g
    out = grad_x_ptr + row * stride_xn + head * stride_xh + cols
    tl.store(out, acc.to(grad_x_ptr.dtype.element_ty), mask=col_ok)


def _block_d(D: int) -> int:
    return min(next_pow2(D), MAX_BLOCK_D)


@torch.library.custom_op("sharedllm_triton::chunk_pool", mutates_args=())
def chunk_pool(x: torch.Tensor, cu_seqlens: torch.Tensor, tokens_per_node: int, mode: str) -> torch.Tensor:
    """``[S * P, H, D]`` pooled rows of ``x: [N, H, D]`` (see ``sharedllm_ops.chunk_pool``)."""
    check_chunk_pool_arguments(x, cu_seqlens, tokens_per_node, mode)
    check_launch("chunk_pool", x)
    check_cu_seqlens_values(cu_seqlens, x.shape[0], "cu_seqlens", "x.shape[0]")
    cu_seqlens = cu_seqlens.contiguous()  # the kernel reads it with unit stride
    N, H, D = x.shape
    S, P = cu_seqlens.shape[0] - 1, tokens_per_node
    out = torch.empty(S * P, H, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    BLOCK_D = _block_d(D)
    grid = (S * P, H, triton.cdiv(D, BLOCK_D))
    _chunk_pool_fwd_kernel[grid](
        x, cu_seqlens, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        D, P=P, MEAN=mode == "mean", BLOCK_D=BLOCK_D,
    )
    return out


@torch.library.custom_op("sharedllm_triton::chunk_pool_backward", mutates_args=())
def chunk_pool_backward(
    grad_out: torch.Tensor, cu_seqlens: torch.Tensor, num_rows: int, tokens_per_node: int, mode: str
) -> torch.Tensor:
    """``[num_rows, H, D]`` gradient of ``chunk_pool`` with respect to ``x``."""
    check_chunk_pool_backward_arguments(grad_out, cu_seqlens, num_rows, tokens_per_node, mode)
    check_launch("chunk_pool_backward", grad_out)
    P = tokens_per_node
    check_cu_seqlens_values(cu_seqlens, num_rows, "cu_seqlens", "num_rows")
    cu_seqlens = cu_seqlens.contiguous()  # the kernel reads it with unit stride
    _, H, D = grad_out.shape
    grad_x = torch.empty(num_rows, H, D, dtype=grad_out.dtype, device=grad_out.device)
    if grad_x.numel() == 0:
        return grad_x
    rows = torch.arange(num_rows, device=grad_out.device, dtype=torch.int32)
    # the segment of every row, without a host sync: the last boundary <= row
    seg_of_row = (torch.searchsorted(cu_seqlens[1:], rows, right=True)).to(torch.int32)
    BLOCK_D = _block_d(D)
    grid = (num_rows, H, triton.cdiv(D, BLOCK_D))
    _chunk_pool_bwd_kernel[grid](
        grad_out, cu_seqlens, seg_of_row, grad_x,
        grad_out.stride(0), grad_out.stride(1), grad_x.stride(0), grad_x.stride(1),
        D, P=P, MEAN=mode == "mean", BLOCK_D=BLOCK_D,
    )
    return grad_x


def supports(args: dict) -> str | None:
    """Every valid call: the grid covers any number of rows, heads and head dims."""
    return None


register_chunk_pool("sharedllm_triton")

__all__ = ["POOL_MODES", "chunk_pool", "chunk_pool_backward", "supports"]
