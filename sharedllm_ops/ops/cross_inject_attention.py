"""Public ``cross_inject_attention`` and ``merge_attention`` (DESIGN 3.3), fake kernels and autograd."""

from __future__ import annotations

import torch

from .. import _ext, reference
from . import _validate as V
from ._dispatch import resolve_backend
from ._registration import register_cross_inject_attention


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
    check_arguments(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos, rotary_sin)
    Nq, Hq, D = q.shape
    Nk = k.shape[0]
    scale = float(D**-0.5 if softmax_scale is None else softmax_scale)
    impl = resolve_backend("cross_inject_attention", backend, q.device)
    if impl == "reference":
        V.check_cu_seqlens_values(cu_seqlens_q, Nq, "cu_seqlens_q", "q.shape[0]")
        V.check_cu_seqlens_values(cu_seqlens_k, Nk, "cu_seqlens_k", "k.shape[0]")
        if rotary_cos is not None:
            V.check_positions_values(q_positions, rotary_cos.shape[0], "q_positions")
            V.check_positions_values(k_positions, rotary_cos.shape[0], "k_positions")
        return reference.cross_inject_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, scale, q_positions, k_positions, rotary_cos, rotary_sin, return_lse
        )
    op = torch.ops.sharedllm_triton if impl == "triton" else torch.ops.sharedllm
    out, lse = op.cross_inject_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale, q_positions, k_positions, rotary_cos, rotary_sin
    )
    return (out, lse) if return_lse else out


def check_arguments(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos, rotary_sin) -> None:
    """Shape, dtype, stride and device checks of ``cross_inject_attention`` (no tensor values)."""
    V.check_float(q, "q", "[Nq, Hq, D]", 3)
    V.check_float(k, "k", "[Nk, Hk, D]", 3)
    V.check_float(v, "v", "[Nk, Hk, Dv]", 3)
    V.check_same(k, q, "k", "q")
    V.check_same(v, q, "v", "q")
    Nq, Hq, D = q.shape
    Nk, Hk, Dv = v.shape
    if k.shape[0] != Nk or k.shape[1] != Hk or k.shape[2] != D:
        raise ValueError(f"k must have shape [Nk={Nk}, Hk={Hk}, D={D}] (from v and q), got {tuple(k.shape)}")
    if D < 1 or Dv < 1:
        raise ValueError(f"head dims must be >= 1, got q.shape[2] = {D} and v.shape[2] = {Dv}")
    if Hk < 1 or Hq % Hk != 0:
        raise ValueError(
            f"the number of query heads (q.shape[1] = {Hq}) must be a multiple of the number of kv heads (k.shape[1] = {Hk})"
        )
    V.check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    V.check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}"
        )
    rotary = (q_positions, k_positions, rotary_cos, rotary_sin)
    if any(t is not None for t in rotary):
        if any(t is None for t in rotary):
            raise ValueError("the fused rotary needs all of rotary_cos, rotary_sin, q_positions and k_positions")
        if D % 2:
            raise ValueError(f"the fused rotary needs an even head dim, got q.shape[2] = {D}")
        V.check_tensor(rotary_cos, "rotary_cos", "[max_pos, D]", 2)
        V.check_tensor(rotary_sin, "rotary_sin", "[max_pos, D]", 2)
        if rotary_cos.shape[1] != D or rotary_sin.shape != rotary_cos.shape:
            raise ValueError(
                f"rotary_cos and rotary_sin must both have shape [max_pos, D={D}], got "
                f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
            )
        for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
            if not t.is_floating_point() or t.device != q.device:
                raise ValueError(f"{name} must be a floating-point tensor on {q.device}, got {t.dtype} on {t.device}")
        # shape strings stay constant: formatting Nq into them would specialise a dynamic size
        V.check_index(q_positions, "q_positions", "[Nq]", q.device)
        V.check_index(k_positions, "k_positions", "[Nk]", q.device)
        if q_positions.shape[0] != Nq or k_positions.shape[0] != Nk:
            raise ValueError(
                f"q_positions and k_positions must have shapes [{Nq}] and [{Nk}], got "
                f"{tuple(q_positions.shape)} and {tuple(k_positions.shape)}"
            )


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
    V.check_tensor(out_a, "out_a", "[N, H, Dv]", 3)
    V.check_tensor(out_b, "out_b", "[N, H, Dv]", 3)
    V.check_tensor(lse_a, "lse_a", "[N, H]", 2)
    V.check_tensor(lse_b, "lse_b", "[N, H]", 2)
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have the shape of out_a {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    for t, name in ((lse_a, "lse_a"), (lse_b, "lse_b")):
        if t.shape != out_a.shape[:2]:
            raise ValueError(f"{name} must have shape {tuple(out_a.shape[:2])}, got {tuple(t.shape)}")
        if t.device != out_a.device:
            raise ValueError(f"{name} must be on the device of out_a ({out_a.device}), got {t.device}")
    V.check_same(out_b, out_a, "out_b", "out_a")
    return reference.merge_attention(out_a, lse_a, out_b, lse_b)


if _ext.loaded:
    register_cross_inject_attention("sharedllm")
