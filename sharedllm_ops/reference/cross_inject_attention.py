"""Pure-PyTorch reference for ``cross_inject_attention`` and ``merge_attention`` (docs/DESIGN.md section 3.3)."""

from __future__ import annotations

import torch

from ._common import compute_dtype
from .rotary import apply_rotary


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
):
    """Non-causal variable-length attention from queries to the injected context keys.

    Args:
        q: ``[Nq, Hq, D]`` queries of ``B`` packed sequences.
        k: ``[Nk, Hk, D]`` keys; ``Hq % Hk == 0`` (query head ``h`` reads kv head ``h // (Hq // Hk)``).
        v: ``[Nk, Hk, Dv]`` values.
        cu_seqlens_q: int32 ``[B + 1]`` query boundaries.
        cu_seqlens_k: int32 ``[B + 1]`` key boundaries.
        softmax_scale: scale of ``q . k``; default ``D ** -0.5``.
        q_positions: int32 ``[Nq]``, k_positions: int32 ``[Nk]``: rotary positions.
        rotary_cos, rotary_sin: ``[max_pos, D]`` rotary tables (HF ``rotate_half`` convention).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out ``[Nq, Hq, Dv]`` in ``q``'s dtype, and, with ``return_lse``, lse float32 ``[Nq, Hq]``.
        A sequence with no keys gives ``out = 0`` and ``lse = -inf``.
    """
    Nq, Hq, D = q.shape
    Hk, Dv = k.shape[1], v.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    if rotary_cos is not None:
        qf = apply_rotary(q, q_positions, rotary_cos, rotary_sin)
        kf = apply_rotary(k, k_positions, rotary_cos, rotary_sin)
    else:
        qf, kf = q.to(compute_dtype(q.dtype)), k.to(compute_dtype(k.dtype))
    vf = v.to(compute_dtype(v.dtype))
    group = Hq // Hk if Hk > 0 else 1
    out = torch.zeros(Nq, Hq, Dv, dtype=qf.dtype, device=q.device)
    lse = torch.full((Nq, Hq), float("-inf"), dtype=qf.dtype, device=q.device)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bq) - 1):
        qs, ks = slice(bq[b], bq[b + 1]), slice(bk[b], bk[b + 1])
        if bq[b + 1] == bq[b] or bk[b + 1] == bk[b]:
            continue
        qb = qf[qs].transpose(0, 1)  # [Hq, Lq, D]
        kb = kf[ks].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
        vb = vf[ks].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, Dv]
        scores = scale * qb @ kb.transpose(1, 2)  # [Hq, Lq, Lk]
        lse[qs] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
        out[qs] = (torch.softmax(scores, dim=-1) @ vb).transpose(0, 1)
    out = out.to(q.dtype)
    if lse.dtype != torch.float64:
        lse = lse.float()
    return (out, lse) if return_lse else out


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions over disjoint key sets into the attention over their union.

    Args:
        out_a, out_b: ``[N, H, Dv]`` normalised attention outputs.
        lse_a, lse_b: float32 ``[N, H]`` their log-sum-exps (``-inf`` for an empty key set).

    Returns:
        out ``[N, H, Dv]`` (dtype of ``out_a``) and lse float32 ``[N, H]``.
    """
    dtype = compute_dtype(out_a.dtype)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    # logaddexp by hand, so that rows where both sides are empty (-inf) give lse = -inf, out = 0
    # and finite gradients (torch.logaddexp(-inf, -inf) has a NaN gradient)
    shift = torch.maximum(lse_a, lse_b)
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)
    w_a, w_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = w_a + w_b
    empty = total == 0
    total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), shift + torch.log(total))
    out = (w_a[..., None] * out_a.to(dtype) + w_b[..., None] * out_b.to(dtype)) / total[..., None]
    return out.to(out_a.dtype), (lse if dtype == torch.float64 else lse.float())
