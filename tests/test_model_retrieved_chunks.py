"""``SharedLLMConfig.retrieved_chunks``: only the older chunks most like the query reach the decoder (issue 16).

Checked against independent computations: the choice against a loop, the chunk scores against the
plain transformers model's states, and the kept chunks' rows against the same config without the
field (every chunk's rows depend on that chunk alone).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_batch_compresses_as_each_alone, tiny_sharedllm
from conftest import token_ids as ids
import torch.nn.functional as F

pytest.importorskip("transformers")

from sharedllm_ops.model.context import chunk_layout, context_tokens  # noqa: E402
from sharedllm_ops.model.retrieval import top_chunks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK, M, P, DEPTH = 32, 2, 4, 2


def wrapped(**cfg):
    return tiny_sharedllm(**{"num_injected_layers": M, "chunk_size": CHUNK, "tree_depth": DEPTH, "tokens_per_node": P,
                             "positions": "distance", "retrieval_node_embedding": "mean", **cfg})


def test_top_chunks_keeps_the_best_candidates_of_each_sequence():
    g = torch.Generator().manual_seed(0)
    row = torch.tensor([0] * 6 + [1] * 3 + [3] * 4)
    score = torch.randint(0, 4, (row.numel(),), generator=g).float()  # ties on purpose
    candidate = torch.rand(row.numel(), generator=g) > 0.3
    for k in (0, 1, 2, 5):
        expected = ~candidate.clone()
        for r in row.unique().tolist():
            mine = [i for i in range(row.numel()) if row[i] == r and candidate[i]]
            best = sorted(mine, key=lambda i: (-score[i].item(), i))[:k]  # the earlier chunk on a tie
            expected[best] = True
        assert torch.equal(top_chunks(score, row, candidate, k), expected), k


@torch.no_grad()
def normed_layer0_states(base, tokens):
    hidden = base(input_ids=tokens[None], output_hidden_states=True).hidden_states[1][0]
    return base.model.norm(hidden)


def test_chunk_scores_are_the_best_centred_leaf_cosine():
    base, model = wrapped(retrieved_chunks=1)
    compressor = model._compressor
    context = ids(2, 3 * CHUNK, seed=1)
    lengths = torch.tensor([3 * CHUNK, 2 * CHUNK + 5])
    query = torch.randn(2, base.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens, _ = context_tokens(context, lengths, CHUNK)
        chunks = chunk_layout(tokens.lengths, CHUNK)
        which = torch.tensor([True, False, True, True, True, True])
        assert chunks.row.numel() == which.numel()  # 3 chunks each, the last of the second 5 tokens
        got = compressor.chunk_scores(tokens, chunks, which, query, None)
        in_groups = compressor.chunk_scores(tokens, chunks, which, query, CHUNK + 1)  # one chunk per group
    torch.testing.assert_close(in_groups, got, atol=1e-6, rtol=0)
    width = CHUNK // 2**DEPTH
    leaves = {}  # chunk -> its leaves' mean layer-0 states, each leaf encoded alone from position 0
    for c in which.nonzero().flatten().tolist():
        row, first, n = int(chunks.row[c]), int(chunks.start[c]), int(chunks.length[c])
        leaves[c] = [normed_layer0_states(base, context[row, s : min(s + width, first + n)]).mean(0)
                     for s in range(first, first + n, width)]
    for c in range(chunks.row.numel()):
        if not which[c]:
            assert got[c] == float("-inf")
            continue
        row = int(chunks.row[c])
        mean = torch.stack([x for d, xs in leaves.items() if int(chunks.row[d]) == row for x in xs]).mean(0)
        best = max(F.cosine_similarity(leaf - mean, query[row] - mean, dim=0).item() for leaf in leaves[c])
        assert got[c].item() == pytest.approx(best, abs=1e-5), c


def rows_of(ctx, chunk_index):
    """The compressed rows (one layer's keys and values, and k_positions) of sequence 0's chunk ``chunk_index``."""
    rows = torch.repeat_interleave(ctx.nodes.chunk, torch.clamp(ctx.nodes.length, max=P)) == chunk_index
    return [ctx.keys[0][rows], ctx.values[0][rows], ctx.k_positions[rows]]


@pytest.mark.parametrize("raw_recent", [0, 1])
@pytest.mark.parametrize("with_query", [False, True])
def test_only_the_chosen_chunks_remain_each_as_without_the_choice(raw_recent, with_query):
    context = ids(5 * CHUNK - 3, seed=3)  # four full chunks and a short fifth
    base, chosen = wrapped(retrieved_chunks=2, raw_recent_chunks=raw_recent)
    _, plain = wrapped(raw_recent_chunks=raw_recent)
    query = ids(1, 6, seed=4) if with_query else None
    with torch.no_grad():
        got = chosen.compress_context(context[None], query_input_ids=query)
        every = plain.compress_context(context[None], query_input_ids=query)
    older = list(range(1, 5 - raw_recent))  # the first chunk is no candidate: it always stays
    if with_query:  # the two older chunks of the best leaves, by the compressor's own scores
        tokens, _ = context_tokens(context[None], torch.tensor([context.numel()]), CHUNK)
        chunks = chunk_layout(tokens.lengths, CHUNK)
        q = chosen._compressor.retrieval_query(query, None, tokens.total_lengths)
        candidates = (torch.arange(5) >= 1) & (torch.arange(5) < 5 - raw_recent)
        scores = chosen._compressor.chunk_scores(tokens, chunks, candidates, q, None)
        kept = sorted(sorted(older, key=lambda c: (-scores[c].item(), c))[:2])
    else:  # without a query, the latest ones
        kept = older[-2:]
    kept = [0] + kept + list(range(5 - raw_recent, 5))
    assert sorted(set(got.nodes.chunk.tolist())) == kept
    assert got.stats["encoded_chunks"] == len(kept) and got.stats["chunks"] == 5
    assert got.stats["scored_chunks"] == (len(older) if with_query else 0)
    assert int(got.num_chunks[0]) == 5  # the context still counts every chunk
    for c in kept:
        for a, b in zip(rows_of(got, c), rows_of(every, c)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_sequence_with_an_empty_query_keeps_its_latest_chunks():
    context = ids(2, 4 * CHUNK, seed=11)
    _, model = wrapped(retrieved_chunks=1)
    query, mask = ids(2, 5, seed=12), torch.tensor([[1] * 5, [0] * 5])
    with torch.no_grad():
        ctx = model.compress_context(context, query_input_ids=query, query_attention_mask=mask)
    second = ctx.nodes.chunk[ctx.nodes.row == 1]
    assert sorted(set(second.tolist())) == [0, 3]  # the first chunk, and the latest older one
    assert int((ctx.nodes.row == 0).sum()) and ctx.stats["scored_chunks"] == 6


def test_enough_chunks_to_keep_changes_nothing():
    context = ids(2, 3 * CHUNK, seed=5)
    lengths = torch.tensor([3 * CHUNK, CHUNK + 4])
    _, chosen = wrapped(retrieved_chunks=3)
    _, plain = wrapped()
    query = ids(2, 5, seed=6)
    with torch.no_grad():
        a = chosen.compress_context(context, lengths, query_input_ids=query)
        b = plain.compress_context(context, lengths, query_input_ids=query)
    assert torch.equal(a.cu_seqlens, b.cu_seqlens) and torch.equal(a.k_positions, b.k_positions)
    for layer in range(M):
        assert torch.equal(a.keys[layer], b.keys[layer]) and torch.equal(a.values[layer], b.values[layer])
    assert a.stats["embedded_tokens"] == b.stats["embedded_tokens"] and a.stats["scored_chunks"] == 0


def test_a_batch_equals_each_sequence_alone():
    context = ids(2, 4 * CHUNK, seed=7)
    lengths = torch.tensor([4 * CHUNK, 3 * CHUNK - 6])
    _, model = wrapped(retrieved_chunks=1, raw_recent_chunks=1, lead_tokens=3, drop_node_sinks=False)
    query = ids(2, 5, seed=8)
    assert_batch_compresses_as_each_alone(model, context, lengths, query)
