"""SharedLLMForCausalLM: a stock Hugging Face Llama-family causal LM stacked on itself (DESIGN section 5).

Nothing of transformers' modeling code is copied. The wrapper

* runs the **lower model** (embedding + bottom ``M`` decoder layers, shared by default) by calling
  the stock decoder layers on one packed row of nodes, with the ``"sharedllm"`` attention function
  (``attention.py``) treating the row as independent causal segments and capturing k/v;
* **injects** into the upper model with module hooks: for ``injection="residual"`` a pre-hook on
  each injected decoder layer keeps its input ``x`` and a hook on its ``self_attn`` adds the cross
  block's output, so that the layer computes ``y = x + SelfAttn(..)``, ``y += o_c(Attn(q_c(norm_c(y))))``,
  then its MLP; for ``injection="merge"`` the attention function merges context attention into
  self-attention;
* offsets the decoder's positions (``positions="true"``) with a pre-hook on the base ``model``.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

import sharedllm_ops as so

from . import context as C
from .attention import ATTN_IMPLEMENTATION, PackedPass, StopEncoding, attention_with_lse, rotate_half
from .config import SharedLLMConfig

WEIGHTS_NAME = "sharedllm_injector.safetensors"
# what a base model needs for SharedLLM to wrap it (LlamaForCausalLM and same-shaped classes)
_REQUIRED = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
_REQUIRED_LAYER = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.q_proj", "self_attn.k_proj",
                   "self_attn.v_proj", "self_attn.o_proj")


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
    nodes: C.PreservedNodes | None = None
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
            nodes=None if self.nodes is None else C.PreservedNodes(*(move(t) for t in vars(self.nodes).values())),
        )

    def repeat_interleave(self, repeats: int) -> "CompressedContext":
        """Each sequence repeated ``repeats`` times in place (as generation expands its batch)."""
        if repeats == 1:
            return self
        cu = self.cu_seqlens.long()
        row = torch.arange(self.batch_size, device=cu.device).repeat_interleave(repeats)
        packed = C.pack_segments(cu[:-1][row], (cu[1:] - cu[:-1])[row])
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


class CrossBlock(nn.Module):
    """The paper's cross-attention block of one injected layer: ``norm_c``, ``q_c``, ``o_c`` (no k/v projections)."""

    def __init__(self, norm: nn.Module, q_proj: nn.Linear, o_proj: nn.Linear):
        super().__init__()
        self.norm_c, self.q_c, self.o_c = norm, q_proj, o_proj


