"""Query retrieval that embeds only the nodes the tree descent reads (docs/DESIGN.md section 5).

``tree_topk`` with ``k=1`` on a binary tree compares, at each level ``1..h-1``, the two children of
the node expanded at the level above; it never reads the leaves' scores (the last level keeps both
candidates) nor anything below a preserved node. :func:`descend` therefore embeds level by level
only those two children (``2 (h - 1)`` nodes, about ``1.5`` chunks of tokens for ``h = 3``, instead
of all ``2^(h+1) - 2`` nodes and ``h`` chunks of tokens) and lets ``tree_topk`` itself decide every
level, on an embedding table whose unread slots are zeros: the node ids are the ones ``tree_topk``
returns for the full table, ties included.
"""

from __future__ import annotations

from typing import Callable

import torch

import sharedllm_ops as so

from .context import BRANCHING, PreservedNodes


def level_offset(level: int) -> int:
    """Level-order id of the first node of ``level`` of a binary tree (level 1 starts at 0)."""
    return 2**level - 2


def right_descent_node_ids(depth: int, device=None) -> torch.Tensor:
    """int64 ``[P]``: the preserved level-order node ids, left to right, when the right child is always expanded."""
    # each level's second-to-last node (the left sibling of the expanded right child); the last level keeps both
    ids = [level_offset(level) + 2**level - 2 for level in range(1, depth)]
    ids += [level_offset(depth) + 2**depth - 2, level_offset(depth) + 2**depth - 1]
    return torch.tensor(ids, dtype=torch.long, device=device)


