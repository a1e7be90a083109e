"""Compression: a batch of contexts in, a :class:`CompressedContext` out (docs/DESIGN.md section 5).

:class:`ContextCompressor` runs SharedLLM's context path on the networks of a wrapped model:

1. **retrieve**: every chunk long enough gets a binary tree of node spans; ``retrieval="query"``
   encodes the question (one upper layer) and every tree node (one lower layer) and keeps the
   nodes ``tree_topk`` selects, ``"right"`` always expands the right child;
2. **encode**: the lower model runs once over all preserved nodes, packed into one row of
   independent causal segments, and the keys/values of its ``M`` layers are captured;
3. **pool**: ``chunk_pool`` compresses every node longer than ``tokens_per_node`` to that many rows.

The index arithmetic lives in ``context.py``; the packed passes run through the attention function
(``attention.py``), switched on by the injection state's ``packed`` field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

import sharedllm_ops as so

from .attention import PackedPass, StopEncoding
from .config import SharedLLMConfig
from .context import (
    BRANCHING,
    ChunkLayout,
    PreservedNodes,
    chunk_layout,
    compressed_row_sources,
    compressed_rows,
    pack_segments,
    preserved_nodes,
    right_descent_node_ids,
    segment_cu_seqlens,
    tree_node_spans,
)


@dataclass
class CompressedContext:
    """A batch of contexts compressed for injection; reusable across forward passes and questions.

    Attributes:
        keys, values: one ``[Nk, Hk, D]`` tensor per injected layer (all sequences packed).
        cu_seqlens: int32 ``[B + 1]`` boundaries of each sequence's rows in ``keys``/``values``.
        k_positions: int32 ``[Nk]`` chunk index of every row (``positions="chunk"``), else None.
        num_chunks: int32 ``[B]`` (``n`` of Eq. 2: the query position); ``max_chunks`` its maximum.
        context_lengths: int64 ``[B]`` original context lengths (decoder offset for ``positions="true"``).
        nodes: the preserved nodes (sequence, chunk, start, length), left to right.
        stats: sizes and per-stage seconds (``retrieve``, ``encode``, ``pool``).
    """

    keys: list
    values: list
    cu_seqlens: torch.Tensor
    k_positions: torch.Tensor | None
    num_chunks: torch.Tensor
    max_chunks: int
    context_lengths: torch.Tensor
    nodes: PreservedNodes | None = None
    stats: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def to(self, device) -> "CompressedContext":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            keys=[move(k) for k in self.keys],
            values=[move(v) for v in self.values],
            cu_seqlens=move(self.cu_seqlens),
            k_positions=move(self.k_positions),
            num_chunks=move(self.num_chunks),
            context_lengths=move(self.context_lengths),
            nodes=None if self.nodes is None else PreservedNodes(*(move(t) for t in vars(self.nodes).values())),
        )

    def repeat_interleave(self, repeats: int) -> "CompressedContext":
        """Each sequence repeated ``repeats`` times in place (as generation expands its batch)."""
        if repeats == 1:
            return self
        cu = self.cu_seqlens.long()
        row = torch.arange(self.batch_size, device=cu.device).repeat_interleave(repeats)
        packed = pack_segments(cu[:-1][row], (cu[1:] - cu[:-1])[row])
        take = lambda t: None if t is None else t[packed.index]  # noqa: E731
        return replace(
            self,
            keys=[take(k) for k in self.keys],
            values=[take(v) for v in self.values],
            cu_seqlens=packed.cu_seqlens,
            k_positions=take(self.k_positions),
            num_chunks=self.num_chunks[row],
            context_lengths=self.context_lengths[row],
            nodes=None,  # describes the original batch only
        )


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

    # ------------------------------------------------------------------------------------------
    # retrieval

    def retrieval_query(self, query_ids, query_mask, context_lengths):
        """``[B, hidden]``: the last query token after one upper layer and the final norm."""
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
        last = torch.clamp(cu[1:].long() - 1, min=0)
        query = hidden[last] if hidden.shape[0] else hidden.new_zeros(counts.numel(), hidden.shape[-1])
        return torch.where((counts > 0)[:, None], query, 0.0)

    def node_embeddings(self, flat_ids, Lc, chunks: ChunkLayout, which, node_start, node_len):
        """``[len(which), T, hidden]``: each tree node encoded in isolation by one lower layer, its last token, normed."""
        first = (chunks.row[which] * Lc + chunks.start[which])[:, None] + node_start
        packed = pack_segments(first.flatten(), node_len.flatten())
        positions = packed.offset
        if self.config.positions == "true":
            positions = positions + (chunks.start[which][:, None] + node_start).flatten()[packed.segment]
        hidden = self.last_token_states(flat_ids[packed.index], positions, packed.cu_seqlens, self.lower[0])
        return self.decoder.norm(hidden).view(*node_start.shape, -1)

    # ------------------------------------------------------------------------------------------
    # argument checks

    def check_query(self, query_input_ids, query_attention_mask, batch: int) -> None:
        if not isinstance(query_input_ids, torch.Tensor) or query_input_ids.dim() != 2:
            raise ValueError("query_input_ids must be an integer tensor [B, L]")
        if query_input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"query_input_ids must be int64 (or int32) token ids, got {query_input_ids.dtype}")
        if query_input_ids.device != self.device:
            raise ValueError(f"query_input_ids is on {query_input_ids.device} but the model is on {self.device}")
        if query_input_ids.shape[0] != batch:
            raise ValueError(f"query_input_ids has batch {query_input_ids.shape[0]}, the context has {batch}")
        if query_attention_mask is not None:
            if not isinstance(query_attention_mask, torch.Tensor) or query_attention_mask.shape != query_input_ids.shape:
                raise ValueError(
                    f"query_attention_mask must have the shape of query_input_ids {tuple(query_input_ids.shape)}, got "
                    f"{getattr(query_attention_mask, 'shape', type(query_attention_mask).__name__)}"
                )
            if query_attention_mask.device != self.device:
                raise ValueError(f"query_attention_mask is on {query_attention_mask.device} but the model is on {self.device}")

    def check_context(self, context_input_ids, context_lengths) -> torch.Tensor:
        """int64 ``[B]``: the checked ``context_lengths`` (default: the width of ``context_input_ids``)."""
        if not isinstance(context_input_ids, torch.Tensor) or context_input_ids.dim() != 2:
            raise ValueError("context_input_ids must be an integer tensor [B, Lc]")
        if context_input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"context_input_ids must be int64 (or int32) token ids, got {context_input_ids.dtype}")
        if context_input_ids.device != self.device:
            raise ValueError(
                f"context_input_ids is on {context_input_ids.device} but the model is on {self.device}"
            )
        B, Lc = context_input_ids.shape
        if B == 0 or Lc == 0:
            raise ValueError(
                f"context_input_ids is empty (shape {tuple(context_input_ids.shape)}): pass context_input_ids=None "
                "for no context, or context_lengths with zeros for rows without context"
            )
        if context_lengths is None:
            return torch.full((B,), Lc, dtype=torch.long, device=self.device)
        lengths = torch.as_tensor(context_lengths)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.shape != (B,):
            raise ValueError(f"context_lengths must be integers of shape [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")
        if lengths.device != self.device and lengths.device.type != "cpu":
            raise ValueError(f"context_lengths is on {lengths.device} but the model is on {self.device}")
        lengths = lengths.to(self.device, torch.long)
        if bool((lengths < 0).any()) or bool((lengths > Lc).any()):
            raise ValueError(f"context_lengths must be in [0, {Lc}] (the width of context_input_ids), got {lengths.tolist()}")
        return lengths

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
    ) -> CompressedContext:
        """See :meth:`SharedLLMForCausalLM.compress_context`; ``training`` turns the split noise on."""
        cfg = self.config
        lengths = self.check_context(context_input_ids, context_lengths)
        B, Lc = context_input_ids.shape
        flat_ids = context_input_ids.reshape(-1).long()
        timer = _StageTimer(self.device)
        chunks = chunk_layout(lengths, cfg.chunk_size)
        h = cfg.tree_depth
        splittable = chunks.length >= 2**h if h > 0 else torch.zeros_like(chunks.length, dtype=torch.bool)
        which = splittable.nonzero().squeeze(1)
        node_start = node_len = node_ids = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        if which.numel():
            noise = cfg.split_noise_std if training else 0.0
            keys = None
            if noise and split_noise_seeds is not None:
                seeds = torch.as_tensor(split_noise_seeds, device=self.device).long()
                if seeds.shape != (B,):
                    raise ValueError(f"split_noise_seeds must have shape [B={B}], got {tuple(seeds.shape)}")
                keys = (seeds[chunks.row[which]] * 1_000_003 + chunks.index[which]) & ((1 << 62) - 1)
            node_start, node_len = tree_node_spans(chunks.length[which], h, noise, keys)
            if cfg.retrieval == "query" and query_input_ids is not None:
                self.check_query(query_input_ids, query_attention_mask, B)
                with torch.no_grad():
                    query = self.retrieval_query(query_input_ids, query_attention_mask, lengths)
                    emb = self.node_embeddings(flat_ids, Lc, chunks, which, node_start, node_len)
                    node_ids, _ = so.tree_topk(query[chunks.row[which]], emb[:, None], h, k=1,
                                               branching=BRANCHING, score="cosine", backend=cfg.backend)
                node_ids = node_ids[:, 0].long()
            else:
                node_ids = right_descent_node_ids(h, self.device).expand(which.numel(), -1)
        nodes = preserved_nodes(chunks, splittable, node_start, node_len, node_ids)
        timer.stage("retrieve")

        packed = pack_segments(nodes.row * Lc + nodes.start, nodes.length)
        positions = packed.offset if cfg.positions == "chunk" else nodes.start[packed.segment] + packed.offset
        M = cfg.num_injected_layers
        _, kv = self.encode_packed(flat_ids[packed.index], positions, packed.cu_seqlens, self.lower,
                                   capture_layers=range(M), stop_after=M - 1)
        timer.stage("encode")

        keys, values = [], []
        P = cfg.tokens_per_node
        if P is not None:
            sources = compressed_row_sources(nodes.length, P)
        for i in range(M):
            k, v = kv[i]
            if P is not None:
                k = torch.cat([so.chunk_pool(k, packed.cu_seqlens, P, cfg.pool_mode, backend=cfg.backend), k])[sources]
                v = torch.cat([so.chunk_pool(v, packed.cu_seqlens, P, cfg.pool_mode, backend=cfg.backend), v])[sources]
            keys.append(k)
            values.append(v)
        rows = compressed_rows(nodes.length, P)
        timer.stage("pool")

        k_positions = nodes.chunk.repeat_interleave(rows).to(torch.int32) if cfg.positions == "chunk" else None
        stats = {
            "context_tokens": int(lengths.sum()),
            "compressed_tokens": int(rows.sum()),
            "chunks": int(chunks.row.numel()),
            "nodes": int(nodes.row.numel()),
            **timer.seconds,
        }
        num_chunks = chunks.num_chunks.to(torch.int32)
        return CompressedContext(
            keys=keys,
            values=values,
            cu_seqlens=segment_cu_seqlens(nodes.row, rows, B),
            k_positions=k_positions,
            num_chunks=num_chunks,
            max_chunks=int(num_chunks.max()) if B else 0,
            context_lengths=lengths,
            nodes=nodes,
            stats=stats,
        )


class _StageTimer:
    """Seconds per stage of the context path (synchronising the GPU, if any, at stage ends)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def stage(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[f"{name}_s"] = now - self.last
        self.last = now


__all__ = ["CompressedContext", "ContextCompressor"]
