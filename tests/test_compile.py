"""torch.compile(fullgraph=True) over every op with backend="cpp", and with backend="triton" (CPU
tensors in Triton's interpreter: the custom ops are opaque to dynamo, so the graph holds them as
calls): the fake kernels, the registered autograd and the dispatch code
must all trace, and the compiled result must equal eager. Compiling is slow, so each backend has
one function, compiled once (plus one dynamic-shape trace)."""

import pytest
import torch
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape)
from conftest import assert_close, cu_seqlens, requires_ext, requires_triton, rotary_tables

import sharedllm_ops as so

H, D, P = 2, 16, 4


def pipeline(x, cu_x, query, node_emb, q, cu_q, cu_k, q_pos, k_pos, cos, sin, k2, v2, cu_k2, backend="cpp"):
    """A small SharedLLM-like step: pool context KV, pick tree nodes, attend to the pooled context
    with the fused rotary, attend to the recent keys, merge both attentions."""
    k_ctx = so.chunk_pool(x, cu_x, P, "mean", backend=backend)
    v_ctx = so.chunk_pool(x * 0.5 + 1.0, cu_x, P, "first", backend=backend)
    node_ids, scores = so.tree_topk(query, node_emb, 3, 1, 2, "cosine", backend=backend)
    out_c, lse_c = so.cross_inject_attention(
        q, k_ctx, v_ctx, cu_q, cu_k, None, q_pos, k_pos, cos, sin, return_lse=True, backend=backend
    )
    out_r, lse_r = so.cross_inject_attention(q, k2, v2, cu_q, cu_k2, 0.2, return_lse=True, backend=backend)
    out, lse = so.merge_attention(out_c, lse_c, out_r, lse_r)
    return out, lse, node_ids, scores


def triton_pipeline(**inputs):
    """The same step with every op on the Triton backend."""
    return pipeline(**inputs, backend="triton")


def make_inputs(seg_lens, seqs_of_segs, lq, lk2, seed=0):
    """seg_lens: context segments; seqs_of_segs: how many segments each sequence owns."""
    g = torch.Generator().manual_seed(seed)
    S, B = len(seg_lens), len(lq)
    assert sum(seqs_of_segs) == S
    x = torch.randn(sum(seg_lens), H, D, generator=g).requires_grad_()
    q = torch.randn(sum(lq), 2 * H, D, generator=g).requires_grad_()
    k2 = torch.randn(sum(lk2), H, D, generator=g).requires_grad_()
    v2 = torch.randn(sum(lk2), H, D, generator=g).requires_grad_()
    cos, sin = rotary_tables(64, D)
    n_ctx = S * P
    return dict(
        x=x,
        cu_x=cu_seqlens(seg_lens),
        query=torch.randn(B, D, generator=g),
        node_emb=torch.randn(B, 3, 14, D, generator=g),
        q=q,
        cu_q=cu_seqlens(lq),
        cu_k=cu_seqlens([n * P for n in seqs_of_segs]),
        q_pos=torch.randint(0, 64, (sum(lq),), dtype=torch.int32, generator=g),
        k_pos=torch.randint(0, 64, (n_ctx,), dtype=torch.int32, generator=g),
        cos=cos,
        sin=sin,
        k2=k2,
        v2=v2,
        cu_k2=cu_seqlens(lk2),
    )


def run(fn, inputs):
    out, lse, node_ids, scores = fn(**inputs)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    grads = torch.autograd.grad(loss, [inputs[n] for n in ("x", "q", "k2", "v2")])
    return (out, lse, node_ids, scores), grads


def compare(eager, compiled):
    (e_out, e_lse, e_ids, e_scores), e_grads = eager
    (c_out, c_lse, c_ids, c_scores), c_grads = compiled
    assert_close(c_out, e_out, dict(atol=1e-5, rtol=1e-5))
    torch.testing.assert_close(c_lse, e_lse, atol=1e-5, rtol=1e-5)  # -inf rows must match too
    assert torch.equal(c_ids, e_ids)
    assert_close(c_scores, e_scores)
    for name, c, e in zip(("x", "q", "k2", "v2"), c_grads, e_grads):
        assert_close(c, e, dict(atol=1e-5, rtol=1e-5), msg=f"grad {name}")


