"""Injection: how a compressed context reaches the upper model (docs/DESIGN.md section 5).

One :class:`InjectionState` per wrapped model holds the context of the current call and is read by

* the hooks the wrapper installs: for ``injection="residual"`` a pre-hook on each injected decoder
  layer keeps its input ``x`` and a hook on its ``self_attn`` adds the cross block's output, so that
  the layer computes ``y = x + SelfAttn(..)``, ``y += o_c(Attn(q_c(norm_c(y)), K, V))``, then its
  MLP; for ``positions="true"`` a pre-hook on the decoder offsets its positions;
* the attention function (``attention.py``), which finds the state on each attention module: it
  runs the compressor's packed passes (``packed``) and, for ``injection="merge"``,
  :meth:`InjectionState.merged_attention`;
* activation checkpointing: a checkpointed layer runs again in the backward, after the call has
  ended, so its checkpoint function is wrapped to replay the context the layer first saw
  (:meth:`InjectionState.replay_safe`).

The state holds the config, the rotary table and the cross blocks; it knows nothing of the
wrapper, so a context flows one way: wrapper -> compression -> this module -> the cross block.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager

import torch
from torch import nn

import sharedllm_ops as so

from ..reference.rotary import rotate
from .attention import PackedPass, attention_with_lse
from .compression import CompressedContext
from .config import SharedLLMConfig


class CrossBlock(nn.Module):
    """The paper's cross-attention block of one injected layer: ``norm_c``, ``q_c``, ``o_c`` (no k/v projections)."""

    def __init__(self, norm: nn.Module, q_proj: nn.Linear, o_proj: nn.Linear):
        super().__init__()
        self.norm_c, self.q_c, self.o_c = norm, q_proj, o_proj


def new_cross_block(layer: nn.Module, init: str) -> CrossBlock:
    """A cross block for decoder ``layer``: copies of its input norm and q/o projections, initialised
    as ``SharedLLMConfig.cross_init`` says (``"copy"``, ``"copy_zero"`` or ``"random"``)."""
    attn = layer.self_attn
    norm, q, o = (copy.deepcopy(m) for m in (layer.input_layernorm, attn.q_proj, attn.o_proj))
    for p in list(norm.parameters()) + list(q.parameters()) + list(o.parameters()):
        p.requires_grad_(True)
    if init == "copy_zero":
        with torch.no_grad():
            for p in o.parameters():
                p.zero_()
    if init == "random":
        std = 0.02
        with torch.no_grad():
            for lin in (q, o):
                lin.weight.normal_(0.0, std)
                if lin.bias is not None:
                    lin.bias.zero_()
            for p in norm.parameters():
                p.fill_(1.0)
    return CrossBlock(norm, q, o)


