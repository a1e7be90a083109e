"""The context path's index arithmetic: chunks, context trees, preserved nodes and packed token runs.

Everything here is vectorised over sequences, chunks and nodes (no Python loop over them) and
works on index tensors only; ``compression.py`` runs the networks on what it returns.

Conventions: a batch of ``B`` right-padded contexts ``[B, Lc]`` with true lengths ``[B]``; a
*segment* is a run of consecutive context tokens of one row, given by its first token (flat index
``row * Lc + start``) and its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import num_tree_nodes

BRANCHING = 2  # SharedLLM's trees are binary (docs/DESIGN.md section 1)


@dataclass
class ChunkLayout:
    """The chunks of a batch of contexts, in (sequence, chunk) order. All tensors ``[num_chunks]`` int64,
    except ``num_chunks`` ``[B]``."""

    row: torch.Tensor  # the sequence of each chunk
    index: torch.Tensor  # the chunk's index within its sequence (its Eq. 2 key position)
    start: torch.Tensor  # first token within the sequence's context
    length: torch.Tensor  # tokens (the last chunk of a sequence may be shorter than chunk_size)
    num_chunks: torch.Tensor  # chunks per sequence


def chunk_layout(context_lengths: torch.Tensor, chunk_size: int) -> ChunkLayout:
    """Splits each context of ``context_lengths`` ``[B]`` tokens into chunks of ``chunk_size``."""
    lengths = context_lengths.long()
    num_chunks = (lengths + chunk_size - 1) // chunk_size
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), num_chunks)
    first_chunk = torch.cumsum(num_chunks, 0) - num_chunks
    index = torch.arange(row.numel(), device=lengths.device) - first_chunk[row]
    start = index * chunk_size
    length = torch.clamp(lengths[row] - start, max=chunk_size)
    return ChunkLayout(row, index, start, length, num_chunks)


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wang's 32-bit integer hash on int64 tensors (values in [0, 2^32)); multipliers < 2^31 keep
    every product inside int64."""
    x = ((x ^ 61) ^ (x >> 16)) & _MASK32
    x = (x * 9) & _MASK32
    x = x ^ (x >> 4)
    x = (x * 0x27D4EB2D) & _MASK32
    return x ^ (x >> 15)


def keyed_normal(keys: torch.Tensor) -> torch.Tensor:
    """float64 standard normal draws, one per int64 key, that depend on the key alone (Box-Muller on
    two hashed uniforms): the same sample gets the same noise in any batch and on any rank."""
    k = _hash32(keys & _MASK32) ^ _hash32((keys >> 32) & _MASK32)
    u1 = (_hash32(k * 2 & _MASK32).double() + 0.5) / 2**32
    u2 = (_hash32((k * 2 + 1) & _MASK32).double() + 0.5) / 2**32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


def tree_node_spans(
    chunk_lens: torch.Tensor, depth: int, split_noise_std: float = 0.0, noise_keys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, length)`` int64 ``[C, T]`` of the ``T`` non-root nodes of each chunk's binary tree, in level order.

    Without noise, node ``i`` of level ``l`` covers ``[floor(i*L/2^l), floor((i+1)*L/2^l))`` (as
    ``tree_spans``, docs/DESIGN.md section 3.2). With noise (training), each node of length ``n`` is split at
    ``n//2 - round(eps)``, ``eps ~ N(0, (split_noise_std * n)^2)`` (the paper's split noise), clamped
    so that every node keeps at least one token per leaf below it. Chunks must have at least
    ``2**depth`` tokens. ``noise_keys`` (int64 ``[C]``, e.g. from a sample's seed and the chunk
    index) make each chunk's noise a function of its key (:func:`keyed_normal`) instead of a draw
    from torch's global generator.
    """
    L = chunk_lens.long()[:, None]
    starts, lengths = [], []
    bounds = torch.cat([torch.zeros_like(L), L], dim=1)  # [C, 2]: the root
    for level in range(1, depth + 1):
        if split_noise_std > 0:
            left, right = bounds[:, :-1], bounds[:, 1:]
            size = right - left
            if noise_keys is None:
                z = torch.randn(size.shape, device=L.device, dtype=torch.float64)
            else:  # one key per (chunk, level, node): node j of level l-1 is the split of id 2^(l-1) + j
                node = 2 ** (level - 1) + torch.arange(size.shape[1], device=L.device)
                z = keyed_normal(noise_keys.long()[:, None] * 64 + node[None, :])
            eps = z * (split_noise_std * size.double())
            min_part = 2 ** (depth - level)  # each child must still hold one token per leaf below it
            mid = left + size // 2 - torch.round(eps).long()
            mid = torch.minimum(torch.maximum(mid, left + min_part), right - min_part)
            new = torch.stack([left, mid], dim=2).flatten(1)
            bounds = torch.cat([new, right[:, -1:]], dim=1)
        else:
            i = torch.arange(2**level + 1, device=L.device)
            bounds = torch.div(i[None, :] * L, 2**level, rounding_mode="floor")
        starts.append(bounds[:, :-1])
        lengths.append(bounds[:, 1:] - bounds[:, :-1])
    return torch.cat(starts, dim=1), torch.cat(lengths, dim=1)


def right_descent_node_ids(depth: int, device=None) -> torch.Tensor:
    """int64 ``[P]``: the preserved level-order node ids, left to right, when the right child is always expanded."""
    ids = [(2**level - 2) + (2**level - 2) for level in range(1, depth)]  # each level's left sibling
    last = 2**depth - 2  # level ``depth`` starts at id 2^depth - 2; its last two nodes stay
    ids += [last + 2**depth - 2, last + 2**depth - 1]
    return torch.tensor(ids, dtype=torch.long, device=device)


@dataclass
class PackedSegments:
    """Segments of a flat token array, packed one after another.

    ``index``: int64 ``[N]`` flat source index of each packed token; ``segment``: int64 ``[N]`` its
    segment; ``offset``: int64 ``[N]`` its position within the segment; ``cu_seqlens``: int32
    ``[S + 1]``; ``lengths``: int64 ``[S]``.
    """

    index: torch.Tensor
    segment: torch.Tensor
    offset: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.index.numel()

    def last_token(self) -> torch.Tensor:
        """int64 ``[S]``: packed index of each segment's last token (segments must be non-empty)."""
        return self.cu_seqlens[1:].long() - 1


