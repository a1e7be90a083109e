"""Two settings for what isolated nodes lose (issue 16), each against an independent computation with
the plain transformers model:

* ``anchor_tokens``: a node that does not start its context is encoded behind the context's first
  tokens, whose rows are dropped: its keys/values are those of one causal pass over anchor + node;
* ``retrieval_node_embedding="mean"`` / ``retrieval_query_tokens``: retrieval embeds a node by the mean
  of its tokens' states after one layer, and the query by the mean of its last tokens' states.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM  # noqa: E402
from sharedllm_ops.model.context import chunk_layout, context_tokens  # noqa: E402
from sharedllm_ops.model.pretrained import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK, M = 32, 2


def ids(*shape, seed):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def wrapped(**cfg):
    base = tiny_model("llama", seed=0)
    cfg = {"num_injected_layers": M, "chunk_size": CHUNK, "tree_depth": 0, "tokens_per_node": None, **cfg}
    return base, SharedLLMForCausalLM.from_base(base, SharedLLMConfig(**cfg)).eval()


@torch.no_grad()
def causal_kv(base, tokens, positions):
    """Per layer ``(k, v)`` ``[T, Hk, D]`` of one causal pass of the plain model over ``tokens`` at ``positions``
    (keys rotated at those positions, as the model caches them)."""
    cache = base(input_ids=tokens[None], position_ids=positions[None], use_cache=True).past_key_values
    return [(cache.layers[i].keys[0].transpose(0, 1), cache.layers[i].values[0].transpose(0, 1)) for i in range(M)]


@pytest.mark.parametrize("positions", ["true", "chunk"])
@pytest.mark.parametrize("anchor,lead", [(CHUNK, 0), (8, 0), (8, 5), (0, 5), (4, CHUNK)])
def test_a_node_behind_an_anchor_has_the_keys_of_one_pass_over_anchor_and_node(positions, anchor, lead):
    context = ids(2 * CHUNK + 11, seed=1)  # two full chunks and a short third, all of them nodes (no tree)
    base, model = wrapped(positions=positions, anchor_tokens=anchor, lead_tokens=lead)
    with torch.no_grad():
        ctx = model.compress_context(context[None])
    rows = []
    for start in (0, CHUNK, 2 * CHUNK):
        node = context[start : start + CHUNK]
        a = min(anchor, start)  # the first chunk is the context's start: no anchor
        n = min(lead, start - a)  # the tokens just before the node that the anchor does not hold
        tokens = torch.cat([context[:a], context[start - n : start], node])
        if positions == "true":  # the anchor and the lead at their own positions, the node at its place in the text
            pos = torch.cat([torch.arange(a), torch.arange(start - n, start + node.numel())])
        else:  # nodes are encoded from position 0: the anchor first, then the lead, then the node
            pos = torch.arange(tokens.numel())
        rows.append([(k[a + n:], v[a + n:]) for k, v in causal_kv(base, tokens, pos)])
    for layer in range(M):
        for kind in (0, 1):
            expected = torch.cat([r[layer][kind] for r in rows])
            torch.testing.assert_close(ctx.keys[layer] if kind == 0 else ctx.values[layer], expected,
                                       atol=2e-5, rtol=1e-4)
    if anchor + lead >= CHUNK and positions == "true":  # the whole first chunk as anchor: one causal pass over two chunks
        whole = causal_kv(base, context[: 2 * CHUNK], torch.arange(2 * CHUNK))
        torch.testing.assert_close(ctx.keys[1][: 2 * CHUNK], whole[1][0], atol=2e-5, rtol=1e-4)


def test_a_lead_in_a_batch_equals_each_sequence_alone():
    """Lead and anchor indexing per sequence (different lengths, a tree, distance positions)."""
    context = ids(2, 3 * CHUNK, seed=6)
    lengths = torch.tensor([3 * CHUNK, 2 * CHUNK - 7])
    _, model = wrapped(tree_depth=2, tokens_per_node=4, positions="distance", anchor_tokens=3, lead_tokens=6)
    with torch.no_grad():
        both = model.compress_context(context, lengths, query_input_ids=context[:, :5])
        alone = [model.compress_context(context[b : b + 1, : int(lengths[b])], query_input_ids=context[b : b + 1, :5])
                 for b in range(2)]
    cu = both.cu_seqlens.tolist()
    for b in range(2):
        for layer in range(M):
            torch.testing.assert_close(both.keys[layer][cu[b] : cu[b + 1]], alone[b].keys[layer], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(both.values[layer][cu[b] : cu[b + 1]], alone[b].values[layer], atol=2e-5, rtol=1e-4)
        assert torch.equal(both.k_positions[cu[b] : cu[b + 1]], alone[b].k_positions)


def test_the_anchor_changes_the_later_nodes_only_and_keeps_every_row():
    context = ids(3, 3 * CHUNK, seed=2)
    lengths = torch.tensor([3 * CHUNK, 2 * CHUNK - 5, 0])
    kw = dict(tree_depth=2, tokens_per_node=4, positions="distance")
    _, plain = wrapped(**kw)
    _, anchored = wrapped(**kw, anchor_tokens=6)
    with torch.no_grad():
        a = plain.compress_context(context, lengths, query_input_ids=context[:, :5])
        b = anchored.compress_context(context, lengths, query_input_ids=context[:, :5])
    for name in ("cu_seqlens", "k_positions", "num_chunks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("row", "chunk", "start", "length"):
        assert torch.equal(getattr(a.nodes, name), getattr(b.nodes, name)), name
    first = a.nodes.start == 0  # nodes that start their context have no anchor: the same rows
    rows_of_first = torch.repeat_interleave(first, torch.minimum(a.nodes.length, torch.tensor(4)))
    assert rows_of_first.any() and (~rows_of_first).any()
    # layer 0's keys depend on their own token only once "distance" undoes their rotation, so they agree
    # everywhere only if the anchored rows were un-rotated at the positions they were encoded at
    torch.testing.assert_close(b.keys[0], a.keys[0], atol=2e-5, rtol=1e-5)
    # layer 1's keys see what came before them: the anchor changes them, except in the nodes without one
    torch.testing.assert_close(b.keys[1][rows_of_first], a.keys[1][rows_of_first], atol=0, rtol=0)
    assert (b.keys[1][~rows_of_first] - a.keys[1][~rows_of_first]).abs().amax(-1).amax(-1).min() > 1e-4


@pytest.mark.parametrize("setting,message", [
    (dict(anchor_tokens=4), "anchor_tokens > 0 or lead_tokens"), (dict(lead_tokens=4), "anchor_tokens > 0 or lead_tokens"),
    (dict(raw_recent_chunks=1), "raw_recent_chunks"),  # both read where the context ends
    (dict(retrieved_chunks=0), "retrieved_chunks"), (dict(retrieved_chunks=1), "retrieved_chunks"),
])
def test_growing_a_context_refuses_an_anchor_and_chunks_chosen_by_its_end(setting, message):
    _, model = wrapped(**setting)
    with torch.no_grad():
        ctx = model.compress_context(ids(1, CHUNK + 3, seed=3))
        with pytest.raises(ValueError, match=message):
            model.compress_context(ids(1, 5, seed=4), into=ctx)


@torch.no_grad()
def normed_layer0_states(base, tokens):
    """``[T, hidden]``: the plain model's states after its first layer, normed by its final norm."""
    hidden = base(input_ids=tokens[None], output_hidden_states=True).hidden_states[1][0]
    return base.model.norm(hidden)


