"""Public ``tree_topk`` and ``tree_spans`` (DESIGN 3.2) and the fake kernel of ``tree_topk``."""

from __future__ import annotations

import torch

from .. import _ext, reference
from ..reference.tree_topk import SCORE_MODES, num_tree_nodes
from . import _validate as V
from ._dispatch import resolve_backend
from ._registration import register_tree_topk


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
    check_arguments(query, node_emb, depth, k, branching, score)
    query, node_emb = query.detach(), node_emb.detach()
    impl = resolve_backend("tree_topk", backend, query.device)
    if impl == "reference":
        return reference.tree_topk(query, node_emb, depth, k, branching, score)
    if impl == "triton":
        return torch.ops.sharedllm_triton.tree_topk(query, node_emb, depth, k, branching, score)
    return torch.ops.sharedllm.tree_topk(query, node_emb, depth, k, branching, score)


def check_arguments(query, node_emb, depth, k, branching, score) -> None:
    """Shape, dtype and parameter checks of ``tree_topk`` (no tensor values)."""
    V.check_float(query, "query", "[B, D]", 2)
    V.check_float(node_emb, "node_emb", "[B, C, T, D]", 4)
    V.check_same(node_emb, query, "node_emb", "query")
    V.check_int(depth, "depth", 1)
    V.check_int(branching, "branching", 2)
    V.check_int(k, "k", 1, branching)
    V.check_choice(score, "score", SCORE_MODES)
    B, D = query.shape
    if node_emb.shape[0] != B or node_emb.shape[3] != D:
        raise ValueError(f"node_emb must have shape [B={B}, C, T, D={D}], got {tuple(node_emb.shape)}")
    T = num_tree_nodes(depth, branching)
    if node_emb.shape[2] != T:
        raise ValueError(
            f"node_emb.shape[2] must be the number of tree nodes b + ... + b^depth = {T} "
            f"(depth={depth}, branching={branching}), got {node_emb.shape[2]}"
        )


def tree_spans(
    node_ids: torch.Tensor, chunk_lens: torch.Tensor, depth: int, branching: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, length)`` int32 ``[B, C, P]`` of each preserved node in its chunk of ``chunk_lens`` tokens.

    Node ``i`` of level ``l`` in a chunk of length ``L`` covers ``[floor(i*L/b^l), floor((i+1)*L/b^l))``.
    """
    V.check_tensor(node_ids, "node_ids", "[B, C, P]", 3, (torch.int32, torch.int64))
    V.check_tensor(chunk_lens, "chunk_lens", "[B, C]", dtypes=(torch.int32, torch.int64))
    V.check_int(depth, "depth", 1)
    V.check_int(branching, "branching", 2)
    return reference.tree_spans(node_ids, chunk_lens, depth, branching)


if _ext.loaded:
    register_tree_topk("sharedllm")
