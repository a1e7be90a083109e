"""SharedLLMForCausalLM (docs/DESIGN.md section 5) on tiny random Llama / Mistral / Qwen2 models.

Every wrapped model gets its own freshly built base (a base can be wrapped only once); an
unwrapped deep copy made before wrapping serves as the oracle where the base model's own
output is expected."""

import copy
import dataclasses
import gc
import inspect
import os
import types

import pytest
import torch
from conftest import requires_triton
from torch import nn

pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
)

from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM  # noqa: E402
from sharedllm_ops.model.demo import held_out_table  # noqa: E402
from sharedllm_ops.model.evaluate import perplexity_table, sharedllm_perplexity  # noqa: E402
from sharedllm_ops.model.modeling import SUPPORTED_MODEL_TYPES, WEIGHTS_NAME  # noqa: E402
from sharedllm_ops.model.pretrained import tiny_config  # noqa: E402
from sharedllm_ops.model.train import enable_activation_checkpointing  # noqa: E402

ARCHS = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}
PAD, EOS = 0, 1
# the package's tiny shape, with the special tokens the generation tests use and larger initial weights
TINY = dict(pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS, initializer_range=0.1)
LOGIT_TOL = dict(atol=2e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_base(arch: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of ``arch`` (same weights for the same seed) with random norm weights and
    biases (Qwen2's q/k/v biases are zero at init), in eval mode."""
    config = tiny_config(arch, **{**TINY, **overrides})
    torch.manual_seed(seed)
    base = ARCHS[arch](config)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return base.eval()


def wrap(arch="llama", seed=0, base_overrides=None, **cfg):
    """``(model, twin)``: a SharedLLM around a fresh base and an unwrapped copy of that base."""
    base = make_base(arch, seed, **(base_overrides or {}))
    twin = copy.deepcopy(base).eval()
    model = SharedLLMForCausalLM.from_base(base, SharedLLMConfig(**cfg)).eval()
    return model, twin


def tokens(*shape, seed=1, low=3, high=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g)


def close(actual, expected, msg="", **tol):
    torch.testing.assert_close(actual, expected, msg=(lambda m: f"{msg}: {m}") if msg else None, **(tol or LOGIT_TOL))


def hf_positions(mask):
    """The position ids Hugging Face ``generate`` derives from a (left-padded) attention mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def greedy_loop(step, prompt, mask, max_new_tokens):
    """Greedy decoding without a cache, mirroring ``generate``'s end-of-sequence handling: a finished
    row gets ``PAD``, the loop ends when every row has finished. ``step(ids, mask)`` -> logits."""
    ids, unfinished = prompt, torch.ones(prompt.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = step(ids, mask)[:, -1].argmax(-1)
        nxt = torch.where(unfinished, nxt, PAD)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        unfinished &= nxt != EOS
        if not unfinished.any():
            break
    return ids


INJECTIONS = ["residual", "merge"]
POSITIONS = ["chunk", "true"]


# --------------------------------------------------------------------------------------------
# 1. no context = the base model


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_no_context_equals_base_model(arch, injection, positions):
    model, twin = wrap(arch, num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3,
                       injection=injection, positions=positions)
    x = tokens(2, 12)
    labels = tokens(2, 12, seed=2)
    with torch.no_grad():
        expected = twin(x, labels=labels)
        out = model(x, labels=labels)
        close(out.logits, expected.logits, "no context")
        close(out.loss, expected.loss)
        ctx = tokens(2, 40, seed=3)
        zero = model(x, context_input_ids=ctx, context_lengths=torch.zeros(2, dtype=torch.long)).logits
        close(zero, expected.logits, "context_lengths all zero")
        # a padded batch too
        mask = torch.ones_like(x)
        mask[1, :4] = 0
        close(model(x, attention_mask=mask, context_input_ids=ctx, context_lengths=[0, 0]).logits,
              twin(x, attention_mask=mask).logits, "context_lengths all zero, padded")


def test_context_changes_the_logits():
    """The tests below compare models with context; make sure the context matters at all."""
    for injection in INJECTIONS:
        model, twin = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, injection=injection)
        x = tokens(1, 8)
        with torch.no_grad():
            diff = (model(x, context_input_ids=tokens(1, 40, seed=3)).logits - twin(x).logits).abs().max()
        assert diff > 1e-2, f"{injection}: the context has no effect on the logits ({diff})"


# --------------------------------------------------------------------------------------------
# 2. the identity of docs/DESIGN.md section 5

IDENTITY = dict(injection="merge", num_injected_layers=4, tree_depth=0, tokens_per_node=None, positions="true")


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("batch,Lc,chunk_size", [(1, 24, 24), (1, 24, 64), (2, 31, 32)])
def test_identity_merge_all_layers_full_context(arch, batch, Lc, chunk_size):
    model, twin = wrap(arch, chunk_size=chunk_size, **IDENTITY)
    ctx, x = tokens(batch, Lc, seed=4), tokens(batch, 9, seed=5)
    with torch.no_grad():
        expected = twin(torch.cat([ctx, x], 1)).logits[:, Lc:]
        close(model(x, context_input_ids=ctx).logits, expected)
        close(model(x, compressed_context=model.compress_context(ctx)).logits, expected)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_identity_with_different_context_lengths_per_row(arch):
    model, twin = wrap(arch, chunk_size=32, **IDENTITY)
    lens = [31, 0, 17]
    ctx, x = tokens(3, 31, seed=4), tokens(3, 6, seed=5)
    with torch.no_grad():
        got = model(x, context_input_ids=ctx, context_lengths=lens).logits
        for b, n in enumerate(lens):
            expected = twin(torch.cat([ctx[b, :n], x[b]])[None]).logits[:, n:]
            close(got[b:b + 1], expected, f"row {b} (context length {n})")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_identity_generation_equals_base_greedy_generation(arch):
    model, twin = wrap(arch, chunk_size=32, **IDENTITY)
    Lc = 20
    ctx, x = tokens(2, Lc, seed=6), tokens(2, 5, seed=7)
    expected = twin.generate(torch.cat([ctx, x], 1), do_sample=False, max_new_tokens=8)[:, Lc:]
    got = model.generate(x, context_input_ids=ctx, do_sample=False, max_new_tokens=8)
    assert torch.equal(got, expected), f"{got} != {expected}"


# --------------------------------------------------------------------------------------------
# 3. backends


def _loss_and_grads(model, x, mask, labels, ctx, lens):
    model.zero_grad(set_to_none=True)
    out = model(x, attention_mask=mask, context_input_ids=ctx, context_lengths=lens, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


TRITON_MODEL = [requires_triton(op) for op in ("chunk_pool", "tree_topk", "cross_inject_attention")]


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=TRITON_MODEL)])
@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_backend_matches_reference_logits_and_grads(backend, injection, positions):
    cfg = dict(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3,
               injection=injection, positions=positions)
    ref, _ = wrap(backend="reference", **cfg)
    other, _ = wrap(backend=backend, **cfg)
    ref.train(), other.train()
    # a training batch: a row without context, a left-padded row (whose padding sees no key at all)
    x, labels = tokens(3, 10, seed=8), tokens(3, 10, seed=9)
    mask = torch.ones_like(x)
    mask[2, :4] = 0
    labels[2, :4] = -100
    ctx, lens = tokens(3, 45, seed=10), torch.tensor([45, 0, 23])
    r_logits, r_loss, r_grads = _loss_and_grads(ref, x, mask, labels, ctx, lens)
    o_logits, o_loss, o_grads = _loss_and_grads(other, x, mask, labels, ctx, lens)
    assert torch.isfinite(r_loss) and torch.isfinite(r_logits[mask.bool()]).all()
    close(o_logits[mask.bool()], r_logits[mask.bool()], f"{backend} logits")
    close(o_loss, r_loss)
    assert set(o_grads) == set(r_grads)
    if injection == "residual":
        assert any(n.startswith("cross_blocks.") for n in r_grads)
    for name, g in r_grads.items():
        assert torch.isfinite(g).all(), f"non-finite gradient of {name}"
        scale = max(1.0, float(g.abs().max()))
        close(o_grads[name], g, f"{backend} grad of {name}", atol=2e-5 * scale, rtol=1e-4)


# (backend="triton" runs on CPU tensors in the interpreter: it is in the test above)
@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("retrieval", ["query", "right"])
def test_gpu_backends_on_cpu_raise_a_clear_error(backend, retrieval):
    model, twin = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3,
                       retrieval=retrieval, backend=backend)
    x = tokens(1, 6)
    with torch.no_grad():
        close(model(x).logits, twin(x).logits)  # no context: no op runs
        with pytest.raises((ValueError, RuntimeError), match=backend):
            model(x, context_input_ids=tokens(1, 40, seed=3))


# --------------------------------------------------------------------------------------------
# 4. batches with different context lengths


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_batch_with_different_context_lengths_equals_single_rows(injection, positions):
    model, _ = wrap(num_injected_layers=3, chunk_size=32, tree_depth=3, tokens_per_node=4,
                    injection=injection, positions=positions)
    lens = [100, 0, 57]  # chunks 32,32,32,4 (too short to split) | none | 32,25 (leaves of 3)
    ctx = tokens(3, 100, seed=11)  # padding is random tokens: it must be ignored
    x = tokens(3, 7, seed=12)
    with torch.no_grad():
        batch_ctx = model.compress_context(ctx, lens, query_input_ids=x)
        batch = model(x, compressed_context=batch_ctx).logits
        rows_per_seq = batch_ctx.cu_seqlens.diff().tolist()
        assert rows_per_seq[0] == 3 * 4 * 4 + 4 and rows_per_seq[1] == 0, rows_per_seq
        for i, n in enumerate(lens):
            if n:
                single_ctx = model.compress_context(ctx[i:i + 1, :n], query_input_ids=x[i:i + 1])
                single = model(x[i:i + 1], compressed_context=single_ctx).logits
                rows = batch_ctx.nodes.row == i
                assert batch_ctx.nodes.start[rows].tolist() == single_ctx.nodes.start.tolist()
                assert batch_ctx.nodes.length[rows].tolist() == single_ctx.nodes.length.tolist()
                cu = batch_ctx.cu_seqlens
                for layer in range(3):
                    close(batch_ctx.keys[layer][cu[i]:cu[i + 1]], single_ctx.keys[layer])
                    close(batch_ctx.values[layer][cu[i]:cu[i + 1]], single_ctx.values[layer])
            else:
                single = model(x[i:i + 1]).logits
            close(batch[i:i + 1], single, f"row {i} (context length {n})")
        # the same through forward(context_input_ids=...)
        close(model(x, context_input_ids=ctx, context_lengths=lens).logits, batch)


def test_short_chunks_keep_their_raw_tokens():
    model, _ = wrap(num_injected_layers=1, chunk_size=32, tree_depth=3, tokens_per_node=4, retrieval="right")
    ctx = model.compress_context(tokens(1, 100, seed=11), [100])
    n = ctx.nodes
    # three split chunks (right descent 16 | 8 | 4 | 4) and a last chunk of 4 tokens, kept whole
    assert n.chunk.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3]
    assert n.start.tolist() == [0, 16, 24, 28, 32, 48, 56, 60, 64, 80, 88, 92, 96]
    assert n.length.tolist() == [16, 8, 4, 4] * 3 + [4]
    assert ctx.k_positions.tolist() == [0] * 16 + [1] * 16 + [2] * 16 + [3] * 4
    assert ctx.stats["compressed_tokens"] == 52 and ctx.stats["context_tokens"] == 100
    assert ctx.num_chunks.tolist() == [4]
    # a last chunk of exactly 2**depth tokens is split down to single tokens; one token less is not
    ctx = model.compress_context(tokens(2, 40, seed=12), [40, 39])
    n = ctx.nodes
    assert list(zip(n.row.tolist(), n.start.tolist(), n.length.tolist()))[4:] == \
        [(0, 32, 4), (0, 36, 2), (0, 38, 1), (0, 39, 1)] + [(1, 0, 16), (1, 16, 8), (1, 24, 4), (1, 28, 4), (1, 32, 7)]


# --------------------------------------------------------------------------------------------
# hand-computed oracles: what is encoded, pooled, selected and injected


def _rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat([-t[..., half:], t[..., :half]], dim=-1)


def _rotary(twin, size):
    """The base model's ``(cos, sin)`` ``[size, D]``."""
    probe = torch.zeros(1, 1)
    cos, sin = twin.model.rotary_emb(probe, torch.arange(size)[None])
    return cos[0], sin[0]


def _rot(t, pos, table):
    """Rotates ``t`` ``[N, H, D]`` at positions ``pos`` ``[N]`` (HF rotate_half convention)."""
    cos, sin = table
    return t * cos[pos][:, None] + _rotate_half(t) * sin[pos][:, None]


def _attend(q, k, v, scale, allowed=None):
    """q ``[L, H, D]``, k/v ``[S, Hk, D]`` (GQA) -> ``[L, H, D]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("lhd,shd->hls", q, k) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v)


def _node_kv(twin, ids, positions):
    """Every layer's (k rotated at ``positions``, v) ``[n, Hk, D]`` of the base model run on ``ids`` alone."""
    captured = []
    hooks = [m.register_forward_hook(lambda mod, a, out: captured.append(out[0]))
             for layer in twin.model.layers for m in (layer.self_attn.k_proj, layer.self_attn.v_proj)]
    try:
        twin.model(ids[None], position_ids=positions[None])
    finally:
        for h in hooks:
            h.remove()
    table = _rotary(twin, int(positions.max()) + 1)
    D = twin.config.head_dim
    return [(_rot(captured[2 * i].view(len(ids), -1, D), positions, table), captured[2 * i + 1].view(len(ids), -1, D))
            for i in range(len(twin.model.layers))]


def _pool(t, P, mode):
    n = t.shape[0]
    if P is None or n <= P:
        return t
    if mode == "first":
        return t[[j * n // P for j in range(P)]]
    return torch.nn.functional.adaptive_avg_pool1d(t.permute(1, 2, 0), P).permute(2, 0, 1)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("arch,pool_mode,P,depth", [
    ("llama", "mean", 3, 2), ("llama", "first", 3, 2), ("qwen2", "mean", 3, 2), ("qwen2", "first", 3, 2),
    ("mistral", "mean", None, 2), ("llama", "mean", 5, 0), ("llama", "first", None, 0),
])
def test_compressed_kv_equal_each_preserved_node_encoded_alone(positions, arch, pool_mode, P, depth):
    M = 3
    model, twin = wrap(arch, num_injected_layers=M, chunk_size=16, tree_depth=depth, tokens_per_node=P,
                       pool_mode=pool_mode, positions=positions)
    c, lens, x = tokens(2, 45, seed=26), [45, 19], tokens(2, 5, seed=27)
    with torch.no_grad():
        ctx = model.compress_context(c, lens, query_input_ids=x)
        n = ctx.nodes
        for b in range(2):
            keys = [[] for _ in range(M)]
            values = [[] for _ in range(M)]
            k_pos = []
            sel = (n.row == b).nonzero().squeeze(1).tolist()
            assert sel and sum(n.length[i] for i in sel) == lens[b]
            for i in sel:
                s, ln = int(n.start[i]), int(n.length[i])
                pos = torch.arange(ln) + (s if positions == "true" else 0)
                kv = _node_kv(twin, c[b, s:s + ln], pos)
                for layer in range(M):
                    keys[layer].append(_pool(kv[layer][0], P, pool_mode))
                    values[layer].append(_pool(kv[layer][1], P, pool_mode))
                k_pos += [s // 16] * (ln if P is None else min(ln, P))
            rows = slice(int(ctx.cu_seqlens[b]), int(ctx.cu_seqlens[b + 1]))
            for layer in range(M):
                close(ctx.keys[layer][rows], torch.cat(keys[layer]), f"row {b} layer {layer} keys")
                close(ctx.values[layer][rows], torch.cat(values[layer]), f"row {b} layer {layer} values")
            if positions == "chunk":
                assert ctx.k_positions[rows].tolist() == k_pos
            else:
                assert ctx.k_positions is None
        assert ctx.num_chunks.tolist() == [3, 2] and ctx.context_lengths.tolist() == lens


def _hidden_after_layer0(twin, ids, positions):
    h = twin.model.embed_tokens(ids)[None]
    pe = twin.model.rotary_emb(h, positions[None])
    out = twin.model.layers[0](h, attention_mask=None, position_ids=positions[None], position_embeddings=pe)
    return twin.model.norm(out[0] if isinstance(out, tuple) else out)[0]


@pytest.mark.parametrize("positions", POSITIONS)
def test_query_retrieval_equals_hand_computed_tree_topk(positions):
    """Node embedding: the node alone through layer 0 (at its chunk or true positions) and the
    final norm, last token; query: the same for the question; cosine descent (tree_topk)."""
    from sharedllm_ops import reference

    depth, chunk = 3, 16
    model, twin = wrap(num_injected_layers=1, chunk_size=chunk, tree_depth=depth, tokens_per_node=2,
                       positions=positions)
    with torch.no_grad():  # widely spread final norm weights: embedding norms differ, dot != cosine
        spread = torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(3)))
        model.base_model.model.norm.weight.copy_(spread)
        twin.model.norm.weight.copy_(spread)
    lens = [128, 100]
    c, x = tokens(2, 128, seed=28), tokens(2, 6, seed=29)
    with torch.no_grad():
        ctx = model.compress_context(c, lens, query_input_ids=x)
        not_right = not_dot = 0
        for b in range(2):
            qpos = torch.arange(6) + (lens[b] if positions == "true" else 0)
            query = _hidden_after_layer0(twin, x[b], qpos)[-1]
            expected = []
            for ci in range((lens[b] + chunk - 1) // chunk):
                cs = ci * chunk
                L = min(chunk, lens[b] - cs)
                if L < 2**depth:
                    expected.append((cs, L))
                    continue
                T = reference.num_tree_nodes(depth, 2)
                starts, lengths = reference.tree_spans(torch.arange(T)[None, None], torch.tensor([[L]]), depth)
                emb = []
                for s, ln in zip(starts[0, 0].tolist(), lengths[0, 0].tolist()):
                    pos = torch.arange(ln) + (cs + s if positions == "true" else 0)
                    emb.append(_hidden_after_layer0(twin, c[b, cs + s:cs + s + ln], pos)[-1])
                ids, _ = reference.tree_topk(query[None], torch.stack(emb)[None, None], depth)
                not_right += ids[0, 0].tolist() != [0, 4, 12, 13]
                dot_ids, _ = reference.tree_topk(query[None], torch.stack(emb)[None, None], depth, score="dot")
                not_dot += not torch.equal(ids, dot_ids)
                st, ln = reference.tree_spans(ids, torch.tensor([[L]]), depth)
                expected += [(cs + s, n) for s, n in zip(st[0, 0].tolist(), ln[0, 0].tolist())]
            sel = ctx.nodes.row == b
            got = list(zip(ctx.nodes.start[sel].tolist(), ctx.nodes.length[sel].tolist()))
            assert got == expected, f"row {b}"
        assert not_right, "every chunk chose the right descent: the test does not exercise the query"
        assert not_dot, "dot and cosine select alike everywhere: the test cannot tell them apart"


def _manual_logits(model, twin, ctx, b, x):
    """Hand-written SharedLLM forward of row ``b`` (decoder tokens ``x`` ``[L]``), from the base model's
    modules, the model's cross blocks and the compressed context (docs/DESIGN.md sections 1 and 5)."""
    cfg, m = model.config, twin.model
    L, D = x.numel(), twin.config.head_dim
    n_chunks = int(ctx.num_chunks[b])
    offset = int(ctx.context_lengths[b]) if cfg.positions == "true" else 0
    dec_pos = torch.arange(L) + offset
    table = _rotary(twin, offset + L + n_chunks + 1)
    # the extra Eq. 2 rotation of a key is a pure rotation: without the magnitude factor (YaRN's
    # attention_scaling) that the base model's tables carry and that the keys already got once
    mscale = getattr(m.rotary_emb, "attention_scaling", 1.0)
    extra = (table[0] / mscale, table[1] / mscale)
    rows = slice(int(ctx.cu_seqlens[b]), int(ctx.cu_seqlens[b + 1]))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    h = m.embed_tokens(x)
    for i, layer in enumerate(m.layers):
        attn = layer.self_attn
        hn = layer.input_layernorm(h)
        q = attn.q_proj(hn).view(L, -1, D)
        k = attn.k_proj(hn).view(L, -1, D)
        v = attn.v_proj(hn).view(L, -1, D)
        qr, kr = _rot(q, dec_pos, table), _rot(k, dec_pos, table)
        injected = i < cfg.num_injected_layers
        if injected:
            kc, vc = ctx.keys[i][rows], ctx.values[i][rows]
            if cfg.positions == "chunk":
                kc = _rot(kc, ctx.k_positions[rows].long(), extra)
        if injected and cfg.injection == "merge":
            qc = _rot(q, torch.full((L,), n_chunks), table) if cfg.positions == "chunk" else qr
            groups = q.shape[1] // k.shape[1]
            s_self = torch.einsum("lhd,shd->hls", qr, kr.repeat_interleave(groups, 1)) * attn.scaling
            s_self = s_self.masked_fill(~causal, float("-inf"))
            s_ctx = torch.einsum("lhd,shd->hls", qc, kc.repeat_interleave(groups, 1)) * attn.scaling
            p = torch.cat([s_self, s_ctx], -1).softmax(-1)
            vv = torch.cat([v, vc]).repeat_interleave(groups, 1)
            o = torch.einsum("hls,shd->lhd", p, vv)
        else:
            o = _attend(qr, kr, v, attn.scaling, causal)
        y = h + attn.o_proj(o.reshape(L, -1))
        if injected and cfg.injection == "residual":
            block = model.cross_blocks[str(i)]
            qc = block.q_c(block.norm_c(y)).view(L, -1, D)
            qc = _rot(qc, torch.full((L,), n_chunks) if cfg.positions == "chunk" else dec_pos, table)
            y = y + block.o_c(_attend(qc, kc, vc, attn.scaling).reshape(L, -1))
        h = y + layer.mlp(layer.post_attention_layernorm(y))
    return twin.lm_head(m.norm(h))


YARN = dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                             "rope_theta": 10000.0})
INJECTION_POSITIONS = [("residual", "chunk"), ("residual", "true"), ("merge", "chunk"), ("merge", "true")]


def _check_against_hand_written(arch, injection, positions, **base_overrides):
    model, twin = wrap(arch, base_overrides=base_overrides, num_injected_layers=2, chunk_size=16, tree_depth=2,
                       tokens_per_node=3, injection=injection, positions=positions, cross_init="random")
    c, lens, x = tokens(2, 45, seed=30), torch.tensor([45, 21]), tokens(2, 7, seed=31)
    with torch.no_grad():
        ctx = model.compress_context(c, lens, query_input_ids=x)
        got = model(x, compressed_context=ctx).logits
        for b in range(2):
            close(got[b], _manual_logits(model, twin, ctx, b, x[b]), f"row {b}")
    return twin


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("injection,positions", INJECTION_POSITIONS)
def test_forward_equals_hand_written_sharedllm(arch, injection, positions):
    _check_against_hand_written(arch, injection, positions)


@pytest.mark.parametrize("injection,positions", INJECTION_POSITIONS)
def test_forward_with_scaled_rope_equals_hand_written_sharedllm(injection, positions):
    """YaRN-scaled rotary tables carry a magnitude factor (``attention_scaling`` != 1) that the base
    model applies once to q and once to k. Eq. 2's extra rotations (keys at their chunk index, the
    cross-attention query at ``n``) must not apply it again."""
    twin = _check_against_hand_written("llama", injection, positions, **YARN)
    assert twin.model.rotary_emb.attention_scaling > 1.1


# --------------------------------------------------------------------------------------------
# 5. query-aware tree selection on a model whose node embeddings are one-hot


X_TOKEN = 5
EXPECTED_SPANS = {
    7: [(0, 4), (4, 6), (6, 8), (8, 16)],  # level-order ids 2, 8, 9, 1
    15: [(0, 8), (8, 12), (12, 14), (14, 16)],
    None: [(0, 2), (2, 4), (4, 8), (8, 16)],  # all ties: the left child is expanded
}


def one_hot_model(**cfg):
    """Layer 0 is the identity on the residual stream, the embedding the identity matrix and the
    final norm all ones: a node's embedding is the one-hot of its last token (times 8)."""
    base = make_base("llama", vocab_size=64, hidden_size=64)
    with torch.no_grad():
        base.model.layers[0].self_attn.o_proj.weight.zero_()
        base.model.layers[0].mlp.down_proj.weight.zero_()
        base.model.embed_tokens.weight.copy_(torch.eye(64))
        base.model.norm.weight.fill_(1.0)
    return SharedLLMForCausalLM.from_base(
        base, SharedLLMConfig(num_injected_layers=1, chunk_size=16, tree_depth=3, tokens_per_node=2, **cfg)
    ).eval()


def _chunk(x_at, seed):
    t = tokens(16, seed=seed, low=10, high=64)
    if x_at is not None:
        t[x_at] = X_TOKEN
    return t


def _spans(nodes, row):
    sel = nodes.row == row
    return list(zip(nodes.chunk[sel].tolist(), nodes.start[sel].tolist(), (nodes.start + nodes.length)[sel].tolist()))


def _expected(chunk_keys):
    return [(c, c * 16 + s, c * 16 + e) for c, key in enumerate(chunk_keys) for s, e in EXPECTED_SPANS[key]]


def test_tree_selection_follows_the_query():
    model = one_hot_model()
    rows = [[7, 15, None], [None, 7]]
    ctx = torch.full((2, 48), 9)
    for r, keys in enumerate(rows):
        for c, key in enumerate(keys):
            ctx[r, c * 16:(c + 1) * 16] = _chunk(key, seed=20 + 3 * r + c)
    query = tokens(2, 6, seed=30, low=10, high=64)
    query[:, -1] = X_TOKEN
    out = model.compress_context(ctx, [48, 32], query_input_ids=query)
    for r, keys in enumerate(rows):
        assert _spans(out.nodes, r) == _expected(keys), f"row {r}"
    # a query without X anywhere: all ties everywhere
    plain = model.compress_context(ctx, [48, 32], query_input_ids=tokens(2, 6, seed=31, low=10, high=64))
    for r, keys in enumerate(rows):
        assert _spans(plain.nodes, r) == _expected([None] * len(keys)), f"row {r}, no X"
    # a left-padded query: its last real token decides
    mask = torch.ones_like(query)
    mask[1, :3] = 0
    padded = query.clone()
    padded[1, :3] = PAD
    out = model.compress_context(ctx, [48, 32], query_input_ids=padded, query_attention_mask=mask)
    for r, keys in enumerate(rows):
        assert _spans(out.nodes, r) == _expected(keys), f"row {r}, padded query"


def test_tree_selection_right_retrieval_and_no_query():
    model = one_hot_model(retrieval="right")
    ctx = torch.stack([torch.cat([_chunk(7, 40), _chunk(None, 41)]), torch.cat([_chunk(15, 42), _chunk(7, 43)])])
    query = tokens(2, 4, seed=44, low=10, high=64)
    query[:, -1] = X_TOKEN
    out = model.compress_context(ctx, [32, 32], query_input_ids=query)
    for r in range(2):
        assert _spans(out.nodes, r) == _expected([15, 15]), f"row {r}"
    # retrieval="query" without a query: right descent too
    model = one_hot_model()
    out = model.compress_context(ctx, [32, 32])
    for r in range(2):
        assert _spans(out.nodes, r) == _expected([15, 15]), f"row {r}, no query"


def test_tree_selection_through_forward_uses_input_ids_as_query():
    model = one_hot_model(cross_init="random")  # o_c is not a copy of layer 0's (zero) o_proj
    ctx = torch.cat([_chunk(7, 50), _chunk(15, 51)])[None]
    query = tokens(1, 4, seed=52, low=10, high=64)
    query[:, -1] = X_TOKEN
    with torch.no_grad():
        expected = model(query, compressed_context=model.compress_context(ctx, query_input_ids=query)).logits
        right = model(query, compressed_context=model.compress_context(ctx)).logits
        got = model(query, context_input_ids=ctx).logits
    close(got, expected)
    assert (right - expected).abs().max() > 1e-4, "selection has no effect on the logits"


def test_scored_tokens_do_not_choose_their_context():
    """The perplexity's retrieval query is the window before the scored tokens: an X among the
    scored tokens leaves the preserved nodes as they are, where as part of the query it would
    have drawn the descent to the context's X's."""
    model = one_hot_model()
    context = torch.cat([_chunk(7, 70), _chunk(15, 71)])
    window, last = tokens(6, seed=72, low=10, high=64), 2
    nodes, whole_window_nodes = {}, {}
    for scored in (X_TOKEN, 20):
        w = window.clone()
        w[-1] = scored
        _, _, ctx = sharedllm_perplexity(model, torch.cat([context, w]), window=6, last=last)
        nodes[scored] = _spans(ctx.nodes, 0)
        whole_window_nodes[scored] = _spans(model.compress_context(context[None], query_input_ids=w[None]).nodes, 0)
    assert nodes[X_TOKEN] == nodes[20] == _expected([None, None])
    assert whole_window_nodes[X_TOKEN] == _expected([7, 15]) != whole_window_nodes[20]


class _ByteTokenizer:
    """One id per UTF-8 byte, inside the tiny model's vocabulary."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + b % 120 for b in text.encode("utf-8")]}


def test_every_evaluation_queries_the_window_before_the_scored_tokens(monkeypatch):
    """eval-ppl and the demo (``perplexity_table``) and training's held-out table (``held_out_table``)
    compress with the window minus its last ``last`` tokens as the retrieval query."""
    queries = []
    compress = SharedLLMForCausalLM.compress_context

    def spy(self, context_input_ids, context_lengths=None, query_input_ids=None, *args, **kwargs):
        queries.append(query_input_ids)
        return compress(self, context_input_ids, context_lengths, query_input_ids, *args, **kwargs)

    monkeypatch.setattr(SharedLLMForCausalLM, "compress_context", spy)
    window, last = 48, 16
    ids = tokens(300, seed=73)
    rows = perplexity_table(make_base(), ids, window, last, chunk_size=32)
    assert len(rows) == 4 and len(queries) == 2  # two SharedLLM rows
    for query in queries:
        assert torch.equal(query, ids[-window:-last][None])

    queries.clear()
    model, _ = wrap(num_injected_layers=2, chunk_size=32, tree_depth=2, tokens_per_node=4)
    model._tokenizer = _ByteTokenizer()
    table = held_out_table(model, ["functools.py"], window=window, last=last, max_tokens=300)
    assert "| functools.py |" in table
    from sharedllm_ops.model.text import module_text, tokenize_text

    held_out = tokenize_text(model._tokenizer, module_text("functools.py"), 300)
    assert len(queries) == 1 and torch.equal(queries[0], held_out[-window:-last][None])


# --------------------------------------------------------------------------------------------
# 7. split noise


def test_split_noise_only_in_training_and_seeded():
    cfg = dict(num_injected_layers=1, chunk_size=64, tree_depth=3, tokens_per_node=4, split_noise_std=0.2)
    model, _ = wrap(**cfg)
    noiseless, _ = wrap(**{**cfg, "split_noise_std": 0.0})
    ctx, query = tokens(2, 150, seed=13), tokens(2, 5, seed=14)
    lens = [150, 130]

    def spans(m, seed):
        torch.manual_seed(seed)
        n = m.compress_context(ctx, lens, query_input_ids=query).nodes
        return n.start.tolist(), n.length.tolist()

    model.train()
    a, b, c = spans(model, 1), spans(model, 1), spans(model, 2)
    assert a == b, "same seed, different spans"
    assert a != c, "different seeds, same spans"
    model.eval()
    expected = spans(noiseless.eval(), 3)
    assert spans(model, 1) == expected and spans(model, 2) == expected
    assert a != expected
    # the noisy spans still tile every chunk of every row
    starts, lengths = a
    nodes = model.train().compress_context(ctx, lens, query_input_ids=query).nodes
    for r, n in enumerate(lens):
        sel = nodes.row == r
        s, ln = nodes.start[sel], nodes.length[sel]
        assert s[0] == 0 and torch.equal(s[1:], (s + ln)[:-1]) and int((s + ln)[-1]) == n
        assert bool((ln > 0).all())


def test_from_base_and_from_pretrained_return_eval_mode(tmp_path):
    """As transformers' from_pretrained: no split noise at inference unless ``.train()`` is called."""
    cfg = SharedLLMConfig(num_injected_layers=1, chunk_size=64, tree_depth=3, tokens_per_node=4, split_noise_std=0.2)
    built = SharedLLMForCausalLM.from_base(make_base().train(), cfg)
    built.save_pretrained(tmp_path)
    loaded = SharedLLMForCausalLM.from_pretrained(tmp_path, make_base().train())
    noiseless = SharedLLMForCausalLM.from_base(make_base(), dataclasses.replace(cfg, split_noise_std=0.0))
    ctx, query, lens = tokens(2, 150, seed=13), tokens(2, 5, seed=14), [150, 130]

    def spans(m, seed):
        torch.manual_seed(seed)
        n = m.compress_context(ctx, lens, query_input_ids=query).nodes
        return n.start.tolist(), n.length.tolist()

    expected = spans(noiseless, 0)
    for name, model in (("from_base", built), ("from_pretrained", loaded)):
        assert not any(m.training for m in model.modules()), name
        assert spans(model, 1) == spans(model, 2) == expected, name
        model.train()
        assert spans(model, 1) != expected, f"{name}: .train() no longer turns the split noise on"


# --------------------------------------------------------------------------------------------
# 8. saving and loading


def _stored_keys(path):
    with safe_open(os.path.join(path, WEIGHTS_NAME), "pt") as f:
        return set(f.keys())


def _perturb(params, scale=0.05):
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


def test_save_load_round_trip_cross_blocks_only(tmp_path):
    cfg = dict(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, cross_init="random")
    model, _ = wrap(**cfg)
    _perturb(model.cross_blocks.parameters())
    x, ctx = tokens(2, 7, seed=15), tokens(2, 40, seed=16)
    model.save_pretrained(tmp_path)
    keys = _stored_keys(tmp_path)
    assert keys and all(k.startswith("cross_blocks.") for k in keys), sorted(keys)
    assert keys == {k for k in model.state_dict() if k.startswith("cross_blocks.")}
    loaded = SharedLLMForCausalLM.from_pretrained(tmp_path, make_base()).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        close(loaded(x, context_input_ids=ctx).logits, model(x, context_input_ids=ctx).logits, atol=0, rtol=0)


def test_save_pretrained_in_bfloat16_halves_the_file_and_reloads_the_rounded_weights(tmp_path):
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, cross_init="random")
    _perturb(model.cross_blocks.parameters())
    model.save_pretrained(tmp_path / "f32")
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "bf16" / WEIGHTS_NAME)
    assert stored and all(v.dtype == torch.bfloat16 for v in stored.values())
    sizes = [os.path.getsize(tmp_path / d / WEIGHTS_NAME) for d in ("f32", "bf16")]
    assert sizes[1] < 0.6 * sizes[0], sizes
    loaded = SharedLLMForCausalLM.from_pretrained(tmp_path / "bf16", make_base()).eval()
    for k, v in model.injector_state_dict().items():
        got = loaded.injector_state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v.to(torch.bfloat16).to(v.dtype)), k
    with pytest.raises(ValueError, match="dtype"):
        model.save_pretrained(tmp_path / "bad", dtype=torch.int8)


