"""Pure-PyTorch references: written for clarity, the oracle every backend is tested against."""

from .chunk_pool import chunk_pool, pool_window
from .cross_inject_attention import cross_inject_attention, merge_attention
from .rotary import apply_rotary, rotate, rotate_half, rotate_half_transposed
from .tree_topk import level_offset, node_scores, num_preserved, num_tree_nodes, tree_spans, tree_topk

__all__ = [
    "apply_rotary",
    "chunk_pool",
    "cross_inject_attention",
    "level_offset",
    "merge_attention",
    "node_scores",
    "num_preserved",
    "num_tree_nodes",
    "pool_window",
    "rotate",
    "rotate_half",
    "rotate_half_transposed",
    "tree_spans",
    "tree_topk",
]
