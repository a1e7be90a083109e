"""Prefill of a long context by SharedLLM and by the baselines it is compared with, for
``bench/bench_model.py`` (checked by ``tests/test_baselines.py``).

Every ``prefill_*`` function has the same shape, ``prefill_x(model, context_ids, decoder_ids, **options)``,
reads the context ``context_ids`` ``[B, Lc]`` followed by the recent tokens ``decoder_ids`` ``[B, Ld]``
(no padding), keeps what the method would keep for generation (KV caches, compressed context), and
returns the float32 logits of the last decoder position ``[B, vocab]`` (so that no work can be skipped;
only the last position goes through ``lm_head``, for every method):

* :func:`prefill_full`: the stock model over ``[context; decoder]`` in one pass (full causal attention).
* :func:`prefill_streaming`: StreamingLLM (attention sink + recent window) over ``[context; decoder]``.
* :func:`prefill_encoder_decoder`: a CEPE-like encoder-decoder proxy (every decoder layer cross-attends
  to the whole, uncompressed context encoded in chunks), built by :func:`build_encoder_decoder`.
* :func:`prefill_sharedllm`: SharedLLM with the paper's configuration, built by :func:`build_sharedllm`.

A base model can be wrapped by only one :class:`SharedLLMForCausalLM`; :func:`share_weights` makes
another module tree around the same parameter tensors (no copy), so one set of weights serves all
four methods. :func:`random_llama` builds the random-weight models of the benchmark and
:func:`peak_memory` measures what a prefill allocates.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM

# ---------------------------------------------------------------------------------------------
# models


# LlamaConfig fields of the two model shapes of the benchmark
SMOLLM2_135M_SHAPE = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    max_position_embeddings=8192,
)
LLAMA2_7B_SHAPE = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
    vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    max_position_embeddings=4096,
)


def random_llama(shape: dict, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, **overrides):
    """A ``LlamaForCausalLM`` of the given shape (``SMOLLM2_135M_SHAPE``, ``LLAMA2_7B_SHAPE`` or any
    ``LlamaConfig`` fields) with transformers' random initialisation, built directly on ``device`` in
    ``dtype``, SDPA attention, eval mode. Deterministic given ``seed`` on one device (the global RNG
    state is left untouched). ``max_position_embeddings`` does not limit the default RoPE, so longer
    inputs than the shape's training length run (as they must for full attention at 128K)."""
    config = LlamaConfig(**{**shape, **overrides})
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def share_weights(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose parameters and buffers are the same tensors as ``base``'s (no memory
    is copied) while its modules and config are its own: it can be wrapped by its own
    :class:`SharedLLMForCausalLM` (which changes the config's attention implementation and adds hooks).
    Make the copies before wrapping ``base``; the weights must then be treated as read-only."""
    if getattr(base, "_sharedllm_wrapped", False):
        raise ValueError("share_weights needs an unwrapped base model (copy it before wrapping it)")
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer tensors of ``model`` (shared or tied ones counted once)."""
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def num_layers(model: nn.Module) -> int:
    base = model.base_model if isinstance(model, SharedLLMForCausalLM) else model
    return len(base.model.layers)


def build_sharedllm(base: nn.Module, **overrides) -> SharedLLMForCausalLM:
    """SharedLLM with the paper's configuration around ``base``: the bottom 4 layers compress and
    receive the context, 1024-token chunks, trees of height 3, 32 KV rows per preserved node (8x),
    query-aware retrieval, residual cross blocks (``SharedLLMConfig``'s defaults)."""
    config = SharedLLMConfig(num_injected_layers=4, chunk_size=1024, tree_depth=3, tokens_per_node=32,
                             retrieval="query", injection="residual")
    return SharedLLMForCausalLM.from_base(base, config, **overrides)


def build_encoder_decoder(base: nn.Module, chunk_size: int = 1024, **overrides) -> SharedLLMForCausalLM:
    """The CEPE-like encoder-decoder proxy around ``base``: our wrapper with every layer injected,
    no tree and no compression, so that the context is encoded in independent ``chunk_size``-token
    chunks and every decoder layer cross-attends (residual cross block after self-attention, as in
    CEPE) to the full, uncompressed context.

    What differs from CEPE, and in which direction for the cost:

    * CEPE's encoder is a small separate bidirectional model (a few hundred million parameters for
      LLaMA-2-7B) whose final hidden states every cross-attention layer projects to keys and values
      with its own k/v projections. Here the "encoder" is the base model's own layers (all of them,
      causal within each chunk), and layer ``i``'s keys and values are the ones layer ``i`` computes
      while encoding: the encoder therefore costs as much as running the full model over the context
      with chunk-local attention, **an upper bound on CEPE's encoder cost** (many times larger for a
      7B decoder). CEPE's per-layer k/v projections of the encoder states (``Lc x d_enc x d_dec`` per
      layer) are covered by the layers' own k/v projections inside that pass (``Lc x d_dec x d_kv``).
    * The decoder side is CEPE's: every layer's cross-attention reads all ``Lc`` context rows, and
      the keys/values of all layers over the whole context are kept (the memory CEPE keeps too, at
      the decoder's width).
    """
    config = SharedLLMConfig(num_injected_layers=num_layers(base), chunk_size=chunk_size, tree_depth=0,
                             tokens_per_node=None, injection="residual")
    return SharedLLMForCausalLM.from_base(base, config, **overrides)


# ---------------------------------------------------------------------------------------------
# prefill


def _check_inputs(context_ids: torch.Tensor, decoder_ids: torch.Tensor) -> None:
    if context_ids.dim() != 2 or decoder_ids.dim() != 2 or context_ids.shape[0] != decoder_ids.shape[0]:
        raise ValueError(
            f"context_ids and decoder_ids must be [B, Lc] and [B, Ld] with the same B, got "
            f"{tuple(context_ids.shape)} and {tuple(decoder_ids.shape)}"
        )
    if decoder_ids.shape[1] == 0:
        raise ValueError("decoder_ids is empty: the logits of its last position are the result")


def _last_logits(out) -> torch.Tensor:
    return out.logits[:, -1].float()


@torch.no_grad()
def prefill_full(base: nn.Module, context_ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
    """Full attention: the stock model reads ``[context; decoder]`` in one pass, building the KV cache
    of every token in every layer."""
    _check_inputs(context_ids, decoder_ids)
    ids = torch.cat([context_ids, decoder_ids], dim=1)
    return _last_logits(base(input_ids=ids, use_cache=True, logits_to_keep=1))


def cut_cache(cache, sink: int, window: int) -> None:
    """Cuts every layer of a transformers ``DynamicCache`` back to its first ``sink`` and its last
    ``window - sink`` positions, in place (new contiguous tensors, so the dropped rows are freed).

    In transformers 5, ``DynamicCache.layers[i]`` is a ``DynamicLayer`` whose ``keys``/``values``
    ``[B, Hk, S, D]`` are concatenated to at each update; the attention mask is sized from the
    cache length (``get_seq_length``), so a cut cache simply makes the next block see fewer keys."""
    recent = window - sink
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys.shape[-2] <= window:
            continue
        layer.keys = torch.cat([layer.keys[..., :sink, :], layer.keys[..., -recent:, :]], dim=-2)
        layer.values = torch.cat([layer.values[..., :sink, :], layer.values[..., -recent:, :]], dim=-2)


@torch.no_grad()
def prefill_streaming(
    base: nn.Module, context_ids: torch.Tensor, decoder_ids: torch.Tensor, sink: int = 4, window: int = 1024
) -> torch.Tensor:
    """StreamingLLM's attention sink + recent window: the stock model reads ``[context; decoder]`` in
    blocks of ``window`` tokens with a ``DynamicCache`` cut back after every block to the first
    ``sink`` tokens plus the most recent ``window - sink`` (:func:`cut_cache`). A block's tokens see
    the cut cache and the block itself (causally): between ``window`` and ``2 * window`` keys each,
    where token-by-token StreamingLLM would see exactly ``window``; the cost is the same order.

    Positions: every token keeps its original position (``position_ids`` are passed explicitly),
    so the cached keys keep the rotary positions they were computed at. StreamingLLM re-assigns
    positions inside the cache (``0..window-1``, re-rotating the kept keys); that is omitted here,
    which changes the outputs but not the cost.
    """
    _check_inputs(context_ids, decoder_ids)
    if not 0 <= sink < window:
        raise ValueError(f"need 0 <= sink < window, got sink={sink}, window={window}")
    ids = torch.cat([context_ids, decoder_ids], dim=1)
    B, N = ids.shape
    cache = DynamicCache(config=base.config)
    positions = torch.arange(N, device=ids.device)[None].expand(B, -1)
    out = None
    for start in range(0, N, window):
        stop = min(start + window, N)
        out = base(input_ids=ids[:, start:stop], position_ids=positions[:, start:stop], cache=cache,
                   use_cache=True, logits_to_keep=1)
        cut_cache(cache, sink, window)
    return _last_logits(out)


def _prefill_wrapped(model: SharedLLMForCausalLM, context_ids, decoder_ids, stats: dict | None):
    _check_inputs(context_ids, decoder_ids)
    ctx = model.compress_context(context_ids, None, query_input_ids=decoder_ids)
    out = model(input_ids=decoder_ids, compressed_context=ctx, use_cache=True, logits_to_keep=1)
    if stats is not None:
        stats.update(ctx.stats)
    return _last_logits(out)


@torch.no_grad()
def prefill_encoder_decoder(
    model: SharedLLMForCausalLM, context_ids: torch.Tensor, decoder_ids: torch.Tensor, stats: dict | None = None
) -> torch.Tensor:
    """The CEPE-like proxy of :func:`build_encoder_decoder`: encode the context in chunks (all
    layers' keys/values kept), then the decoder tokens with cross-attention to all of it in every
    layer. ``stats``, if given, receives the context path's sizes and stage seconds."""
    return _prefill_wrapped(model, context_ids, decoder_ids, stats)


@torch.no_grad()
def prefill_sharedllm(
    model: SharedLLMForCausalLM, context_ids: torch.Tensor, decoder_ids: torch.Tensor, stats: dict | None = None
) -> torch.Tensor:
    """SharedLLM (:func:`build_sharedllm`): query-aware tree retrieval driven by the decoder tokens,
    the lower model encodes the preserved nodes, chunk pooling, then the decoder tokens through the
    upper model with cross-injection in its bottom layers. ``stats`` as for the encoder-decoder."""
    return _prefill_wrapped(model, context_ids, decoder_ids, stats)


# ---------------------------------------------------------------------------------------------
# memory


@dataclass
class PeakMemory:
    """What :func:`peak_memory` measured: ``peak_bytes`` above what was allocated before the call."""

    peak_bytes: int
    method: str  # "cuda_max_memory_allocated" | "live_tensor_bytes"


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class _ReportOutputs(TorchDispatchMode):
    """Runs every op as usual and hands its outputs and inputs to ``meter.record``."""

    def __init__(self, meter: "_LiveTensorBytes"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.meter.record(out, args, kwargs)
        return out


class _LiveTensorBytes:
    """Counts the bytes of the tensor storages that ops create while it is active, and their peak.

    A ``TorchDispatchMode`` sees the outputs of every aten (and custom) op. An output whose storage
    is new (not one of its inputs', not already counted) adds its storage's size; the size is given
    back when the last tensor seen on that storage is garbage-collected. Storages that existed before
    (weights, inputs) are never counted, nor scratch memory that an op allocates and frees inside itself.
    """

    def __init__(self, device: torch.device):
        self.mode = _ReportOutputs(self)
        self.device = device
        self.refs: dict = {}  # storage key -> [nbytes, number of live tensors seen on it]
        self.current = 0
        self.peak = 0

    def record(self, out, args, kwargs) -> None:
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device == self.device]
        if not outputs:
            return
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)}
        for t in outputs:
            key = _storage_key(t)
            if not key:
                continue
            entry = self.refs.get(key)
            if entry is None:
                if key in inputs:  # a view of a tensor from before the measurement
                    continue
                entry = self.refs[key] = [t.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self.release, key)

    def release(self, key) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.refs[key]
            self.current -= entry[0]

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def peak_memory(fn, device) -> tuple[object, PeakMemory]:
    """Runs ``fn()`` once and returns its result and the peak memory it allocated on ``device``
    beyond what was allocated before the call (the weights, the inputs): activations, KV caches,
    compressed context, logits.

    * CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call (the
      caching allocator's live blocks, including every kernel's workspace).
    * CPU: torch keeps no peak statistics for CPU memory, so a ``TorchDispatchMode`` counts the
      bytes of the tensor storages the ops create, as they are created and garbage-collected
      (:class:`_LiveTensorBytes`): the same quantity at op granularity, without scratch memory an op
      frees before returning (e.g. inside an attention kernel) and without allocator overhead.
      It slows the call down, so never time under it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, PeakMemory(torch.cuda.max_memory_allocated(device) - before, "cuda_max_memory_allocated")
    with _LiveTensorBytes(device) as meter:
        result = fn()
    return result, PeakMemory(meter.peak, "live_tensor_bytes")


__all__ = [
    "LLAMA2_7B_SHAPE",
    "SMOLLM2_135M_SHAPE",
    "PeakMemory",
    "build_encoder_decoder",
    "build_sharedllm",
    "cut_cache",
    "model_bytes",
    "num_layers",
    "peak_memory",
    "prefill_encoder_decoder",
    "prefill_full",
    "prefill_sharedllm",
    "prefill_streaming",
    "random_llama",
    "share_weights",
]