def test_save_load_round_trip_with_trained_top_layer(tmp_path):
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3)
    trainable = model.set_trainable("cross+top", top_layers=1)
    top = model.base_model.model.layers[3]
    assert {id(p) for p in top.parameters()} <= {id(p) for p in trainable}
    _perturb(trainable)
    model.save_pretrained(tmp_path)
    keys = _stored_keys(tmp_path)
    top_keys = {k for k in keys if k.startswith("base_model.model.layers.3.")}
    assert top_keys == {"base_model.model.layers.3." + k for k in top.state_dict()}
    assert keys - top_keys == {k for k in model.state_dict() if k.startswith("cross_blocks.")}
    loaded = SharedLLMForCausalLM.from_pretrained(tmp_path, make_base()).eval()
    for k, v in top.state_dict().items():
        assert torch.equal(loaded.base_model.model.layers[3].state_dict()[k], v), k
    x, ctx = tokens(1, 7, seed=15), tokens(1, 40, seed=16)
    with torch.no_grad():
        close(loaded(x, context_input_ids=ctx).logits, model(x, context_input_ids=ctx).logits, atol=0, rtol=0)


def test_from_pretrained_of_a_wrong_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="sharedllm_config.json"):
        SharedLLMForCausalLM.from_pretrained(tmp_path, make_base())
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match"):  # merge has no cross blocks to load them into
        SharedLLMForCausalLM.from_pretrained(tmp_path, make_base(), injection="merge")
    os.remove(os.path.join(tmp_path, WEIGHTS_NAME))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        SharedLLMForCausalLM.from_pretrained(tmp_path, make_base())


