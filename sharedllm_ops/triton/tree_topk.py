"""Triton ``tree_topk`` (docs/DESIGN.md section 3.2) in one kernel, registered as ``sharedllm_triton::tree_topk``.

One program per (sequence, chunk) scores the chunk's ``T`` nodes (a loop over D in blocks, float32
accumulation), runs the level-by-level top-k descent on the vector of scores, and writes the
preserved ids in left-to-right order. The tree's shape (each node's level, parent and first leaf)
comes from a tiny host-built table, so the kernel is the same for every depth and branching.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..core.checks import check_tree_topk_arguments
from ..core.registration import register_tree_topk
from ..reference.tree_topk import level_offset, num_preserved
from ._common import check_launch, next_pow2

MAX_NODES = 512  # the descent compares every node with every other: a [T, T] tile


@triton.jit
def _tree_topk_kernel(
    query_ptr, emb_ptr, shape_ptr, ids_ptr, scores_ptr,
    stride_qb, stride_eb, stride_ec, stride_et,
    C, T, D,
    DEPTH: tl.constexpr, K: tl.constexpr, COSINE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NUM_PRESERVED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * C + c
    b = pid // C
    c = pid % C
    nodes = tl.arange(0, BLOCK_T)
    node_ok = nodes < T
    # scores: one pass over the chunk's embeddings
    dots = tl.zeros([BLOCK_T], dtype=tl.float32)
    emb_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    q_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    emb_rows = emb_ptr + b * stride_eb + c * stride_ec + nodes[:, None].to(tl.int64) * stride_et
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        q = tl.load(query_ptr + b * stride_qb + cols, mask=col_ok, other=0.0).to(tl.float32)
        e = tl.load(emb_rows + cols[None, :], mask=node_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        dots += tl.sum(e * q[None, :], axis=1)
        emb_sq += tl.sum(e * e, axis=1)
        q_sq += q * q
    if COSINE:
        q_norm = tl.maximum(tl.sqrt(tl.sum(q_sq, axis=0)), 1e-8)
        scores = dots / (q_norm * tl.maximum(tl.sqrt(emb_sq), 1e-8))
    else:
        scores = dots
    tl.store(scores_ptr + pid * T + nodes, scores, mask=node_ok)

    # the tree's shape: level (1-based), parent (level-order id, -1 for level 1), first leaf
    level = tl.load(shape_ptr + nodes, mask=node_ok, other=0)
    parent = tl.load(shape_ptr + T + nodes, mask=node_ok, other=-2)
    leaf_start = tl.load(shape_ptr + 2 * T + nodes, mask=node_ok, other=0)
    is_parent = parent[:, None] == nodes[None, :]  # [child, node]
    expanded = nodes < 0  # all False
    preserved = nodes < 0
    for lv in tl.static_range(1, DEPTH + 1):
        if lv == 1:
            candidate = level == 1
        else:
            parent_expanded = tl.max((is_parent & expanded[None, :]).to(tl.int32), axis=1) > 0
            candidate = (level == lv) & parent_expanded
        if lv == DEPTH:
            preserved = preserved | candidate
        else:
            remaining = tl.where(candidate, scores, float("-inf"))
            chosen = nodes < 0
            for _ in tl.static_range(K):
                # ties go to the lower id: argmax returns the first maximum
                best = tl.argmax(remaining, axis=0, tie_break_left=True)
                chosen = chosen | (nodes == best)
                remaining = tl.where(nodes == best, float("-inf"), remaining)
            expanded = expanded | chosen
            preserved = preserved | (candidate & ~chosen)
    # preserved nodes tile the chunk: a node's rank among them is the number that start before it
    before = preserved[None, :] & (leaf_start[None, :] < leaf_start[:, None])  # [node, other]
    rank = tl.sum(before.to(tl.int32), axis=1)
    tl.store(ids_ptr + pid * NUM_PRESERVED + rank, nodes, mask=preserved & node_ok)


@functools.lru_cache(maxsize=64)
def _tree_shape_cpu(depth: int, branching: int) -> torch.Tensor:
    """int32 ``[3, T]``: level, parent id and first leaf of every node in level order."""
    level, parent, leaf_start = [], [], []
    for lv in range(1, depth + 1):
        for i in range(branching**lv):
            level.append(lv)
            parent.append(-1 if lv == 1 else level_offset(lv - 1, branching) + i // branching)
            leaf_start.append(i * branching ** (depth - lv))
    return torch.tensor([level, parent, leaf_start], dtype=torch.int32)


_shape_on_device: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _tree_shape(depth: int, branching: int, device: torch.device) -> torch.Tensor:
    key = (depth, branching, device)
    if key not in _shape_on_device:
        _shape_on_device[key] = _tree_shape_cpu(depth, branching).to(device)
    return _shape_on_device[key]


@torch.library.custom_op("sharedllm_triton::tree_topk", mutates_args=())
def tree_topk(
    query: torch.Tensor, node_emb: torch.Tensor, depth: int, k: int, branching: int, score: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(node_ids int32 [B, C, P], scores float32 [B, C, T])`` (see ``sharedllm_ops.tree_topk``)."""
    check_tree_topk_arguments(query, node_emb, depth, k, branching, score)
    check_launch("tree_topk", query)
    B, C, T, D = node_emb.shape
    too_large = supports(dict(node_emb=node_emb))
    if too_large:
        raise ValueError(f"{too_large} (depth={depth}, branching={branching}); use backend='cuda' or 'reference'")
    P = num_preserved(depth, k, branching)
    ids = torch.empty(B, C, P, dtype=torch.int32, device=query.device)
    scores = torch.empty(B, C, T, dtype=torch.float32, device=query.device)
    if B * C == 0:
        return ids, scores
    BLOCK_T = next_pow2(T)
    BLOCK_D = min(next_pow2(D), max(16, 4096 // BLOCK_T))
    _tree_topk_kernel[(B * C,)](
        query, node_emb, _tree_shape(depth, branching, query.device), ids, scores,
        query.stride(0), node_emb.stride(0), node_emb.stride(1), node_emb.stride(2),
        C, T, D,
        DEPTH=depth, K=k, COSINE=score == "cosine", BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, NUM_PRESERVED=P,
    )
    return ids, scores


def supports(args: dict) -> str | None:
    """Trees of up to ``MAX_NODES`` nodes."""
    nodes = args["node_emb"].shape[2]
    if nodes > MAX_NODES:
        return f"the Triton kernel takes trees of up to {MAX_NODES} nodes (it ranks them in registers), got {nodes}"
    return None


register_tree_topk("sharedllm_triton")

__all__ = ["MAX_NODES", "supports", "tree_topk"]
