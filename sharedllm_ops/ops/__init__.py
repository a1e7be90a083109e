"""The public op functions (docs/DESIGN.md sections 3 and 4): check the arguments, pick a backend,
run it. They import only the leaf package ``sharedllm_ops.core`` and the reference; the backends
declare themselves to ``core.dispatch`` (``sharedllm_ops._ext``, ``sharedllm_ops.triton``)."""

from ..core.dispatch import BACKENDS, resolve_backend
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
