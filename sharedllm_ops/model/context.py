"""The context path's index arithmetic: chunks, context trees, preserved nodes and packed token runs.

Everything here is vectorised over sequences, chunks and nodes (no Python loop over them) and
works on index tensors only; ``compression.py`` runs the networks on what it returns.

Conventions: a batch of ``B`` right-padded contexts ``[B, Lc]`` with true lengths ``[B]``; a
*segment* is a run of consecutive context tokens of one row, given by its first token (flat index
``row * Lc + start``) and its length.
"""

from __future__ import annotations

import math
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

    def where(self, keep) -> "ChunkLayout":
        """The chunks ``keep`` (a bool mask or a slice) selects; indices and ``num_chunks`` count every chunk."""
        return ChunkLayout(self.row[keep], self.index[keep], self.start[keep], self.length[keep], self.num_chunks)

    def take(self, first: int, end: int) -> "ChunkLayout":
        """Chunks ``first..end-1`` (``num_chunks`` still counts every chunk of each sequence)."""
        return self.where(slice(first, end))


def chunk_layout(context_lengths: torch.Tensor, chunk_size: int, first_chunk: torch.Tensor | None = None) -> ChunkLayout:
    """Splits each context of ``context_lengths`` ``[B]`` tokens into chunks of ``chunk_size``.

    ``first_chunk`` (int64 ``[B]``, default 0) continues earlier contexts: each sequence's tokens
    start at chunk ``first_chunk``, and chunk indices, starts and ``num_chunks`` count the earlier
    chunks too (``start = index * chunk_size``).
    """
    lengths = context_lengths.long()
    num_chunks = (lengths + chunk_size - 1) // chunk_size
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), num_chunks)
    first_of_row = torch.cumsum(num_chunks, 0) - num_chunks
    index = torch.arange(row.numel(), device=lengths.device) - first_of_row[row]
    length = torch.clamp(lengths[row] - index * chunk_size, max=chunk_size)
    if first_chunk is not None:
        index = index + first_chunk.long()[row]
        num_chunks = num_chunks + first_chunk.long()
    return ChunkLayout(row, index, index * chunk_size, length, num_chunks)


def chunk_groups(chunk_lengths: torch.Tensor, max_tokens: int | None) -> list[tuple[int, int]]:
    """``[(first, end), ...]``: consecutive runs of chunks of at most ``max_tokens`` tokens each.

    Greedy, in chunk order; a chunk longer than ``max_tokens`` is a run of its own. ``None``: one
    run. Always at least one run (``(0, 0)`` when there are no chunks).
    """
    n = chunk_lengths.numel()
    if max_tokens is None or n == 0:
        return [(0, n)]
    groups, first, tokens = [], 0, 0
    for i, length in enumerate(chunk_lengths.tolist()):
        if i > first and tokens + length > max_tokens:
            groups.append((first, i))
            first, tokens = i, 0
        tokens += length
    groups.append((first, n))
    return groups


@dataclass
class ContextTokens:
    """The tokens one compression call reads, with where they sit in their sequences.

    ``ids`` int64 ``[B, W]`` right-padded, ``lengths`` ``[B]``; each row starts at chunk
    ``first_chunk[b]`` of its sequence (0 for a new context) and the sequence is
    ``total_lengths[b]`` tokens long with them. ``previous_tail`` (a continued context only): the
    earlier context's unfinished-chunk tokens, still the tail of rows without new tokens.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    first_chunk: torch.Tensor
    total_lengths: torch.Tensor
    chunk_size: int
    previous_tail: torch.Tensor | None = None

    def flat_index(self, row: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Index in ``ids.reshape(-1)`` of the token at position ``start`` of sequence ``row`` (both int64 ``[n]``)."""
        return row * self.ids.shape[1] + start - (self.first_chunk * self.chunk_size)[row]

    def tail(self) -> torch.Tensor:
        """int64 ``[B, w]`` right-padded: the tokens of each sequence's unfinished last chunk."""
        n = self.total_lengths % self.chunk_size
        width = int(n.max()) if n.numel() else 0
        j = torch.arange(width, device=n.device)
        index = ((self.lengths - n)[:, None] + j).clamp(0, max(self.ids.shape[1] - 1, 0))
        tail = self.ids.gather(1, index) if self.ids.shape[1] else self.ids.new_zeros(n.numel(), width)
        if self.previous_tail is not None:  # rows without new tokens keep their tail
            tail = torch.where((self.lengths > 0)[:, None], tail, _fit(self.previous_tail, width))
        return tail.masked_fill(j[None, :] >= n[:, None], 0)


def _fit(ids: torch.Tensor, width: int) -> torch.Tensor:
    """``ids`` ``[B, w]`` cut or zero-padded to ``[B, width]``."""
    ids = ids[:, :width]
    return torch.cat([ids, ids.new_zeros(ids.shape[0], width - ids.shape[1])], 1)


