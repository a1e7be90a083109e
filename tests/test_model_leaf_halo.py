"""``SharedLLMConfig.leaf_halo_tokens``: the text beside a chunk's retrieved leaves is kept raw (issue 16).

Checked against independent computations: the node spans against a loop over the nodes, the
leaves' rows against the same config without the field, and the halo nodes' keys/values against
one causal pass of the plain transformers model over anchor + lead + node.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_batch_compresses_as_each_alone, tiny_sharedllm
from conftest import token_ids as ids

pytest.importorskip("transformers")

from sharedllm_ops.model.context import PreservedNodes  # noqa: E402
from sharedllm_ops.model.retrieval import halo_nodes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK, M, P, DEPTH = 32, 2, 4, 2  # leaves of 8 tokens, pooled to 4 rows; their sibling at level 1: 16


def wrapped(**cfg):
    return tiny_sharedllm(**{"num_injected_layers": M, "chunk_size": CHUNK, "tree_depth": DEPTH, "tokens_per_node": P,
                             "positions": "distance", "retrieval_node_embedding": "mean", **cfg})


def spans(nodes):
    return list(zip(*(getattr(nodes, f).tolist() for f in ("row", "chunk", "start", "length"))))


def test_halo_nodes_cut_the_neighbours_of_each_leaf_in_its_chunk():
    # (row, chunk, start, length, is a leaf): leaves mid-chunk, at both ends of adjacent chunks, a
    # node between two leaves, a neighbour shorter than the halo, an empty row
    table = [(0, 0, 0, 16, 0), (0, 0, 16, 8, 0), (0, 0, 24, 4, 1), (0, 0, 28, 4, 1),
             (0, 1, 32, 4, 1), (0, 1, 36, 4, 1), (0, 1, 40, 8, 0), (0, 1, 48, 16, 0),
             (2, 0, 0, 2, 0), (2, 0, 2, 4, 1), (2, 0, 6, 5, 0), (2, 0, 11, 4, 1), (2, 0, 15, 9, 0)]
    row, chunk, start, length, leaf = (torch.tensor(c) for c in zip(*table))
    nodes = PreservedNodes(row, chunk, start, length)
    got = halo_nodes(nodes, row[leaf.bool()], start[leaf.bool()], 3)
    expected = []  # written out by a loop over the nodes
    for i, (r, c, s, n, is_leaf) in enumerate(table):
        same = lambda j: 0 <= j < len(table) and table[j][:2] == (r, c)  # noqa: E731
        tail = min(3, n) if not is_leaf and same(i + 1) and table[i + 1][4] else 0
        head = min(3, n - tail) if not is_leaf and same(i - 1) and table[i - 1][4] else 0
        for first, size in ((s, head), (s + head, n - head - tail), (s + n - tail, tail)):
            if size:
                expected.append((r, c, first, size))
    assert spans(got) == expected
    assert expected[:3] == [(0, 0, 0, 16), (0, 0, 16, 5), (0, 0, 21, 3)]  # before the leaves: its last 3
    assert expected[7:9] == [(0, 1, 40, 3), (0, 1, 43, 5)]  # after them: its first 3
    # a neighbour shorter than the halo goes whole; one between two leaves gives its last tokens first
    assert expected[10:15] == [(2, 0, 0, 2), (2, 0, 2, 4), (2, 0, 6, 2), (2, 0, 8, 3), (2, 0, 11, 4)]
    assert spans(halo_nodes(nodes, row[:0], start[:0], 3)) == spans(nodes)  # no leaf, no change


@pytest.mark.parametrize("retrieval", ["query", "right"])
@pytest.mark.parametrize("anchor,lead", [(0, 0), (3, 6)])
def test_the_leaves_neighbours_give_their_nearest_tokens_to_raw_nodes(retrieval, anchor, lead):
    context = ids(3 * CHUNK, seed=1)
    base, halo = wrapped(leaf_halo_tokens=3, retrieval=retrieval, anchor_tokens=anchor, lead_tokens=lead)
    _, plain = wrapped(retrieval=retrieval, anchor_tokens=anchor, lead_tokens=lead)
    query = ids(1, 5, seed=2)
    with torch.no_grad():
        got = halo.compress_context(context[None], query_input_ids=query)
        old = plain.compress_context(context[None], query_input_ids=query)
    old_nodes, new_nodes = spans(old.nodes), spans(got.nodes)
    leaves = [n for n in old_nodes if n[3] == CHUNK // 2**DEPTH]  # the descent's pair in each chunk
    assert len(leaves) == 2 * 3
    covered = lambda nodes: sorted(t for _, _, s, n in nodes for t in range(s, s + n))  # noqa: E731
    assert covered(new_nodes) == covered(old_nodes) == list(range(context.numel()))  # still a tiling
    pieces = [n for n in new_nodes if n not in old_nodes]
    for _, c, s, n in pieces:  # every new node is a halo beside a leaf of its chunk, or what is left
        beside = any(lc == c and (s + n == ls or s == ls + ln) for _, lc, ls, ln in leaves)
        assert (n == 3 and beside) or not beside
    halos = [p for p in pieces if p[3] == 3]
    assert len(halos) >= 3  # each chunk's pair has a neighbour on at least one side
    # the leaves keep their rows; a halo node is kept raw: one causal pass over anchor + lead + node
    rows_new = torch.cumsum(torch.clamp(got.nodes.length, max=P), 0).tolist()
    rows_old = torch.cumsum(torch.clamp(old.nodes.length, max=P), 0).tolist()
    for node in leaves:
        i, j = new_nodes.index(node), old_nodes.index(node)
        for layer in range(M):
            torch.testing.assert_close(got.values[layer][rows_new[i] - P : rows_new[i]],
                                       old.values[layer][rows_old[j] - P : rows_old[j]], atol=0, rtol=0)
    for _, _, s, n in halos:
        i = new_nodes.index((0, s // CHUNK, s, n))
        a = min(anchor, s)
        b = min(lead, s - a)
        tokens = torch.cat([context[:a], context[s - b : s + n]])
        cache = base(input_ids=tokens[None], use_cache=True).past_key_values
        for layer in range(M):
            v = cache.layers[layer].values[0].transpose(0, 1)[a + b :]
            torch.testing.assert_close(got.values[layer][rows_new[i] - n : rows_new[i]], v, atol=2e-5, rtol=1e-4)
        assert got.k_positions[rows_new[i] - n : rows_new[i]].tolist() == list(range(s, s + n))


def test_a_batch_equals_each_sequence_alone():
    context = ids(2, 3 * CHUNK - 5, seed=5)
    _, model = wrapped(leaf_halo_tokens=2, anchor_tokens=2, lead_tokens=4)
    with torch.no_grad():
        assert_batch_compresses_as_each_alone(model, context, torch.tensor([3 * CHUNK - 5, CHUNK + 9]), ids(2, 4, seed=6))
