"""Public ``cross_inject_attention`` and ``merge_attention`` (docs/DESIGN.md section 3.3)."""

from __future__ import annotations

import torch

from .. import reference
from ..core.checks import (
    check_cross_inject_attention_arguments,
    check_cross_inject_attention_values,
    check_merge_attention_arguments,
)
from ..core.dispatch import resolve_backend


def cross_inject_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    return_lse: bool = False,
    *,
    backend: str = "auto",
):
    """Non-causal varlen attention from each sequence's queries to all of its (injected) keys.

    Args:
        q: ``[Nq, Hq, D]`` float32/float16/bfloat16, last dim contiguous (other strides free).
        k: ``[Nk, Hk, D]``, ``Hq % Hk == 0`` (GQA: query head ``h`` reads kv head ``h // (Hq // Hk)``).
        v: ``[Nk, Hk, Dv]``.
        cu_seqlens_q: int32 ``[B + 1]`` query boundaries; cu_seqlens_k: int32 ``[B + 1]`` key boundaries.
        softmax_scale: default ``D ** -0.5``.
        q_positions: int32 ``[Nq]``, k_positions: int32 ``[Nk]``, rotary_cos/rotary_sin ``[max_pos, D]``:
            the fused HF ``rotate_half`` rotary embedding, applied to q and k before the dot product.
            Give all four or none.
        return_lse: also return the float32 ``[Nq, Hq]`` natural-log log-sum-exp of the scaled scores.
        backend: ``"auto" | "reference" | "cpp" | "cuda" | "triton"``.

    Returns:
        ``out [Nq, Hq, Dv]`` (``q``'s dtype), or ``(out, lse)``. A sequence without keys gives
        ``out = 0`` and ``lse = -inf``. Differentiable in ``q``, ``k``, ``v`` (and through ``lse``).
    """
    check_cross_inject_attention_arguments(
        q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos, rotary_sin
    )
    scale = float(q.shape[2] ** -0.5 if softmax_scale is None else softmax_scale)
    impl = resolve_backend("cross_inject_attention", backend, q.device, dict(q=q, k=k, v=v))
    if impl == "reference":
        check_cross_inject_attention_values(q, k, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos)
        return reference.cross_inject_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, scale, q_positions, k_positions, rotary_cos, rotary_sin, return_lse
        )
    op = torch.ops.sharedllm_triton if impl == "triton" else torch.ops.sharedllm
    out, lse = op.cross_inject_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale, q_positions, k_positions, rotary_cos, rotary_sin
    )
    return (out, lse) if return_lse else out


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attentions over two disjoint key sets into the attention over their union.

    Args:
        out_a, out_b: ``[N, H, Dv]`` normalised outputs (same dtype and device).
        lse_a, lse_b: ``[N, H]`` their log-sum-exps (``-inf`` where a side had no keys).

    Returns:
        ``(out [N, H, Dv], lse float32 [N, H])``. Elementwise, in PyTorch: it fuses well under
        ``torch.compile`` and is not worth a kernel.
    """
    check_merge_attention_arguments(out_a, lse_a, out_b, lse_b)
    return reference.merge_attention(out_a, lse_a, out_b, lse_b)
