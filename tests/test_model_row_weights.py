"""``row_weight_exponent`` (issue 16: a bias between raw and pooled rows): a row that stands for ``t``
context tokens weighs ``t ** a`` in the attention to the context. Checked against independent
computations: a row of integer weight ``w`` attends exactly like ``w`` copies of itself, and the
grouped attention equals a dense softmax with the bias written out.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import sharedllm_ops as so
from sharedllm_ops.model.context import compressed_row_tokens, row_weight_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK, M, P = 32, 2, 8


def test_row_tokens_of_pooled_raw_sink_and_first_rows():
    # node 0 starts the context (its first row holds the attention sink), node 1 is pooled without
    # its own first token (63 tokens in 8 rows), node 2 is short enough to stay raw
    tokens = compressed_row_tokens(torch.tensor([0, 64, 128]), torch.tensor([64, 64, 5]), P, torch.tensor([0, 1, 0]))
    expected = [1.0] + [8.0] * 7 + [63 / 8] * 8 + [1.0] * 5
    assert tokens.dtype == torch.float32 and tokens.tolist() == pytest.approx(expected)
    assert compressed_row_tokens(torch.tensor([0, 3]), torch.tensor([3, 2]), None, torch.zeros(2)).tolist() == [1.0] * 5


@pytest.mark.parametrize("exponent", [1.0, -0.5])
def test_grouped_row_weights_equal_a_dense_softmax_with_the_bias(exponent):
    g = torch.Generator().manual_seed(0)
    H, Hk, D = 4, 2, 16
    cu_k = torch.tensor([0, 20, 20, 57], dtype=torch.int32)  # the middle sequence has no context
    cu_q = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    k, v = torch.randn(57, Hk, D, generator=g), torch.randn(57, Hk, D, generator=g)
    q = torch.randn(9, H, D, generator=g)
    row_tokens = torch.tensor([1.0, 4.0, 8.0, 32.0])[torch.randint(0, 4, (57,), generator=g)]
    out = lse = None
    for log_tokens, rows, cu in row_weight_groups(row_tokens, cu_k):
        o, l = so.cross_inject_attention(q, k[rows], v[rows], cu_q, cu, softmax_scale=0.25, return_lse=True)
        l = l + exponent * log_tokens
        out, lse = (o, l) if out is None else so.merge_attention(out, lse, o, l)
    for b in range(3):
        qs, ks, vs = (t[c[b]:c[b + 1]] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        if ks.shape[0] == 0:
            assert torch.all(out[cu_q[b]:cu_q[b + 1]] == 0) and torch.all(torch.isneginf(lse[cu_q[b]:cu_q[b + 1]]))
            continue
        ks, vs = ks.repeat_interleave(H // Hk, 1), vs.repeat_interleave(H // Hk, 1)
        bias = exponent * torch.log(row_tokens[cu_k[b]:cu_k[b + 1]])
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * 0.25 + bias
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]], torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        torch.testing.assert_close(lse[cu_q[b]:cu_q[b + 1]], torch.logsumexp(scores, -1).T)


def test_buckets_keep_sequences_in_order_and_powers_of_two_exact():
    row_tokens = torch.tensor([1.0, 4.0, 4.0, 1.0, 4.05, 33.0])
    groups = row_weight_groups(row_tokens, torch.tensor([0, 3, 6], dtype=torch.int32))
    by_weight = {round(math.exp(w), 3): (rows.tolist(), cu.tolist()) for w, rows, cu in groups}
    assert by_weight[1.0] == ([0, 3], [0, 1, 2])
    assert by_weight[4.0] == ([1, 2, 4], [0, 2, 3])  # 4.05 is within 2.2% of 4: the same bucket
    (w33,) = [w for w in by_weight if w > 30]
    assert abs(math.log(w33 / 33.0)) < math.log(2) / 32


transformers = pytest.importorskip("transformers")

from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM  # noqa: E402
from sharedllm_ops.model.pretrained import tiny_model  # noqa: E402


def duplicated(ctx, copies):
    """``ctx`` with row ``i`` repeated ``copies[i]`` times (int64 ``[Nk]``) and no row weights."""
    rows = torch.repeat_interleave(torch.arange(copies.numel()), copies)
    seq = torch.repeat_interleave(torch.arange(ctx.batch_size), (ctx.cu_seqlens[1:] - ctx.cu_seqlens[:-1]).long())
    cu = torch.zeros(ctx.batch_size + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.zeros(ctx.batch_size, dtype=torch.long).index_add_(0, seq, copies), 0)
    take = lambda t: None if t is None else t[rows]  # noqa: E731
    return replace(ctx, keys=[k[rows] for k in ctx.keys], values=[v[rows] for v in ctx.values], cu_seqlens=cu,
                   k_positions=take(ctx.k_positions), row_tokens=None)


@pytest.mark.parametrize("injection,positions", [("merge", "distance"), ("merge", "true"), ("residual", "chunk")])
@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_a_row_for_w_tokens_attends_like_w_copies_of_itself(injection, positions, exponent):
    base = tiny_model("llama", seed=0)
    cfg = SharedLLMConfig(num_injected_layers=M, chunk_size=CHUNK, tree_depth=1, tokens_per_node=P, pool_mode="mean",
                          injection=injection, positions=positions, row_weight_exponent=exponent)
    model = SharedLLMForCausalLM.from_base(base, cfg).eval()
    g = torch.Generator().manual_seed(3)
    context = torch.randint(3, 128, (2, 3 * CHUNK + 5), generator=g)  # pooled halves of 16 (2 tokens a row), raw tail
    decoder = torch.randint(3, 128, (2, 12), generator=g)
    with torch.no_grad():
        ctx = model.compress_context(context)
        assert set(ctx.row_tokens.tolist()) == {1.0, 2.0}  # the sink rows and the raw tail count one
        weighted = model(decoder, compressed_context=ctx, use_cache=False).logits
        copies = (ctx.row_tokens ** exponent).round().long()
        plain = model(decoder, compressed_context=duplicated(ctx, copies), use_cache=False).logits
        unweighted = model(decoder, compressed_context=replace(ctx, row_tokens=None), use_cache=False).logits
    torch.testing.assert_close(weighted, plain, rtol=1e-4, atol=1e-4)
    assert (weighted - unweighted).abs().max() > 1e-3  # the weights do change the answer


def test_negative_exponent_in_the_cross_block_attends_like_copies_of_the_lighter_rows():
    """In a residual cross block only the context softmax matters (not its lse), so weights t**-1
    with t in {1, 2} act as 2 copies of every one-token row and 1 of every two-token row."""
    base = tiny_model("llama", seed=0)
    cfg = SharedLLMConfig(num_injected_layers=M, chunk_size=CHUNK, tree_depth=1, tokens_per_node=P, pool_mode="mean",
                          positions="distance", row_weight_exponent=-1.0)
    model = SharedLLMForCausalLM.from_base(base, cfg).eval()
    g = torch.Generator().manual_seed(4)
    context, decoder = torch.randint(3, 128, (2, 3 * CHUNK + 5), generator=g), torch.randint(3, 128, (2, 12), generator=g)
    with torch.no_grad():
        ctx = model.compress_context(context)
        weighted = model(decoder, compressed_context=ctx, use_cache=False).logits
        plain = model(decoder, compressed_context=duplicated(ctx, (2 / ctx.row_tokens).round().long()), use_cache=False).logits
    torch.testing.assert_close(weighted, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("injection", ["merge", "residual"])
def test_row_weights_with_no_context_rows_at_all(injection):
    base = tiny_model("llama", seed=0)
    logits = []
    for exponent in (0.0, -1.0):
        cfg = SharedLLMConfig(num_injected_layers=M, chunk_size=CHUNK, tree_depth=1, tokens_per_node=P,
                              injection=injection, positions="distance", row_weight_exponent=exponent)
        model = SharedLLMForCausalLM.from_base(base, cfg).eval()
        with torch.no_grad():
            ctx = model.compress_context(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long))
            logits.append(model(torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(5)),
                                compressed_context=ctx, use_cache=False).logits)
        model.unwrap()
    assert torch.equal(logits[0], logits[1])


def test_growing_a_context_needs_the_same_row_weights():
    base = tiny_model("llama", seed=0)
    kw = dict(num_injected_layers=M, chunk_size=CHUNK, tree_depth=1, tokens_per_node=P, positions="distance")
    weighted = SharedLLMForCausalLM.from_base(base, SharedLLMConfig(**kw, row_weight_exponent=1.0)).eval()
    with torch.no_grad():
        ctx = weighted.compress_context(torch.randint(3, 128, (1, CHUNK + 3)))
    weighted.unwrap()
    plain = SharedLLMForCausalLM.from_base(base, SharedLLMConfig(**kw)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="row_weight_exponent"):
        plain.compress_context(torch.randint(3, 128, (1, 5)), into=ctx)


def test_exponent_zero_keeps_no_row_weights_and_bad_exponents_are_refused():
    assert SharedLLMConfig().row_weight_exponent == 0.0
    for bad in (True, "1", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="row_weight_exponent"):
            SharedLLMConfig(row_weight_exponent=bad)