class InjectionState:
    """Per-model switches read by the hooks and the attention function during one call."""

    def __init__(self, model: "SharedLLMForCausalLM"):
        self.model = model
        self.context: CompressedContext | None = None
        self.packed: PackedPass | None = None
        self.layer_inputs: dict = {}

    def active(self, layer_idx: int) -> bool:
        return self.context is not None and self.packed is None and layer_idx < self.model.config.num_injected_layers

    def merges_into(self, layer_idx: int) -> bool:
        return self.model.config.injection == "merge" and self.active(layer_idx)

    def context_for(self, batch: int) -> CompressedContext:
        ctx = self.context
        if batch != ctx.batch_size:
            if batch % ctx.batch_size:
                raise ValueError(f"the input batch ({batch}) is not a multiple of the context batch ({ctx.batch_size})")
            ctx = self.context = ctx.repeat_interleave(batch // ctx.batch_size)
        return ctx

    def merged_attention(self, module, query, key, value, attention_mask, scaling, position_ids):
        """Self-attention of an injected layer merged with its attention to the context (``injection="merge"``)."""
        B, H, L, D = query.shape
        self_out, self_lse = attention_with_lse(query, key, value, attention_mask, scaling)
        q = query.transpose(1, 2)  # [B, L, H, D], rotated at the decoder positions
        if self.model.config.positions == "chunk":
            # undo the decoder rotation; the context attention rotates q to position n instead
            if position_ids is None:
                raise RuntimeError("merge injection with positions='chunk' needs the position_ids of the attention call")
            cos, sin = self.model.rotary_table(int(position_ids.max()) + 1, query.device)
            cos, sin = cos[position_ids][:, :, None].to(q.dtype), sin[position_ids][:, :, None].to(q.dtype)
            q = q * cos - rotate_half(q) * sin
        ctx_out, ctx_lse = self.model.context_attention(q, self.context_for(B), module.layer_idx, scaling)
        out, _ = so.merge_attention(self_out.reshape(B * L, H, D), self_lse.reshape(B * L, H), ctx_out, ctx_lse)
        return out.view(B, L, H, D), None


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def check_llama_shaped(base: nn.Module) -> None:
    """Raises a ValueError naming what is missing unless ``base`` looks like ``LlamaForCausalLM``."""
    what = type(base).__name__
    for name in _REQUIRED:
        if _get(base, name) is None:
            raise ValueError(
                f"base model {what} is not Llama-shaped: it has no `{name}` (SharedLLM wraps LlamaForCausalLM, "
                "MistralForCausalLM, Qwen2ForCausalLM and models with the same module layout)"
            )
    for i, layer in enumerate(base.model.layers):
        for name in _REQUIRED_LAYER:
            if _get(layer, name) is None:
                raise ValueError(f"base model {what} is not Llama-shaped: model.layers[{i}] has no `{name}`")
    if not hasattr(base.config, "_attn_implementation"):
        raise ValueError(f"base model {what} does not use transformers' AttentionInterface")


class SharedLLMForCausalLM(nn.Module):
    """SharedLLM around a Llama-family causal LM (see the module docstring and DESIGN section 5).

    Build it with :meth:`from_base` or :meth:`from_pretrained`. ``self.base_model`` is the wrapped
    model itself (weights shared, hooks added); ``self.cross_blocks`` holds the added parameters.
    """

    def __init__(self, base_model: nn.Module, config: SharedLLMConfig):
        super().__init__()
        check_llama_shaped(base_model)
        if getattr(base_model, "_sharedllm_wrapped", False):
            raise ValueError("this base model is already wrapped by a SharedLLMForCausalLM")
        num_layers = len(base_model.model.layers)
        if config.num_injected_layers > num_layers:
            raise ValueError(
                f"SharedLLMConfig.num_injected_layers ({config.num_injected_layers}) exceeds the base model's "
                f"{num_layers} layers"
            )
        self.config = config
        self.base_model = base_model
        self._state = InjectionState(self)
        self._rotary_cache: dict = {}
        # rotary variants such as YaRN scale cos/sin by this factor, meant to reach q and k once each
        self._attention_scaling = float(getattr(base_model.model.rotary_emb, "attention_scaling", 1.0) or 1.0)
        self._trained_base_layers: list[int] = []
        M = config.num_injected_layers
        layers = base_model.model.layers
        if config.share_lower:
            self._lower = list(layers[:M])  # a plain list: shared modules are not registered twice
        else:
            self.lower_layers = nn.ModuleList(copy.deepcopy(layer) for layer in layers[:M])
            self._lower = list(self.lower_layers)
        self.cross_blocks = nn.ModuleDict()
        if config.injection == "residual":
            for i in range(M):
                self.cross_blocks[str(i)] = self._new_cross_block(layers[i], config.cross_init)
        original_attn = base_model.config._attn_implementation
        base_model.config._attn_implementation = ATTN_IMPLEMENTATION
        for layer in list(layers) + self._lower:
            layer.self_attn._sharedllm_state = self._state
            layer.self_attn.config._attn_implementation = ATTN_IMPLEMENTATION  # copies have their own config
        self._hooks = []
        if config.injection == "residual":
            for i in range(M):
                self._hooks.append(layers[i].register_forward_pre_hook(self._keep_layer_input(i), with_kwargs=True))
                self._hooks.append(layers[i].self_attn.register_forward_hook(self._add_cross_block(i), with_kwargs=True))
        if config.positions == "true":
            self._hooks.append(base_model.model.register_forward_pre_hook(self._offset_positions, with_kwargs=True))
        base_model._sharedllm_wrapped = True
        self._original_attn = original_attn

    def unwrap(self) -> nn.Module:
        """Removes the hooks and the attention switch: returns the base model as it was (this wrapper is then unusable)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        layers = self.base_model.model.layers
        for layer in list(layers) + self._lower:
            layer.self_attn.__dict__.pop("_sharedllm_state", None)
            layer.self_attn.config._attn_implementation = self._original_attn
        self.base_model.config._attn_implementation = self._original_attn
        self.base_model.__dict__.pop("_sharedllm_wrapped", None)
        return self.base_model

    # ------------------------------------------------------------------------------------------
    # construction, saving, loading

    @classmethod
    def from_base(cls, base_model_or_path, config: SharedLLMConfig | None = None, **overrides) -> "SharedLLMForCausalLM":
        """Wraps a loaded model, or loads one from a local path (a Hugging Face folder or a ``.gguf``)."""
        config = replace(config, **overrides) if config is not None else SharedLLMConfig(**overrides)
        base = base_model_or_path
        if isinstance(base, (str, os.PathLike)):
            from .pretrained import load_base_model

            base, _ = load_base_model(base)
        if not isinstance(base, nn.Module):
            raise ValueError(f"base_model_or_path must be a model or a local path, got {type(base).__name__}")
        return cls(base, config)

    @staticmethod
    def _new_cross_block(layer: nn.Module, init: str) -> CrossBlock:
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

    def injector_state_dict(self) -> dict:
        """The parameters SharedLLM adds or trains: cross blocks, copied lower layers, trained top layers."""
        state = {k: v for k, v in self.state_dict().items() if k.startswith(("cross_blocks.", "lower_layers."))}
        for i in self._trained_base_layers:
            prefix = f"model.layers.{i}."
            for k, v in self.base_model.state_dict().items():
                if k.startswith(prefix):
                    state["base_model." + k] = v
        return state

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Writes the config and :meth:`injector_state_dict` (safetensors); the base model is not saved.

        ``dtype`` (e.g. ``torch.bfloat16``) stores the floating-point tensors in that dtype, to ship a
        float32-trained injector at half the size; :meth:`from_pretrained` casts them back to the model's."""
        from safetensors.torch import save_file

        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        os.makedirs(path, exist_ok=True)
        self.config.save(path)
        tensors = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous().cpu()
                   for k, v in self.injector_state_dict().items()}
        meta = {"trained_base_layers": ",".join(map(str, self._trained_base_layers))}
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata=meta)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base_model_or_path, **overrides) -> "SharedLLMForCausalLM":
        """Wraps ``base_model_or_path`` with the config and injector saved in ``path``."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        config = replace(SharedLLMConfig.load(path), **overrides)
        model = cls.from_base(base_model_or_path, config)
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: is {path} a folder written by save_pretrained?")
        with safe_open(file, "pt") as f:
            trained = (f.metadata() or {}).get("trained_base_layers", "")
        model._trained_base_layers = [int(i) for i in trained.split(",") if i]
        tensors = load_file(file, device=str(model.device))
        expected = set(model.injector_state_dict())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"{file} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        own = model.state_dict()
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v)
        return model

    def set_trainable(self, which: str = "cross", top_layers: int = 0) -> list[nn.Parameter]:
        """Freezes everything except the cross blocks (``"cross"``), or also the top ``top_layers``
        decoder layers (``"cross+top"``); copied lower layers train with the cross blocks.
        Returns the trainable parameters (for the optimizer)."""
        if which not in ("cross", "cross+top"):
            raise ValueError(f"which must be 'cross' or 'cross+top', got {which!r}")
        layers = self.base_model.model.layers
        if which == "cross+top" and not 1 <= top_layers <= len(layers):
            raise ValueError(f"top_layers must be in [1, {len(layers)}] for which='cross+top', got {top_layers}")
        for p in self.parameters():
            p.requires_grad_(False)
        trainable = list(self.cross_blocks.parameters())
        if not self.config.share_lower:
            trainable += list(self.lower_layers.parameters())
        self._trained_base_layers = list(range(len(layers) - top_layers, len(layers))) if which == "cross+top" else []
        for i in self._trained_base_layers:
            trainable += list(layers[i].parameters())
        if not trainable:
            raise ValueError("nothing to train: injection='merge' adds no parameters (use 'cross+top' or 'residual')")
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    @property
    def device(self) -> torch.device:
        return self.base_model.model.embed_tokens.weight.device

    # ------------------------------------------------------------------------------------------
    # hooks

    def _keep_layer_input(self, layer_idx: int):
        def hook(module, args, kwargs):
            if self._state.active(layer_idx):
                self._state.layer_inputs[layer_idx] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _add_cross_block(self, layer_idx: int):
        def hook(module, args, kwargs, output):
            if not self._state.active(layer_idx):
                return None
            x = self._state.layer_inputs.pop(layer_idx)
            attn_out = output[0] if isinstance(output, tuple) else output
            delta = self.cross_block_output(layer_idx, x + attn_out, kwargs.get("position_embeddings"))
            return (attn_out + delta, *output[1:]) if isinstance(output, tuple) else attn_out + delta

        return hook

    def _offset_positions(self, module, args, kwargs):
        ctx = self._state.context
        if ctx is None or self._state.packed is not None:
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
        kwargs["position_ids"] = positions + self._state.context_for(B).context_lengths[:, None]
        return args, kwargs

    @contextmanager
    def injecting(self, ctx: CompressedContext | None):
        """Within this block, calls of ``self.base_model`` receive ``ctx`` (None = no context)."""
        state = self._state
        previous = state.context
        state.context = ctx
        try:
            yield
        finally:
            state.context = previous
            state.layer_inputs.clear()

    # ------------------------------------------------------------------------------------------
    # attention to the context

    def rotary_table(self, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The base model's rotary ``(cos, sin)``, float32 ``[>= size, D]``, for positions ``0..size-1``,
        without its attention scaling (a pure rotation: it is applied on top of rotated keys)."""
        key = torch.device(device)
        cached = self._rotary_cache.get(key)
        if cached is None or cached[0].shape[0] < size:
            n = max(size, 2 * cached[0].shape[0] if cached is not None else 64)
            probe = torch.zeros(1, 1, dtype=torch.float32, device=key)
            with torch.no_grad():
                cos, sin = self.base_model.model.rotary_emb(probe, torch.arange(n, device=key)[None])
            scale = self._attention_scaling
            cached = self._rotary_cache[key] = (cos[0].float() / scale, sin[0].float() / scale)
        return cached

    def context_attention(self, q: torch.Tensor, ctx: CompressedContext, layer_idx: int, scaling: float):
        """Attention of queries ``q`` ``[B, L, H, D]`` (not rotated for ``positions="chunk"``, rotated
        at their true positions for ``"true"``) to layer ``layer_idx``'s compressed context.
        Returns ``out [B*L, H, D]`` and ``lse`` float32 ``[B*L, H]``."""
        B, L, H, D = q.shape
        cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * L
        rotary = {}
        if self.config.positions == "chunk":
            cos, sin = self.rotary_table(ctx.max_chunks + 1, q.device)
            rotary = dict(
                q_positions=ctx.num_chunks.repeat_interleave(L),
                k_positions=ctx.k_positions,
                rotary_cos=cos,
                rotary_sin=sin,
            )
        k, v = ctx.keys[layer_idx], ctx.values[layer_idx]
        return so.cross_inject_attention(
            q.reshape(B * L, H, D).to(k.dtype), k, v, cu_q, ctx.cu_seqlens, softmax_scale=scaling, return_lse=True,
            backend=self.config.backend, **rotary,
        )

    def cross_block_output(self, layer_idx: int, y: torch.Tensor, position_embeddings) -> torch.Tensor:
        """``o_c(Attn(q_c(norm_c(y)), K, V))`` for the residual stream ``y`` ``[B, L, hidden]``."""
        block = self.cross_blocks[str(layer_idx)]
        attn = self.base_model.model.layers[layer_idx].self_attn
        B, L, _ = y.shape
        q = block.q_c(block.norm_c(y)).view(B, L, -1, attn.head_dim)
        scaling = attn.scaling
        if self.config.positions == "true":
            cos, sin = position_embeddings  # scaled: q gets the rotary attention scaling like the keys
            q = q * cos[:, :, None] + rotate_half(q) * sin[:, :, None]
        else:
            scaling = scaling * self._attention_scaling  # the Eq. 2 rotation is a pure rotation
        out, _ = self.context_attention(q, self._state.context_for(B), layer_idx, scaling)
        return block.o_c(out.view(B, L, -1).to(y.dtype))

    # ------------------------------------------------------------------------------------------
    # the context path

    def encode_packed(self, token_ids, positions, cu_seqlens, layers, capture_layers=(), stop_after=None, keys_of=None):
        """Runs ``layers`` on one packed row of independent causal segments.

        token_ids, positions: int64 ``[N]``; cu_seqlens: int32 ``[S + 1]``. Returns the hidden
        states ``[N, hidden]`` after the last layer run (None if the pass stopped early) and the
        captured ``{layer_idx: (k, v)}`` (``[N, Hk, D]``, k rotated at ``positions``).
        """
        model = self.base_model.model
        if token_ids.numel() == 0:  # transformers' attention cannot reshape an empty row
            attn = layers[0].self_attn if len(layers) else model.layers[0].self_attn
            empty = model.embed_tokens.weight.new_zeros(0, attn.k_proj.out_features // attn.head_dim, attn.head_dim)
            hidden = model.embed_tokens.weight.new_zeros(0, model.embed_tokens.embedding_dim)
            return hidden, {i: (empty, empty) for i in capture_layers}
        hidden = model.embed_tokens(token_ids)[None]
        position_ids = positions[None]
        position_embeddings = model.rotary_emb(hidden, position_ids=position_ids)
        packed = self._state.packed = PackedPass.build(cu_seqlens, capture_layers, stop_after, keys_of)
        try:
            for layer in layers:
                out = layer(hidden, attention_mask=None, position_ids=position_ids,
                            position_embeddings=position_embeddings)
                hidden = out[0] if isinstance(out, tuple) else out
        except StopEncoding:
            hidden = None
        finally:
            self._state.packed = None
        return (None if hidden is None else hidden[0]), packed.capture

    def _retrieval_query(self, query_ids, query_mask, context_lengths):
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
        hidden, _ = self.encode_packed(query_ids[keep], positions[keep], cu, self.base_model.model.layers[:1])
        hidden = self.base_model.model.norm(hidden)
        last = torch.clamp(cu[1:].long() - 1, min=0)
        query = hidden[last] if hidden.shape[0] else hidden.new_zeros(counts.numel(), hidden.shape[-1])
        return torch.where((counts > 0)[:, None], query, 0.0)

    def _node_embeddings(self, flat_ids, Lc, chunks: C.ChunkLayout, which, node_start, node_len):
        """``[len(which), T, hidden]``: each tree node encoded in isolation by one lower layer, its last token, normed."""
        first = (chunks.row[which] * Lc + chunks.start[which])[:, None] + node_start
        packed = C.pack_segments(first.flatten(), node_len.flatten())
        positions = packed.offset
        if self.config.positions == "true":
            positions = positions + (chunks.start[which][:, None] + node_start).flatten()[packed.segment]
        hidden = self.last_token_states(flat_ids[packed.index], positions, packed.cu_seqlens, self._lower[0])
        return self.base_model.model.norm(hidden).view(*node_start.shape, -1)

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

    def _check_query(self, query_input_ids, query_attention_mask, batch: int) -> None:
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

    def _check_context(self, context_input_ids, context_lengths):
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

    def compress_context(
        self,
        context_input_ids: torch.Tensor,
        context_lengths=None,
        query_input_ids: torch.Tensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        split_noise_seeds: torch.Tensor | None = None,
    ) -> CompressedContext:
        """Compresses a batch of contexts for injection.

        Args:
            context_input_ids: int64 ``[B, Lc]``, right-padded.
            context_lengths: ``[B]`` true lengths (0 = no context for that row); default ``Lc``.
            query_input_ids, query_attention_mask: ``[B, L]``: the question whose last token drives
                ``retrieval="query"``. Without it the right child is expanded (as ``"right"``).
            split_noise_seeds: int64 ``[B]``, one per sequence: its training split noise becomes a
                function of the seed (the same in any batch, on any rank) instead of a global draw.

        Returns:
            a :class:`CompressedContext` for ``forward(..., compressed_context=)`` or ``generate``.
        """
        cfg = self.config
        lengths = self._check_context(context_input_ids, context_lengths)
        B, Lc = context_input_ids.shape
        flat_ids = context_input_ids.reshape(-1).long()
        timer = _StageTimer(self.device)
        chunks = C.chunk_layout(lengths, cfg.chunk_size)
        h = cfg.tree_depth
        splittable = chunks.length >= 2**h if h > 0 else torch.zeros_like(chunks.length, dtype=torch.bool)
        which = splittable.nonzero().squeeze(1)
        node_start = node_len = node_ids = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        if which.numel():
            noise = cfg.split_noise_std if self.training else 0.0
            keys = None
            if noise and split_noise_seeds is not None:
                seeds = torch.as_tensor(split_noise_seeds, device=self.device).long()
                if seeds.shape != (B,):
                    raise ValueError(f"split_noise_seeds must have shape [B={B}], got {tuple(seeds.shape)}")
                keys = (seeds[chunks.row[which]] * 1_000_003 + chunks.index[which]) & ((1 << 62) - 1)
            node_start, node_len = C.tree_node_spans(chunks.length[which], h, noise, keys)
            if cfg.retrieval == "query" and query_input_ids is not None:
                self._check_query(query_input_ids, query_attention_mask, B)
                with torch.no_grad():
                    query = self._retrieval_query(query_input_ids, query_attention_mask, lengths)
                    emb = self._node_embeddings(flat_ids, Lc, chunks, which, node_start, node_len)
                    node_ids, _ = so.tree_topk(query[chunks.row[which]], emb[:, None], h, k=1,
                                               branching=C.BRANCHING, score="cosine", backend=cfg.backend)
                node_ids = node_ids[:, 0].long()
            else:
                node_ids = C.right_descent_node_ids(h, self.device).expand(which.numel(), -1)
        nodes = C.preserved_nodes(chunks, splittable, node_start, node_len, node_ids)
        timer.stage("retrieve")

        packed = C.pack_segments(nodes.row * Lc + nodes.start, nodes.length)
        positions = packed.offset if cfg.positions == "chunk" else nodes.start[packed.segment] + packed.offset
        M = cfg.num_injected_layers
        _, kv = self.encode_packed(flat_ids[packed.index], positions, packed.cu_seqlens, self._lower,
                                   capture_layers=range(M), stop_after=M - 1)
        timer.stage("encode")

        keys, values = [], []
        P = cfg.tokens_per_node
        if P is not None:
            sources = C.compressed_row_sources(nodes.length, P)
        for i in range(M):
            k, v = kv[i]
            if P is not None:
                k = torch.cat([so.chunk_pool(k, packed.cu_seqlens, P, cfg.pool_mode, backend=cfg.backend), k])[sources]
                v = torch.cat([so.chunk_pool(v, packed.cu_seqlens, P, cfg.pool_mode, backend=cfg.backend), v])[sources]
            keys.append(k)
            values.append(v)
        rows = C.compressed_rows(nodes.length, P)
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
            cu_seqlens=C.segment_cu_seqlens(nodes.row, rows, B),
            k_positions=k_positions,
            num_chunks=num_chunks,
            max_chunks=int(num_chunks.max()) if B else 0,
            context_lengths=lengths,
            nodes=nodes,
            stats=stats,
        )

    # ------------------------------------------------------------------------------------------
    # running

    def _context_for_call(self, input_ids, attention_mask, context_input_ids, context_lengths, compressed_context,
                          split_noise_seeds=None):
        if compressed_context is not None and context_input_ids is not None:
            raise ValueError("pass either compressed_context or context_input_ids, not both")
        if compressed_context is not None:
            if not isinstance(compressed_context, CompressedContext):
                raise ValueError(f"compressed_context must be a CompressedContext, got {type(compressed_context).__name__}")
            if compressed_context.device != self.device:
                raise ValueError(f"compressed_context is on {compressed_context.device} but the model is on {self.device}")
            return compressed_context
        if context_input_ids is None:
            if context_lengths is not None:
                raise ValueError("context_lengths was given without context_input_ids")
            return None
        if input_ids is not None and input_ids.shape[0] != context_input_ids.shape[0]:
            raise ValueError(
                f"input_ids has batch {input_ids.shape[0]} but context_input_ids has batch {context_input_ids.shape[0]}"
            )
        return self.compress_context(context_input_ids, context_lengths, input_ids, attention_mask, split_noise_seeds)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context_input_ids: torch.Tensor | None = None,
        context_lengths=None,
        labels: torch.Tensor | None = None,
        compressed_context: CompressedContext | None = None,
        split_noise_seeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """The base model's forward (same outputs: ``logits [B, L, V]``, ``loss``, cache) with the
        context injected. ``input_ids``/``attention_mask`` ``[B, L]`` are the decoder tokens;
        ``context_input_ids`` ``[B, Lc]`` right-padded with ``context_lengths`` ``[B]``, or a
        ``compressed_context`` from :meth:`compress_context` (``split_noise_seeds``: see there).
        Other keyword arguments go to the base model."""
        ctx = self._context_for_call(input_ids, attention_mask, context_input_ids, context_lengths, compressed_context,
                                     split_noise_seeds)
        with self.injecting(ctx):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        context_input_ids: torch.Tensor | None = None,
        context_lengths=None,
        compressed_context: CompressedContext | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ):
        """Hugging Face ``generate`` (greedy, sampling, ...) with the context compressed once and
        injected at every step. Batched prompts should be left-padded, as usual for decoders."""
        ctx = self._context_for_call(input_ids, attention_mask, context_input_ids, context_lengths, compressed_context)
        with self.injecting(ctx):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)


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


__all__ = ["CompressedContext", "CrossBlock", "SharedLLMForCausalLM", "check_llama_shaped"]
