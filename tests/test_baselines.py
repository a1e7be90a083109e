"""The benchmark's prefill methods (``bench/baselines.py``) on the tiny random Llama, each against an
independent oracle: the plain model's forward (with an explicit attention mask where the method
restricts attention), the paper's compression ratio, or a hand-counted answer.

``bench`` is a package at the repository root: run pytest as ``python -m pytest`` from there (as
``make test`` does), which puts the root on ``sys.path``."""

import pytest
import torch
from transformers import DynamicCache

from bench import baselines as B
from sharedllm_ops.model.pretrained import tiny_llama_config, tiny_model

CONTEXT, DECODER = 40, 8
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def base():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def ids(base):
    """``[2, CONTEXT + DECODER]`` random token ids."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, base.config.vocab_size, (2, CONTEXT + DECODER), generator=gen)


def last_logits(model, ids, **kwargs) -> torch.Tensor:
    """The plain model's logits of the last position, from one pass without a cache."""
    with torch.no_grad():
        return model(ids, **kwargs).logits[:, -1].float()


def test_full_attention_is_one_pass_of_the_plain_model(base, ids):
    out = B.prefill_full(base, ids[:, :CONTEXT], ids[:, CONTEXT:])
    assert out.dtype == torch.float32 and out.shape == (2, base.config.vocab_size)
    torch.testing.assert_close(out, last_logits(base, ids), **TOL)


@pytest.mark.parametrize("sink, window", [(2, 12), (4, 16), (0, 10)])
def test_streaming_equals_one_pass_with_the_sink_and_window_mask(base, ids, sink, window):
    """Reading in blocks of ``window`` with the cache cut back to ``sink`` + ``window - sink`` after
    each block is one pass in which a token of the block starting at ``s`` sees the first ``sink``
    tokens, the ``window - sink`` tokens before ``s``, and its block up to itself."""
    n = ids.shape[1]
    query, key = torch.arange(n)[:, None], torch.arange(n)[None]
    block_start = query // window * window
    visible = (key <= query) & ((key < sink) | (key >= block_start - (window - sink)))
    expected = last_logits(base, ids, attention_mask=visible.expand(ids.shape[0], 1, n, n))
    out = B.prefill_streaming(base, ids[:, :CONTEXT], ids[:, CONTEXT:], sink=sink, window=window)
    torch.testing.assert_close(out, expected, **TOL)
    assert (out - last_logits(base, ids)).abs().max() > 1e-3  # the window did drop keys


def test_streaming_with_a_window_over_the_whole_input_is_full_attention(base, ids):
    out = B.prefill_streaming(base, ids[:, :CONTEXT], ids[:, CONTEXT:], sink=4, window=CONTEXT + DECODER)
    torch.testing.assert_close(out, last_logits(base, ids), **TOL)


def test_cut_cache_keeps_the_sink_and_the_most_recent_rows():
    cache = DynamicCache(config=tiny_llama_config(num_hidden_layers=2))
    positions = lambda n: torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 16)  # noqa: E731
    cache.update(positions(10), -positions(10), 0)
    cache.update(positions(4), -positions(4), 1)  # within the window: left alone
    B.cut_cache(cache, sink=2, window=5)
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 7, 8, 9]
    assert cache.layers[0].values[0, 1, :, 3].tolist() == [0, -1, -7, -8, -9]
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert cache.get_seq_length(0) == 5


@pytest.mark.parametrize("sink, window", [(4, 4), (-1, 8)])
def test_streaming_rejects_a_sink_outside_the_window(base, ids, sink, window):
    with pytest.raises(ValueError, match="sink"):
        B.prefill_streaming(base, ids[:, :CONTEXT], ids[:, CONTEXT:], sink=sink, window=window)


def test_encoder_decoder_keeps_every_context_token_in_every_layer(base, ids):
    """With training-free ``merge`` injection and true positions, cross-attention of every layer to
    the whole uncompressed context, encoded as one chunk, is full attention over context + decoder."""
    model = B.build_encoder_decoder(B.share_weights(base), chunk_size=CONTEXT, injection="merge", positions="true")
    stats: dict = {}
    out = B.prefill_encoder_decoder(model, ids[:, :CONTEXT], ids[:, CONTEXT:], stats)
    torch.testing.assert_close(out, last_logits(base, ids), **TOL)
    assert model.config.num_injected_layers == base.config.num_hidden_layers
    assert stats["compressed_tokens"] == stats["context_tokens"] == 2 * CONTEXT  # nothing compressed


