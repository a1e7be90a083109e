"""Compression: a batch of contexts in, a :class:`CompressedContext` out (docs/DESIGN.md section 5).

:class:`ContextCompressor` runs SharedLLM's context path on the networks of a wrapped model. Every
chunk long enough, except the last ``raw_recent_chunks`` of a context (encoded whole, then cut
into raw nodes of ``tokens_per_node`` tokens), gets a binary tree of node spans (split noise included), all drawn up front;
then the chunks are worked through in **groups** of at most ``max_pass_tokens`` context tokens
(in (sequence, chunk) order; a longer chunk is a group of its own), each group in three stages:

1. **retrieve**: ``retrieval="query"`` encodes the question once (one upper layer) and, level by
   level, only the tree nodes ``tree_topk``'s descent compares (one lower layer, ``retrieval.py``;
   ``"right"`` always expands the right child); ``leaf_halo_tokens`` cuts the text beside its leaves free;
2. **encode**: the lower model runs over the group's preserved nodes, packed into one row of
   independent causal segments, and the keys/values of its ``M`` layers are captured;
3. **pool**: ``chunk_pool`` compresses every node longer than ``tokens_per_node`` to that many rows
   (for ``positions="distance"`` after undoing the keys' rotation; with ``drop_node_sinks``
   without each node's first token, its own attention sink).

Only the compressed keys/values, the nodes and the counts outlive a group, so the memory of a
call is one group's activations plus the compressed context, whatever its length; every chunk's
result depends on that chunk alone, so the groups give what one pass would. A context grows
(``into=``) by compressing only the new chunks, after reopening an unfinished last chunk.

The index arithmetic lives in ``context.py``; the packed passes run through the attention function
(``attention.py``), switched on by the injection state's ``packed`` field.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import sharedllm_ops as so

from ..reference.rotary import rotate
from .arguments import check_context, check_into, check_query, check_split_noise_seeds, pass_tokens
from .attention import PackedPass, StopEncoding
from .compressed import CompressedContext
from .config import SharedLLMConfig
from .context import (
    ChunkLayout,
    ContextTokens,
    chunk_groups,
    chunk_layout,
    compressed_row_centres,
    compressed_row_tokens,
    compressed_row_sources,
    compressed_rows,
    concat_nodes,
    context_tokens,
    node_sinks,
    pack_segments,
    pooled_segments,
    preserved_nodes,
    recent_chunks,
    segment_cu_seqlens,
    split_nodes,
    split_spans,
    tree_node_spans,
)
from .retrieval import centred_chunk_scores, descend, halo_nodes, level_offset, right_descent_node_ids, top_chunks


class ContextCompressor:
    """The context path of one wrapped model.

    Holds what it runs, not the wrapper: ``decoder``, the base model's inner decoder (its
    ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``, looked up at each call so that a
    resized embedding is seen); ``lower``, the lower model's layers; the config; and ``state``,
    whose ``packed`` field routes the attention function during a packed pass (anything with that
    attribute, in practice the model's :class:`~sharedllm_ops.model.injection.InjectionState`).
    """

    def __init__(self, decoder: nn.Module, lower: list, config: SharedLLMConfig, state):
        self.decoder = decoder
        self.lower = lower
        self.config = config
        self.state = state

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    # ------------------------------------------------------------------------------------------
    # packed passes

    def encode_packed(self, token_ids, positions, cu_seqlens, layers, capture_layers=(), stop_after=None, keys_of=None):
        """Runs ``layers`` on one packed row of independent causal segments.

        token_ids, positions: int64 ``[N]``; cu_seqlens: int32 ``[S + 1]``. Returns the hidden
        states ``[N, hidden]`` after the last layer run (None if the pass stopped early) and the
        captured ``{layer_idx: (k, v)}`` (``[N, Hk, D]``, k rotated at ``positions``).
        """
        decoder = self.decoder
        if token_ids.numel() == 0:  # transformers' attention cannot reshape an empty row
            attn = layers[0].self_attn if len(layers) else decoder.layers[0].self_attn
            embed = decoder.embed_tokens
            empty = embed.weight.new_zeros(0, attn.k_proj.out_features // attn.head_dim, attn.head_dim)
            hidden = embed.weight.new_zeros(0, embed.embedding_dim)
            return hidden, {i: (empty, empty) for i in capture_layers}
        hidden = decoder.embed_tokens(token_ids)[None]
        position_ids = positions[None]
        position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
        packed = self.state.packed = PackedPass.build(cu_seqlens, capture_layers, stop_after, keys_of)
        try:
            for layer in layers:
                out = layer(hidden, attention_mask=None, position_ids=position_ids,
                            position_embeddings=position_embeddings)
                hidden = out[0] if isinstance(out, tuple) else out
        except StopEncoding:
            hidden = None
        finally:
            self.state.packed = None
        return (None if hidden is None else hidden[0]), packed.capture

    def last_token_states(self, token_ids, positions, cu_seqlens, layer):
        """``[S, hidden]``: the hidden state of each (non-empty) segment's last token after ``layer``.

        Equal to running ``layer`` on every token, at a fraction of the cost: a first pass computes
        the keys/values of every token and stops at the attention; then the whole layer runs on the
        last tokens only, each attending to its segment's captured keys/values.
        """
        idx = layer.self_attn.layer_idx
        _, kv = self.encode_packed(token_ids, positions, cu_seqlens, [layer], capture_layers=[idx], stop_after=idx)
        last = cu_seqlens[1:].long() - 1
        keys, values = kv[idx]
        hidden, _ = self.encode_packed(token_ids[last], positions[last], None, [layer],
                                       keys_of=(keys, values, cu_seqlens, self.config.backend))
        return hidden

    def rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` ``[N, 1, D]`` of the base model's rotary at ``positions`` ``[N]``, without
        its attention scaling (so that undoing a rotation leaves the key as the layer projected it,
        times that scaling once)."""
        rotary = self.decoder.rotary_emb
        scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
        probe = torch.zeros(1, 1, dtype=torch.float32, device=positions.device)
        with torch.no_grad():
            cos, sin = rotary(probe, positions[None])
        return cos[0, :, None].float() / scale, sin[0, :, None].float() / scale

    # ------------------------------------------------------------------------------------------
    # retrieval

    def retrieval_query(self, query_ids, query_mask, context_lengths):
        """``[B, hidden]``: the mean of the last ``retrieval_query_tokens`` query tokens after one upper
        layer and the final norm (zeros for an empty query)."""
        if query_mask is None:
            query_mask = torch.ones_like(query_ids)
        keep = query_mask.bool()
        counts = keep.sum(1)
        cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=query_ids.device)
        torch.cumsum(counts, 0, out=cu[1:])
        positions = (torch.cumsum(keep.long(), 1) - 1)
        if self.config.positions == "true":
            positions = positions + context_lengths[:, None]
        hidden, _ = self.encode_packed(query_ids[keep], positions[keep], cu, self.decoder.layers[:1])
        hidden = self.decoder.norm(hidden)
        row = torch.repeat_interleave(torch.arange(counts.numel(), device=hidden.device), counts)
        from_end = cu[1:].long()[row] - 1 - torch.arange(hidden.shape[0], device=hidden.device)
        used = from_end < self.config.retrieval_query_tokens
        return _segment_means(hidden[used], row[used], counts.clamp(max=self.config.retrieval_query_tokens))

    def node_embeddings(self, tokens: ContextTokens, row, start, length):
        """``[n, k, hidden]``: nodes encoded in isolation by one lower layer, normed: their last token
        (``retrieval_node_embedding="last"``) or the mean over their tokens (``"mean"``).

        ``row`` ``[n]``: the sequence of each of ``n`` chunks; ``start``, ``length`` ``[n, k]``: its
        nodes' spans in the sequence."""
        packed = pack_segments(tokens.flat_index(row[:, None], start).flatten(), length.flatten())
        positions = packed.offset
        if self.config.positions == "true":
            positions = positions + start.flatten()[packed.segment]
        ids = tokens.ids.reshape(-1)[packed.index]
        if self.config.retrieval_node_embedding == "last":
            hidden = self.last_token_states(ids, positions, packed.cu_seqlens, self.lower[0])
            return self.decoder.norm(hidden).view(*start.shape, -1)
        hidden, _ = self.encode_packed(ids, positions, packed.cu_seqlens, self.lower[:1])
        hidden = self.decoder.norm(hidden)
        return _segment_means(hidden, packed.segment, packed.lengths).view(*start.shape, -1)

    # ------------------------------------------------------------------------------------------
    # the whole path

    def compress(
        self,
        context_input_ids: torch.Tensor,
        context_lengths=None,
        query_input_ids: torch.Tensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        split_noise_seeds: torch.Tensor | None = None,
        training: bool = False,
        max_pass_tokens: int | None = None,
        into: CompressedContext | None = None,
    ) -> CompressedContext:
        """See :meth:`SharedLLMForCausalLM.compress_context`; ``training`` turns the split noise on."""
        cfg = self.config
        lengths = check_context(context_input_ids, context_lengths, self.device)
        limit = pass_tokens(max_pass_tokens, cfg)
        B = lengths.numel()
        if into is None:
            tokens, reopened = context_tokens(context_input_ids, lengths, cfg.chunk_size)
        else:
            check_into(into, B, self.device, cfg)
            tokens, reopened = context_tokens(context_input_ids, lengths, cfg.chunk_size, into.context_lengths,
                                              into.tail_input_ids)
        timer = _StageTimer(self.device)
        chunks = chunk_layout(tokens.lengths, cfg.chunk_size, tokens.first_chunk)
        # the chunks retrieved_chunks chooses from: not kept raw, and not the first, whose first token
        # is the context's attention sink (without it, the merged attention to the context breaks)
        older = ~recent_chunks(chunks.index, chunks.row, chunks.num_chunks, cfg.raw_recent_chunks) & (chunks.index > 0)
        selecting = cfg.retrieved_chunks is not None and bool(
            (torch.bincount(chunks.row[older], minlength=B) > cfg.retrieved_chunks).any())
        query = None
        if (selecting or bool(self.splittable(chunks).any())) and cfg.retrieval == "query" \
                and query_input_ids is not None:
            check_query(query_input_ids, query_attention_mask, B, self.device)
            with torch.no_grad():
                query = self.retrieval_query(query_input_ids, query_attention_mask, tokens.total_lengths)
        scored = 0
        if selecting:
            score = chunks.index.float()  # without a query (or with an empty one): the latest
            if query is not None:
                with torch.no_grad():
                    cos = self.chunk_scores(tokens, chunks, older, query, limit)
                score = torch.where((query == 0).all(-1)[chunks.row], score, cos)
                scored = int(older.sum())
            chunks = chunks.where(top_chunks(score, chunks.row, older, cfg.retrieved_chunks))
        splittable, node_start, node_len = self.trees(chunks, split_noise_seeds, training)
        timer.stage("retrieve")

        M = cfg.num_injected_layers
        stats = dict(passes=0, peak_group_tokens=0, embedded_nodes=0, embedded_tokens=0)
        trees_before = [0] + torch.cumsum(splittable, 0).tolist()  # splittable chunks before each chunk
        groups = []  # per group: (nodes, keys, values); group activations are freed as each one ends
        for first, end in chunk_groups(chunks.length, limit):
            t0, t1 = trees_before[first], trees_before[end]
            groups.append(self.compress_group(tokens, chunks.take(first, end), splittable[first:end],
                                              node_start[t0:t1], node_len[t0:t1], query, timer, stats))
            stats["passes"] += 1
            stats["peak_group_tokens"] = max(stats["peak_group_tokens"], int(chunks.length[first:end].sum()))
        nodes = concat_nodes([g[0] for g in groups]) if len(groups) > 1 else groups[0][0]
        keys = [_joined([g[1] for g in groups], i) for i in range(M)]
        values = [_joined([g[2] for g in groups], i) for i in range(M)]
        rows = compressed_rows(nodes.length, cfg.tokens_per_node)
        k_positions = None
        if cfg.positions == "chunk":
            k_positions = nodes.chunk.repeat_interleave(rows).to(torch.int32)
        sinks = node_sinks(nodes.start, nodes.length, cfg.tokens_per_node, cfg.drop_node_sinks)
        if cfg.positions == "distance":  # where each row sits in the text; the attention turns it into a distance
            k_positions = compressed_row_centres(nodes.start, nodes.length, cfg.tokens_per_node, sinks).to(torch.int32)
        num_chunks = chunks.num_chunks.to(torch.int32)
        stats = {
            "context_tokens": int(tokens.total_lengths.sum()),
            "compressed_tokens": int(rows.sum()),
            "chunks": int(num_chunks.sum()),
            "encoded_chunks": int(chunks.row.numel()),
            "scored_chunks": scored,
            "nodes": int(nodes.row.numel()),
            **stats,
            **timer.seconds,
        }
        compressed = CompressedContext(
            keys=keys,
            values=values,
            cu_seqlens=segment_cu_seqlens(nodes.row, rows, B),
            k_positions=k_positions,
            row_tokens=(compressed_row_tokens(nodes.start, nodes.length, cfg.tokens_per_node, sinks)
                        if cfg.row_weight_exponent else None),
            num_chunks=num_chunks,
            max_chunks=int(num_chunks.max()) if B else 0,
            context_lengths=tokens.total_lengths,
            nodes=nodes,
            stats=stats,
            tail_input_ids=tokens.tail(),
        )
        return compressed if into is None else into.extended(compressed, reopened, cfg.tokens_per_node)

    def splittable(self, chunks: ChunkLayout) -> torch.Tensor:
        """bool ``[num_chunks]``: the chunks that get a tree (long enough, not kept raw)."""
        cfg = self.config
        h = cfg.tree_depth
        splittable = chunks.length >= 2**h if h > 0 else torch.zeros_like(chunks.length, dtype=torch.bool)
        return splittable & ~recent_chunks(chunks.index, chunks.row, chunks.num_chunks, cfg.raw_recent_chunks)

    def chunk_scores(self, tokens: ContextTokens, chunks: ChunkLayout, which: torch.Tensor, query, limit) -> torch.Tensor:
        """float ``[num_chunks]``: for the chunks ``which`` (bool), :func:`centred_chunk_scores` of the
        query ``[B, hidden]`` and the chunk's leaves (windows of ``chunk_size / 2 ** tree_depth`` tokens,
        embedded as retrieval embeds a node); ``-inf`` for the others. The chunks are embedded in
        groups of at most ``limit`` tokens, as they are compressed."""
        width = max(self.config.chunk_size // 2**self.config.tree_depth, 1)
        candidates = which.nonzero().squeeze(1)
        leaves, of = [query.new_zeros(0, query.shape[1])], [candidates[:0]]
        for first, end in chunk_groups(chunks.length[candidates], limit):
            chunk = candidates[first:end]
            window, offset, length = split_spans(chunks.length[chunk], torch.ones_like(chunk, dtype=torch.bool), width)
            of.append(chunk[window])  # the chunk of every window
            leaves.append(self.node_embeddings(tokens, chunks.row[of[-1]], (chunks.start[of[-1]] + offset)[:, None],
                                               length[:, None])[:, 0].float())
        of = torch.cat(of)
        return centred_chunk_scores(torch.cat(leaves), of, chunks.row[of], query, chunks.row.numel())

    def trees(self, chunks: ChunkLayout, split_noise_seeds, training: bool):
        """``(splittable, node_start, node_len)``: bool ``[num_chunks]``, the chunks with a tree, and
        int64 ``[num_splittable, T]`` their node spans (within the chunk), split noise included."""
        cfg = self.config
        h = cfg.tree_depth
        splittable = self.splittable(chunks)
        which = splittable.nonzero().squeeze(1)
        if not which.numel():
            empty = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            return splittable, empty, empty
        noise = cfg.split_noise_std if training else 0.0
        keys = None
        if noise and split_noise_seeds is not None:
            seeds = check_split_noise_seeds(split_noise_seeds, chunks.num_chunks.numel(), self.device)
            keys = (seeds[chunks.row[which]] * 1_000_003 + chunks.index[which]) & ((1 << 62) - 1)
        node_start, node_len = tree_node_spans(chunks.length[which], h, noise, keys)
        return splittable, node_start, node_len

    def compress_group(self, tokens: ContextTokens, chunks: ChunkLayout, splittable, node_start, node_len, query,
                       timer, stats):
        """``(nodes, keys, values)`` of one group of chunks (``splittable``, ``node_start``, ``node_len``:
        as :meth:`trees` returns them for these chunks; ``query`` ``[B, hidden]`` or None for the right
        descent). Adds the retrieval's work to ``stats``."""
        cfg = self.config
        node_ids = node_start[:, :0]
        which = splittable.nonzero().squeeze(1)  # the chunks with a tree: the rows of node_start
        row, chunk_start = chunks.row[which], chunks.start[which][:, None]
        if node_start.shape[0]:
            if query is None:
                node_ids = right_descent_node_ids(cfg.tree_depth, self.device).expand(which.numel(), -1)
            else:
                def embed(ids):
                    return self.node_embeddings(tokens, row, chunk_start + node_start.gather(1, ids),
                                                node_len.gather(1, ids))

                with torch.no_grad():
                    node_ids, embedded = descend(query[row], embed, cfg.tree_depth, cfg.backend)
                stats["embedded_nodes"] += embedded.numel()
                stats["embedded_tokens"] += int(node_len.gather(1, embedded).sum())
        nodes = preserved_nodes(chunks, splittable, node_start, node_len, node_ids)
        if cfg.leaf_halo_tokens and node_ids.numel():
            leaf = (node_ids >= level_offset(cfg.tree_depth)) & (node_len.gather(1, node_ids) > 0)  # last level
            leaf_start = chunk_start + node_start.gather(1, node_ids)
            nodes = halo_nodes(nodes, row[:, None].expand_as(leaf)[leaf], leaf_start[leaf], cfg.leaf_halo_tokens)
        timer.stage("retrieve")

        packed = pack_segments(tokens.flat_index(nodes.row, nodes.start), nodes.length)
        M = cfg.num_injected_layers
        kv, positions = self.encode_nodes(tokens, nodes, packed, M)
        if cfg.raw_recent_chunks and cfg.tokens_per_node is not None:
            # a recent chunk, encoded whole, is cut into nodes of at most P tokens, which pooling keeps
            # as they are; the pieces are its tokens in the same order, so the encoded rows still match
            recent = recent_chunks(nodes.chunk, nodes.row, chunks.num_chunks, cfg.raw_recent_chunks)
            nodes = split_nodes(nodes, recent, cfg.tokens_per_node)
            packed = pack_segments(tokens.flat_index(nodes.row, nodes.start), nodes.length)
        timer.stage("encode")

        keys, values = [], []
        P = cfg.tokens_per_node
        if P is not None:
            sources = compressed_row_sources(nodes.length, P)
            pool_index, pool_cu = pooled_segments(packed, node_sinks(nodes.start, nodes.length, P, cfg.drop_node_sinks))
        if cfg.positions == "distance":  # pool before rotary: undo the rotation at the in-node positions
            cos, sin = self.rotation(positions)
        for i in range(M):
            k, v = kv.pop(i)
            if cfg.positions == "distance":
                k = rotate(k, cos.to(k.dtype), sin.to(k.dtype), inverse=True)
            if P is not None:
                pk, pv = (k, v) if pool_index is None else (k[pool_index], v[pool_index])
                k = torch.cat([so.chunk_pool(pk, pool_cu, P, cfg.pool_mode, backend=cfg.backend), k])[sources]
                v = torch.cat([so.chunk_pool(pv, pool_cu, P, cfg.pool_mode, backend=cfg.backend), v])[sources]
            keys.append(k)
            values.append(v)
        timer.stage("pool")
        return nodes, keys, values

    def encode_nodes(self, tokens: ContextTokens, nodes, packed, M: int):
        """The lower pass over every preserved node, each encoded alone: ``({layer: (k, v)}, positions)``,
        one row per token of ``packed`` (the nodes' tokens, packed) for layers ``0..M-1``, and the
        positions the tokens were encoded at.

        With ``anchor_tokens = a``, a node that does not start its context is encoded behind the
        context's first ``min(a, start)`` tokens, whose rows are then dropped (the anchor of Star
        Attention, arXiv 2411.17116): the anchor takes the attention-sink role that the node's own
        first token would otherwise take, and no token of the node is lost. With ``lead_tokens = n``
        the node is also encoded behind the (at most ``n``) tokens just before it that the anchor
        does not hold, dropped as well."""
        cfg = self.config
        flat = tokens.ids.reshape(-1)
        if not cfg.anchor_tokens and not cfg.lead_tokens:
            positions = packed.offset if cfg.positions != "true" else nodes.start[packed.segment] + packed.offset
            _, kv = self.encode_packed(flat[packed.index], positions, packed.cu_seqlens, self.lower,
                                       capture_layers=range(M), stop_after=M - 1)
            return kv, positions
        anchor = nodes.start.clamp(max=cfg.anchor_tokens)
        lead = torch.minimum(nodes.start - anchor, torch.full_like(nodes.start, cfg.lead_tokens))
        prefix = anchor + lead
        full = pack_segments(tokens.flat_index(nodes.row, torch.zeros_like(nodes.start)), prefix + nodes.length)
        seg, offset = full.segment, full.offset
        in_prefix = offset < prefix[seg]
        # the text position of every encoded token: the anchor from 0, the lead just before the node, the node
        text = torch.where(offset < anchor[seg], offset, nodes.start[seg] - prefix[seg] + offset)
        index = tokens.flat_index(nodes.row, torch.zeros_like(nodes.start))[seg] + text
        positions = text if cfg.positions == "true" else offset
        _, kv = self.encode_packed(flat[index], positions, full.cu_seqlens, self.lower,
                                   capture_layers=range(M), stop_after=M - 1)
        kept = (~in_prefix).nonzero().squeeze(1)  # in the order of ``packed``
        return {i: (k[kept], v[kept]) for i, (k, v) in kv.items()}, positions[kept]


def _segment_means(rows: torch.Tensor, segment: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[n, hidden]``: per segment, the sum of its ``rows`` (``segment``: each row's, of ``n = counts.numel()``)
    over its ``counts`` (zeros for an empty one). Summed in float32: a bf16/fp16 sum of many states loses
    precision, and on CUDA its order varies."""
    sums = rows.new_zeros(counts.numel(), rows.shape[-1], dtype=torch.float32).index_add_(0, segment, rows.float())
    return (sums / counts.clamp(min=1)[:, None]).to(rows.dtype)


def _joined(groups: list, layer: int) -> torch.Tensor:
    """Layer ``layer``'s rows of every group, concatenated; the groups' copies are dropped as it goes."""
    parts = [g[layer] for g in groups]
    for g in groups:
        g[layer] = None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _StageTimer:
    """Seconds per stage of the context path, summed over groups (synchronising the GPU, if any, at stage ends)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def stage(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        key = f"{name}_s"
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self.last
        self.last = now


__all__ = ["CompressedContext", "ContextCompressor"]
