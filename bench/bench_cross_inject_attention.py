"""cross_inject_attention on CPU: the C++ kernel (rotary fused) against the torch peer (rotary in
PyTorch, then ``scaled_dot_product_attention`` with ``enable_gqa``) and the reference.

Headline: 4096 recent tokens attending to 16384 pooled context keys (a 128K-token context, 128
chunks x 128 KV tokens), 32 query heads, 8 KV heads, head dim 128, float32 (Llama-2/3-7B-like
attention). The reference would materialise a 32 x 4096 x 16384 float32 score matrix (8.6 GB)
there, so it only runs at the small shape (512 x 4096), where all three are compared.
"""

from __future__ import annotations

import pytest
import torch

import sharedllm_ops as so
from sharedllm_ops.workloads import AttentionInputs, attention_inputs, sdpa_attention

from .conftest import dtype_name

HEADLINE = dict(q_lens=[4096], k_lens=[16384])
SMALL = dict(q_lens=[512], k_lens=[4096])
# FlashAttention's convention: the backward does 2.5x the forward's matmul work (S is recomputed).
BACKWARD_FLOP_FACTOR = 2.5


def forward_fn(backend: str, inp: AttentionInputs):
    """A no-argument forward of ``backend`` (``reference``, ``cpp`` or ``torch_sdpa``) on ``inp``."""
    if backend == "torch_sdpa":
        return lambda: sdpa_attention(inp)
    return lambda: inp.run(backend)


def info(inp: AttentionInputs, pass_: str, flops: float) -> dict:
    return {
        "op": "cross_inject_attention",
        "pass": pass_,
        "shape": inp.describe(),
        "dtype": dtype_name(inp.q.dtype),
        "flops": int(flops),
    }


@pytest.mark.parametrize("backend", ["torch_sdpa", "cpp"])
def test_attention_forward_headline(timed, backend):
    inp = attention_inputs(**HEADLINE)
    timed(
        forward_fn(backend, inp),
        group="cross_inject_attention forward 4096x16384 float32",
        backend=backend,
        info=info(inp, "forward", inp.forward_flops()),
        # seconds per call: a few rounds are enough and keep the suite to minutes
        pedantic=dict(rounds=3, iterations=1, warmup_rounds=1),
    )


@pytest.mark.parametrize("backend", ["reference", "torch_sdpa", "cpp"])
def test_attention_forward_small(timed, backend):
    inp = attention_inputs(**SMALL)
    timed(
        forward_fn(backend, inp),
        group="cross_inject_attention forward 512x4096 float32",
        backend=backend,
        info=info(inp, "forward", inp.forward_flops()),
        pedantic=dict(rounds=5, iterations=1, warmup_rounds=1),
    )


@pytest.mark.parametrize("backend", ["reference", "torch_sdpa", "cpp"])
def test_attention_backward_small(timed, backend):
    """Times the backward alone: each round's forward runs in the (untimed) setup."""
    inp = attention_inputs(**SMALL)
    q, k, v = inp.leaves()
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=torch.Generator().manual_seed(1))

    def forward():
        if backend == "torch_sdpa":
            out = sdpa_attention(inp, q, k, v)
        else:
            out = so.cross_inject_attention(
                q, k, v, inp.cu_q, inp.cu_k, None, inp.q_pos, inp.k_pos, inp.cos, inp.sin, backend=backend
            )
        return (out,), {}

    timed(
        lambda out: torch.autograd.grad(out, (q, k, v), grad_out),
        group="cross_inject_attention backward 512x4096 float32",
        backend=backend,
        info=info(inp, "backward", BACKWARD_FLOP_FACTOR * inp.forward_flops()),
        pedantic=dict(setup=forward, rounds=5, iterations=1, warmup_rounds=1),
    )