def test_from_pretrained_into_more_injected_layers_needs_missing_ok(tmp_path):
    """Two saved cross blocks into a three-layer config: refused by default; with ``missing_ok`` the
    saved blocks are loaded and the third keeps its fresh ``cross_init`` start."""
    cfg = dict(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, cross_init="copy_zero")
    model, _ = wrap(**cfg)
    _perturb(model.cross_blocks.parameters())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        SharedLLMForCausalLM.from_pretrained(tmp_path, make_base(), num_injected_layers=3)
    loaded = SharedLLMForCausalLM.from_pretrained(tmp_path, make_base(), missing_ok=True, num_injected_layers=3)
    fresh = SharedLLMForCausalLM.from_base(make_base(), SharedLLMConfig(**dict(cfg, num_injected_layers=3)))
    assert len(loaded.cross_blocks) == 3
    for i in range(3):
        want = (model if i < 2 else fresh).cross_blocks[str(i)].state_dict()
        for k, v in loaded.cross_blocks[str(i)].state_dict().items():
            assert torch.equal(v, want[k]), f"cross block {i}: {k}"


def test_save_load_round_trip_unshared_lower_layers(tmp_path):
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, share_lower=False)
    _perturb(model.lower_layers.parameters())
    model.save_pretrained(tmp_path)
    keys = _stored_keys(tmp_path)
    assert any(k.startswith("lower_layers.0.") for k in keys) and any(k.startswith("lower_layers.1.") for k in keys)
    assert not any(k.startswith("base_model.") for k in keys)
    assert keys == {k for k in model.state_dict() if k.startswith(("cross_blocks.", "lower_layers."))}
    loaded = SharedLLMForCausalLM.from_pretrained(tmp_path, make_base()).eval()
    x, ctx = tokens(1, 7, seed=15), tokens(1, 40, seed=16)
    with torch.no_grad():
        got, want = loaded(x, context_input_ids=ctx).logits, model(x, context_input_ids=ctx).logits
        close(got, want, atol=0, rtol=0)
        # the unperturbed lower layers would give other logits: they were restored
        fresh = SharedLLMForCausalLM.from_base(make_base(), model.config).eval()
        fresh.cross_blocks.load_state_dict(model.cross_blocks.state_dict())
        assert (fresh(x, context_input_ids=ctx).logits - want).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# 9. generation


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_generate_with_cached_context_equals_recompressing_loop(injection, positions):
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3,
                    injection=injection, positions=positions)
    c, lens, x = tokens(1, 45, seed=17), [45], tokens(1, 6, seed=18)
    ctx = model.compress_context(c, lens, query_input_ids=x)
    got = model.generate(x, compressed_context=ctx, do_sample=False, max_new_tokens=6)

    def step(ids, mask):
        with torch.no_grad():
            fresh = model.compress_context(c, lens, query_input_ids=x)
            return model(ids, compressed_context=fresh).logits

    expected = greedy_loop(step, x, None, 6)
    assert torch.equal(got, expected), f"{got} != {expected}"
    # and through generate(context_input_ids=...)
    assert torch.equal(model.generate(x, context_input_ids=c, context_lengths=lens, do_sample=False,
                                      max_new_tokens=6), expected)


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_incremental_forward_with_cache_equals_full_forward(injection, positions):
    """A user's own decoding loop: forward with ``use_cache`` then the next tokens with the cache
    (no position_ids given) equals one forward over everything."""
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3,
                    injection=injection, positions=positions)
    c, lens, x = tokens(2, 45, seed=17), torch.tensor([45, 30]), tokens(2, 9, seed=18)
    key = "cache" if "cache" in inspect.signature(type(model.base_model).forward).parameters else "past_key_values"
    with torch.no_grad():
        ctx = model.compress_context(c, lens, query_input_ids=x)
        full = model(x, compressed_context=ctx).logits
        first = model(x[:, :5], compressed_context=ctx, use_cache=True)
        cache = getattr(first, key)
        second = model(x[:, 5:8], compressed_context=ctx, use_cache=True, **{key: cache})
        third = model(x[:, 8:], compressed_context=ctx, use_cache=True, **{key: getattr(second, key)})
    close(torch.cat([first.logits, second.logits, third.logits], 1), full)


