"""Public op functions with backend dispatch (DESIGN sections 3 and 4)."""

from ._dispatch import BACKENDS, resolve_backend
from .chunk_pool import chunk_pool
from .cross_inject_attention import cross_inject_attention, merge_attention
from .tree_topk import tree_spans, tree_topk

__all__ = [
    "BACKENDS",
    "chunk_pool",
    "cross_inject_attention",
    "merge_attention",
    "resolve_backend",
    "tree_spans",
    "tree_topk",
]