def pack_segments(first: torch.Tensor, lengths: torch.Tensor) -> PackedSegments:
    """Packs segments given by their first flat index ``[S]`` and length ``[S]`` (int64)."""
    lengths = lengths.long()
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    offset = torch.arange(segment.numel(), device=lengths.device) - cu[segment]
    return PackedSegments(first.long()[segment] + offset, segment, offset, cu.to(torch.int32), lengths)


@dataclass
class PreservedNodes:
    """The nodes kept for injection, in (sequence, chunk, position) order: they tile every context.

    All int64 ``[num_nodes]``: ``row`` (sequence), ``chunk`` (index in the sequence), ``start``
    (first token in the sequence's context) and ``length``.
    """

    row: torch.Tensor
    chunk: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor


def preserved_nodes(
    chunks: ChunkLayout,
    splittable: torch.Tensor,
    node_start: torch.Tensor,
    node_len: torch.Tensor,
    node_ids: torch.Tensor,
) -> PreservedNodes:
    """Gathers the preserved nodes of every chunk.

    Args:
        chunks: the layout of all chunks.
        splittable: bool ``[num_chunks]``: chunks that have a tree; the others stay one node.
        node_start, node_len: int64 ``[num_splittable, T]``, every tree node's span within its chunk.
        node_ids: int64 ``[num_splittable, P]``, the preserved level-order ids, left to right.
    """
    num_chunks = chunks.row.numel()
    P = node_ids.shape[1] if node_ids.numel() else 1
    device = chunks.row.device
    start = chunks.start[:, None].repeat(1, P)  # [num_chunks, P]: whole chunk by default in slot 0
    length = torch.zeros(num_chunks, P, dtype=torch.long, device=device)
    length[:, 0] = chunks.length
    if node_ids.numel():
        where = splittable.nonzero().squeeze(1)
        start[where] = chunks.start[where, None] + torch.gather(node_start, 1, node_ids)
        length[where] = torch.gather(node_len, 1, node_ids)
    keep = length > 0
    chunk_of = torch.arange(num_chunks, device=device)[:, None].expand(num_chunks, P)
    chunk_of = chunk_of[keep]
    return PreservedNodes(chunks.row[chunk_of], chunks.index[chunk_of], start[keep], length[keep])


def compressed_rows(node_len: torch.Tensor, tokens_per_node: int | None) -> torch.Tensor:
    """int64 ``[num_nodes]``: key/value rows each node keeps: ``P`` if it is longer than ``P``, else all."""
    if tokens_per_node is None:
        return node_len.long()
    return torch.clamp(node_len.long(), max=tokens_per_node)


def compressed_row_sources(node_len: torch.Tensor, tokens_per_node: int) -> torch.Tensor:
    """int64 ``[sum(kept rows)]``: where each kept key/value row comes from in ``cat([pooled, raw])``.

    ``pooled`` holds ``tokens_per_node`` rows per node (``chunk_pool`` output) and ``raw`` the nodes'
    tokens packed; nodes longer than ``tokens_per_node`` take their pooled rows, shorter ones (which
    pooling would only repeat) their raw tokens.
    """
    node_len = node_len.long()
    keep = compressed_rows(node_len, tokens_per_node)
    node = torch.repeat_interleave(torch.arange(node_len.numel(), device=node_len.device), keep)
    first_kept = torch.cumsum(keep, 0) - keep
    j = torch.arange(node.numel(), device=node_len.device) - first_kept[node]
    first_raw = torch.cumsum(node_len, 0) - node_len
    pooled_rows = node_len.numel() * tokens_per_node
    return torch.where(node_len[node] > tokens_per_node, node * tokens_per_node + j, pooled_rows + first_raw[node] + j)


def segment_cu_seqlens(row: torch.Tensor, counts: torch.Tensor, batch: int) -> torch.Tensor:
    """int32 ``[batch + 1]``: boundaries of rows when items of ``row`` ``[n]`` (sorted) contribute ``counts`` ``[n]``."""
    per_row = torch.zeros(batch, dtype=torch.long, device=row.device)
    per_row.index_add_(0, row, counts.long())
    cu = torch.zeros(batch + 1, dtype=torch.long, device=row.device)
    torch.cumsum(per_row, 0, out=cu[1:])
    return cu.to(torch.int32)


__all__ = [
    "BRANCHING",
    "ChunkLayout",
    "PackedSegments",
    "PreservedNodes",
    "chunk_layout",
    "compressed_row_sources",
    "compressed_rows",
    "keyed_normal",
    "num_tree_nodes",
    "pack_segments",
    "preserved_nodes",
    "right_descent_node_ids",
    "segment_cu_seqlens",
    "tree_node_spans",
]