def test_forward_uses_the_attention_mask_for_the_retrieval_query():
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=3, tokens_per_node=3)
    c, x = tokens(2, 160, seed=32), tokens(2, 7, seed=33)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    with torch.no_grad():
        with_mask = model.compress_context(c, query_input_ids=x, query_attention_mask=mask)
        without = model.compress_context(c, query_input_ids=x)
        assert not torch.equal(with_mask.nodes.start, without.nodes.start), "the mask does not change the selection"
        expected = model(x, attention_mask=mask, compressed_context=with_mask).logits
        close(model(x, attention_mask=mask, context_input_ids=c).logits, expected)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_generate_left_padded_batch_chunk_positions(injection):
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3,
                    injection=injection, positions="chunk")
    c, lens = tokens(2, 45, seed=19), torch.tensor([45, 30])
    x = tokens(2, 7, seed=20)
    mask = torch.ones_like(x)
    x[1, :3], mask[1, :3] = PAD, 0
    ctx = model.compress_context(c, lens, query_input_ids=x, query_attention_mask=mask)
    got = model.generate(x, attention_mask=mask, compressed_context=ctx, do_sample=False, max_new_tokens=6)

    def step(ids, m):
        with torch.no_grad():
            fresh = model.compress_context(c, lens, query_input_ids=x, query_attention_mask=mask)
            return model(ids, attention_mask=m, position_ids=hf_positions(m), compressed_context=fresh).logits

    expected = greedy_loop(step, x, mask, 6)
    assert torch.equal(got, expected), f"{got} != {expected}"


