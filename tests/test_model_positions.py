"""Keys pooled before rotary and placed at their distance in the text (``positions="distance"``),
nodes' attention sinks left out of pooling (``drop_node_sinks``), and the third-party training text
(issue 16's levers; docs/DESIGN.md section 5)."""

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM  # noqa: E402
from sharedllm_ops.model.pretrained import tiny_model  # noqa: E402
from sharedllm_ops.model.text import site_packages_files, stdlib_dir, training_files  # noqa: E402
from sharedllm_ops.model.train import text_files  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ids(*shape, seed):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def projected_keys(base, token_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """``[L, Hk, D]``: layer ``layer``'s keys of ``token_ids [L]`` run alone, before any rotary, computed
    from the base model's hidden states (no SharedLLM code)."""
    with torch.no_grad():
        hidden = base(token_ids[None], output_hidden_states=True).hidden_states[layer][0]
        block = base.model.layers[layer]
        k = block.self_attn.k_proj(block.input_layernorm(hidden))
    return k.view(token_ids.numel(), -1, block.self_attn.head_dim)


@pytest.mark.parametrize("setting", [
    # one chunk, no tree, no pooling, one token per position step, no cap
    dict(tree_depth=0, tokens_per_node=None, distance_scale=1, max_distance=128),
    # one chunk kept raw (raw_recent_chunks): its rows sit at their token distance whatever distance_scale
    dict(tree_depth=3, tokens_per_node=4, raw_recent_chunks=1),
])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_distance_positions_reproduce_full_attention_when_nothing_is_compressed(arch, setting):
    # the merged context is the text before the decoder at its true distances, so the logits are full attention's
    base = tiny_model(arch, seed=3)
    text = ids(1, 90, seed=4)
    cfg = SharedLLMConfig(num_injected_layers=4, chunk_size=128, injection="merge", positions="distance", **setting)
    model = SharedLLMForCausalLM.from_base(base, cfg)
    with torch.no_grad():
        got = model(text[:, 70:], context_input_ids=text[:, :70]).logits
        model.unwrap()
        expected = base(text).logits[:, 70:]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("drop_node_sinks", [False, True])
def test_pooled_keys_are_means_of_the_keys_before_rotary(drop_node_sinks):
    # two chunks of 32 tokens, each one node pooled to 4 rows; the second starts after the context's
    # start, so with drop_node_sinks its first token is left out of its pooling
    base = tiny_model("llama", seed=5)
    text = ids(1, 64, seed=6)
    cfg = SharedLLMConfig(num_injected_layers=2, chunk_size=32, tree_depth=0, tokens_per_node=4, positions="distance",
                          drop_node_sinks=drop_node_sinks)
    model = SharedLLMForCausalLM.from_base(base, cfg)
    with torch.no_grad():
        ctx = model.compress_context(text)
    for layer in range(2):
        first = projected_keys(base, text[0, :32], layer)
        second = projected_keys(base, text[0, 32:], layer)[1 if drop_node_sinks else 0:]
        pooled = [F.adaptive_avg_pool1d(k.permute(1, 2, 0), 4).permute(2, 0, 1) for k in (first, second)]
        torch.testing.assert_close(ctx.keys[layer], torch.cat(pooled), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("drop_node_sinks", [False, True])
def test_row_positions_are_the_middle_of_their_source_tokens(drop_node_sinks):
    base = tiny_model("llama", seed=7)
    cfg = SharedLLMConfig(num_injected_layers=2, chunk_size=32, tree_depth=2, tokens_per_node=4, positions="distance",
                          drop_node_sinks=drop_node_sinks)
    model = SharedLLMForCausalLM.from_base(base, cfg)
    lengths = torch.tensor([100, 37])
    with torch.no_grad():
        ctx = model.compress_context(ids(2, 100, seed=8), lengths, ids(2, 5, seed=9))
    expected = []
    for start, length in zip(ctx.nodes.start.tolist(), ctx.nodes.length.tolist()):
        if length <= 4:  # kept raw: one row per token
            expected += range(start, start + length)
            continue
        skip = int(drop_node_sinks and start > 0)
        span = torch.arange(start + skip, start + length, dtype=torch.float64)
        expected += torch.floor(F.adaptive_avg_pool1d(span[None, None], 4)[0, 0]).long().tolist()
    assert ctx.k_positions.tolist() == expected


def test_distances_grow_along_the_text_and_are_capped():
    base = tiny_model("llama", seed=10)
    cfg = SharedLLMConfig(num_injected_layers=2, chunk_size=32, tree_depth=2, tokens_per_node=4, positions="distance",
                          distance_scale=4, max_distance=10)
    model = SharedLLMForCausalLM.from_base(base, cfg)
    with torch.no_grad():
        ctx = model.compress_context(ids(1, 150, seed=11), None, ids(1, 5, seed=12))
    positions = model._state.distance_positions(ctx).long()
    assert positions.min() == 0 and positions.max() <= 10
    assert torch.all(positions[1:] >= positions[:-1])  # rows are in text order: nearer rows sit later
    far = ctx.k_positions.long() <= 150 - 4 * 10 - 4  # more than max_distance steps away
    assert far.any() and torch.all(positions[far] == 0)
    assert positions[-1] == 10 - (150 - int(ctx.k_positions[-1])) // 4


def test_exact_distances_refine_the_whole_steps_and_keep_raw_rows_apart():
    base = tiny_model("llama", seed=10)
    common = dict(num_injected_layers=2, chunk_size=32, tree_depth=3, tokens_per_node=4, positions="distance",
                  distance_scale=4, max_distance=40)
    context, query = ids(1, 150, seed=11), ids(1, 5, seed=12)
    plain = SharedLLMForCausalLM.from_base(base, SharedLLMConfig(**common))
    exact = SharedLLMForCausalLM.from_base(tiny_model("llama", seed=10), SharedLLMConfig(**common, exact_distance=True))
    with torch.no_grad():
        ctx = plain.compress_context(context, None, query)
        ctx_exact = exact.compress_context(context, None, query)
    assert torch.equal(ctx.k_positions, ctx_exact.k_positions)  # the setting only changes the rotation
    steps = plain._state.distance_positions(ctx).long()
    fine = exact._state.distance_positions(ctx).long()
    # table rows per step: 4; whole steps agree with the plain setting (nothing here is capped)
    assert torch.equal((40 * 4 - fine) // 4, 40 - steps)
    assert torch.all(fine[1:] > fine[:-1])  # every row, raw rows included, at its own position
    assert any(length <= 4 for length in ctx.nodes.length.tolist())  # some nodes are kept raw
    assert len(set(steps.tolist())) < steps.numel()  # whole steps put neighbouring raw rows together


@pytest.mark.parametrize("scale", [1, 3])
def test_exact_distances_depend_only_on_distance(scale):
    # rotary attention depends only on the query's position minus the key's: moving the cap (which
    # shifts the queries and the rows alike) changes nothing while no row reaches it; with one
    # token per step, the uncompressed context is full attention
    text = ids(1, 90, seed=4)
    logits = {}
    for far in (100, 130):
        cfg = SharedLLMConfig(num_injected_layers=4, chunk_size=128, tree_depth=0, tokens_per_node=None,
                              injection="merge", positions="distance", distance_scale=scale, max_distance=far,
                              exact_distance=True)
        model = SharedLLMForCausalLM.from_base(tiny_model("llama", seed=3), cfg)
        with torch.no_grad():
            logits[far] = model(text[:, 70:], context_input_ids=text[:, :70]).logits
    torch.testing.assert_close(logits[100], logits[130], atol=2e-5, rtol=0)
    with torch.no_grad():
        full = tiny_model("llama", seed=3)(text).logits[:, 70:]
    if scale == 1:
        torch.testing.assert_close(logits[100], full, atol=2e-5, rtol=0)
    else:
        assert not torch.allclose(logits[100], full, atol=1e-3)


def test_subdivided_rotary_table_rows_are_fractional_positions():
    from sharedllm_ops.model.injection import RotaryTable

    base = tiny_model("llama", seed=17)
    table = RotaryTable(base.model.rotary_emb)
    cos1, sin1 = table(10, "cpu")
    cos4, sin4 = table(40, "cpu", subdivisions=4)
    torch.testing.assert_close(cos4[0:40:4], cos1[:10])
    torch.testing.assert_close(sin4[0:40:4], sin1[:10])
    inv_freq = base.model.rotary_emb.inv_freq.float()
    angle = torch.cat([inv_freq, inv_freq]) * 2.5  # row 10 of the 4-per-step table: position 2.5
    torch.testing.assert_close(cos4[10], torch.cos(angle))
    torch.testing.assert_close(sin4[10], torch.sin(angle))


def test_residual_cross_blocks_see_the_context_with_distance_positions():
    base = tiny_model("llama", seed=13)
    cfg = SharedLLMConfig(num_injected_layers=2, chunk_size=32, tree_depth=2, tokens_per_node=4, positions="distance",
                          cross_init="random", drop_node_sinks=True)
    model = SharedLLMForCausalLM.from_base(base, cfg).train()
    decoder = ids(2, 6, seed=14)
    out = model(decoder, context_input_ids=ids(2, 80, seed=15), labels=decoder, split_noise_seeds=torch.tensor([1, 2]))
    out.loss.backward()
    grads = [p.grad for p in model.cross_blocks.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        other = model(decoder, context_input_ids=ids(2, 80, seed=16)).logits
    assert not torch.allclose(out.logits, other), "the context must change the logits"


@pytest.mark.parametrize("field,value", [("distance_scale", 0), ("max_distance", -1), ("distance_scale", 1.5),
                                         ("drop_node_sinks", 1), ("positions", "relative")])
def test_bad_position_settings_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SharedLLMConfig(**{field: value})


# --------------------------------------------------------------------------------------------
# training text


def test_site_packages_sample_leaves_out_the_standard_library_and_tests():
    files = site_packages_files(max_bytes=2_000_000)
    assert files, "this environment has third-party packages (torch, transformers)"
    assert sum(f.stat().st_size for f in files) <= 2_000_000 * 1.05
    stdlib = stdlib_dir().resolve()
    for f in files:
        assert f.suffix == ".py" and f.stem not in sys.stdlib_module_names, f
        assert stdlib not in f.resolve().parents, f
        assert not {"test", "tests", "_distutils", "_vendor", "backports"} & set(f.parts), f
    assert site_packages_files(max_bytes=2_000_000) == files  # the same sample every time
    assert 0 < len(site_packages_files(max_bytes=500_000)) < len(files)


def test_text_files_names_its_sources():
    assert text_files(["stdlib"]) == training_files()
    assert text_files(["site-packages:0.5"]) == site_packages_files(500_000)
    with pytest.raises(ValueError, match="site-packages:MB"):
        text_files(["site-packages:lots"])
