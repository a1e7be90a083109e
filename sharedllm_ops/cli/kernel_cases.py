"""What the kernel check (``sharedllm-ops ops``) runs: each op at one shape on random inputs, with
the backends that can run it here and how its output is compared with the reference's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import sharedllm_ops as so

from ..reference import num_tree_nodes
from ..workloads import attention_inputs, chunk_pool_input, paper_tree_lengths, sdpa_attention, tree_topk_input

# The compiled backends that can run on each device type, in the order they are shown.
DEVICE_BACKENDS = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
TREE_DEPTH, TREE_BRANCHING = 3, 2


@dataclass(frozen=True)
class CheckShapes:
    """The sizes of every op's inputs in one run of the check."""

    pool_lengths: tuple[int, ...]  # segments pooled by chunk_pool
    pool_heads: int
    pool_head_dim: int
    tokens_per_node: int
    tree_batch: int
    tree_chunks: int
    tree_dim: int
    q_lens: tuple[int, ...]  # one entry per sequence
    k_lens: tuple[int, ...]
    q_heads: int
    kv_heads: int
    head_dim: int
    keys_per_chunk: int  # pooled KV tokens per context chunk: the keys' rotary position is their chunk


# Realistic, and under a minute on 2 CPU cores (the reference attention dominates).
FULL_SHAPES = CheckShapes(
    pool_lengths=tuple(paper_tree_lengths(16)),  # 16 chunks of 1024 tokens, the paper's 4 preserved nodes each
    pool_heads=8,
    pool_head_dim=128,
    tokens_per_node=32,
    tree_batch=1,
    tree_chunks=128,  # a 128K-token context
    tree_dim=4096,  # Llama-2-7B's hidden size
    q_lens=(1024,),
    k_lens=(4096,),  # 32 chunks x 128 pooled tokens: a 32K-token context
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    keys_per_chunk=128,
)
# Tiny, with the edge cases: several sequences, an empty segment, nodes shorter than tokens_per_node.
QUICK_SHAPES = CheckShapes(
    pool_lengths=(32, 16, 8, 8, 3, 0),
    pool_heads=2,
    pool_head_dim=16,
    tokens_per_node=4,
    tree_batch=2,
    tree_chunks=3,
    tree_dim=32,
    q_lens=(5, 11),
    k_lens=(40, 24),
    q_heads=4,
    kv_heads=2,
    head_dim=16,
    keys_per_chunk=8,
)


@dataclass
class CheckCase:
    """One op at one shape: ``run(backend)`` computes it, ``compare(out, reference_out)`` gives
    ``(max abs error, note)``."""

    op: str
    shape: str
    backends: list[str]  # "reference" first: the others are checked against its output
    run: Callable[[str], object]
    compare: Callable[[object, object], tuple[float, str]]


def max_abs_error(out: torch.Tensor, expected: torch.Tensor) -> tuple[float, str]:
    if out.numel() == 0:
        return 0.0, ""
    return (out.float() - expected.float()).abs().max().item(), ""


def compare_tree_topk(out, expected) -> tuple[float, str]:
    """Error of the scores; the node ids must match exactly (a mismatch counts as an infinite error)."""
    (ids, scores), (expected_ids, expected_scores) = out, expected
    mismatched = (ids != expected_ids).any(dim=-1).sum().item()
    if mismatched:
        return math.inf, f"node ids differ in {mismatched} chunks"
    return max_abs_error(scores, expected_scores)[0], "scores; ids match"


def available_backends(op: str, device: torch.device) -> list[str]:
    """The reference, then each compiled backend of ``op`` that can run on ``device``."""
    kernels = so.build_info()["kernels"][op]
    return ["reference"] + [b for b in DEVICE_BACKENDS.get(device.type, ()) if kernels[b]]


def check_cases(shapes: CheckShapes, device: torch.device, dtype: torch.dtype) -> list[CheckCase]:
    """The four ops at ``shapes``, on random inputs (fixed seed), each with the backends available here."""
    gen = torch.Generator().manual_seed(0)
    cases = []

    x, cu = chunk_pool_input(shapes.pool_lengths, shapes.pool_heads, shapes.pool_head_dim, dtype, device, generator=gen)
    cases.append(
        CheckCase(
            "chunk_pool",
            f"x {'x'.join(map(str, x.shape))}, {len(shapes.pool_lengths)} segments -> {shapes.tokens_per_node}, mean",
            available_backends("chunk_pool", device),
            lambda backend: so.chunk_pool(x, cu, shapes.tokens_per_node, "mean", backend=backend),
            max_abs_error,
        )
    )

    nodes = num_tree_nodes(TREE_DEPTH, TREE_BRANCHING)
    query, node_emb = tree_topk_input(
        shapes.tree_batch, shapes.tree_chunks, nodes, shapes.tree_dim, dtype, device, generator=gen
    )
    cases.append(
        CheckCase(
            "tree_topk",
            f"B={shapes.tree_batch} C={shapes.tree_chunks} T={nodes} D={shapes.tree_dim}, "
            f"h={TREE_DEPTH} b={TREE_BRANCHING}",
            available_backends("tree_topk", device),
            lambda backend: so.tree_topk(query, node_emb, TREE_DEPTH, k=1, branching=TREE_BRANCHING, backend=backend),
            compare_tree_topk,
        )
    )

    attn = attention_inputs(
        shapes.q_lens, shapes.k_lens, shapes.q_heads, shapes.kv_heads, shapes.head_dim, shapes.keys_per_chunk,
        dtype=dtype, device=device,
    )  # fmt: skip
    (nq, hq, d), (nk, hk, _) = attn.q.shape, attn.k.shape
    attn_shape = f"B={len(shapes.q_lens)} q {nq}x{hq}x{d} k/v {nk}x{hk}x{d}, rotary"
    attention_backends = available_backends("cross_inject_attention", device)
    cases.append(
        CheckCase(
            "cross_inject_attention",
            attn_shape,
            attention_backends + ["torch_sdpa"],  # stock PyTorch, for scale
            lambda backend: sdpa_attention(attn) if backend == "torch_sdpa" else attn.run(backend),
            max_abs_error,
        )
    )

    # merge_attention's use: attention over two key sets (here each sequence's two halves), merged,
    # must equal the attention over all keys; the backend column is the one of the two attentions.
    first, second = attn.split_keys()

    def split_and_merge(backend: str) -> torch.Tensor:
        out_a, lse_a = first.run(backend, return_lse=True)
        out_b, lse_b = second.run(backend, return_lse=True)
        return so.merge_attention(out_a, lse_a, out_b, lse_b)[0]

    full_attention = {}  # the reference over all keys, computed once, is what the merge must match

    def compare_merge(out, _reference_merge) -> tuple[float, str]:
        if "out" not in full_attention:
            full_attention["out"] = attn.run("reference")
        return max_abs_error(out, full_attention["out"])[0], "vs unsplit attention"

    cases.append(
        CheckCase(
            "merge_attention", "2 key halves of the above, merged", attention_backends, split_and_merge, compare_merge
        )
    )
    return cases