def test_generate_sampling_with_several_return_sequences():
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3)
    c, lens, x = tokens(2, 45, seed=21), [45, 20], tokens(2, 5, seed=22)
    ctx = model.compress_context(c, lens, query_input_ids=x)
    torch.manual_seed(0)
    out = model.generate(x, compressed_context=ctx, do_sample=True, num_return_sequences=2, max_new_tokens=4,
                         min_new_tokens=4)
    assert out.shape == (4, 9)
    assert torch.equal(out[:, :5], x.repeat_interleave(2, 0))
    out = model.generate(x, context_input_ids=c, context_lengths=lens, do_sample=True, num_return_sequences=2,
                         max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (4, 8)


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_context_batch_is_repeated_for_a_larger_input_batch(injection, positions):
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, injection=injection,
                    positions=positions)
    c, lens, x = tokens(2, 45, seed=21), torch.tensor([45, 20]), tokens(2, 5, seed=22)
    with torch.no_grad():
        ctx = model.compress_context(c, lens, query_input_ids=x)
        x2 = x.repeat_interleave(2, 0)
        got = model(x2, compressed_context=ctx).logits
        expected = model(x2, context_input_ids=c.repeat_interleave(2, 0),
                         context_lengths=lens.repeat_interleave(2)).logits
    close(got, expected)


