"""Public ``chunk_pool`` (docs/DESIGN.md section 3.1)."""

from __future__ import annotations

import torch

from .. import reference
from ..core.checks import check_chunk_pool_arguments, check_cu_seqlens_values
from ..core.dispatch import resolve_backend


def chunk_pool(
    x: torch.Tensor, cu_seqlens: torch.Tensor, tokens_per_node: int, mode: str = "mean", *, backend: str = "auto"
) -> torch.Tensor:
    """Pool every segment of a packed sequence to ``tokens_per_node`` rows.

    Args:
        x: ``[N, H, D]`` float32/float16/bfloat16, last dim contiguous; the rows of ``S`` segments.
        cu_seqlens: int32 ``[S + 1]`` segment boundaries on ``x``'s device.
        tokens_per_node: ``P >= 1``.
        mode: ``"mean"`` (adaptive average pooling) or ``"first"`` (first row of each window).
        backend: ``"auto" | "reference" | "cpp" | "cuda" | "triton"``.

    Returns:
        ``[S * P, H, D]`` in ``x``'s dtype; empty segments give zeros. Differentiable in ``x``.
    """
    check_chunk_pool_arguments(x, cu_seqlens, tokens_per_node, mode)
    impl = resolve_backend("chunk_pool", backend, x.device, dict(x=x))
    if impl == "reference":
        check_cu_seqlens_values(cu_seqlens, x.shape[0], "cu_seqlens", "x.shape[0]")
        return reference.chunk_pool(x, cu_seqlens, tokens_per_node, mode)
    if impl == "triton":
        return torch.ops.sharedllm_triton.chunk_pool(x, cu_seqlens, tokens_per_node, mode)
    return torch.ops.sharedllm.chunk_pool(x, cu_seqlens, tokens_per_node, mode)
