"""CompressedContext: a batch of contexts compressed for injection, and how one grows (docs/DESIGN.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .context import PreservedNodes, compressed_rows, pack_segments, row_weight_groups


@dataclass
class CompressedContext:
    """A batch of contexts compressed for injection; reusable across forward passes and questions.

    Attributes:
        keys, values: one ``[Nk, Hk, D]`` tensor per injected layer (all sequences packed).
        cu_seqlens: int32 ``[B + 1]`` boundaries of each sequence's rows in ``keys``/``values``.
        k_positions: int32 ``[Nk]`` chunk index of every row (``positions="chunk"``), or the
            context position of the middle of its source tokens (``"distance"``), else None.
        row_tokens: float32 ``[Nk]`` context tokens each row stands for (with ``row_weight_exponent``),
            else None.
        num_chunks: int32 ``[B]`` (``n`` of Eq. 2: the query position); ``max_chunks`` its maximum.
        context_lengths: int64 ``[B]`` original context lengths (decoder offset for ``positions="true"``).
        nodes: the preserved nodes (sequence, chunk, start, length), left to right.
        stats: sizes of the whole context (``context_tokens``, ``compressed_tokens``, ``chunks``,
            ``nodes``) and the work of the call that made it: ``passes`` (groups of chunks run),
            ``peak_group_tokens`` (context tokens of the largest group), ``embedded_nodes`` and
            ``embedded_tokens`` (what query retrieval encoded) and per-stage seconds (``retrieve_s``,
            ``encode_s``, ``pool_s``).
        tail_input_ids: int64 ``[B, W]``, right-padded: the tokens of each sequence's unfinished last
            chunk (``context_lengths % chunk_size`` of them), kept so that growing the context
            (``compress_context(..., into=)``) recompresses that chunk with what follows it.
    """

    keys: list
    values: list
    cu_seqlens: torch.Tensor
    k_positions: torch.Tensor | None
    row_tokens: torch.Tensor | None
    num_chunks: torch.Tensor
    max_chunks: int
    context_lengths: torch.Tensor
    nodes: PreservedNodes | None = None
    stats: dict = field(default_factory=dict)
    tail_input_ids: torch.Tensor | None = None
    _row_groups: list | None = field(default=None, init=False, repr=False, compare=False)

    def row_groups(self) -> list:
        """The rows grouped by weight (``context.row_weight_groups``), computed once per context:
        every injected layer and every decoding step attends with the same groups."""
        if self._row_groups is None:
            self._row_groups = row_weight_groups(self.row_tokens, self.cu_seqlens)
        return self._row_groups

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
            row_tokens=move(self.row_tokens),
            num_chunks=move(self.num_chunks),
            context_lengths=move(self.context_lengths),
            nodes=None if self.nodes is None else PreservedNodes(*(move(t) for t in vars(self.nodes).values())),
            tail_input_ids=move(self.tail_input_ids),
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
            row_tokens=take(self.row_tokens),
            num_chunks=self.num_chunks[row],
            context_lengths=self.context_lengths[row],
            nodes=None,  # describes the original batch only (and so a repeated context cannot grow)
            tail_input_ids=None,
        )

    def extended(self, more: "CompressedContext", reopened: torch.Tensor,
                 tokens_per_node: int | None) -> "CompressedContext":
        """This context followed, sequence by sequence, by ``more`` (a new object; ``self`` is unchanged).

        ``more`` holds the chunks compressed after this context's: its ``num_chunks``,
        ``context_lengths`` and ``tail_input_ids`` describe the whole grown context. Where
        ``reopened`` (bool ``[B]``) is set, ``more`` starts with a recompressed copy of this context's
        unfinished last chunk, whose rows and nodes are left out here.
        """
        B = self.batch_size
        nodes, more_nodes = self.nodes, more.nodes
        dropped = reopened[nodes.row] & (nodes.chunk == (self.num_chunks.long() - 1)[nodes.row])
        keep_nodes = _per_row(nodes.row, ~dropped, B)  # the dropped nodes end their sequence
        keep_rows = _per_row(nodes.row, compressed_rows(nodes.length, tokens_per_node).masked_fill(dropped, 0), B)
        node_bounds = _bounds(_per_row(nodes.row, torch.ones_like(dropped), B))
        more_node_bounds = _bounds(_per_row(more_nodes.row, torch.ones_like(more_nodes.row), B))
        row_bounds, more_row_bounds = self.cu_seqlens.long(), more.cu_seqlens.long()

        def join_rows(old, new):
            return None if old is None else _interleave(old, new, row_bounds, keep_rows, more_row_bounds)

        joined_nodes = PreservedNodes(*(_interleave(old, new, node_bounds, keep_nodes, more_node_bounds)
                                        for old, new in zip(vars(nodes).values(), vars(more_nodes).values())))
        cu = _bounds(keep_rows + (more_row_bounds[1:] - more_row_bounds[:-1])).to(torch.int32)
        return replace(
            more,
            keys=[join_rows(old, new) for old, new in zip(self.keys, more.keys)],
            values=[join_rows(old, new) for old, new in zip(self.values, more.values)],
            cu_seqlens=cu,
            k_positions=join_rows(self.k_positions, more.k_positions),
            row_tokens=join_rows(self.row_tokens, more.row_tokens),
            nodes=joined_nodes,
            stats=dict(more.stats, compressed_tokens=int(cu[-1]), nodes=int(joined_nodes.row.numel())),
        )


def _bounds(counts: torch.Tensor) -> torch.Tensor:
    """int64 ``[n + 1]``: ``0`` then the running sum of ``counts`` ``[n]``."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def _per_row(row: torch.Tensor, counts: torch.Tensor, batch: int) -> torch.Tensor:
    """int64 ``[batch]``: the sum of ``counts`` over the items of each row."""
    out = torch.zeros(batch, dtype=torch.long, device=row.device)
    return out.index_add_(0, row, counts.long())


def _interleave(old, new, cu_old, keep, cu_new):
    """Sequence ``b`` of the result: the first ``keep[b]`` items of ``old``'s sequence ``b`` (bounds
    ``cu_old``), then ``new``'s sequence ``b`` (bounds ``cu_new``). Slices, one copy: no
    intermediate as large as the result."""
    parts = []
    for o, k, n0, n1 in zip(cu_old[:-1].tolist(), keep.tolist(), cu_new[:-1].tolist(), cu_new[1:].tolist()):
        parts += [old[o:o + k], new[n0:n1]]
    return torch.cat(parts)


__all__ = ["CompressedContext"]