def context_tokens(ids: torch.Tensor, lengths: torch.Tensor, chunk_size: int, previous_lengths=None,
                   previous_tail=None) -> tuple[ContextTokens, torch.Tensor]:
    """The tokens to compress: ``ids`` ``[B, Lc]`` (``lengths`` ``[B]``) alone, or continuing contexts
    of ``previous_lengths`` ``[B]`` tokens whose unfinished last chunks hold ``previous_tail`` ``[B, w]``.

    A continued row with new tokens reopens its unfinished chunk: its tokens are that chunk's, then
    the new ones, from the chunk's start. Returns the tokens and ``reopened`` (bool ``[B]``).
    """
    ids, lengths = ids.long(), lengths.long()
    if previous_lengths is None:
        zeros = torch.zeros_like(lengths)
        return ContextTokens(ids, lengths, zeros, lengths, chunk_size), zeros.bool()
    previous_lengths = previous_lengths.long()
    open_len = previous_lengths % chunk_size
    reopened = (open_len > 0) & (lengths > 0)
    carried = torch.where(reopened, open_len, 0)
    new_lengths = carried + lengths
    j = torch.arange(max(int(new_lengths.max()), 1), device=ids.device)[None, :]
    tail = _fit(previous_tail.long(), max(previous_tail.shape[1], 1))
    from_tail = tail.gather(1, j.clamp(max=tail.shape[1] - 1).expand(ids.shape[0], -1))
    from_ids = ids.gather(1, (j - carried[:, None]).clamp(0, ids.shape[1] - 1))
    merged = torch.where(j < carried[:, None], from_tail, from_ids)
    first_chunk = (previous_lengths + chunk_size - 1) // chunk_size - reopened.long()
    tokens = ContextTokens(merged, new_lengths, first_chunk, previous_lengths + lengths, chunk_size, previous_tail)
    return tokens, reopened


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


def preserved_nodes(chunks: ChunkLayout, splittable: torch.Tensor, node_start: torch.Tensor, node_len: torch.Tensor,
                    node_ids: torch.Tensor) -> PreservedNodes:
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


def recent_chunks(index: torch.Tensor, row: torch.Tensor, num_chunks: torch.Tensor, count: int) -> torch.Tensor:
    """bool ``[n]``: chunks (``index`` in sequence ``row``) among the last ``count`` of their sequence."""
    return index >= num_chunks[row] - count