def test_encoder_decoder_encodes_independent_chunks(base, ids):
    stats: dict = {}
    model = B.build_encoder_decoder(B.share_weights(base), chunk_size=16)
    B.prefill_encoder_decoder(model, ids[:, :CONTEXT], ids[:, CONTEXT:], stats)
    assert stats["chunks"] == stats["nodes"] == 2 * 3  # 40 tokens: chunks of 16, 16 and 8 per row
    assert stats["compressed_tokens"] == 2 * CONTEXT


def test_sharedllm_compresses_a_chunk_8x_as_in_the_paper(base):
    """1024-token chunk, tree of height 3: 4 preserved nodes (512, 256, 128, 128 tokens) of 32 rows."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, base.config.vocab_size, (1, 1024 + DECODER), generator=gen)
    stats: dict = {}
    model = B.build_sharedllm(B.share_weights(base))
    out = B.prefill_sharedllm(model, ids[:, :1024], ids[:, 1024:], stats)
    assert (stats["context_tokens"], stats["chunks"], stats["nodes"], stats["compressed_tokens"]) == (1024, 1, 4, 128)
    assert (out - last_logits(base, ids[:, 1024:])).abs().max() > 1e-3  # the context reached the decoder


def test_sharedllm_with_silent_cross_blocks_is_the_decoder_alone(base, ids):
    """``copy_zero`` cross blocks add nothing, and with chunk positions the decoder starts at 0."""
    model = B.build_sharedllm(B.share_weights(base), cross_init="copy_zero")
    out = B.prefill_sharedllm(model, ids[:, :CONTEXT], ids[:, CONTEXT:])
    torch.testing.assert_close(out, last_logits(base, ids[:, CONTEXT:]), **TOL)


def test_share_weights_shares_tensors_but_not_modules(base, ids):
    before = last_logits(base, ids)
    copy = B.share_weights(base)
    assert all(a is b for a, b in zip(base.parameters(), copy.parameters()))
    assert copy.model.layers[0] is not base.model.layers[0] and copy.config is not base.config
    wrapped = B.build_sharedllm(copy)
    torch.testing.assert_close(last_logits(base, ids), before, atol=0, rtol=0)  # wrapping the copy left base alone
    with pytest.raises(ValueError, match="unwrapped"):
        B.share_weights(wrapped.base_model)


def test_model_bytes_counts_shared_tensors_once():
    linear = torch.nn.Linear(3, 4, bias=False)  # 12 float32
    assert B.model_bytes(linear) == 48
    assert B.model_bytes(torch.nn.Sequential(linear, linear)) == 48
    assert B.model_bytes(tiny_model(tie_word_embeddings=True)) < B.model_bytes(tiny_model())
    assert B.num_layers(tiny_model()) == 4


def test_peak_memory_on_cpu_counts_live_storages():
    def three_live_tensors():
        a = torch.ones(1000)
        b = torch.ones(1000)
        del a  # freed before c exists: the peak is b, c and their sum, 3 x 4000 bytes
        c = torch.ones(1000)
        return b + c

    _, mem = B.peak_memory(three_live_tensors, "cpu")
    assert (mem.peak_bytes, mem.method) == (12000, "live_tensor_bytes")
    x = torch.ones(1000)
    assert B.peak_memory(lambda: x.view(10, 100).t(), "cpu")[1].peak_bytes == 0  # views allocate nothing


def test_random_llama_is_seeded_and_leaves_the_global_rng_alone():
    small = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256)
    state = torch.random.get_rng_state()
    first = B.random_llama(B.SMOLLM2_135M_SHAPE, seed=3, **small)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = B.random_llama(B.SMOLLM2_135M_SHAPE, seed=3, **small)
    other = B.random_llama(B.SMOLLM2_135M_SHAPE, seed=4, **small)
    weight = lambda m: m.model.layers[0].self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(weight(first), weight(again)) and not torch.equal(weight(first), weight(other))
    # the shape's fields not overridden are kept: SmolLM2's RoPE base and tied embeddings
    assert first.config.rope_parameters["rope_theta"] == 100000.0
    assert first.lm_head.weight is first.model.embed_tokens.weight
    assert not first.training and first.config.num_hidden_layers == 1


def test_prefill_rejects_mismatched_or_empty_inputs(base, ids):
    with pytest.raises(ValueError, match="same B"):
        B.prefill_full(base, ids[:1, :CONTEXT], ids[:, CONTEXT:])
    with pytest.raises(ValueError, match="decoder_ids is empty"):
        B.prefill_full(base, ids[:, :CONTEXT], ids[:, :0])