# --------------------------------------------------------------------------------------------
# 10. training


def test_set_trainable_cross_and_a_training_step_lowers_the_loss():
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3)
    params = model.set_trainable("cross")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("cross_blocks.") for n in names), sorted(names)
    assert names == {"cross_blocks." + n for n, _ in model.cross_blocks.named_parameters()}
    assert {id(p) for p in params} == {id(p) for p in model.cross_blocks.parameters()}
    frozen = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    x, labels, c = tokens(2, 12, seed=23), tokens(2, 12, seed=24), tokens(2, 40, seed=25)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(x, context_input_ids=c, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3, losses
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen {k} changed"


def test_set_trainable_with_unshared_lower_layers():
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, share_lower=False)
    model.set_trainable("cross")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("cross_blocks.", "lower_layers."))}
    assert names == expected and any(n.startswith("lower_layers.") for n in names)
    merge, _ = wrap(num_injected_layers=2, injection="merge", share_lower=False)
    params = merge.set_trainable("cross")  # the copied lower layers are something to train
    assert {id(p) for p in params} == {id(p) for p in merge.lower_layers.parameters()}
    # and a training step moves them, not the base model
    merge.train()
    c, x = tokens(1, 40, seed=3), tokens(1, 6)
    before = [p.clone() for p in merge.lower_layers.parameters()]
    base_before = {k: v.clone() for k, v in merge.base_model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    merge(x, context_input_ids=c, labels=x).loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, merge.lower_layers.parameters()))
    assert all(torch.equal(v, base_before[k]) for k, v in merge.base_model.state_dict().items())


