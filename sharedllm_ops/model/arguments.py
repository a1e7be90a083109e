"""Checks of ``compress_context``'s arguments: each bad input gets an error that names it."""

from __future__ import annotations

import torch

from .compressed import CompressedContext
from .config import SharedLLMConfig


def check_context(context_input_ids, context_lengths, device) -> torch.Tensor:
    """int64 ``[B]``: the checked ``context_lengths`` (default: the width of ``context_input_ids``)."""
    if not isinstance(context_input_ids, torch.Tensor) or context_input_ids.dim() != 2:
        raise ValueError("context_input_ids must be an integer tensor [B, Lc]")
    if context_input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_input_ids must be int64 (or int32) token ids, got {context_input_ids.dtype}")
    if context_input_ids.device != device:
        raise ValueError(f"context_input_ids is on {context_input_ids.device} but the model is on {device}")
    B, Lc = context_input_ids.shape
    if B == 0 or Lc == 0:
        raise ValueError(
            f"context_input_ids is empty (shape {tuple(context_input_ids.shape)}): pass context_input_ids=None "
            "for no context, or context_lengths with zeros for rows without context"
        )
    if context_lengths is None:
        return torch.full((B,), Lc, dtype=torch.long, device=device)
    lengths = torch.as_tensor(context_lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.shape != (B,):
        raise ValueError(f"context_lengths must be integers of shape [B={B}], got {lengths.dtype} {tuple(lengths.shape)}")
    if lengths.device != device and lengths.device.type != "cpu":
        raise ValueError(f"context_lengths is on {lengths.device} but the model is on {device}")
    lengths = lengths.to(device, torch.long)
    if bool((lengths < 0).any()) or bool((lengths > Lc).any()):
        raise ValueError(f"context_lengths must be in [0, {Lc}] (the width of context_input_ids), got {lengths.tolist()}")
    return lengths


def check_query(query_input_ids, query_attention_mask, batch: int, device) -> None:
    if not isinstance(query_input_ids, torch.Tensor) or query_input_ids.dim() != 2:
        raise ValueError("query_input_ids must be an integer tensor [B, L]")
    if query_input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"query_input_ids must be int64 (or int32) token ids, got {query_input_ids.dtype}")
    if query_input_ids.device != device:
        raise ValueError(f"query_input_ids is on {query_input_ids.device} but the model is on {device}")
    if query_input_ids.shape[0] != batch:
        raise ValueError(f"query_input_ids has batch {query_input_ids.shape[0]}, the context has {batch}")
    if query_attention_mask is not None:
        if not isinstance(query_attention_mask, torch.Tensor) or query_attention_mask.shape != query_input_ids.shape:
            raise ValueError(
                f"query_attention_mask must have the shape of query_input_ids {tuple(query_input_ids.shape)}, got "
                f"{getattr(query_attention_mask, 'shape', type(query_attention_mask).__name__)}"
            )
        if query_attention_mask.device != device:
            raise ValueError(f"query_attention_mask is on {query_attention_mask.device} but the model is on {device}")


def check_split_noise_seeds(split_noise_seeds, batch: int, device) -> torch.Tensor:
    """int64 ``[B]``: the checked seeds."""
    seeds = torch.as_tensor(split_noise_seeds, device=device)
    if seeds.dtype.is_floating_point or seeds.dtype == torch.bool or seeds.shape != (batch,):
        raise ValueError(f"split_noise_seeds must be integers of shape [B={batch}], got {seeds.dtype} {tuple(seeds.shape)}")
    return seeds.long()


def pass_tokens(max_pass_tokens, config: SharedLLMConfig) -> int | None:
    """The tokens per compression pass of a call: ``max_pass_tokens`` (checked), else the config's."""
    if max_pass_tokens is None:
        return config.max_pass_tokens
    if isinstance(max_pass_tokens, bool) or not isinstance(max_pass_tokens, int) or max_pass_tokens < 1:
        raise ValueError(f"max_pass_tokens must be an int >= 1 or None (the config's), got {max_pass_tokens!r}")
    return max_pass_tokens


def check_into(into, batch: int, device, config: SharedLLMConfig) -> None:
    """``into`` must be a context this model compressed (not repeated for generation) of the same batch."""
    if not isinstance(into, CompressedContext):
        raise ValueError(f"into must be a CompressedContext, got {type(into).__name__}")
    if into.nodes is None or into.tail_input_ids is None:
        raise ValueError("into cannot grow: it was not made by compress_context (or was repeated for generation)")
    if into.batch_size != batch:
        raise ValueError(f"into has batch {into.batch_size}, context_input_ids has {batch}")
    if into.device != device:
        raise ValueError(f"into is on {into.device} but the model is on {device}")
    if len(into.keys) != config.num_injected_layers or (into.k_positions is None) != (config.positions == "true"):
        raise ValueError("into was compressed by a model with another config (injected layers or positions)")
    if (into.row_tokens is None) != (config.row_weight_exponent == 0):
        raise ValueError("into was compressed by a model with another config (row_weight_exponent zero or not)")
    if config.anchor_tokens or config.lead_tokens:  # a grown context no longer holds the tokens they read
        raise ValueError("compress_context(into=...) does not support SharedLLMConfig.anchor_tokens > 0 "
                         "or lead_tokens > 0 yet")
    # both choose chunks by where the context ends (retrieved_chunks=0 is a setting too)
    for name, used in (("raw_recent_chunks", config.raw_recent_chunks > 0),
                       ("retrieved_chunks", config.retrieved_chunks is not None)):
        if used:
            raise ValueError(f"compress_context(into=...) does not support SharedLLMConfig.{name} yet")


__all__ = ["check_context", "check_into", "check_query", "check_split_noise_seeds", "pass_tokens"]
