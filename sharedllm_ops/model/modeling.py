"""SharedLLMForCausalLM: a stock Hugging Face Llama-family causal LM stacked on itself (docs/DESIGN.md section 5).

Nothing of transformers' modeling code is copied. This module wraps the base model (the attention
switch, the hooks), saves and loads what SharedLLM adds, and runs ``forward``/``generate``; the
work is done by the modules a context flows through, in this order:

* ``compression.py``: :class:`ContextCompressor` turns ``context_input_ids`` into a
  :class:`CompressedContext` (tree retrieval, the **lower model**: embedding + bottom ``M``
  decoder layers, shared by default, run on one packed row of nodes; chunk pooling);
* ``injection.py``: :class:`InjectionState` carries it into the upper model during the base
  model's call: the hooks installed here add the cross blocks (``injection="residual"``) or offset
  the decoder's positions (``positions="true"``), and the ``"sharedllm"`` attention function
  (``attention.py``) merges context attention into self-attention (``injection="merge"``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .attention import ATTN_IMPLEMENTATION
from .compression import CompressedContext, ContextCompressor
from .config import SharedLLMConfig
from .injection import CrossBlock, InjectionState, RotaryTable, new_cross_block
from .pretrained import load_base_model

WEIGHTS_NAME = "sharedllm_injector.safetensors"
# what a base model needs for SharedLLM to wrap it (LlamaForCausalLM and same-shaped classes)
_REQUIRED = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
_REQUIRED_LAYER = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.q_proj", "self_attn.k_proj",
                   "self_attn.v_proj", "self_attn.o_proj")
# the ``config.model_type`` of the base models whose decoder layer is Llama's (x + attention, then + MLP;
# SmolLM2 is a "llama"); each one is covered by the tests
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def check_llama_shaped(base: nn.Module) -> None:
    """Raises a ValueError naming what is missing unless ``base`` looks like ``LlamaForCausalLM``, or
    naming its model type unless that is one the hooks compute right (``SUPPORTED_MODEL_TYPES``)."""
    what = type(base).__name__
    for name in _REQUIRED:
        if _get(base, name) is None:
            raise ValueError(
                f"base model {what} is not Llama-shaped: it has no `{name}` (SharedLLM wraps LlamaForCausalLM, "
                "MistralForCausalLM and Qwen2ForCausalLM)"
            )
    for i, layer in enumerate(base.model.layers):
        for name in _REQUIRED_LAYER:
            if _get(layer, name) is None:
                raise ValueError(f"base model {what} is not Llama-shaped: model.layers[{i}] has no `{name}`")
    if not hasattr(base.config, "_attn_implementation"):
        raise ValueError(f"base model {what} does not use transformers' AttentionInterface")
    # the same module names do not mean the same layer: Gemma 2/3 norm the attention output before the
    # residual add, Granite scales the embeddings and the residual branches; the hooks would add a cross
    # block to the wrong stream and the lower model would encode unscaled embeddings
    model_type = getattr(base.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"base model {what} has model_type {model_type!r}, which SharedLLM does not support: its hooks "
            f"compute a Llama decoder layer; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


class SharedLLMForCausalLM(nn.Module):
    """SharedLLM around a Llama-family causal LM (see the module docstring and docs/DESIGN.md section 5).

    Build it with :meth:`from_base` or :meth:`from_pretrained`, which return it in eval mode, as
    transformers' ``from_pretrained`` does; ``.train()`` turns training behaviour on (split noise).
    ``self.base_model`` is the wrapped model itself (weights shared, hooks added);
    ``self.cross_blocks`` holds the added parameters.
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
                self.cross_blocks[str(i)] = new_cross_block(layers[i], config.cross_init)
        # plain objects, not modules: they refer to modules registered above, never to this wrapper
        self._state = InjectionState(config, RotaryTable(base_model.model.rotary_emb), self.cross_blocks)
        self._compressor = ContextCompressor(base_model.model, self._lower, config, self._state)
        original_attn = base_model.config._attn_implementation
        base_model.config._attn_implementation = ATTN_IMPLEMENTATION
        for layer in list(layers) + self._lower:
            layer.self_attn._sharedllm_state = self._state  # what the attention function reads
            layer.self_attn.config._attn_implementation = ATTN_IMPLEMENTATION  # copies have their own config
        self._hooks = []
        if config.injection == "residual":
            for i in range(M):
                self._hooks.append(layers[i].register_forward_pre_hook(self._state.layer_input_hook(i),
                                                                       with_kwargs=True))
                self._hooks.append(layers[i].self_attn.register_forward_hook(self._state.cross_block_hook(i),
                                                                             with_kwargs=True))
        if config.positions == "true":
            self._hooks.append(base_model.model.register_forward_pre_hook(self._state.offset_positions,
                                                                          with_kwargs=True))
        # activation checkpointing may be switched on at any time: checked before every decoder pass
        self._checkpointable = list(layers) + (list(self.lower_layers) if not config.share_lower else [])
        self._hooks.append(base_model.model.register_forward_pre_hook(self._state.replay_hook(self._checkpointable)))
        base_model._sharedllm_wrapped = True
        self._original_attn = original_attn

    def unwrap(self) -> nn.Module:
        """Removes the hooks and the attention switch: returns the base model as it was (this wrapper is then unusable)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._state.release(self._checkpointable)
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
        """Wraps a loaded model, or loads one from a local path (a Hugging Face folder or a ``.gguf``).

        Returns the wrapper in eval mode (no split noise; the base model is switched to eval too):
        call ``.train()`` before training."""
        config = replace(config, **overrides) if config is not None else SharedLLMConfig(**overrides)
        base = base_model_or_path
        if isinstance(base, (str, os.PathLike)):
            base, _ = load_base_model(base)
        if not isinstance(base, nn.Module):
            raise ValueError(f"base_model_or_path must be a model or a local path, got {type(base).__name__}")
        return cls(base, config).eval()

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
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        os.makedirs(path, exist_ok=True)
        self.config.save(path)
        tensors = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous().cpu()
                   for k, v in self.injector_state_dict().items()}
        meta = {"trained_base_layers": ",".join(map(str, self._trained_base_layers))}
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata=meta)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base_model_or_path, *, missing_ok: bool = False,
                        **overrides) -> "SharedLLMForCausalLM":
        """Wraps ``base_model_or_path`` with the config and injector saved in ``path`` (in eval mode, as
        :meth:`from_base`). ``missing_ok``: cross blocks the saved injector lacks (it had fewer injected
        layers) keep their ``cross_init`` start instead of raising; anything else missing still raises."""
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
        # missing_ok covers cross blocks only (more injected layers): any other gap is a wrong folder
        if unexpected or (missing and not (missing_ok and all(k.startswith("cross_blocks.") for k in missing))):
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
    # the steps of a call, for callers that run them one by one (benchmarks, tests)

    def injecting(self, ctx: CompressedContext | None):
        """Context manager: within it, calls of ``self.base_model`` receive ``ctx`` (None = no context)."""
        return self._state.injecting(ctx)

    def rotary_table(self, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The base model's rotary ``(cos, sin)``, float32 ``[>= size, D]``, for positions ``0..size-1``,
        without its attention scaling (a pure rotation: it is applied on top of rotated keys)."""
        return self._state.rotary(size, device)

    def context_attention(self, q: torch.Tensor, ctx: CompressedContext, layer_idx: int, scaling: float):
        """Attention of queries ``q`` ``[B, L, H, D]`` to layer ``layer_idx``'s compressed context:
        see :meth:`InjectionState.context_attention`."""
        return self._state.context_attention(q, ctx, layer_idx, scaling)

    def cross_block_output(self, layer_idx: int, y: torch.Tensor, position_embeddings) -> torch.Tensor:
        """``o_c(Attn(q_c(norm_c(y)), K, V))`` for the residual stream ``y`` ``[B, L, hidden]`` (within
        :meth:`injecting`)."""
        attn = self.base_model.model.layers[layer_idx].self_attn
        return self._state.cross_block_output(layer_idx, y, position_embeddings, attn)

    def encode_packed(self, token_ids, positions, cu_seqlens, layers, capture_layers=(), stop_after=None, keys_of=None):
        """Runs ``layers`` on one packed row of independent causal segments: see
        :meth:`ContextCompressor.encode_packed`."""
        return self._compressor.encode_packed(token_ids, positions, cu_seqlens, layers, capture_layers, stop_after,
                                              keys_of)

    def last_token_states(self, token_ids, positions, cu_seqlens, layer):
        """``[S, hidden]``: each segment's last token after ``layer``: see
        :meth:`ContextCompressor.last_token_states`."""
        return self._compressor.last_token_states(token_ids, positions, cu_seqlens, layer)

    def compress_context(
        self,
        context_input_ids: torch.Tensor,
        context_lengths=None,
        query_input_ids: torch.Tensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        split_noise_seeds: torch.Tensor | None = None,
        *,
        max_pass_tokens: int | None = None,
        into: CompressedContext | None = None,
    ) -> CompressedContext:
        """Compresses a batch of contexts for injection.

        Args:
            context_input_ids: int64 ``[B, Lc]``, right-padded.
            context_lengths: ``[B]`` true lengths (0 = no context for that row); default ``Lc``.
            query_input_ids, query_attention_mask: ``[B, L]``: the question whose last token drives
                ``retrieval="query"``. Without it the right child is expanded (as ``"right"``).
            split_noise_seeds: int64 ``[B]``, one per sequence: its training split noise becomes a
                function of the seed (the same in any batch, on any rank) instead of a global draw.
            max_pass_tokens: context tokens per compression pass for this call (default: the
                config's ``max_pass_tokens``); memory, not the result, depends on it.
            into: a context returned by this method: ``context_input_ids`` continues each of its
                sequences (same batch; a row of length 0 adds nothing). Only the new chunks are
                compressed, after an unfinished last chunk is reopened and recompressed with the
                tokens that complete it, so that growing a context piece by piece gives what
                compressing it at once does (with ``split_noise_seeds`` when training; with
                ``positions="true"`` the retrieval query sits after the context known at each call,
                which moves its rotary positions only). ``into`` is left unchanged.

        Returns:
            a :class:`CompressedContext` for ``forward(..., compressed_context=)`` or ``generate``
            (a new one when growing: drop ``into`` to free its memory).
        """
        self._state.replay_safe(self._checkpointable)  # the packed passes must not be checkpointed
        return self._compressor.compress(context_input_ids, context_lengths, query_input_ids, query_attention_mask,
                                         split_noise_seeds, training=self.training, max_pass_tokens=max_pass_tokens,
                                         into=into)

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
        With ``context_input_ids``, all of ``input_ids`` is the retrieval query: to score tokens
        without letting them choose their own context, compress with the tokens before them as
        the query and pass ``compressed_context`` (as the evaluation does).
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


# CompressedContext and CrossBlock are defined where they are made (compression.py, injection.py)
__all__ = ["SUPPORTED_MODEL_TYPES", "WEIGHTS_NAME", "CompressedContext", "CrossBlock", "SharedLLMForCausalLM",
           "check_llama_shaped"]