def test_set_trainable_cross_top_and_merge():
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3)
    model.set_trainable("cross+top", top_layers=2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("base_model.model.layers.2.") for n in names)
    assert any(n.startswith("base_model.model.layers.3.") for n in names)
    assert not any(n.startswith(("base_model.model.layers.1.", "base_model.model.embed_tokens")) for n in names)
    merge, _ = wrap(num_injected_layers=2, injection="merge")
    with pytest.raises(ValueError, match="merge"):
        merge.set_trainable("cross")
    with pytest.raises(ValueError, match="which"):
        model.set_trainable("everything")
    with pytest.raises(ValueError, match="top_layers"):
        model.set_trainable("cross+top", top_layers=0)


@pytest.mark.parametrize("cfg, trainable", [
    (dict(), ("cross",)),
    (dict(positions="true", share_lower=False), ("cross",)),
    (dict(injection="merge", positions="true", num_injected_layers=4), ("cross+top", 2)),
    (dict(), ("cross+top", 4)),  # the shared lower layers train too: the packed passes need gradients
])
def test_activation_checkpointing_keeps_the_loss_and_the_gradients(cfg, trainable):
    """A checkpointed layer is recomputed in the backward, after the call that injected the context
    has ended; the recomputation must see that context again."""
    c, lens, x, seeds = tokens(2, 64, seed=80), torch.tensor([64, 40]), tokens(2, 24, seed=81), torch.tensor([1, 2])

    def step(checkpointing):
        torch.manual_seed(0)  # the random cross blocks
        model, _ = wrap(**{**dict(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3,
                                  split_noise_std=0.2, cross_init="random"), **cfg})
        model.set_trainable(*trainable)
        if checkpointing:
            enable_activation_checkpointing(model.base_model)
        model.train()
        calls = []
        model.base_model.model.layers[-1].self_attn.register_forward_hook(lambda *a: calls.append(1))
        loss = model(x, context_input_ids=c, context_lengths=lens, labels=x, split_noise_seeds=seeds).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return model, loss.item(), grads, len(calls)

    _, loss, grads, calls = step(False)
    model, loss_ckpt, grads_ckpt, calls_ckpt = step(True)
    assert calls_ckpt == calls + 1, "the top layer was not recomputed: nothing is checkpointed"
    assert loss_ckpt == loss
    assert sorted(grads_ckpt) == sorted(grads)
    # (a copied lower layer M - 1 gets none past its keys/values: the lower pass stops there)
    assert all(grads[n] is not None for n in grads if n.startswith("cross_blocks."))
    for name, g in grads.items():
        if g is None:
            assert grads_ckpt[name] is None, name
        else:
            close(grads_ckpt[name], g, name, atol=0.0, rtol=0.0)
    base = model.unwrap()
    assert not any(hasattr(vars(layer).get("_gradient_checkpointing_func"), "_sharedllm_state")
                   for layer in base.model.layers)


# --------------------------------------------------------------------------------------------
# 11. bad input


@pytest.fixture(scope="module")
def small_model():
    return wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3)[0]


