"""Perplexity of SharedLLM against its baselines (docs/DESIGN.md section 7), shared by ``sharedllm-ops demo``
and ``sharedllm-ops eval-ppl``.

The protocol: take the first ``max_tokens`` tokens of a text; the decoder sees the last ``window``
of them; the perplexity is over the last ``last`` tokens. Rows:

* **window only**: the base model on the decoder window alone;
* **SharedLLM, training-free** (``injection="merge"``, every layer injected): the rest of the text
  as context, uncompressed (chunks encoded at their true positions), and compressed with the
  paper's tree, five levels deep (32 tokens per node, query-aware retrieval by the mean of a node's
  tokens against the mean of the query's last 16; keys kept every 32nd...2nd token before rotary
  and placed at their distance in the text, ``positions="distance"``; every node encoded behind
  the context's first 16 tokens and the 64 before it, so that it has neither its own attention
  sink nor a cut-off sentence; the context's last chunk kept raw, at its true distance; of the
  older chunks, the first and the 7 most like the query, so that longer contexts do not dilute it);
* **full attention**: the base model on all the tokens, where they fit its position window.

The retrieval query of a SharedLLM row is the window's tokens before the scored ones: the context
chosen for the scored tokens never depends on them.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import SharedLLMConfig
from .modeling import SharedLLMForCausalLM
from .text import full_perplexity, window_perplexity


TRAINING_FREE_ROW = "SharedLLM training-free (merge), compressed"  # the default training-free setting


def training_free_configs(num_layers: int, chunk_size: int = 1024) -> dict[str, SharedLLMConfig]:
    """The training-free SharedLLM settings of the perplexity table, by row name."""
    common = dict(num_injected_layers=num_layers, chunk_size=chunk_size, injection="merge", positions="true")
    return {
        "SharedLLM training-free (merge), uncompressed": SharedLLMConfig(**common, tree_depth=0, tokens_per_node=None),
        # keys pooled before rotary at their distance in the text, strided; nodes behind an anchor and
        # their lead; the last chunk raw; the 32 tokens beside each retrieved leaf raw; beyond 8K only
        # the 7 older chunks most like the query (and the first): the best setting on the validation
        # split, its passkey and its context curve (issue 16)
        TRAINING_FREE_ROW: SharedLLMConfig(
            **{**common, "positions": "distance"}, tree_depth=5, tokens_per_node=chunk_size // 32, retrieval="query",
            pool_mode="first", retrieval_node_embedding="mean", retrieval_query_tokens=16, anchor_tokens=16,
            lead_tokens=64, drop_node_sinks=False, raw_recent_chunks=1, exact_distance=True, retrieved_chunks=7,
            leaf_halo_tokens=chunk_size // 32,
        ),
    }


def config_overrides(text: str | None) -> dict:
    """``--config`` of ``validate`` and ``eval-long``: SharedLLMConfig fields as a JSON object (``{}`` for
    none), or a SystemExit naming the option. The fields themselves are checked by the config."""
    if text is None:
        return {}
    try:
        overrides = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"--config is not JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise SystemExit(f"--config must be a JSON object of SharedLLMConfig fields, got {text}")
    return overrides


@dataclass
class Row:
    """One line of the perplexity table."""

    name: str
    perplexity: float
    seconds: float
    stats: dict = field(default_factory=dict)
    context: object = None  # the CompressedContext of a SharedLLM row (retrieved without the scored tokens)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


@torch.no_grad()
def sharedllm_perplexity(model: SharedLLMForCausalLM, ids: torch.Tensor, window: int, last: int):
    """Perplexity of the last ``last`` tokens of ``ids [N]``: decoder on the last ``window``, the rest as context.

    The retrieval query is the window without its last ``last`` tokens, so that what is scored
    cannot steer which parts of the context are kept.

    Returns ``(perplexity, stats, context)``: the compressed context's stats plus ``inject_s`` (the
    decoder pass with injection minus the same pass without) and ``decode_s``, and the context.
    """
    if not 1 <= last < window < ids.numel():
        raise ValueError(f"need 1 <= last < window < len(ids), got last={last}, window={window}, N={ids.numel()}")
    device = model.device
    context, decoder = ids[:-window].to(device)[None], ids[-window:].to(device)[None]
    ctx = model.compress_context(context, None, query_input_ids=decoder[:, :-last])
    start = time.perf_counter()
    logits = model(decoder, compressed_context=ctx, use_cache=False, logits_to_keep=last + 1).logits
    with_context = time.perf_counter() - start
    start = time.perf_counter()
    model(decoder, use_cache=False, logits_to_keep=1)
    alone = time.perf_counter() - start
    nll = F.cross_entropy(logits[0, :-1].float(), decoder[0, -last:])
    stats = dict(ctx.stats, decode_s=alone, inject_s=max(with_context - alone, 0.0))
    return math.exp(nll.item()), stats, ctx


def perplexity_table(base, ids: torch.Tensor, window: int = 512, last: int = 256, chunk_size: int = 1024,
                     progress=None, configs: dict | None = None) -> list[Row]:
    """Every row of the module docstring for one text's token ids ``[N]``; ``base`` is left unwrapped.

    ``configs``: row name -> SharedLLMConfig, or the folder of a trained injector (``save_pretrained``).

    ``progress(name)`` is called before each row (for a progress bar)."""
    progress = progress or (lambda name: None)
    rows = []

    def timed(name, fn):
        progress(name)
        start = time.perf_counter()
        result = fn()
        ppl, stats, ctx = result if isinstance(result, tuple) else (result, {}, None)
        rows.append(Row(name, ppl, time.perf_counter() - start, stats, ctx))

    timed(f"window {window} only", lambda: window_perplexity(base, ids, window, last))
    num_layers = len(base.model.layers)
    for name, config in (configs or training_free_configs(num_layers, chunk_size)).items():
        if isinstance(config, SharedLLMConfig):
            model = SharedLLMForCausalLM.from_base(base, config)
        else:  # a folder written by save_pretrained: a trained injector
            model = SharedLLMForCausalLM.from_pretrained(config, base)
        try:
            timed(name, lambda: sharedllm_perplexity(model, ids, window, last))
        finally:
            model.unwrap()
    max_positions = getattr(base.config, "max_position_embeddings", None)
    if max_positions is None or ids.numel() <= max_positions:
        timed(f"full attention ({ids.numel()} tokens)", lambda: full_perplexity(base, ids, last))
    return rows


def format_table(rows: list[Row]) -> str:
    """Markdown table of perplexity rows."""
    lines = ["| setting | perplexity | seconds |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.perplexity:.2f} | {r.seconds:.1f} |" for r in rows]
    return "\n".join(lines)


__all__ = ["TRAINING_FREE_ROW", "Row", "config_overrides", "format_table", "peak_rss_gb", "perplexity_table",
           "sharedllm_perplexity", "training_free_configs"]
