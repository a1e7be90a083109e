"""Compression in groups, retrieval that embeds only what the descent reads, and growing a context
(``compress_context(max_pass_tokens=, into=)``, ``sharedllm_ops.model.compression``/``retrieval``/``compressed``)."""

import json
import os

import pytest
import torch

import sharedllm_ops as so
from sharedllm_ops import _ext, reference

pytest.importorskip("transformers")

from sharedllm_ops.model import CompressedContext, SharedLLMConfig, SharedLLMForCausalLM  # noqa: E402
from sharedllm_ops.model.config import CONFIG_NAME  # noqa: E402
from sharedllm_ops.model.context import chunk_groups, chunk_layout, context_tokens  # noqa: E402
from sharedllm_ops.model.pretrained import tiny_model  # noqa: E402
from sharedllm_ops.model.retrieval import descend  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK, DEPTH = 32, 3
# rows: four full chunks and a short one (22 tokens); none; two and an 11-token one; one chunk
# shorter than 2**DEPTH (no tree)
LENGTHS = [150, 0, 75, 5]
ONE_PASS = 10**9


def model_with(**cfg) -> SharedLLMForCausalLM:
    cfg = {"num_injected_layers": 2, "chunk_size": CHUNK, "tree_depth": DEPTH, "tokens_per_node": 4, **cfg}
    return SharedLLMForCausalLM.from_base(tiny_model("llama", seed=0), SharedLLMConfig(**cfg)).eval()


def tokens(*shape, seed):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


CONTEXT, QUERY, DECODER = tokens(4, 150, seed=1), tokens(4, 6, seed=2), tokens(4, 5, seed=3)
SEEDS = torch.tensor([11, 12, 13, 14])


def assert_same_context(got: CompressedContext, expected: CompressedContext, exact: bool = True):
    """Equal rows, positions, boundaries, counts and nodes; keys/values bitwise (or to 1e-6)."""
    for name in ("cu_seqlens", "num_chunks", "context_lengths", "tail_input_ids"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.max_chunks == expected.max_chunks
    assert (got.k_positions is None) == (expected.k_positions is None)
    if expected.k_positions is not None:
        assert torch.equal(got.k_positions, expected.k_positions), "k_positions"
    assert (got.row_tokens is None) == (expected.row_tokens is None)
    if expected.row_tokens is not None:
        assert torch.equal(got.row_tokens, expected.row_tokens), "row_tokens"
    for name, value in vars(expected.nodes).items():
        assert torch.equal(getattr(got.nodes, name), value), f"nodes.{name}"
    for kind in ("keys", "values"):
        for layer, (a, b) in enumerate(zip(getattr(got, kind), getattr(expected, kind))):
            if exact:
                assert torch.equal(a, b), f"{kind}[{layer}] differ by {(a - b).abs().max():.3g}"
            else:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"{kind}[{layer}]")


# --------------------------------------------------------------------------------------------
# groups


def test_chunk_groups_are_greedy_runs_and_a_long_chunk_is_alone():
    lengths = torch.tensor([32, 32, 22, 32, 11, 5])
    assert chunk_groups(lengths, 64) == [(0, 2), (2, 4), (4, 6)]
    assert chunk_groups(lengths, 60) == [(0, 1), (1, 3), (3, 6)]
    assert chunk_groups(lengths, 20) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6)]  # longer chunks are alone
    assert chunk_groups(lengths, 10**6) == chunk_groups(lengths, None) == [(0, 6)]
    assert chunk_groups(torch.tensor([], dtype=torch.long), 8) == [(0, 0)]