@requires_ext
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    # sequence 2 has context but no recent keys; sequence 1 has no queries
    inputs = make_inputs(seg_lens=[5, 0, 3, 12, 10, 1], seqs_of_segs=[2, 1, 3], lq=[3, 0, 4], lk2=[4, 2, 0])
    eager = run(pipeline, inputs)
    (out, lse, _, _), _ = eager
    assert torch.isfinite(out).all() and torch.isfinite(lse[3:]).all()
    compiled_fn = torch.compile(pipeline, fullgraph=True)
    compare(eager, run(compiled_fn, inputs))


@requires_ext
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_compile_dynamic_shapes_no_recompile(rotary):
    """The fake kernels and the public functions' checks work with symbolic sizes: a second set of
    shapes (other numbers of segments, queries and keys) reuses the graph. (Regression: formatting
    Nq into an argument check's message once specialised it, so every new query count recompiled.)"""
    torch._dynamo.reset()
    compiled_fn = torch.compile(pipeline, fullgraph=True, dynamic=True, backend="aot_eager")
    shapes = [
        dict(seg_lens=[5, 0, 3, 12, 10, 1], seqs_of_segs=[2, 1, 3], lq=[3, 0, 4], lk2=[4, 2, 0]),
        dict(seg_lens=[7, 9, 2, 30], seqs_of_segs=[3, 1], lq=[6, 5], lk2=[3, 8]),
    ]
    # no duck sizing: sizes equal by coincidence in the first call must not be tied together
    with torch._dynamo.config.patch(error_on_recompile=True), torch.fx.experimental._config.patch(use_duck_shape=False):
        for i, kw in enumerate(shapes):
            inputs = make_inputs(**kw, seed=i)
            if not rotary:
                inputs.update(q_pos=None, k_pos=None, cos=None, sin=None)
            compare(run(pipeline, inputs), run(compiled_fn, inputs))


# --------------------------------------------------------------------------------------------
# the Triton kernels (CPU tensors in the interpreter)


@requires_triton("chunk_pool")
@requires_triton("tree_topk")
@requires_triton("cross_inject_attention")
def test_compile_triton_fullgraph_matches_eager():
    """Inductor on CPU: the Triton ops stay opaque calls (run in the interpreter), the rest is C++."""
    torch._dynamo.reset()
    inputs = make_inputs(seg_lens=[5, 0, 3, 12, 10, 1], seqs_of_segs=[2, 1, 3], lq=[3, 0, 4], lk2=[4, 2, 0])
    eager = run(triton_pipeline, inputs)
    compare(eager, run(torch.compile(triton_pipeline, fullgraph=True), inputs))
    # the compiled graph calls the Triton ops (not, say, the reference traced through)
    graphs = []
    torch._dynamo.reset()
    torch.compile(triton_pipeline, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)(**inputs)
    code = "\n".join(gm.code for gm in graphs)
    for op in ("chunk_pool", "tree_topk", "cross_inject_attention"):
        assert f"sharedllm_triton.{op}" in code, code


@requires_triton("chunk_pool")
@requires_triton("tree_topk")
@requires_triton("cross_inject_attention")
def test_compile_triton_dynamic_shapes_no_recompile():
    """Other numbers of segments, rows, sequences and chunks reuse the graph."""
    torch._dynamo.reset()
    compiled_fn = torch.compile(triton_pipeline, fullgraph=True, dynamic=True, backend="aot_eager")
    shapes = [
        dict(seg_lens=[5, 0, 3, 12, 10, 1], seqs_of_segs=[2, 1, 3], lq=[3, 0, 4], lk2=[4, 2, 0]),
        dict(seg_lens=[7, 9, 2, 30], seqs_of_segs=[3, 1], lq=[6, 5], lk2=[3, 8]),
    ]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.fx.experimental._config.patch(use_duck_shape=False):
        for i, kw in enumerate(shapes):
            inputs = make_inputs(**kw, seed=i)
            compare(run(triton_pipeline, inputs), run(compiled_fn, inputs))
