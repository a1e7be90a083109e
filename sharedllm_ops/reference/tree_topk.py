"""Pure-PyTorch reference for ``tree_topk`` and ``tree_spans`` (docs/DESIGN.md section 3.2)."""

from __future__ import annotations

import torch

from ._common import compute_dtype

SCORE_MODES = ("cosine", "dot")


def num_tree_nodes(depth: int, branching: int) -> int:
    """``T = b + b^2 + ... + b^h``: the non-root nodes of a tree of height ``depth``."""
    return sum(branching**level for level in range(1, depth + 1))


def level_offset(level: int, branching: int) -> int:
    """Level-order id of the first node of ``level`` (level 1 starts at 0)."""
    return sum(branching**l for l in range(1, level))


def num_preserved(depth: int, k: int, branching: int) -> int:
    """``P``, the number of preserved nodes per chunk."""
    if depth == 1:
        return branching
    return (branching - k) + (depth - 2) * (k * branching - k) + k * branching


def node_scores(query: torch.Tensor, node_emb: torch.Tensor, score: str = "cosine") -> torch.Tensor:
    """float32 ``[B, C, T]`` similarity of each node embedding ``[B, C, T, D]`` to its query ``[B, D]``."""
    q = query.to(compute_dtype(query.dtype))[:, None, None, :]
    e = node_emb.to(compute_dtype(node_emb.dtype))
    dots = (q * e).sum(-1)
    if score == "dot":
        return dots.float()
    q_norm = q.norm(dim=-1).clamp_min(1e-8)
    e_norm = e.norm(dim=-1).clamp_min(1e-8)
    return (dots / (q_norm * e_norm)).float()


def tree_topk(
    query: torch.Tensor,
    node_emb: torch.Tensor,
    depth: int,
    k: int = 1,
    branching: int = 2,
    score: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-aware top-k descent of every chunk's tree.

    Args:
        query: ``[B, D]``, one query per sequence.
        node_emb: ``[B, C, T, D]``, the non-root nodes of each of ``C`` chunks in level order.
        depth: tree height ``h >= 1``; ``T == b + ... + b^h``.
        k: nodes expanded per level, ``1 <= k <= branching``.
        branching: children per node ``b >= 2``.
        score: ``"cosine"`` or ``"dot"``.

    Returns:
        node_ids: int32 ``[B, C, P]``, preserved node ids sorted left to right in the chunk.
        scores: float32 ``[B, C, T]``.
    """
    b = branching
    scores = node_scores(query, node_emb, score)
    B, C, T = scores.shape
    if B * C == 0:
        return torch.empty(B, C, num_preserved(depth, k, b), dtype=torch.int32, device=scores.device), scores
    flat = scores.reshape(B * C, T)

    def leaf_start(level: int, idx: torch.Tensor) -> torch.Tensor:
        return idx * b ** (depth - level)

    preserved_ids, preserved_starts = [], []
    # expanded: [B*C, k] indices within the current level (None before level 1)
    expanded = None
    for level in range(1, depth + 1):
        if expanded is None:
            candidates = torch.arange(b, device=flat.device).expand(B * C, b)
        else:
            parents = expanded.sort(dim=1).values  # candidates in ascending id order
            children = parents[:, :, None] * b + torch.arange(b, device=flat.device)
            candidates = children.reshape(B * C, -1)
        if level == depth:
            keep = candidates  # the last level preserves every candidate
            expanded = None
        else:
            cand_scores = flat.gather(1, level_offset(level, b) + candidates)
            # stable descending sort: equal scores keep the lower id first
            order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices
            ranked = candidates.gather(1, order)
            expanded, keep = ranked[:, :k], ranked[:, k:]
        preserved_ids.append(level_offset(level, b) + keep)
        preserved_starts.append(leaf_start(level, keep))
    ids = torch.cat(preserved_ids, dim=1)
    starts = torch.cat(preserved_starts, dim=1)
    ids = ids.gather(1, starts.argsort(dim=1, stable=True))
    return ids.reshape(B, C, -1).to(torch.int32), scores


def tree_spans(
    node_ids: torch.Tensor, chunk_lens: torch.Tensor, depth: int, branching: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token span of each preserved node.

    Args:
        node_ids: int ``[B, C, P]`` level-order node ids (as returned by ``tree_topk``).
        chunk_lens: int ``[B, C]`` (or broadcastable) length ``L`` of each chunk in tokens.
        depth, branching: the tree's shape.

    Returns:
        ``(start, length)``, each int32 ``[B, C, P]``: node ``i`` of level ``l`` covers
        ``[floor(i*L/b^l), floor((i+1)*L/b^l))`` of its chunk.
    """
    ids = node_ids.long()
    L = chunk_lens.long()[..., None].expand_as(ids)
    level = torch.zeros_like(ids)
    index = ids.clone()
    for lv in range(1, depth + 1):
        first = level_offset(lv, branching)
        in_level = (ids >= first) & (ids < first + branching**lv)
        level = torch.where(in_level, torch.full_like(ids, lv), level)
        index = torch.where(in_level, ids - first, index)
    width = branching**level
    start = (index * L) // width
    end = ((index + 1) * L) // width
    return start.to(torch.int32), (end - start).to(torch.int32)
