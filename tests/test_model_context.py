"""The model's context path, piece by piece (``sharedllm_ops.model.context`` and ``.attention``):
chunking, tree spans (with and without split noise), the right-descent ids, the compressed row
sources, the packed causal lower pass and the self-attention with log-sum-exp used by merge injection."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, cu_seqlens

import sharedllm_ops as so
from sharedllm_ops import reference

pytest.importorskip("transformers")

from sharedllm_ops.model import context, retrieval  # noqa: E402
from sharedllm_ops.model.attention import (  # noqa: E402
    PackedPass,
    StopEncoding,
    attention_with_lse,
    packed_causal_attention,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --------------------------------------------------------------------------------------------
# chunk_layout


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunk_layout_matches_a_python_loop(chunk_size):
    lengths = [0, 5, 16, 32, 33, 0, 47, 1, 4, 8]
    layout = context.chunk_layout(torch.tensor(lengths), chunk_size)
    row, index, start, length, num = [], [], [], [], []
    for b, n in enumerate(lengths):
        chunks = 0
        for i, s in enumerate(range(0, n, chunk_size)):
            row.append(b)
            index.append(i)
            start.append(s)
            length.append(min(chunk_size, n - s))
            chunks += 1
        num.append(chunks)
    for name, expected in (("row", row), ("index", index), ("start", start), ("length", length), ("num_chunks", num)):
        got = getattr(layout, name)
        assert got.dtype == torch.int64, name
        assert got.tolist() == expected, f"{name}: {got.tolist()} != {expected}"


def test_chunk_layout_exact_multiples_and_all_empty():
    layout = context.chunk_layout(torch.tensor([32, 64]), 32)
    assert layout.length.tolist() == [32, 32, 32]
    assert layout.start.tolist() == [0, 0, 32]
    assert layout.num_chunks.tolist() == [1, 2]
    empty = context.chunk_layout(torch.tensor([0, 0]), 8)
    assert empty.row.numel() == 0 and empty.num_chunks.tolist() == [0, 0]


def test_chunk_layout_continuing_earlier_chunks_counts_them():
    layout = context.chunk_layout(torch.tensor([40, 0, 5]), 16, first_chunk=torch.tensor([2, 3, 0]))
    assert layout.row.tolist() == [0, 0, 0, 2]
    assert layout.index.tolist() == [2, 3, 4, 0]
    assert layout.start.tolist() == [32, 48, 64, 0]
    assert layout.length.tolist() == [16, 16, 8, 5]
    assert layout.num_chunks.tolist() == [5, 3, 1]
    assert layout.take(1, 3).index.tolist() == [3, 4] and layout.take(1, 3).num_chunks.tolist() == [5, 3, 1]


# --------------------------------------------------------------------------------------------
# context_tokens: the tokens one compression call reads


def test_context_tokens_of_a_new_context_and_their_tail():
    ids = torch.arange(30).view(3, 10)
    tokens, reopened = context.context_tokens(ids, torch.tensor([10, 0, 7]), 4)
    assert not reopened.any() and tokens.first_chunk.tolist() == [0, 0, 0]
    assert tokens.total_lengths.tolist() == [10, 0, 7]
    assert tokens.tail().tolist() == [[8, 9, 0], [0, 0, 0], [24, 25, 26]]  # 10 % 4, 0, 7 % 4 tokens
    assert tokens.flat_index(torch.tensor([2, 2]), torch.tensor([0, 6])).tolist() == [20, 26]


def test_context_tokens_continuing_reopen_unfinished_chunks():
    """Rows: an unfinished chunk (6 % 4 = 2 tokens) continued; a finished one (8) continued; an
    unfinished one (5) without new tokens (not reopened, its tail stays); nothing before (0)."""
    before = torch.tensor([6, 8, 5, 0])
    tail = torch.tensor([[104, 105], [0, 0], [204, 0], [0, 0]])
    ids = torch.tensor([[1, 2, 3], [11, 12, 13], [0, 0, 0], [31, 32, 0]])
    tokens, reopened = context.context_tokens(ids, torch.tensor([3, 3, 0, 2]), 4, before, tail)
    assert reopened.tolist() == [True, False, False, False]
    assert tokens.lengths.tolist() == [5, 3, 0, 2]
    assert tokens.ids[:, :5].tolist()[0] == [104, 105, 1, 2, 3]
    assert tokens.ids[1, :3].tolist() == [11, 12, 13] and tokens.ids[3, :2].tolist() == [31, 32]
    assert tokens.first_chunk.tolist() == [1, 2, 2, 0]  # the reopened chunk; after the last chunk
    assert tokens.total_lengths.tolist() == [9, 11, 5, 2]
    # the token at position 6 of row 0 (the first new one) and position 8 of row 1
    flat = tokens.flat_index(torch.tensor([0, 1]), torch.tensor([6, 8]))
    assert tokens.ids.reshape(-1)[flat].tolist() == [1, 11]
    assert tokens.tail().tolist() == [[3, 0, 0], [11, 12, 13], [204, 0, 0], [31, 32, 0]]
    layout = context.chunk_layout(tokens.lengths, 4, tokens.first_chunk)
    assert layout.index.tolist() == [1, 2, 2, 0] and layout.start.tolist() == [4, 8, 8, 0]
    assert layout.num_chunks.tolist() == [3, 3, 2, 1]


# --------------------------------------------------------------------------------------------
# tree_node_spans


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_tree_node_spans_without_noise_equal_reference_tree_spans(depth):
    T = reference.num_tree_nodes(depth, 2)
    lens = torch.tensor(list(range(2**depth, 2**depth + 70)) + [1000, 1023, 1024, 1025])
    start, length = context.tree_node_spans(lens, depth)
    assert start.shape == (lens.numel(), T) and length.shape == (lens.numel(), T)
    ids = torch.arange(T).expand(lens.numel(), T)
    ref_start, ref_len = reference.tree_spans(ids[None], lens[None], depth, 2)
    assert torch.equal(start, ref_start[0].long())
    assert torch.equal(length, ref_len[0].long())
    assert bool((length > 0).all())


def _check_tiling(start, length, lens, depth):
    """Level-order spans: every level tiles the chunk, each node's two children tile it, no node is
    shorter than the leaves below it."""
    end = start + length
    offset = 0
    for level in range(1, depth + 1):
        n = 2**level
        s, e = start[:, offset:offset + n], end[:, offset:offset + n]
        if level == 1:
            ps, pe = torch.zeros_like(lens)[:, None], lens[:, None]
        else:
            prev = offset - n // 2
            ps, pe = start[:, prev:offset], end[:, prev:offset]
        assert torch.equal(s[:, 0::2], ps), f"level {level}: left children do not start at their parent"
        assert torch.equal(e[:, 0::2], s[:, 1::2]), f"level {level}: left and right children do not meet"
        assert torch.equal(e[:, 1::2], pe), f"level {level}: right children do not end at their parent"
        assert bool((e - s >= 2 ** (depth - level)).all()), f"level {level}: a node is shorter than its leaves"
        offset += n


@pytest.mark.parametrize("depth", [1, 3])
def test_tree_node_spans_with_noise_tile_and_are_seeded(depth):
    lens = torch.tensor([2**depth, 2**depth + 1, 13, 64, 100, 1000, 1024] * 4)
    torch.manual_seed(5)
    a = context.tree_node_spans(lens, depth, 0.2)
    torch.manual_seed(5)
    b = context.tree_node_spans(lens, depth, 0.2)
    torch.manual_seed(6)
    c = context.tree_node_spans(lens, depth, 0.2)
    for start, length in (a, b, c):
        _check_tiling(start, length, lens, depth)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "same seed, different spans"
    assert not torch.equal(a[0], c[0]), "different seeds gave the same spans"
    noiseless = context.tree_node_spans(lens, depth)
    assert not torch.equal(a[0], noiseless[0]), "split noise did not move any split"


def test_tree_node_spans_with_huge_noise_still_tile():
    lens = torch.tensor([8, 9, 10, 16, 17, 33] * 20)
    torch.manual_seed(0)
    start, length = context.tree_node_spans(lens, 3, 0.49)
    _check_tiling(start, length, lens, 3)


# --------------------------------------------------------------------------------------------
# right_descent_node_ids


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_right_descent_node_ids_equal_tree_topk_with_increasing_scores(depth):
    T = reference.num_tree_nodes(depth, 2)
    # node embedding = (its index within its level, 0, ...): with a query (1, 0, ...) and "dot",
    # the right child always scores higher
    emb = torch.zeros(1, 1, T, 4)
    for level in range(1, depth + 1):
        first = reference.level_offset(level, 2)
        emb[0, 0, first:first + 2**level, 0] = torch.arange(2**level, dtype=torch.float32)
    query = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected, _ = so.tree_topk(query, emb, depth, score="dot", backend="reference")
    got = retrieval.right_descent_node_ids(depth)
    assert got.dtype == torch.int64
    assert got.tolist() == expected[0, 0].long().tolist()


def test_right_descent_spans_of_a_16_token_chunk():
    ids = retrieval.right_descent_node_ids(3)
    start, length = context.tree_node_spans(torch.tensor([16]), 3)
    spans = list(zip(start[0, ids].tolist(), (start[0, ids] + length[0, ids]).tolist()))
    assert spans == [(0, 8), (8, 12), (12, 14), (14, 16)]


# --------------------------------------------------------------------------------------------
# compressed rows


@pytest.mark.parametrize("P", [1, 3, 4])
def test_compressed_row_sources_match_a_python_loop(P):
    node_len = torch.tensor([1, 5, 3, 8, 2, 4, 7, 1, 12])
    expected, first_raw = [], 0
    pooled = node_len.numel() * P
    for n, length in enumerate(node_len.tolist()):
        if length > P:
            expected += [n * P + j for j in range(P)]
        else:
            expected += [pooled + first_raw + j for j in range(length)]
        first_raw += length
    got = context.compressed_row_sources(node_len, P)
    assert got.tolist() == expected
    assert context.compressed_rows(node_len, P).tolist() == [min(n, P) for n in node_len.tolist()]
    assert context.compressed_rows(node_len, None).tolist() == node_len.tolist()


def test_pack_segments_and_segment_cu_seqlens():
    first = torch.tensor([3, 10, 0, 20])
    lens = torch.tensor([2, 0, 3, 1])
    p = context.pack_segments(first, lens)
    assert p.index.tolist() == [3, 4, 0, 1, 2, 20]
    assert p.segment.tolist() == [0, 0, 2, 2, 2, 3]
    assert p.offset.tolist() == [0, 1, 0, 1, 2, 0]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 2, 2, 5, 6]
    cu = context.segment_cu_seqlens(torch.tensor([0, 0, 2, 2, 2]), torch.tensor([1, 2, 3, 4, 5]), 4)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 15, 15]


# --------------------------------------------------------------------------------------------
# packed causal attention (the lower model's pass)


def _per_segment_sdpa(q, k, v, lengths, scale):
    """q ``[Hq, N, D]``, k/v ``[Hk, N, D]`` -> ``[N, Hq, D]``, causal SDPA per segment."""
    groups = q.shape[0] // k.shape[0]
    outs, s = [], 0
    for n in lengths:
        if n:
            qs, ks, vs = q[:, s:s + n], k[:, s:s + n], v[:, s:s + n]
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
        s += n
    return torch.cat(outs)


@pytest.mark.parametrize("Hq,Hk", [(4, 2), (2, 2), (4, 1)])
def test_packed_causal_attention_equals_per_segment_sdpa(Hq, Hk):
    lengths = [0, 1, 5, 16, 33, 0, 2, 9]
    N, D, scale = sum(lengths), 8, 0.3
    q, k, v = torch.randn(1, Hq, N, D), torch.randn(1, Hk, N, D), torch.randn(1, Hk, N, D)
    packed = PackedPass.build(cu_seqlens(lengths), capture_layers=(0,))
    out, weights = packed_causal_attention(types.SimpleNamespace(layer_idx=0), q, k, v, packed, scale)
    assert weights is None
    assert out.shape == (1, N, Hq, D)
    assert_close(out[0], _per_segment_sdpa(q[0], k[0], v[0], lengths, scale))
    ck, cv = packed.capture[0]  # captured k/v in the packed layout [N, Hk, D]
    assert torch.equal(ck, k[0].transpose(0, 1)) and torch.equal(cv, v[0].transpose(0, 1))


def test_packed_causal_attention_capture_and_stop():
    lengths = [3, 4]
    q, k, v = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    module = types.SimpleNamespace(layer_idx=1)
    not_captured = PackedPass.build(cu_seqlens(lengths), capture_layers=(0,))
    packed_causal_attention(module, q, k, v, not_captured, 0.5)
    assert not_captured.capture == {}
    stopping = PackedPass.build(cu_seqlens(lengths), capture_layers=(0, 1), stop_after=1)
    with pytest.raises(StopEncoding):
        packed_causal_attention(module, q, k, v, stopping, 0.5)
    assert set(stopping.capture) == {1}


def test_packed_causal_attention_one_long_segment_equals_sdpa():
    q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    packed = PackedPass.build(cu_seqlens([70]))
    out, _ = packed_causal_attention(types.SimpleNamespace(layer_idx=3), q, k, v, packed, 0.25)
    assert_close(out[0], _per_segment_sdpa(q[0], k[0], v[0], [70], 0.25))


# --------------------------------------------------------------------------------------------
# attention_with_lse (merge injection's self-attention)


def _expected_with_lse(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, -math.inf)
    elif mask is not None:
        scores = scores + mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2), torch.logsumexp(scores, -1).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_attention_with_lse_equals_sdpa_and_logsumexp(mask_kind):
    B, Hq, Hk, L, S, D, scale = 2, 4, 2, 5, 9, 8, 0.35
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hk, S, D), torch.randn(B, Hk, S, D)
    if mask_kind == "none":
        mask = None
        causal = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        expected = _expected_with_lse(q, k, v, causal[None, None].expand(B, 1, L, S), scale)
    else:
        allowed = torch.rand(B, 1, L, S) < 0.6
        allowed[..., 0] = True  # every query sees a key
        if mask_kind == "bool":
            mask = allowed
        else:
            mask = torch.where(allowed, torch.randn(B, 1, L, S), torch.tensor(-math.inf))
        expected = _expected_with_lse(q, k, v, mask, scale)
    out, lse = attention_with_lse(q, k, v, mask, scale)
    assert out.shape == (B, L, Hq, D) and lse.shape == (B, L, Hq) and lse.dtype == torch.float32
    assert_close(out, expected[0])
    assert_close(lse, expected[1])


def test_attention_with_lse_fully_masked_row_gives_zero_and_minus_inf():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1] = False
    out, lse = attention_with_lse(q, k, v, mask, 0.5)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1], torch.zeros(2, 4))
    assert bool(torch.isneginf(lse[0, 1]).all()) and bool(torch.isfinite(lse[0, [0, 2]]).all())


def test_keyed_split_noise_depends_on_the_key_alone():
    lens = torch.tensor([64, 100, 37, 64])
    keys = torch.tensor([5, 6, 7, 5])
    start, length = context.tree_node_spans(lens, 3, 0.3, keys)
    # rows 0 and 3 have the same key and length: the same spans; alone, row 1 gets its spans again
    assert torch.equal(start[0], start[3]) and torch.equal(length[0], length[3])
    alone = context.tree_node_spans(lens[1:2], 3, 0.3, keys[1:2])
    assert torch.equal(alone[0][0], start[1]) and torch.equal(alone[1][0], length[1])
    # the noise does move the splits away from the noise-free ones, and keeps every node non-empty
    clean = context.tree_node_spans(lens, 3, 0.0)
    assert not torch.equal(start, clean[0]) and bool((length > 0).all())
    z = context.keyed_normal(torch.arange(20000))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1.0) < 0.05
