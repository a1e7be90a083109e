"""Public ``tree_topk`` and ``tree_spans`` (docs/DESIGN.md section 3.2)."""

from __future__ import annotations

import torch

from .. import reference
from ..core.checks import check_tree_spans_arguments, check_tree_topk_arguments
from ..core.dispatch import resolve_backend


def tree_topk(
    query: torch.Tensor,
    node_emb: torch.Tensor,
    depth: int,
    k: int = 1,
    branching: int = 2,
    score: str = "cosine",
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-aware descent of each chunk's context tree: which nodes stay at which granularity.

    Args:
        query: ``[B, D]``, one query vector per sequence.
        node_emb: ``[B, C, T, D]`` (same dtype/device), the ``T = b + ... + b^depth`` non-root
            nodes of each of ``C`` chunks in level order.
        depth: tree height ``h >= 1``.
        k: children expanded per level, ``1 <= k <= branching``.
        branching: ``b >= 2``.
        score: ``"cosine"`` or ``"dot"``.
        backend: ``"auto" | "reference" | "cpp" | "cuda" | "triton"``.

    Returns:
        node_ids: int32 ``[B, C, P]``, the preserved nodes left to right (they tile the chunk).
        scores: float32 ``[B, C, T]``, every node's score. Selection is not differentiable.
    """
    check_tree_topk_arguments(query, node_emb, depth, k, branching, score)
    query, node_emb = query.detach(), node_emb.detach()
    impl = resolve_backend("tree_topk", backend, query.device, dict(query=query, node_emb=node_emb))
    if impl == "reference":
        return reference.tree_topk(query, node_emb, depth, k, branching, score)
    if impl == "triton":
        return torch.ops.sharedllm_triton.tree_topk(query, node_emb, depth, k, branching, score)
    return torch.ops.sharedllm.tree_topk(query, node_emb, depth, k, branching, score)


def tree_spans(
    node_ids: torch.Tensor, chunk_lens: torch.Tensor, depth: int, branching: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, length)`` int32 ``[B, C, P]`` of each preserved node in its chunk of ``chunk_lens`` tokens.

    Node ``i`` of level ``l`` in a chunk of length ``L`` covers ``[floor(i*L/b^l), floor((i+1)*L/b^l))``.
    """
    check_tree_spans_arguments(node_ids, chunk_lens, depth, branching)
    return reference.tree_spans(node_ids, chunk_lens, depth, branching)