@pytest.mark.parametrize("positions", ["chunk", "true", "distance"])
@pytest.mark.parametrize("retrieval", ["query", "right"])
@pytest.mark.parametrize("tokens_per_node", [None, 4])
@pytest.mark.parametrize("drop_node_sinks", [False, True])
def test_groups_equal_one_pass_bitwise(positions, retrieval, tokens_per_node, drop_node_sinks):
    model = model_with(positions=positions, retrieval=retrieval, tokens_per_node=tokens_per_node,
                       drop_node_sinks=drop_node_sinks,
                       max_pass_tokens=None)
    with torch.no_grad():
        one_pass = model.compress_context(CONTEXT, LENGTHS, QUERY)
        assert one_pass.stats["passes"] == 1
        # smaller than a chunk, one chunk, a few chunks (chunks [32, 32 | 32, 32 | 22, 32 | 32, 11, 5])
        for limit, passes in ((20, 8), (CHUNK, 8), (70, 4)):  # 11 and 5 tokens share a group
            grouped = model.compress_context(CONTEXT, LENGTHS, QUERY, max_pass_tokens=limit)
            assert grouped.stats["passes"] == passes
            assert grouped.stats["peak_group_tokens"] == max(limit // CHUNK * CHUNK, CHUNK)
            assert_same_context(grouped, one_pass)
            for name in ("context_tokens", "compressed_tokens", "chunks", "nodes", "embedded_nodes", "embedded_tokens"):
                assert grouped.stats[name] == one_pass.stats[name], name


def test_every_pass_reads_at_most_max_pass_tokens():
    """The retrieval passes and the lower pass of a group encode at most the limit's tokens (or one
    chunk's, when the limit is smaller): nothing is encoded for the whole context at once."""
    model = model_with()
    passes = []
    encode_packed = model._compressor.encode_packed

    def spy(token_ids, *args, **kwargs):
        passes.append(token_ids.numel())
        return encode_packed(token_ids, *args, **kwargs)

    model._compressor.encode_packed = spy
    with torch.no_grad():
        model.compress_context(CONTEXT, LENGTHS, QUERY, max_pass_tokens=70)
        assert max(passes) == 64 and len(passes) > 5
        passes.clear()
        model.compress_context(CONTEXT, LENGTHS, QUERY, max_pass_tokens=ONE_PASS)
        assert max(passes) == sum(LENGTHS)  # the lower pass over every token at once


@pytest.mark.parametrize("seeded", [True, False])
def test_groups_equal_one_pass_in_training_with_split_noise(seeded):
    model = model_with(split_noise_std=0.3).train()
    seeds = SEEDS if seeded else None

    def compress(limit):
        torch.manual_seed(7)  # the global draws (no seeds) are made for all chunks up front
        return model.compress_context(CONTEXT, LENGTHS, QUERY, split_noise_seeds=seeds, max_pass_tokens=limit)

    with torch.no_grad():
        one_pass = compress(ONE_PASS)
        noiseless = model.eval().compress_context(CONTEXT, LENGTHS, QUERY)
        model.train()
        assert not torch.equal(one_pass.nodes.length, noiseless.nodes.length), "the split noise moved nothing"
        for limit in (20, 70):
            assert_same_context(compress(limit), one_pass)


def _gradients(model, limit):
    model.zero_grad()
    ctx = model.compress_context(CONTEXT, LENGTHS, QUERY, split_noise_seeds=SEEDS, max_pass_tokens=limit)
    logits = model(DECODER, compressed_context=ctx).logits
    (logits.float() ** 2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("positions", ["chunk", "true", "distance"])
def test_groups_give_the_gradients_of_one_pass(positions):
    """Copied lower layers (share_lower=False) train through the compressed keys/values; with
    split noise on, as in training."""
    model = model_with(share_lower=False, split_noise_std=0.2, positions=positions, cross_init="random").train()
    model.set_trainable("cross")
    expected = _gradients(model, ONE_PASS)
    got = _gradients(model, 20)
    lower = [name for name in expected if name.startswith("lower_layers.")]
    # layer 0 whole, layer 1 up to its keys/values (the rest of it never runs in the lower model)
    assert {"lower_layers.0.mlp.up_proj.weight", "lower_layers.1.self_attn.v_proj.weight"} <= set(lower)
    assert all(float(expected[name].abs().max()) > 0 for name in lower), "a lower layer got no gradient"
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------
# retrieval embeds only the nodes the descent compares


def _random_table(n, depth, dim, seed):
    """Random node embeddings ``[n, T, dim]`` where every other tree has equal siblings (ties)."""
    T = reference.num_tree_nodes(depth, 2)
    table = torch.randn(n, T, dim, generator=torch.Generator().manual_seed(seed))
    table[::2, 1::2] = table[::2, 0::2]
    return table


def _backends():
    return ["reference"] + (["cpp"] if _ext.loaded else [])


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("backend", _backends())
def test_descend_equals_tree_topk_on_the_full_table(depth, backend):
    n, dim = 40, 8
    table = _random_table(n, depth, dim, seed=depth)
    query = torch.randn(n, dim, generator=torch.Generator().manual_seed(100 + depth))
    query[:4] = 0.0  # zero queries: every score ties
    asked = []

    def embed(ids):
        asked.append(ids)
        return table[torch.arange(n)[:, None], ids]

    node_ids, embedded = descend(query, embed, depth, backend)
    expected, _ = so.tree_topk(query, table[:, None], depth, backend=backend)
    assert torch.equal(node_ids, expected[:, 0].long())
    assert len(asked) == depth - 1 and embedded.shape == (n, 2 * (depth - 1))
    for level, ids in enumerate(asked, start=1):  # siblings of the level, children of the path
        assert bool((ids[:, 1] == ids[:, 0] + 1).all()) and bool((ids[:, 0] % 2 == 0).all())
        assert bool((ids >= 2**level - 2).all()) and bool((ids < 2 ** (level + 1) - 2).all())


@pytest.mark.parametrize("backend", _backends())
def test_tree_topk_never_reads_leaves_or_the_subtrees_of_preserved_nodes(backend):
    """The reason :func:`descend` may leave those nodes out: changing their embeddings arbitrarily
    does not change the selection."""
    depth, n, dim = 4, 60, 8
    table = _random_table(n, depth, dim, seed=9)
    query = torch.randn(n, dim, generator=torch.Generator().manual_seed(10))
    _, read = descend(query, lambda ids: table[torch.arange(n)[:, None], ids], depth, backend)
    unread = torch.ones(n, table.shape[1], dtype=torch.bool)
    unread[torch.arange(n)[:, None], read] = False
    assert bool(unread[:, -(2**depth):].all()), "a leaf was read"
    scrambled = torch.where(unread[..., None], torch.randn(table.shape, generator=torch.Generator().manual_seed(11)),
                            table)
    expected, _ = so.tree_topk(query, table[:, None], depth, backend=backend)
    got, _ = so.tree_topk(query, scrambled[:, None], depth, backend=backend)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("positions", ["chunk", "true", "distance"])
def test_model_retrieval_equals_tree_topk_over_every_node(positions):
    """The model's nodes equal tree_topk's choice over the embeddings of all 14 nodes of each tree
    (the retrieval before nodes were left out), computed by the same node encoder."""
    model = model_with(positions=positions)
    compressor = model._compressor
    with torch.no_grad():
        ctx = model.compress_context(CONTEXT, LENGTHS, QUERY)
        tokens, _ = context_tokens(CONTEXT, torch.tensor(LENGTHS), CHUNK)
        chunks = chunk_layout(tokens.lengths, CHUNK)
        splittable, start, length = compressor.trees(chunks, None, False)
        which = splittable.nonzero().squeeze(1)
        emb = compressor.node_embeddings(tokens, chunks.row[which], chunks.start[which][:, None] + start, length)
        query = compressor.retrieval_query(QUERY, None, tokens.total_lengths)
        ids, _ = so.tree_topk(query[chunks.row[which]], emb[:, None], DEPTH)
    ids = ids[:, 0].long()
    assert bool((ids != torch.tensor([0, 4, 12, 13])).any()), "every chunk chose the right descent"
    expected, tree = [], 0
    for c in range(chunks.row.numel()):
        row, index, first = int(chunks.row[c]), int(chunks.index[c]), int(chunks.start[c])
        if splittable[c]:
            spans = zip(start[tree, ids[tree]].tolist(), length[tree, ids[tree]].tolist())
            expected += [(row, index, first + s, n) for s, n in spans]
            tree += 1
        else:
            expected.append((row, index, first, int(chunks.length[c])))
    nodes = ctx.nodes
    assert list(zip(nodes.row.tolist(), nodes.chunk.tolist(), nodes.start.tolist(), nodes.length.tolist())) == expected


def test_retrieval_embeds_four_nodes_and_one_and_a_half_chunks_per_chunk():
    """Depth 3: the two level-1 children (the whole chunk) and two level-2 nodes (half of it),
    instead of all 14 nodes and three chunks of tokens."""
    chunk = 64
    model = model_with(chunk_size=chunk)
    with torch.no_grad():
        ctx = model.compress_context(tokens(1, 4 * chunk, seed=5), query_input_ids=QUERY[:1])
    assert ctx.stats["embedded_nodes"] == 4 * 4
    assert ctx.stats["embedded_tokens"] == 4 * (chunk + chunk // 2)
    right = model_with(chunk_size=chunk, retrieval="right")
    with torch.no_grad():
        assert right.compress_context(tokens(1, 4 * chunk, seed=5)).stats["embedded_nodes"] == 0


# --------------------------------------------------------------------------------------------
# growing a context


def _grow(model, cuts, query=QUERY, seeds=None):
    """Compresses CONTEXT (LENGTHS) in pieces between ``cuts``, each piece into the previous result."""
    ctx = None
    lengths = torch.tensor(LENGTHS)
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece_lengths = (lengths - a).clamp(0, b - a)
        ctx = model.compress_context(CONTEXT[:, a:b], piece_lengths, query, split_noise_seeds=seeds, into=ctx)
    return ctx


@pytest.mark.parametrize("positions", ["chunk", "true", "distance"])
@pytest.mark.parametrize("retrieval", ["query", "right"])
@pytest.mark.parametrize("tokens_per_node", [None, 4])
@pytest.mark.parametrize("drop_node_sinks", [False, True])
def test_growing_in_pieces_equals_compressing_at_once(positions, retrieval, tokens_per_node, drop_node_sinks):
    model = model_with(positions=positions, retrieval=retrieval, tokens_per_node=tokens_per_node,
                       drop_node_sinks=drop_node_sinks)
    with torch.no_grad():
        at_once = model.compress_context(CONTEXT, LENGTHS, QUERY)
        # uneven pieces: mid-chunk cuts, a one-token piece, a piece that completes a chunk, a piece
        # where some rows (the 0- and 5-token ones, then the 75-token one) add nothing
        for cuts in ([0, 20, 21, 64, 100, 150], [0, 150], [0, 3, 40, 150]):
            grown = _grow(model, cuts)
            assert_same_context(grown, at_once)
            logits = model(DECODER, compressed_context=grown).logits
            expected = model(DECODER, compressed_context=at_once).logits
            assert torch.equal(logits, expected)


@pytest.mark.parametrize("retrieval", ["query", "right"])
def test_growing_with_a_leaf_halo_equals_compressing_at_once(retrieval):
    model = model_with(positions="distance", retrieval=retrieval, leaf_halo_tokens=2)
    plain = model_with(positions="distance", retrieval=retrieval)
    with torch.no_grad():
        at_once = model.compress_context(CONTEXT, LENGTHS, QUERY)
        assert at_once.nodes.length.numel() > plain.compress_context(CONTEXT, LENGTHS, QUERY).nodes.length.numel()
        assert_same_context(_grow(model, [0, 20, 21, 64, 100, 150]), at_once)


@pytest.mark.parametrize("drop_node_sinks", [False, True])
def test_growing_with_row_weights_equals_compressing_at_once(drop_node_sinks):
    model = model_with(positions="distance", row_weight_exponent=-1.0, drop_node_sinks=drop_node_sinks)
    with torch.no_grad():
        at_once = model.compress_context(CONTEXT, LENGTHS, QUERY)
        assert at_once.row_tokens is not None and at_once.row_tokens.max() > 1
        grown = _grow(model, [0, 20, 21, 64, 100, 150])
        assert_same_context(grown, at_once)
        assert torch.equal(model(DECODER, compressed_context=grown).logits,
                           model(DECODER, compressed_context=at_once).logits)
        repeated = at_once.repeat_interleave(2)
        assert torch.equal(repeated.row_tokens[: repeated.cu_seqlens[2]],
                           at_once.row_tokens[: at_once.cu_seqlens[1]].repeat(2))


def test_growing_in_training_with_seeds_equals_compressing_at_once():
    model = model_with(split_noise_std=0.3).train()
    with torch.no_grad():
        at_once = model.compress_context(CONTEXT, LENGTHS, QUERY, split_noise_seeds=SEEDS)
        assert_same_context(_grow(model, [0, 50, 51, 150], seeds=SEEDS), at_once)


def test_growing_recompresses_only_the_new_and_reopened_chunks_and_leaves_into_unchanged():
    model = model_with(max_pass_tokens=None)
    with torch.no_grad():
        first = model.compress_context(CONTEXT[:, :40], torch.tensor(LENGTHS).clamp(max=40), QUERY)
        before = [t.clone() for t in first.keys + first.values + [first.cu_seqlens, first.tail_input_ids]]
        grown = model.compress_context(CONTEXT[:, 40:], (torch.tensor(LENGTHS) - 40).clamp(min=0), QUERY, into=first)
    # compressed again: rows 0 (chunk 1 reopened, chunks 2-4) and 2 (chunk 1 reopened, chunk 2)
    assert grown.stats["embedded_nodes"] == 4 * (4 + 2)
    assert grown.stats["context_tokens"] == sum(LENGTHS) and grown.stats["chunks"] == 5 + 3 + 1
    assert grown.context_lengths.tolist() == LENGTHS
    assert first.context_lengths.tolist() == [40, 0, 40, 5]
    after = first.keys + first.values + [first.cu_seqlens, first.tail_input_ids]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "into was changed"
    assert first.tail_input_ids.tolist() == [CONTEXT[0, 32:40].tolist(), [0] * 8, CONTEXT[2, 32:40].tolist(),
                                             CONTEXT[3, :5].tolist() + [0] * 3]


def test_bad_growth_raises():
    model = model_with()
    with torch.no_grad():
        ctx = model.compress_context(CONTEXT, LENGTHS)
        with pytest.raises(ValueError, match="into"):
            model.compress_context(CONTEXT, LENGTHS, into="not a context")
        with pytest.raises(ValueError, match="into has batch"):
            model.compress_context(CONTEXT[:2], into=ctx)
        with pytest.raises(ValueError, match="into cannot grow"):
            model.compress_context(tokens(8, 10, seed=4), into=ctx.repeat_interleave(2))
        with pytest.raises(ValueError, match="into was compressed"):
            model_with(positions="true").compress_context(CONTEXT, LENGTHS, into=ctx)


# --------------------------------------------------------------------------------------------
# the config field and the per-call override


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "16"])
def test_bad_max_pass_tokens_raise(value):
    with pytest.raises(ValueError, match="max_pass_tokens"):
        SharedLLMConfig(max_pass_tokens=value)
    with pytest.raises(ValueError, match="max_pass_tokens"):
        model_with().compress_context(CONTEXT, LENGTHS, max_pass_tokens=value)


def test_max_pass_tokens_is_saved_and_old_configs_load(tmp_path):
    SharedLLMConfig(max_pass_tokens=None).save(tmp_path)
    assert SharedLLMConfig.load(tmp_path).max_pass_tokens is None
    values = SharedLLMConfig().to_dict()
    del values["max_pass_tokens"]  # a config written before the field existed
    with open(os.path.join(tmp_path, CONFIG_NAME), "w") as f:
        json.dump(values, f)
    assert SharedLLMConfig.load(tmp_path).max_pass_tokens == 16384


def test_the_per_call_limit_overrides_the_config():
    model = model_with(max_pass_tokens=CHUNK)
    with torch.no_grad():
        assert model.compress_context(CONTEXT, LENGTHS).stats["passes"] == 8
        assert model.compress_context(CONTEXT, LENGTHS, max_pass_tokens=ONE_PASS).stats["passes"] == 1