class RotaryTable:
    """The base model's rotary ``(cos, sin)`` tables, grown on demand and cached per device."""

    def __init__(self, rotary_emb: nn.Module):
        self.rotary_emb = rotary_emb
        # rotary variants such as YaRN scale cos/sin by this factor, meant to reach q and k once each
        self.attention_scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
        self._cache: dict = {}

    def __call__(self, size: int, device, subdivisions: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``[>= size, D]`` for positions ``0..size-1`` (row ``i`` at position ``i / subdivisions``
        when that is given), without the attention scaling (a pure rotation: it is applied on top
        of rotated keys)."""
        key = (torch.device(device), subdivisions)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < size:
            n = max(size, 2 * cached[0].shape[0] if cached is not None else 64)
            probe = torch.zeros(1, 1, dtype=torch.float32, device=key[0])
            positions = torch.arange(n, device=key[0], dtype=torch.float32) / subdivisions
            with torch.no_grad():
                cos, sin = self.rotary_emb(probe, positions[None])
            scale = self.attention_scaling
            cached = self._cache[key] = (cos[0].float() / scale, sin[0].float() / scale)
        return cached


class InjectionState:
    """Per-model switches read by the hooks and the attention function during one call.

    ``context``: the :class:`CompressedContext` of the current call (None = no context);
    ``packed``: the compressor's packed pass while one runs (nothing is injected then);
    ``layer_inputs``: each injected layer's input, kept by its pre-hook for the cross block.
    """

    def __init__(self, config: SharedLLMConfig, rotary: RotaryTable, cross_blocks: nn.ModuleDict):
        self.config = config
        self.rotary = rotary
        self.cross_blocks = cross_blocks
        self.context: CompressedContext | None = None
        self.packed: PackedPass | None = None
        self.layer_inputs: dict = {}

    def active(self, layer_idx: int) -> bool:
        return self.context is not None and self.packed is None and layer_idx < self.config.num_injected_layers

    def merges_into(self, layer_idx: int) -> bool:
        return self.config.injection == "merge" and self.active(layer_idx)

    def context_for(self, batch: int) -> CompressedContext:
        """The context, its sequences repeated if the input batch is a multiple of it (as in generation)."""
        ctx = self.context
        if batch != ctx.batch_size:
            if batch % ctx.batch_size:
                raise ValueError(f"the input batch ({batch}) is not a multiple of the context batch ({ctx.batch_size})")
            ctx = self.context = ctx.repeat_interleave(batch // ctx.batch_size)
        return ctx

    @contextmanager
    def injecting(self, ctx: CompressedContext | None):
        """Within this block, the wrapped model's calls receive ``ctx`` (None = no context)."""
        previous = self.context
        self.context = ctx
        try:
            yield
        finally:
            self.context = previous
            self.layer_inputs.clear()

    # ------------------------------------------------------------------------------------------
    # hooks

    def layer_input_hook(self, layer_idx: int):
        """Forward pre-hook of injected decoder layer ``layer_idx``: keeps its input ``x``."""

        def hook(module, args, kwargs):
            if self.active(layer_idx):
                self.layer_inputs[layer_idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def cross_block_hook(self, layer_idx: int):
        """Forward hook of that layer's ``self_attn``: adds the cross block's output to the attention's."""

        def hook(attn, args, kwargs, output):
            if not self.active(layer_idx):
                return None
            x = self.layer_inputs.pop(layer_idx)
            attn_out = output[0] if isinstance(output, tuple) else output
            delta = self.cross_block_output(layer_idx, x + attn_out, kwargs.get("position_embeddings"), attn)
            return (attn_out + delta, *output[1:]) if isinstance(output, tuple) else attn_out + delta

        return hook

    def offset_positions(self, module, args, kwargs):
        """Forward pre-hook of the decoder for ``positions="true"``: its tokens continue after the context."""
        ctx = self.context
        if ctx is None or self.packed is not None:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        B, L = tokens.shape[:2]
        positions = kwargs.get("position_ids")
        if positions is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + L, device=tokens.device)[None]
        kwargs["position_ids"] = positions + self.context_for(B).context_lengths[:, None]
        return args, kwargs

    # ------------------------------------------------------------------------------------------
    # activation checkpointing

    def replay_safe(self, layers) -> None:
        """Makes transformers' activation checkpointing of ``layers`` recompute them as they first ran.

        A checkpointed layer is run again during the backward, after :meth:`injecting` has ended:
        its cross block or merged attention would see no context and recompute something else.
        Each layer's checkpoint function (``_gradient_checkpointing_func``, set by transformers'
        ``activation_checkpointing_enable``) is wrapped so that the layer's run and its recomputation
        both see the context and the layer input of the call. Packed passes (the context path) are
        run without checkpointing: they stop inside a layer and capture its keys/values. Idempotent:
        call it before layers run (the wrapper does, on every call)."""
        for layer in layers:
            checkpoint = vars(layer).get("_gradient_checkpointing_func")
            if checkpoint is not None and getattr(checkpoint, "_sharedllm_state", None) is not self:
                layer._gradient_checkpointing_func = self._replaying(checkpoint, layer.self_attn.layer_idx)

    def release(self, layers) -> None:
        """Undoes :meth:`replay_safe` on ``layers``."""
        for layer in layers:
            checkpoint = vars(layer).get("_gradient_checkpointing_func")
            if getattr(checkpoint, "_sharedllm_state", None) is self:
                layer._gradient_checkpointing_func = checkpoint.__wrapped__

    def _replaying(self, checkpoint, layer_idx: int):
        """``checkpoint(function, *args)`` with ``function`` run under the state of the moment it is called."""

        @functools.wraps(checkpoint)
        def checkpointed(function, *args, **kwargs):
            if self.packed is not None:
                return function(*args, **kwargs)
            context, layer_input = self.context, self.layer_inputs.get(layer_idx)

            def replay(*a, **kw):
                with self._replayed(layer_idx, context, layer_input):
                    return function(*a, **kw)

            return checkpoint(replay, *args, **kwargs)

        checkpointed._sharedllm_state = self
        return checkpointed

    @contextmanager
    def _replayed(self, layer_idx: int, context, layer_input):
        previous = self.context
        self.context = context
        if layer_input is not None:  # kept by the layer's pre-hook before the checkpointed call
            self.layer_inputs[layer_idx] = layer_input
        try:
            yield
        finally:
            self.context = previous
            self.layer_inputs.pop(layer_idx, None)

    def replay_hook(self, layers):
        """Forward pre-hook of the decoder: :meth:`replay_safe` of ``layers`` before they run."""

        def hook(module, args):
            self.replay_safe(layers)

        return hook

    # ------------------------------------------------------------------------------------------
    # attention to the context

    def context_attention(self, q: torch.Tensor, ctx: CompressedContext, layer_idx: int, scaling: float):
        """Attention of queries ``q`` ``[B, L, H, D]`` (not rotated for ``positions="chunk"``, rotated
        at their decoder positions for ``"true"`` and ``"distance"``) to layer ``layer_idx``'s compressed context.
        Returns ``out [B*L, H, D]`` and ``lse`` float32 ``[B*L, H]``."""
        B, L, H, D = q.shape
        cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * L
        rotary = {}
        if self.config.positions == "chunk":
            cos, sin = self.rotary(ctx.max_chunks + 1, q.device)
            rotary = dict(
                q_positions=ctx.num_chunks.repeat_interleave(L),
                k_positions=ctx.k_positions,
                rotary_cos=cos,
                rotary_sin=sin,
            )
        elif self.config.positions == "distance":
            table_rows, per_position = self.distance_table()
            far = table_rows - 1
            cos, sin = self.rotary(table_rows, q.device, subdivisions=per_position)
            rotary = dict(
                q_positions=torch.full((B * L,), far, dtype=torch.int32, device=q.device),
                k_positions=self.distance_positions(ctx),
                rotary_cos=cos,
                rotary_sin=sin,
            )
        k, v = ctx.keys[layer_idx], ctx.values[layer_idx]
        q = q.reshape(B * L, H, D).to(k.dtype)
        groups = ctx.row_groups() if ctx.row_tokens is not None else []
        if not groups:  # no weights, or no rows at all (out = 0, lse = -inf)
            return so.cross_inject_attention(q, k, v, cu_q, ctx.cu_seqlens, softmax_scale=scaling, return_lse=True,
                                             backend=self.config.backend, **rotary)
        # row weights: rows that stand for the same number of tokens (within 2.2%) are attended
        # together, their log-sum-exp raised by a * log(tokens), and the groups merged: exact with
        # the kernels as they are, at one call per group
        out, lse = None, None
        for log_tokens, rows, cu in groups:
            group_rotary = dict(rotary, k_positions=rotary["k_positions"][rows]) if rotary else {}
            o, l = so.cross_inject_attention(q, k[rows], v[rows], cu_q, cu, softmax_scale=scaling, return_lse=True,
                                             backend=self.config.backend, **group_rotary)
            l = l + self.config.row_weight_exponent * log_tokens
            out, lse = (o, l) if out is None else so.merge_attention(out, lse, o, l)
        return out, lse

    def distance_table(self) -> tuple[int, int]:
        """``(rows, rows per position)`` of the rotary table of ``positions="distance"``: it reaches the
        farthest raw recent row (one position per token) plus ``max_distance`` steps, in rows of
        ``1 / distance_scale`` position with ``exact_distance``, else of one position."""
        cfg = self.config
        per_position = cfg.distance_scale if cfg.exact_distance else 1
        return (cfg.raw_recent_chunks * cfg.chunk_size + cfg.max_distance) * per_position + 1, per_position

    def distance_positions(self, ctx: CompressedContext) -> torch.Tensor:
        """int32 ``[Nk]`` (``positions="distance"``): each row's row of the rotary table, the table's last
        minus the row's distance from the end of its sequence's context. The queries, rotated at
        their decoder positions ``p``, are rotated by that last row more.

        The distance: a row of the ``raw_recent_chunks`` (which hold the last ``R`` tokens) sits at
        its distance in tokens, like a token of the window; a row ``d > R`` tokens away at ``R`` plus
        ``(d - R) / distance_scale`` positions (whole steps unless ``exact_distance``), that part
        capped at ``max_distance`` steps."""
        cfg = self.config
        table_rows, per_position = self.distance_table()
        rows = ctx.cu_seqlens[1:].long() - ctx.cu_seqlens[:-1].long()
        end = ctx.context_lengths.long()
        first_recent = torch.clamp(ctx.num_chunks.long() - cfg.raw_recent_chunks, min=0) * cfg.chunk_size
        recent = torch.clamp(end - first_recent, min=0).repeat_interleave(rows)
        distance = torch.clamp(end.repeat_interleave(rows) - ctx.k_positions.long(), min=0)
        near = torch.minimum(distance, recent)
        beyond = torch.clamp((distance - near) * per_position // cfg.distance_scale, max=cfg.max_distance * per_position)
        return (table_rows - 1 - near * per_position - beyond).to(torch.int32)

    def cross_block_output(self, layer_idx: int, y: torch.Tensor, position_embeddings, attn: nn.Module) -> torch.Tensor:
        """``o_c(Attn(q_c(norm_c(y)), K, V))`` for the residual stream ``y`` ``[B, L, hidden]`` of the
        layer whose attention module is ``attn`` (its head size and softmax scale)."""
        block = self.cross_blocks[str(layer_idx)]
        B, L, _ = y.shape
        q = block.q_c(block.norm_c(y)).view(B, L, -1, attn.head_dim)
        scaling = attn.scaling
        if self.config.positions != "chunk":
            # "true": q sits at its position; "distance": the kernel adds max_distance on top, so the
            # context ends at distance p from the decoder token at position p
            cos, sin = position_embeddings  # scaled: q gets the rotary attention scaling like the keys
            q = rotate(q, cos[:, :, None], sin[:, :, None])
        else:
            scaling = scaling * self.rotary.attention_scaling  # the Eq. 2 rotation is a pure rotation
        out, _ = self.context_attention(q, self.context_for(B), layer_idx, scaling)
        return block.o_c(out.view(B, L, -1).to(y.dtype))

    def merged_attention(self, module, query, key, value, attention_mask, scaling, position_ids):
        """Self-attention of an injected layer merged with its attention to the context (``injection="merge"``).

        query ``[B, H, L, D]`` (rotated at the decoder positions), key/value ``[B, Hk, S, D]``;
        returns ``out [B, L, H, D]`` and no attention weights, as transformers' attention functions do."""
        B, H, L, D = query.shape
        self_out, self_lse = attention_with_lse(query, key, value, attention_mask, scaling)
        q = query.transpose(1, 2)  # [B, L, H, D]
        if self.config.positions == "chunk":
            # undo the decoder rotation; the context attention rotates q to position n instead
            if position_ids is None:
                raise RuntimeError("merge injection with positions='chunk' needs the position_ids of the attention call")
            cos, sin = self.rotary(int(position_ids.max()) + 1, query.device)
            cos, sin = cos[position_ids][:, :, None].to(q.dtype), sin[position_ids][:, :, None].to(q.dtype)
            q = rotate(q, cos, sin, inverse=True)
        ctx_out, ctx_lse = self.context_attention(q, self.context_for(B), module.layer_idx, scaling)
        out, _ = so.merge_attention(self_out.reshape(B * L, H, D), self_lse.reshape(B * L, H), ctx_out, ctx_lse)
        return out.view(B, L, H, D), None


__all__ = ["CrossBlock", "InjectionState", "RotaryTable", "new_cross_block"]