def descend(
    query: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], depth: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-1 descent of ``n`` binary trees, embedding only the nodes it compares.

    Args:
        query: ``[n, D]``, the query of each tree.
        embed: ``embed(ids)`` with ``ids`` int64 ``[n, 2]`` (level-order node ids, two siblings per
            tree) returns their embeddings ``[n, 2, D]``.
        depth: the trees' height ``h >= 1``.
        backend: backend of ``tree_topk``.

    Returns:
        ``node_ids`` int64 ``[n, P]``, the preserved nodes left to right (as ``tree_topk``), and
        ``embedded`` int64 ``[n, 2 (h - 1)]``, the ids that were embedded.
    """
    n = query.shape[0]
    num_nodes = level_offset(depth + 1)
    embedded = []
    table = None
    expanded = torch.zeros(n, dtype=torch.long, device=query.device)  # index within its level
    node_ids = None
    for level in range(1, depth):
        first = level_offset(level)
        ids = first + 2 * expanded[:, None] + torch.arange(BRANCHING, device=query.device)
        emb = embed(ids)
        if table is None:
            table = emb.new_zeros(n, num_nodes, emb.shape[-1])
        table[torch.arange(n, device=query.device)[:, None], ids] = emb
        embedded.append(ids)
        # levels below this one are zeros (unread by this level's decision)
        node_ids, _ = so.tree_topk(query, table[:, None], depth, k=1, branching=BRANCHING, score="cosine",
                                   backend=backend)
        node_ids = node_ids[:, 0].long()
        in_level = (node_ids >= first) & (node_ids < first + 2**level)
        kept = node_ids.masked_fill(~in_level, -1).amax(1) - first  # the one preserved node of this level
        expanded = kept ^ 1  # its sibling was expanded
    if node_ids is None:  # depth 1: both children are kept, nothing is compared
        node_ids = torch.arange(BRANCHING, device=query.device).expand(n, BRANCHING)
        return node_ids, torch.zeros(n, 0, dtype=torch.long, device=query.device)
    return node_ids, torch.cat(embedded, dim=1)


def top_chunks(score: torch.Tensor, row: torch.Tensor, candidate: torch.Tensor, k: int) -> torch.Tensor:
    """bool ``[n]``: the chunks to keep of ``n`` (``row``: the sequence of each, in sequence order):
    every one that is not a ``candidate``, and of each sequence's candidates the ``k`` with the
    highest ``score`` (the earlier chunk on a tie)."""
    score = torch.where(candidate, score.float(), torch.full_like(score, float("-inf"), dtype=torch.float32))
    order = torch.argsort(-score, stable=True)  # best first, ties in chunk order
    order = order[torch.argsort(row[order], stable=True)]  # grouped by sequence, best first within
    counts = torch.bincount(row, minlength=int(row.max()) + 1 if row.numel() else 0)
    rank = torch.arange(row.numel(), device=row.device) - (torch.cumsum(counts, 0) - counts)[row[order]]
    keep = ~candidate.clone()
    keep[order] |= candidate[order] & (rank < k)
    return keep


def centred_chunk_scores(leaves: torch.Tensor, chunk: torch.Tensor, row: torch.Tensor, query: torch.Tensor,
                         num_chunks: int) -> torch.Tensor:
    """float ``[num_chunks]``: per chunk, the best cosine between one of its leaves and its sequence's
    query, both less the mean of the sequence's leaves (``-inf`` for a chunk without leaves).

    ``leaves`` ``[n, D]``: leaf embeddings, ``chunk`` and ``row`` int64 ``[n]``: the chunk and the sequence
    of each; ``query`` ``[B, D]``. Without the mean, what every leaf shares (the style of the text,
    the filler around a pass key) outweighs what sets one leaf apart: a leaf holding a whole pass
    key sentence scored no higher than the filler around it."""
    leaves = leaves.float()
    B = query.shape[0]
    count = torch.bincount(row, minlength=B).clamp(min=1)
    mean = leaves.new_zeros(B, leaves.shape[1]).index_add_(0, row, leaves) / count[:, None]
    cos = torch.nn.functional.cosine_similarity(leaves - mean[row], query.float()[row] - mean[row], dim=-1)
    score = torch.full((num_chunks,), float("-inf"), device=leaves.device)
    return score.scatter_reduce_(0, chunk, cos, "amax")


def halo_nodes(nodes: PreservedNodes, leaf_row: torch.Tensor, leaf_start: torch.Tensor, halo: int) -> PreservedNodes:
    """``nodes`` where every node beside a retrieved leaf of its chunk (``leaf_row``, ``leaf_start``
    int64 ``[n]``: the leaves' sequences and first tokens), and not a leaf itself, gives the ``halo``
    tokens nearest that leaf (at most all of them) to a node of their own, which pooling keeps raw
    when ``halo <= tokens_per_node``: a sentence that a leaf boundary cuts keeps its start and its
    end in full detail (a pass key stated just before the leaf, the name of a call just after)."""
    n = nodes.length.numel()
    if not n or not leaf_row.numel():
        return nodes
    span = int(nodes.start.max()) + 1
    leaf = torch.isin(nodes.row * span + nodes.start, leaf_row * span + leaf_start)
    same_chunk = (nodes.row[1:] == nodes.row[:-1]) & (nodes.chunk[1:] == nodes.chunk[:-1])
    before, after = torch.zeros_like(leaf), torch.zeros_like(leaf)
    before[:-1] = leaf[1:] & same_chunk & ~leaf[:-1]
    after[1:] = leaf[:-1] & same_chunk & ~leaf[1:]
    zero = torch.zeros_like(nodes.length)
    tail = torch.where(before, nodes.length.clamp(max=halo), zero)  # its last tokens, before a leaf
    head = torch.where(after, (nodes.length - tail).clamp(max=halo), zero)  # its first, after one
    start = torch.stack([nodes.start, nodes.start + head, nodes.start + nodes.length - tail], 1).flatten()
    length = torch.stack([head, nodes.length - head - tail, tail], 1).flatten()
    node = torch.arange(n, device=nodes.length.device).repeat_interleave(3)
    keep = length > 0
    return PreservedNodes(nodes.row[node][keep], nodes.chunk[node][keep], start[keep], length[keep])


__all__ = ["centred_chunk_scores", "descend", "halo_nodes", "level_offset", "right_descent_node_ids", "top_chunks"]
