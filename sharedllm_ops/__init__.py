"""sharedllm_ops: kernels and a reference model for SharedLLM.

The ops (docs/DESIGN.md section 3) take ``backend="auto" | "reference" | "cpp" | "cuda" | "triton"``::

    import sharedllm_ops as so
    pooled = so.chunk_pool(x, cu_seqlens, tokens_per_node=32)
    node_ids, scores = so.tree_topk(query, node_emb, depth=3)
    out, lse = so.cross_inject_attention(q, k, v, cu_q, cu_k, return_lse=True)
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch

# the backends declare themselves to sharedllm_ops.core.dispatch as they are imported
from . import _ext, reference
from . import triton as _triton
from .ops import BACKENDS, chunk_pool, cross_inject_attention, merge_attention, tree_spans, tree_topk


def build_info() -> dict:
    """What was compiled (torch, CUDA version, archs) and which backends can run now."""
    compiled = _ext.compiled_build_info()
    cuda_now = torch.cuda.is_available()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "extension_loaded": _ext.loaded,
        "extension_error": _ext.load_error,
        "compiled_torch": compiled.get("torch_version") or None,
        "compiled_cuda": compiled.get("cuda_version") or None,
        "compiled_archs": compiled.get("cuda_archs") or None,
        "compiler": compiled.get("compiler") or None,
        # what setup.py recorded (readable even when the extension fails to load)
        "build": dict(_ext.build_meta),
        "cuda_available": cuda_now,
        "kernels": {
            op: {
                "reference": True,
                "cpp": kinds["cpu"],
                "cuda": kinds["cuda"] and cuda_now,
                "triton": _triton.has_op(op) and cuda_now,
            }
            for op, kinds in _ext.compiled_kernels.items()
        },
    }


__all__ = [
    "BACKENDS",
    "build_info",
    "chunk_pool",
    "cross_inject_attention",
    "merge_attention",
    "reference",
    "tree_spans",
    "tree_topk",
    "__version__",
]
