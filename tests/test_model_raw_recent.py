"""``SharedLLMConfig.raw_recent_chunks``: the last chunks of every context are kept uncompressed (issue 16).

Checked against independent computations: the node spans against a loop over the chunks, the
kept chunks' keys/values against one causal pass of the plain transformers model over anchor +
lead + node, and the older chunks against the same config without the field.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_batch_compresses_as_each_alone, tiny_sharedllm
from conftest import token_ids as ids

pytest.importorskip("transformers")

from sharedllm_ops.model.context import PreservedNodes, split_nodes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK, M, P = 32, 2, 4


def wrapped(**cfg):
    return tiny_sharedllm(**{"num_injected_layers": M, "chunk_size": CHUNK, "tree_depth": 2, "tokens_per_node": P,
                             "positions": "distance", **cfg})


@torch.no_grad()
def causal_kv(base, tokens):
    """Per layer ``(k, v)`` ``[T, Hk, D]`` of one causal pass of the plain model over ``tokens`` from position 0."""
    cache = base(input_ids=tokens[None], use_cache=True).past_key_values
    return [(cache.layers[i].keys[0].transpose(0, 1), cache.layers[i].values[0].transpose(0, 1)) for i in range(M)]


def test_split_nodes_cuts_the_chosen_nodes_into_pieces_and_keeps_the_tiling():
    nodes = PreservedNodes(row=torch.tensor([0, 0, 0, 1, 1]), chunk=torch.tensor([0, 1, 1, 0, 0]),
                           start=torch.tensor([0, 10, 19, 0, 7]), length=torch.tensor([10, 9, 0, 7, 5]))
    which = torch.tensor([False, True, True, True, False])
    got = split_nodes(nodes, which, 4)
    expected = []  # (row, chunk, start, length), written out by a loop over the nodes
    for i in range(5):
        r, c, s, n = (int(getattr(nodes, f)[i]) for f in ("row", "chunk", "start", "length"))
        if not which[i]:
            expected.append((r, c, s, n))
            continue
        for first in range(s, s + n, 4):
            expected.append((r, c, first, min(4, s + n - first)))
    assert list(zip(*(getattr(got, f).tolist() for f in ("row", "chunk", "start", "length")))) == expected
    assert expected[1:4] == [(0, 1, 10, 4), (0, 1, 14, 4), (0, 1, 18, 1)]  # the empty node leaves no piece


@pytest.mark.parametrize("anchor,lead", [(0, 0), (3, 6)])
def test_the_recent_chunk_is_kept_raw_and_the_older_ones_as_before(anchor, lead):
    context = ids(3 * CHUNK - 5, seed=1)  # two full chunks and a short third
    sinks = dict(drop_node_sinks=False) if anchor or lead else {}
    base, raw = wrapped(raw_recent_chunks=1, anchor_tokens=anchor, lead_tokens=lead, **sinks)
    _, plain = wrapped(anchor_tokens=anchor, lead_tokens=lead, **sinks)
    query = ids(1, 5, seed=2)
    with torch.no_grad():
        got = raw.compress_context(context[None], query_input_ids=query)
        old = plain.compress_context(context[None], query_input_ids=query)
    last = 2 * CHUNK  # the recent chunk: 27 tokens in nodes of P, every row kept
    recent = got.nodes.start >= last
    assert got.nodes.start[recent].tolist() == list(range(last, context.numel(), P))
    assert int(got.nodes.length[recent].sum()) == context.numel() - last and int(got.nodes.length[recent].max()) <= P
    older_rows = int(old.cu_seqlens[1]) - int(torch.clamp(old.nodes.length[old.nodes.start >= last], max=P).sum())
    assert int(got.cu_seqlens[1]) == older_rows + context.numel() - last
    for name in ("start", "length"):  # the older chunks keep their trees and retrieval
        assert torch.equal(getattr(got.nodes, name)[~recent], getattr(old.nodes, name)[old.nodes.start < last])
    for layer in range(M):
        torch.testing.assert_close(got.keys[layer][:older_rows], old.keys[layer][:older_rows], atol=0, rtol=0)
        torch.testing.assert_close(got.values[layer][:older_rows], old.values[layer][:older_rows], atol=0, rtol=0)
    # the recent chunk is encoded whole, behind its anchor and lead: its rows are those of one
    # causal pass over anchor + lead + chunk (values; the keys are un-rotated like every other row)
    a, n = min(anchor, last), min(lead, last - min(anchor, last))
    tokens = torch.cat([context[:a], context[last - n : last], context[last:]])
    for layer, (_, v) in enumerate(causal_kv(base, tokens)):
        torch.testing.assert_close(got.values[layer][older_rows:], v[a + n :], atol=2e-5, rtol=1e-4)
    assert torch.equal(got.k_positions[older_rows:], torch.arange(last, context.numel(), dtype=torch.int32))


@pytest.mark.parametrize("exact", [False, True])
def test_recent_rows_sit_at_their_token_distance_and_older_rows_beyond_them(exact):
    context = ids(2, 3 * CHUNK - 5, seed=9)
    lengths = torch.tensor([3 * CHUNK - 5, CHUNK + 6])
    _, model = wrapped(raw_recent_chunks=1, distance_scale=4, max_distance=5, exact_distance=exact)
    with torch.no_grad():
        ctx = model.compress_context(context, lengths, query_input_ids=ids(2, 3, seed=10))
    got = model._state.distance_positions(ctx).long()
    far = model._state.distance_table()[0] - 1
    per_position = 4 if exact else 1  # rows of the rotary table per position
    assert far == (CHUNK + 5) * per_position
    cu = ctx.cu_seqlens.tolist()
    for b in range(2):
        end, recent = int(lengths[b]), int(lengths[b]) - (int(ctx.num_chunks[b]) - 1) * CHUNK
        for row in range(cu[b], cu[b + 1]):  # written out row by row, in positions, then table rows
            d = end - int(ctx.k_positions[row])
            if d <= recent:
                position = d
            else:
                beyond = (d - recent) / 4 if exact else (d - recent) // 4
                position = recent + min(beyond, 5)
            assert far - got[row] == round(position * per_position), (b, row, d)


def test_every_chunk_recent_means_nothing_is_compressed():
    context = ids(2 * CHUNK + 3, seed=3)
    _, raw = wrapped(raw_recent_chunks=5)
    with torch.no_grad():
        ctx = raw.compress_context(context[None], query_input_ids=ids(1, 4, seed=4))
    assert int(ctx.cu_seqlens[-1]) == context.numel()
    assert ctx.stats["embedded_nodes"] == 0  # no tree, so no retrieval
    assert torch.equal(ctx.k_positions, torch.arange(context.numel(), dtype=torch.int32))


def test_a_batch_equals_each_sequence_alone():
    """The recent chunks are counted per sequence (different lengths and chunk counts)."""
    context = ids(2, 3 * CHUNK, seed=5)
    lengths = torch.tensor([3 * CHUNK, CHUNK + 7])
    _, model = wrapped(raw_recent_chunks=1, lead_tokens=5, drop_node_sinks=False)
    query = ids(2, 5, seed=6)
    assert_batch_compresses_as_each_alone(model, context, lengths, query)