def split_spans(lengths: torch.Tensor, which: torch.Tensor, piece: int):
    """Spans (``lengths`` int64 ``[n]``), those ``which`` (bool) marks cut into pieces of ``piece`` tokens:
    ``(source, offset, length)``, per piece its span, its offset in it and its length."""
    pieces = torch.where(which, (lengths + piece - 1) // piece, torch.ones_like(lengths))
    source = torch.repeat_interleave(torch.arange(pieces.numel(), device=pieces.device), pieces)
    j = torch.arange(source.numel(), device=pieces.device) - (torch.cumsum(pieces, 0) - pieces)[source]
    cut = which[source]
    offset = torch.where(cut, j * piece, torch.zeros_like(j))
    return source, offset, torch.where(cut, torch.clamp(lengths[source] - offset, max=piece), lengths[source])


def split_nodes(nodes: PreservedNodes, which: torch.Tensor, piece: int) -> PreservedNodes:
    """``nodes`` with each node where ``which`` (bool) cut into consecutive nodes of ``piece`` tokens."""
    node, offset, length = split_spans(nodes.length, which, piece)
    return PreservedNodes(nodes.row[node], nodes.chunk[node], nodes.start[node] + offset, length)


def concat_nodes(parts: list[PreservedNodes]) -> PreservedNodes:
    """The nodes of ``parts`` (consecutive runs of chunks), one after another."""
    return PreservedNodes(*(torch.cat(field) for field in zip(*(vars(p).values() for p in parts))))


def compressed_rows(node_len: torch.Tensor, tokens_per_node: int | None) -> torch.Tensor:
    """int64 ``[num_nodes]``: key/value rows each node keeps: ``P`` if it is longer than ``P``, else all."""
    if tokens_per_node is None:
        return node_len.long()
    return torch.clamp(node_len.long(), max=tokens_per_node)


def _kept_rows(node_len: torch.Tensor, tokens_per_node: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``[sum(kept rows)]`` twice: each kept row's node and its index ``j`` within that node."""
    keep = compressed_rows(node_len, tokens_per_node)
    node = torch.repeat_interleave(torch.arange(node_len.numel(), device=node_len.device), keep)
    return node, torch.arange(node.numel(), device=node_len.device) - (torch.cumsum(keep, 0) - keep)[node]


def compressed_row_sources(node_len: torch.Tensor, tokens_per_node: int) -> torch.Tensor:
    """int64 ``[sum(kept rows)]``: where each kept key/value row comes from in ``cat([pooled, raw])``.

    ``pooled`` holds ``tokens_per_node`` rows per node (``chunk_pool`` output) and ``raw`` the nodes'
    tokens packed; nodes longer than ``tokens_per_node`` take their pooled rows, shorter ones (which
    pooling would only repeat) their raw tokens.
    """
    node_len = node_len.long()
    node, j = _kept_rows(node_len, tokens_per_node)
    first_raw = torch.cumsum(node_len, 0) - node_len
    pooled_rows = node_len.numel() * tokens_per_node
    return torch.where(node_len[node] > tokens_per_node, node * tokens_per_node + j, pooled_rows + first_raw[node] + j)


def node_sinks(node_start: torch.Tensor, node_len: torch.Tensor, tokens_per_node: int | None,
               drop_sinks: bool) -> torch.Tensor:
    """int64 ``[num_nodes]``: 1 where a node's first token is left out of its pooling, else 0.

    A node encoded alone makes its first token an attention sink; with ``drop_sinks`` it is left
    out of every pooled node (longer than ``tokens_per_node``) that does not start the context."""
    if not drop_sinks or tokens_per_node is None:
        return torch.zeros_like(node_len, dtype=torch.long)
    return ((node_start > 0) & (node_len > tokens_per_node)).long()


def pooled_segments(packed: PackedSegments, sinks: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What ``chunk_pool`` reads: ``(index, cu_seqlens)``: the packed tokens of every node but the
    sinks that ``sinks`` ``[num_nodes]`` leaves out (``index`` None: all of them), and their bounds."""
    if not bool(sinks.any()):
        return None, packed.cu_seqlens
    keep = ~((sinks[packed.segment] > 0) & (packed.offset == 0))
    lengths = packed.lengths - sinks
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    return keep.nonzero().squeeze(1), cu.to(torch.int32)


def compressed_row_centres(node_start: torch.Tensor, node_len: torch.Tensor, tokens_per_node: int | None,
                           sinks: torch.Tensor) -> torch.Tensor:
    """int64 ``[sum(kept rows)]``: the context position at the middle of each kept row's source tokens.

    A pooled row averages ``chunk_pool``'s window of its node (after the sink ``sinks`` leaves out);
    a raw row is one token."""
    node_start, node_len = node_start.long(), node_len.long()
    node, j = _kept_rows(node_len, tokens_per_node)
    raw = node_start[node] + j
    if tokens_per_node is None:
        return raw
    P = tokens_per_node
    skip = sinks.long()[node]
    length = node_len[node] - skip
    first, end = (j * length) // P, -((-(j + 1) * length) // P)  # chunk_pool's adaptive windows
    pooled = node_start[node] + skip + (first + end - 1) // 2
    return torch.where(node_len[node] > P, pooled, raw)


def compressed_row_tokens(node_start: torch.Tensor, node_len: torch.Tensor, tokens_per_node: int | None,
                          sinks: torch.Tensor) -> torch.Tensor:
    """float32 ``[sum(kept rows)]``: how many context tokens each kept row stands for: a pooled row
    ``1 / P`` of its node (less the sink ``sinks`` leaves out), a raw row one, and the context's
    first row one (the attention sink: weighting it as a whole window would drown everything else)."""
    node_len = node_len.long()
    node, j = _kept_rows(node_len, tokens_per_node)
    ones = torch.ones(node.numel(), dtype=torch.float32, device=node_len.device)
    if tokens_per_node is None:
        return ones
    pooled = (node_len - sinks.long())[node].float() / tokens_per_node
    sink = (node_start.long()[node] == 0) & (j == 0)
    return torch.where((node_len[node] > tokens_per_node) & ~sink, pooled, ones)


def row_weight_groups(row_tokens: torch.Tensor, cu_seqlens: torch.Tensor):
    """The rows of a packed context grouped by how many tokens they stand for (``row_tokens``
    float32 ``[Nk]``, sequences bounded by ``cu_seqlens`` int32 ``[B + 1]``), in buckets 1/16 wide in
    ``log2`` (powers of two exact, any weight within 2.2%).

    Returns a list of ``(log_tokens, rows, cu_seqlens)``: the group's natural log of tokens (its bucket's
    centre), its row indices int64 (in order, so every sequence's rows stay contiguous) and their
    per-sequence bounds int32 ``[B + 1]``."""
    bucket = torch.round(torch.log2(row_tokens.float()) * 16).long()
    counts = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    sequence = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    groups = []
    for b in torch.unique(bucket).tolist():
        rows = (bucket == b).nonzero().squeeze(1)
        groups.append((b / 16 * math.log(2), rows, segment_cu_seqlens(sequence[rows], torch.ones_like(rows), counts.numel())))
    return groups


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
    "ContextTokens",
    "PackedSegments",
    "PreservedNodes",
    "chunk_groups",
    "chunk_layout",
    "compressed_row_centres",
    "compressed_row_sources",
    "compressed_row_tokens",
    "compressed_rows",
    "concat_nodes",
    "context_tokens",
    "keyed_normal",
    "num_tree_nodes",
    "node_sinks",
    "pack_segments",
    "pooled_segments",
    "preserved_nodes",
    "recent_chunks",
    "row_weight_groups",
    "segment_cu_seqlens",
    "split_nodes",
    "split_spans",
    "tree_node_spans",
]
