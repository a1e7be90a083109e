"""Fake kernels and autograd formulas of the ops, registered once per op namespace: ``sharedllm``
(the C++/CUDA extension) and ``sharedllm_triton`` (the Triton kernels) share them, since the ops
have the same schemas there. The extension loader (``sharedllm_ops._ext``) registers the first, the
Triton package the second."""

from __future__ import annotations

import torch

from ..reference.tree_topk import num_preserved
from .checks import check_devices


def register_chunk_pool(namespace: str) -> None:
    """Fake kernels of ``chunk_pool`` and ``chunk_pool_backward``, and the autograd of ``chunk_pool``."""

    @torch.library.register_fake(f"{namespace}::chunk_pool")
    def _fake(x, cu_seqlens, tokens_per_node, mode):
        check_devices(x, cu_seqlens=cu_seqlens)
        return x.new_empty((cu_seqlens.shape[0] - 1) * tokens_per_node, x.shape[1], x.shape[2])

    @torch.library.register_fake(f"{namespace}::chunk_pool_backward")
    def _backward_fake(grad_out, cu_seqlens, num_rows, tokens_per_node, mode):
        check_devices(grad_out, cu_seqlens=cu_seqlens)
        return grad_out.new_empty(num_rows, grad_out.shape[1], grad_out.shape[2])

    def setup_context(ctx, inputs, output):
        x, cu_seqlens, tokens_per_node, mode = inputs
        ctx.save_for_backward(cu_seqlens)
        ctx.num_rows, ctx.tokens_per_node, ctx.mode = x.shape[0], tokens_per_node, mode

    def backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        backward_op = getattr(torch.ops, namespace).chunk_pool_backward
        grad_x = backward_op(grad.contiguous(), cu_seqlens, ctx.num_rows, ctx.tokens_per_node, ctx.mode)
        return grad_x, None, None, None

    torch.library.register_autograd(f"{namespace}::chunk_pool", backward, setup_context=setup_context)


def register_tree_topk(namespace: str) -> None:
    """Fake kernel of ``tree_topk`` (not differentiable: no autograd)."""

    @torch.library.register_fake(f"{namespace}::tree_topk")
    def _fake(query, node_emb, depth, k, branching, score):
        check_devices(query, node_emb=node_emb)
        B, C, T = node_emb.shape[0], node_emb.shape[1], node_emb.shape[2]
        return (
            query.new_empty(B, C, num_preserved(depth, k, branching), dtype=torch.int32),
            query.new_empty(B, C, T, dtype=torch.float32),
        )


def register_cross_inject_attention(namespace: str) -> None:
    """Fake kernels of ``cross_inject_attention`` and its backward, and the autograd of the forward."""

    @torch.library.register_fake(f"{namespace}::cross_inject_attention")
    def _fake(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, q_positions, k_positions, cos, sin):
        check_devices(q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                        q_positions=q_positions, k_positions=k_positions, rotary_cos=cos, rotary_sin=sin)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        lse = q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)
        return out, lse

    @torch.library.register_fake(f"{namespace}::cross_inject_attention_backward")
    def _backward_fake(grad_out, grad_lse, q, k, v, out, lse, *rest):
        # the kernels return contiguous gradients whatever the strides of q, k, v
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, scale, q_pos, k_pos, cos, sin = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, q_pos, k_pos, cos, sin)
        ctx.softmax_scale = scale

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k, q_pos, k_pos, cos, sin = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        backward_op = getattr(torch.ops, namespace).cross_inject_attention_backward
        dq, dk, dv = backward_op(
            grad_out.contiguous(), grad_lse, q, k, v, out, lse, cu_q, cu_k, ctx.softmax_scale, q_pos, k_pos, cos, sin
        )
        return dq, dk, dv, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::cross_inject_attention", backward, setup_context=setup_context)
