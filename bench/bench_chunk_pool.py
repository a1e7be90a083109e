"""chunk_pool: reference vs C++ on CPU, forward and forward+backward.

Shapes: the KV of one layer for 16 context chunks of 1024 tokens (8 KV heads, head dim 128),
pooled to ``tokens_per_node = 32``, either per whole chunk or per preserved node of the paper's
tree (512/256/128/128 tokens). The backward runs on whole chunks only: the reference's backward
costs seconds per call on the tree's 64 segments (one autograd node per output row).
"""

from __future__ import annotations

import pytest
import torch

import sharedllm_ops as so
from sharedllm_ops.workloads import chunk_pool_input, paper_tree_lengths

from .conftest import dtype_name

NUM_CHUNKS, CHUNK_SIZE, HEADS, HEAD_DIM, TOKENS_PER_NODE = 16, 1024, 8, 128, 32
LAYOUTS = {
    "chunks": [CHUNK_SIZE] * NUM_CHUNKS,
    "paper_tree": paper_tree_lengths(NUM_CHUNKS, CHUNK_SIZE),
}
BACKENDS = ("reference", "cpp")  # the peer first: its median is needed for the ratio


def describe(layout: str, lengths) -> str:
    segments = f"{NUM_CHUNKS}x{CHUNK_SIZE}" if layout == "chunks" else f"{len(lengths)} nodes (512/256/128/128)"
    return f"x {sum(lengths)}x{HEADS}x{HEAD_DIM}, {segments} -> P={TOKENS_PER_NODE}"


def forward_bytes(lengths, mode: str, element_size: int) -> int:
    """Bytes read and written: "mean" reads every row, "first" only one row per output slot."""
    rows_out = len(lengths) * TOKENS_PER_NODE
    rows_in = sum(lengths) if mode == "mean" else rows_out
    return (rows_in + rows_out) * HEADS * HEAD_DIM * element_size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["mean", "first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chunk_pool_forward(timed, layout, dtype, mode, backend):
    lengths = LAYOUTS[layout]
    x, cu = chunk_pool_input(lengths, HEADS, HEAD_DIM, dtype)
    timed(
        lambda: so.chunk_pool(x, cu, TOKENS_PER_NODE, mode, backend=backend),
        group=f"chunk_pool forward {layout} {dtype_name(dtype)} {mode}",
        backend=backend,
        info={
            "op": "chunk_pool",
            "pass": "forward",
            "shape": describe(layout, lengths),
            "dtype": dtype_name(dtype),
            "mode": mode,
            "bytes": forward_bytes(lengths, mode, x.element_size()),
        },
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["mean", "first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_chunk_pool_forward_backward(timed, dtype, mode, backend):
    layout = "chunks"
    lengths = LAYOUTS[layout]
    x, cu = chunk_pool_input(lengths, HEADS, HEAD_DIM, dtype)
    x.requires_grad_(True)
    grad_out = torch.ones(len(lengths) * TOKENS_PER_NODE, HEADS, HEAD_DIM, dtype=dtype)

    def step():
        out = so.chunk_pool(x, cu, TOKENS_PER_NODE, mode, backend=backend)
        # autograd.grad rather than backward(): nothing accumulates into x.grad across rounds
        return torch.autograd.grad(out, x, grad_out)

    # the backward reads grad_out and writes the whole grad_x, whatever the mode
    backward_bytes = (len(lengths) * TOKENS_PER_NODE + sum(lengths)) * HEADS * HEAD_DIM * x.element_size()
    timed(
        step,
        group=f"chunk_pool forward+backward {layout} {dtype_name(dtype)} {mode}",
        backend=backend,
        info={
            "op": "chunk_pool",
            "pass": "forward+backward",
            "shape": describe(layout, lengths),
            "dtype": dtype_name(dtype),
            "mode": mode,
            "bytes": forward_bytes(lengths, mode, x.element_size()) + backward_bytes,
        },
        # about a second per reference call: a few rounds, not pytest-benchmark's calibration
        pedantic=dict(rounds=3, iterations=1, warmup_rounds=1) if backend == "reference" else None,
    )
