"""Pure-PyTorch reference for ``chunk_pool`` (docs/DESIGN.md section 3.1): the oracle every backend is tested against."""

from __future__ import annotations

import torch

from ._common import compute_dtype

POOL_MODES = ("mean", "first")


def pool_window(j: int, length: int, tokens_per_node: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a segment of ``length`` rows pooled into output slot ``j``.

    These are PyTorch's adaptive-pooling windows: ``start = floor(j*L/P)``,
    ``end = ceil((j+1)*L/P)``.
    """
    start = (j * length) // tokens_per_node
    end = -((-(j + 1) * length) // tokens_per_node)
    return start, end


def chunk_pool(x: torch.Tensor, cu_seqlens: torch.Tensor, tokens_per_node: int, mode: str = "mean") -> torch.Tensor:
    """Pool every segment of a packed sequence to ``tokens_per_node`` rows.

    Args:
        x: ``[N, H, D]`` packed rows of all segments.
        cu_seqlens: int32 ``[S + 1]`` segment boundaries (``cu_seqlens[S] == N``).
        tokens_per_node: ``P``, rows per segment in the output.
        mode: ``"mean"`` averages each window, ``"first"`` keeps the window's first row.

    Returns:
        ``[S * P, H, D]``, segment ``s`` in rows ``s*P .. s*P+P-1``; an empty segment gives zeros.
    """
    num_segments = cu_seqlens.numel() - 1
    P = tokens_per_node
    bounds = cu_seqlens.tolist()
    out = x.new_zeros((num_segments * P,) + tuple(x.shape[1:]))
    for s in range(num_segments):
        seg = x[bounds[s] : bounds[s + 1]].to(compute_dtype(x.dtype))
        L = seg.shape[0]
        if L == 0:
            continue
        for j in range(P):
            start, end = pool_window(j, L, P)
            row = seg[start:end].mean(dim=0) if mode == "mean" else seg[start]
            out[s * P + j] = row.to(x.dtype)
    return out