def test_mean_node_embeddings_and_a_query_of_its_last_tokens():
    base, model = wrapped(tree_depth=2, tokens_per_node=4, retrieval_node_embedding="mean", retrieval_query_tokens=3)
    compressor = model._compressor
    context = ids(2, 2 * CHUNK, seed=5)
    lengths = torch.tensor([2 * CHUNK, CHUNK + 9])
    with torch.no_grad():
        tokens, _ = context_tokens(context, lengths, CHUNK)
        chunks = chunk_layout(tokens.lengths, CHUNK)
        splittable, start, length = compressor.trees(chunks, None, False)
        which = splittable.nonzero().squeeze(1)
        emb = compressor.node_embeddings(tokens, chunks.row[which], chunks.start[which][:, None] + start, length)
    for t, c in enumerate(which.tolist()):
        row, first = int(chunks.row[c]), int(chunks.start[c])
        for j in range(start.shape[1]):
            s, n = first + int(start[t, j]), int(length[t, j])
            expected = normed_layer0_states(base, context[row, s : s + n]).mean(0)  # encoded alone, from position 0
            torch.testing.assert_close(emb[t, j], expected, atol=2e-5, rtol=1e-4)
    query = ids(2, 7, seed=6)
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0]])  # the second query has two tokens: both are used
    with torch.no_grad():
        got = compressor.retrieval_query(query, mask, lengths)
    torch.testing.assert_close(got[0], normed_layer0_states(base, query[0])[-3:].mean(0), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], normed_layer0_states(base, query[1, :2]).mean(0), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("field,value", [("anchor_tokens", -1), ("anchor_tokens", True), ("lead_tokens", -2),
                                         ("retrieval_node_embedding", "max"), ("retrieval_query_tokens", 0),
                                         ("raw_recent_chunks", -1), ("raw_recent_chunks", True), ("raw_recent_chunks", 1.5),
                                         ("retrieved_chunks", -1), ("retrieved_chunks", True), ("retrieved_chunks", 2.0),
                                         ("leaf_halo_tokens", -1), ("leaf_halo_tokens", True)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SharedLLMConfig(**{field: value})


@pytest.mark.parametrize("settings, message", [
    (dict(anchor_tokens=4, drop_node_sinks=True), "drop_node_sinks=False"),
    (dict(lead_tokens=4, drop_node_sinks=True), "lead_tokens > 0 replaces drop_node_sinks"),
    (dict(exact_distance=True, positions="true"), "exact_distance needs positions='distance'"),
    (dict(leaf_halo_tokens=8, tokens_per_node=4), r"at most tokens_per_node \(4\) to stay raw, got 8"),
    (dict(leaf_halo_tokens=2, tree_depth=0), "leaf_halo_tokens needs a tree"),
    (dict(leaf_halo_tokens=2, tokens_per_node=None), "leaf_halo_tokens needs a tree .* and pooling"),
])
def test_settings_that_do_not_combine_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SharedLLMConfig(**settings)
