"""The attention function SharedLLM registers with Hugging Face's ``AttentionInterface``.

Wrapped models run with ``config._attn_implementation = "sharedllm"``. Transformers' attention
modules project, rotate and cache q/k/v as usual and then call :func:`sharedllm_attention`,
which, depending on the state the wrapper put on the module (``module._sharedllm_state``, the
model's ``injection.InjectionState``; this module needs only its ``packed``, ``merges_into`` and
``merged_attention``):

* in a **packed pass** (the lower model encoding many nodes, or the retrieval query) treats the
  single packed row as independent causal segments (``cu_seqlens``), and captures k/v;
* in an **injected layer with ``injection="merge"``** attends to the compressed context with the
  layer's own query and merges it into causal self-attention (``merge_attention``);
* otherwise is exactly transformers' SDPA attention (masks are built as for ``"sdpa"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sharedllm_ops as so

from ..reference.rotary import rotate_half  # noqa: F401  (imported from here before the rotary had one source)

ATTN_IMPLEMENTATION = "sharedllm"


class StopEncoding(Exception):
    """Raised after the last needed k/v were captured: the rest of that layer's work is not needed."""


@dataclass
class PackedPass:
    """One packed row of causal segments: ``cu_seqlens`` int32 ``[S + 1]`` over ``N`` tokens.

    ``buckets``: for each group of segments of similar length, ``(index [n, Lb], valid [n, Lb])``
    packed-token indices padded to the group's longest segment (one SDPA call per group).
    ``capture``: layer index -> (k, v) ``[N, Hk, D]`` filled by the pass; ``stop_after``: the layer
    after whose k/v capture the pass ends; ``keys_of``: see :meth:`build`.
    """

    cu_seqlens: torch.Tensor
    buckets: list
    inverse: torch.Tensor  # position of each packed token in the buckets' concatenated outputs
    capture: dict = field(default_factory=dict)
    capture_layers: frozenset = frozenset()
    stop_after: int | None = None
    keys_of: tuple | None = None

    @classmethod
    def build(cls, cu_seqlens, capture_layers=(), stop_after: int | None = None, keys_of: tuple | None = None):
        """``keys_of = (k, v, cu_seqlens_k, backend)`` instead of ``cu_seqlens``: every packed token is a
        query of its own that attends (non-causally) to its segment of ``k``/``v`` ``[Nk, Hk, D]``."""
        if keys_of is not None:
            return cls(None, [], None, {}, frozenset(capture_layers), stop_after, keys_of)
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        nonempty = (lengths > 0).nonzero().squeeze(1)
        lens = lengths[nonempty]
        # segments whose lengths round up to the same power of two share one SDPA call: at most 2x padding
        bucket_of = torch.ceil(torch.log2(lens.double().clamp(min=1))).long()
        buckets, order = [], []
        for b in torch.unique(bucket_of).tolist():
            seg = nonempty[bucket_of == b]
            seg_len = lengths[seg]
            width = 2 ** int(b)  # a function of the bucket alone: a segment gets the same bits in any pack
            pos = torch.arange(width, device=cu.device)
            valid = pos[None, :] < seg_len[:, None]
            index = torch.where(valid, cu[seg][:, None] + pos[None, :], 0)
            buckets.append((index, valid))
            order.append(index[valid])
        order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long, device=cu.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=cu.device)
        return cls(cu_seqlens, buckets, inverse, {}, frozenset(capture_layers), stop_after)


def packed_causal_attention(module, query, key, value, packed: PackedPass, scaling):
    """Causal attention within each segment of one packed row.

    query ``[1, Hq, N, D]``, key/value ``[1, Hk, N, D]`` -> ``[1, N, Hq, D]``. Right-padding each
    segment is harmless under a causal mask: a real query never sees the padding after it.
    """
    layer = module.layer_idx
    if layer in packed.capture_layers:
        packed.capture[layer] = (key[0].transpose(0, 1), value[0].transpose(0, 1))
        if layer == packed.stop_after:
            raise StopEncoding
    if packed.keys_of is not None:
        keys, values, cu_k, backend = packed.keys_of
        cu_q = torch.arange(cu_k.numel(), dtype=torch.int32, device=query.device)
        out = so.cross_inject_attention(query[0].transpose(0, 1), keys, values, cu_q, cu_k, softmax_scale=scaling,
                                        backend=backend)
        return out.unsqueeze(0), None
    q, k, v = query[0], key[0], value[0]
    gqa = q.shape[0] != k.shape[0]
    outs = []
    for index, valid in packed.buckets:
        # [Hq, n, Lb, D] -> [n, Hq, Lb, D]
        qb, kb, vb = (t[:, index].transpose(0, 1) for t in (q, k, v))
        ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scaling, enable_gqa=gqa)
        outs.append(ob.transpose(1, 2)[valid])  # [valid tokens, Hq, D]
    if not outs:
        return query.new_zeros(1, q.shape[1], q.shape[0], q.shape[2]), None
    return torch.cat(outs)[packed.inverse].unsqueeze(0), None


def attention_with_lse(query, key, value, attention_mask, scaling):
    """Self-attention that also returns its log-sum-exp (for merging with the context).

    query ``[B, Hq, L, D]``, key/value ``[B, Hk, S, D]``, attention_mask: SDPA-style bool (True =
    attend) or additive float ``[B, 1, L, S]``, or None (causal, aligned to the last key).
    Returns ``out [B, L, Hq, D]`` (query's dtype) and ``lse`` float32 ``[B, L, Hq]``.
    """
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    L, S = scores.shape[-2:]
    if attention_mask is None:
        causal = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril(S - L)
        scores = scores.masked_fill(~causal, -math.inf)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, -math.inf)
    else:
        scores = scores + attention_mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    # rows without any key (padding) get out = 0 and lse = -inf instead of NaN
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).to(query.dtype), lse.transpose(1, 2)


def sharedllm_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Transformers attention function (see the module docstring)."""
    state = getattr(module, "_sharedllm_state", None)
    if state is not None:
        if state.packed is not None:
            return packed_causal_attention(module, query, key, value, state.packed, scaling)
        if state.merges_into(module.layer_idx):
            return state.merged_attention(module, query, key, value, attention_mask, scaling, kwargs.get("position_ids"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, sharedllm_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


__all__ = [
    "ATTN_IMPLEMENTATION",
    "PackedPass",
    "StopEncoding",
    "attention_with_lse",
    "packed_causal_attention",
    "rotate_half",
    "sharedllm_attention",
]
