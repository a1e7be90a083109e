"""Public ``chunk_pool`` (DESIGN 3.1), its fake kernel and its autograd formula."""

from __future__ import annotations

import torch

from .. import _ext, reference
from ..reference.chunk_pool import POOL_MODES
from . import _validate as V
from ._dispatch import resolve_backend
from ._registration import register_chunk_pool


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
    V.check_float(x, "x", "[N, H, D]", 3)
    V.check_cu_seqlens(cu_seqlens, "cu_seqlens", x.device)
    V.check_int(tokens_per_node, "tokens_per_node", 1)
    V.check_choice(mode, "mode", POOL_MODES)
    impl = resolve_backend("chunk_pool", backend, x.device)
    if impl == "reference":
        V.check_cu_seqlens_values(cu_seqlens, x.shape[0], "cu_seqlens", "x.shape[0]")
        return reference.chunk_pool(x, cu_seqlens, tokens_per_node, mode)
    if impl == "triton":
        return torch.ops.sharedllm_triton.chunk_pool(x, cu_seqlens, tokens_per_node, mode)
    return torch.ops.sharedllm.chunk_pool(x, cu_seqlens, tokens_per_node, mode)


if _ext.loaded:
    register_chunk_pool("sharedllm")
