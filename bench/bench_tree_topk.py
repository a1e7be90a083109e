"""tree_topk: reference vs C++ on CPU at retrieval shapes (the paper's tree: depth 3, branching 2,
14 nodes per chunk, cosine score, one expanded child per level)."""

from __future__ import annotations

import pytest
import torch

import sharedllm_ops as so
from sharedllm_ops.reference import num_tree_nodes
from sharedllm_ops.workloads import tree_topk_input

from .conftest import dtype_name

DEPTH, BRANCHING = 3, 2
NODES = num_tree_nodes(DEPTH, BRANCHING)
CASES = {
    # one 128K-token context (128 chunks of 1024) scored with Llama-2-7B's hidden size
    "llama2_128k": dict(batch=1, chunks=128, dim=4096),
    # a batch of 16K-token contexts with SmolLM2-135M's hidden size
    "smollm2_batch8": dict(batch=8, chunks=16, dim=576),
}
BACKENDS = ("reference", "cpp")  # the peer first: its median is needed for the ratio


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("case", list(CASES))
def test_tree_topk(timed, case, dtype, backend):
    shape = CASES[case]
    query, node_emb = tree_topk_input(shape["batch"], shape["chunks"], NODES, shape["dim"], dtype)
    timed(
        lambda: so.tree_topk(query, node_emb, DEPTH, k=1, branching=BRANCHING, backend=backend),
        group=f"tree_topk {case} {dtype_name(dtype)}",
        backend=backend,
        info={
            "op": "tree_topk",
            "pass": "forward",
            "shape": f"B={shape['batch']} C={shape['chunks']} T={NODES} D={shape['dim']} (h={DEPTH}, b={BRANCHING})",
            "dtype": dtype_name(dtype),
            # reading the node embeddings dominates; the scores written are float32 [B, C, T]
            "bytes": (node_emb.numel() + query.numel()) * node_emb.element_size() + 4 * node_emb.shape[:3].numel(),
        },
    )
