"""SharedLLMConfig: every choice of the SharedLLM wrapper (docs/DESIGN.md section 5), with the paper's defaults."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from ..ops import BACKENDS

CONFIG_NAME = "sharedllm_config.json"


@dataclass
class SharedLLMConfig:
    """How SharedLLM stacks a decoder on itself.

    Attributes:
        num_injected_layers: ``M``; the bottom ``M`` layers form the lower model (compressor) and
            the bottom ``M`` layers of the upper model receive the compressed context.
        chunk_size: context chunk length; the last chunk of a context may be shorter.
        tree_depth: ``h`` of each chunk's binary tree; 0 = each chunk is one node (no tree).
            Chunks shorter than ``2 ** tree_depth`` tokens cannot be split and stay one node.
        tokens_per_node: ``P`` of ``chunk_pool``: every preserved node longer than ``P`` is pooled
            to ``P`` key/value rows (shorter nodes are kept as they are). ``None`` = no compression.
        pool_mode: ``"mean"`` or ``"first"`` (``chunk_pool`` modes).
        retrieval: ``"query"`` (cosine between the query and node embeddings, as in the paper) or
            ``"right"`` (always expand the right child: no query needed).
        retrieval_node_embedding: how ``"query"`` retrieval embeds a node, after one lower layer and
            the final norm: ``"last"`` (its last token, as in the paper) or ``"mean"`` (the mean over
            its tokens: a node is found by what it holds, not by the token it happens to end on).
        retrieval_query_tokens: the query embedding is the mean of the query's last this-many tokens
            after one upper layer and the final norm (1: its last token, as in the paper).
        split_noise_std: training-time split noise as a fraction of node length (paper: 0.2);
            applied only while the model is in training mode.
        injection: ``"residual"`` (the paper's cross block ``x += o_c(Attn(q_c(norm_c(x)), K, V))``
            after self-attention) or ``"merge"`` (training-free: the layer's own query attends to the
            context, merged into self-attention with ``merge_attention``).
        positions: ``"chunk"`` (paper Eq. 2: nodes are encoded from position 0, keys of chunk ``i``
            get the extra rotary position ``i``, cross-attention queries position ``n`` = number of
            chunks; the decoder starts at position 0), ``"true"`` (context tokens keep their
            positions in the context and the decoder continues after it) or ``"distance"``: nodes
            are encoded from position 0 as for ``"chunk"``, but their keys are pooled **before**
            rotary (the in-node rotation is undone: averaging rotated keys cancels the fast rotary
            pairs), then each compressed row is rotated once so that its distance to the
            cross-attention query is its distance in the text from the end of the context, in
            units of ``distance_scale`` tokens, capped at ``max_distance`` (so that any context
            length stays within the positions seen in training).
        cross_init: ``"copy"`` (cross blocks start as copies of the layer's input norm and q/o
            projections), ``"copy_zero"`` (the same with ``o_c = 0``: the model starts exactly as
            the base model and training only adds what the context brings) or ``"random"``.
        share_lower: the lower model shares the base model's weights (default); ``False`` copies
            its layers so that they can be trained apart.
        backend: backend of every sharedllm_ops op (``"auto"``, ``"reference"``, ``"cpp"``, ...).
        distance_scale: ``positions="distance"``: context tokens per position step.
        max_distance: ``positions="distance"``: the largest distance (in position steps); rows
            farther away all sit at this distance.
        exact_distance: with ``positions="distance"``, each row is rotated at its exact distance in
            tokens divided by ``distance_scale`` (fractional steps), not at whole steps, so that raw
            rows fewer than ``distance_scale`` tokens apart (a kept-raw identifier) keep their order.
        drop_node_sinks: every node is encoded alone, so its first token becomes an attention
            sink; ``True`` leaves that token out of the pooling of every pooled node that does not
            start the context (nodes short enough to be kept raw keep it).
        anchor_tokens: every node that does not start its context is encoded behind the context's
            first ``anchor_tokens`` tokens (fewer if the node starts earlier), whose keys and values
            are then dropped, so that the node's own first token is no attention sink (Star
            Attention's anchor); 0: nodes are encoded alone. Replaces ``drop_node_sinks`` (which must
            then be False).
        lead_tokens: every node is also encoded behind the ``lead_tokens`` tokens that precede it in
            the text (after the anchor, fewer where they would overlap it), whose keys and values are
            dropped too: a node cut out of its sentence still reads the sentence's start. 0: none.
            Like ``anchor_tokens``, it replaces ``drop_node_sinks``.
        raw_recent_chunks: the last ``n`` chunks of every context are kept uncompressed: no tree and
            no retrieval; each is cut into nodes of ``tokens_per_node`` tokens, every row kept (the
            nodes are encoded like any other, so give them ``anchor_tokens``/``lead_tokens`` to read
            the text before them). The text nearest the decoder is then held exactly, and only the
            older chunks are compressed. 0: every chunk is compressed (the paper).
        retrieved_chunks: at most this many of a context's older chunks (neither kept raw nor the
            first, which holds the context's attention sink and always stays) reach the decoder: the ones with the leaf (a ``chunk_size / 2 ** tree_depth``-token window)
            most like the query, as ``"query"`` retrieval embeds them; the latest ones without a
            query or with ``retrieval="right"``. The others are dropped before encoding, so the
            compressed context, and the attention it takes from the window, stop growing with
            the context. ``None``: every chunk (the paper).
        leaf_halo_tokens: ``h``: the nodes beside the two leaves that a chunk's descent keeps (its
            finest nodes) give the ``h`` tokens nearest them to nodes of their own, kept raw (``h <=
            tokens_per_node``): a sentence cut by a leaf boundary keeps its start and its end in
            full detail. Adds up to ``2 h`` rows per chunk with a tree. 0: none (the paper).
        row_weight_exponent: ``a``: every compressed row's attention weight is multiplied by
            ``tokens ** a``, where ``tokens`` is the number of context tokens it stands for (``a *
            log(tokens)`` added to its logits; the context's first row, the attention sink, counts as
            one token). 0: rows weigh alike (the paper); 1: proportional attention, as in token
            merging, so that a row kept for 32 tokens weighs like those 32 tokens; negative values
            favour the raw rows that retrieval kept over the pooled ones. ``tokens`` is rounded to
            buckets 1/16 wide in ``log2`` (powers of two exact; the weight within ``2 ** (|a| / 32)``).
        max_pass_tokens: compression works through the chunks in groups of at most this many context
            tokens per pass (a longer chunk is a group of its own), so that its memory does not grow
            with the context; the result is the same. ``None``: all chunks in one pass.
    """

    num_injected_layers: int = 4
    chunk_size: int = 1024
    tree_depth: int = 3
    tokens_per_node: int | None = 32
    pool_mode: str = "mean"
    retrieval: str = "query"
    retrieval_node_embedding: str = "last"
    retrieval_query_tokens: int = 1
    split_noise_std: float = 0.0
    injection: str = "residual"
    positions: str = "chunk"
    cross_init: str = "copy"
    share_lower: bool = True
    backend: str = "auto"
    max_pass_tokens: int | None = 16384
    distance_scale: int = 8
    max_distance: int = 1024
    exact_distance: bool = False
    drop_node_sinks: bool = False
    anchor_tokens: int = 0
    lead_tokens: int = 0
    raw_recent_chunks: int = 0
    retrieved_chunks: int | None = None
    leaf_halo_tokens: int = 0
    row_weight_exponent: float = 0.0

    def __post_init__(self):
        def check_int(name: str, low: int, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                expected = f"an int >= {low}" + (" or None" if allow_none else "")
                raise ValueError(f"SharedLLMConfig.{name} must be {expected}, got {value!r}")

        def check_choice(name: str, choices) -> None:
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"SharedLLMConfig.{name} must be one of {tuple(choices)}, got {value!r}")

        check_int("num_injected_layers", 1)
        check_int("chunk_size", 1)
        check_int("tree_depth", 0)
        check_int("tokens_per_node", 1, allow_none=True)
        check_int("max_pass_tokens", 1, allow_none=True)
        check_int("distance_scale", 1)
        check_int("anchor_tokens", 0)
        check_int("lead_tokens", 0)
        check_int("raw_recent_chunks", 0)
        check_int("retrieved_chunks", 0, allow_none=True)
        check_int("leaf_halo_tokens", 0)
        check_int("retrieval_query_tokens", 1)
        check_int("max_distance", 1)
        check_choice("pool_mode", ("mean", "first"))
        check_choice("retrieval", ("query", "right"))
        check_choice("retrieval_node_embedding", ("last", "mean"))
        check_choice("injection", ("residual", "merge"))
        check_choice("positions", ("chunk", "true", "distance"))
        check_choice("cross_init", ("copy", "copy_zero", "random"))
        check_choice("backend", BACKENDS)
        if not isinstance(self.split_noise_std, (int, float)) or not 0.0 <= self.split_noise_std < 0.5:
            raise ValueError(f"SharedLLMConfig.split_noise_std must be a float in [0, 0.5), got {self.split_noise_std!r}")
        for name in ("share_lower", "drop_node_sinks", "exact_distance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SharedLLMConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.row_weight_exponent, bool) or not isinstance(self.row_weight_exponent, (int, float)) \
                or not math.isfinite(self.row_weight_exponent):
            raise ValueError(f"SharedLLMConfig.row_weight_exponent must be a finite float, got {self.row_weight_exponent!r}")
        for name in ("anchor_tokens", "lead_tokens"):
            if getattr(self, name) and self.drop_node_sinks:
                # behind an anchor a node's first token is no sink: dropping it would only lose a token
                raise ValueError(f"SharedLLMConfig.{name} > 0 replaces drop_node_sinks: set drop_node_sinks=False")
        if self.leaf_halo_tokens and (self.tree_depth < 1 or self.tokens_per_node is None
                                      or self.leaf_halo_tokens > self.tokens_per_node):
            raise ValueError("SharedLLMConfig.leaf_halo_tokens needs a tree (tree_depth >= 1) and pooling, and must be "
                             f"at most tokens_per_node ({self.tokens_per_node}) to stay raw, got {self.leaf_halo_tokens}")
        if self.exact_distance and self.positions != "distance":
            raise ValueError(f"SharedLLMConfig.exact_distance needs positions='distance', got {self.positions!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SharedLLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SharedLLMConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def save(self, folder: str | os.PathLike) -> None:
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SharedLLMConfig":
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {folder} a folder written by SharedLLMForCausalLM.save_pretrained?")
        with open(path) as f:
            return cls.from_dict(json.load(f))