def test_bad_context_inputs_raise(small_model):
    m = small_model
    x = tokens(1, 5)
    cases = [
        (dict(context_input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta")), "context_input_ids"),
        (dict(context_input_ids=torch.zeros(1, 0, dtype=torch.long)), "context_input_ids"),
        (dict(context_input_ids=tokens(1, 8), context_lengths=[9]), "context_lengths"),
        (dict(context_input_ids=tokens(1, 8), context_lengths=[-1]), "context_lengths"),
        (dict(context_input_ids=tokens(1, 8), context_lengths=[3, 4]), "context_lengths"),
        (dict(context_input_ids=tokens(1, 8), context_lengths=[[3]]), "context_lengths"),
        (dict(context_input_ids=tokens(1, 8), context_lengths=[3.0]), "context_lengths"),
        (dict(context_input_ids=tokens(1, 8).float()), "context_input_ids"),
        (dict(context_input_ids=tokens(8)), "context_input_ids"),
        (dict(context_input_ids=tokens(2, 8)), "batch"),
        (dict(context_lengths=[3]), "context_lengths"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            m(x, **kwargs)
    with pytest.raises(ValueError, match="query_input_ids"):
        m.compress_context(tokens(2, 40), query_input_ids=tokens(1, 4))
    ctx = m.compress_context(tokens(1, 40))
    with pytest.raises(ValueError, match="compressed_context"):
        m(x, context_input_ids=tokens(1, 8), compressed_context=ctx)
    with pytest.raises(ValueError, match="compressed_context"):
        m(x, compressed_context="not a context")
    with pytest.raises(ValueError, match="compressed_context"):
        m(x, compressed_context=ctx.to("meta"))
    with pytest.raises(ValueError, match="context_lengths"):
        m(x, context_input_ids=tokens(1, 8), context_lengths=torch.tensor([3], device="meta"))
    with pytest.raises(ValueError, match="batch"):
        m(tokens(3, 5), compressed_context=m.compress_context(tokens(2, 40)))


def test_bad_query_inputs_raise(small_model):
    """The question of compress_context is validated like the context (docs/DESIGN.md section 2: clear errors that
    name the argument)."""
    m = small_model
    c, q = tokens(1, 40), tokens(1, 4)
    with pytest.raises(ValueError, match="query_input_ids"):
        m.compress_context(c, query_input_ids=q[0])
    with pytest.raises(ValueError, match="query_input_ids"):
        m.compress_context(c, query_input_ids=q.float())
    with pytest.raises(ValueError, match="query_input_ids"):
        m.compress_context(c, query_input_ids=q.to("meta"))
    with pytest.raises(ValueError, match="query_attention_mask"):
        m.compress_context(c, query_input_ids=q, query_attention_mask=torch.ones(1, 5, dtype=torch.long))


@pytest.mark.parametrize("field,value", [
    ("chunk_size", 0), ("tree_depth", -1), ("injection", "sideways"), ("num_injected_layers", 0),
    ("tokens_per_node", 0), ("positions", "absolute"), ("retrieval", "left"), ("pool_mode", "max"),
    ("split_noise_std", 0.5), ("backend", "gpu"), ("share_lower", 1),
])
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        SharedLLMConfig(**{field: value})
    base = make_base()
    with pytest.raises(ValueError, match=field):
        SharedLLMForCausalLM.from_base(base, **{field: value})


def test_bad_base_models_raise():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match="Llama-shaped"):
        SharedLLMForCausalLM.from_base(gpt2)
    with pytest.raises(ValueError, match="Llama-shaped"):
        SharedLLMForCausalLM.from_base(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="base_model"):
        SharedLLMForCausalLM.from_base(42)
    with pytest.raises(ValueError, match="num_injected_layers"):
        SharedLLMForCausalLM.from_base(make_base(), num_injected_layers=5)
    base = make_base()
    SharedLLMForCausalLM.from_base(base, num_injected_layers=4)
    with pytest.raises(ValueError, match="already wrapped"):
        SharedLLMForCausalLM.from_base(base)


# transformers classes of Llama-shaped models whose decoder layer is not Llama's
UNSUPPORTED = {"gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),  # attention output normed before the residual add
               "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
               "granite": ("GraniteConfig", "GraniteForCausalLM")}  # embedding and residual multipliers


@pytest.mark.parametrize("model_type", list(UNSUPPORTED))
def test_llama_shaped_models_with_another_layer_are_refused(model_type):
    import transformers

    config_name, model_name = UNSUPPORTED[model_type]
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = getattr(transformers, config_name)(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                intermediate_size=64, max_position_embeddings=256)
    base = getattr(transformers, model_name)(config)
    assert base.config.model_type == model_type
    with pytest.raises(ValueError, match=rf"model_type '{model_type}'.*supported model types: llama, mistral, qwen2"):
        SharedLLMForCausalLM.from_base(base)
    assert not getattr(base, "_sharedllm_wrapped", False)


def test_every_supported_model_type_is_tested_and_wraps():
    assert set(SUPPORTED_MODEL_TYPES) == set(ARCHS)
    for arch in ARCHS:
        model = SharedLLMForCausalLM.from_base(make_base(arch), num_injected_layers=2)
        assert model.base_model.config.model_type == arch


# --------------------------------------------------------------------------------------------
# 12. wrapping: the path of a context runs one way, and unwrap undoes everything


def _reaches(roots, target) -> bool:
    """Whether ``target`` can be reached from ``roots`` by following object references (not through
    classes, modules or a function's globals, which lead everywhere)."""
    seen, todo = set(), list(roots)
    while todo:
        obj = todo.pop()
        if obj is target:
            return True
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    todo.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
        else:
            todo += gc.get_referents(obj)
    return False


@pytest.mark.parametrize("injection, positions, share_lower",
                         [("residual", "chunk", True), ("residual", "true", False), ("merge", "true", True)])
def test_nothing_the_wrapper_holds_leads_back_to_it(injection, positions, share_lower):
    """The hooks, the injection state on the attention modules and the compressor refer to the
    modules they use, never to the wrapper: a context passed to forward flows one way."""
    model, _ = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, injection=injection,
                    positions=positions, share_lower=share_lower)
    with torch.no_grad():
        model(tokens(1, 6), context_input_ids=tokens(1, 40, seed=2))  # caches filled by a call included
    held = [v for v in gc.get_referents(model) if v is not model]
    assert not _reaches(held, model)
    # the walk does follow the injection state that the attention modules carry (it holds the cross blocks)
    assert _reaches([model.base_model], model.cross_blocks)


def test_unwrap_restores_the_base_model():
    model, twin = wrap(num_injected_layers=2, chunk_size=16, tree_depth=2, tokens_per_node=3, positions="true")
    base = model.unwrap()
    modules = [base, base.model, *base.model.layers, *(layer.self_attn for layer in base.model.layers)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert not any("_sharedllm_state" in vars(layer.self_attn) for layer in base.model.layers)
    assert base.config._attn_implementation == twin.config._attn_implementation == "sdpa"
    x = tokens(2, 9)
    with torch.no_grad():
        close(base(x).logits, twin(x).logits, "unwrapped")
    SharedLLMForCausalLM.from_base(base, num_injected_layers=2)  # no longer marked as wrapped
