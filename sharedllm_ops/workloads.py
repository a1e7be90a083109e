"""Realistic SharedLLM op inputs and the PyTorch peer, shared by the kernel check
(``sharedllm-ops ops``), the benchmarks and the tests.

Every random builder draws on CPU from its own ``torch.Generator`` (seeded with ``seed``, or the
``generator`` passed in) and then moves the result to ``device``, so the same arguments give the
same numbers on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .ops import cross_inject_attention
from .reference import apply_rotary

# ---------------------------------------------------------------------------------------------
# packing and rotary


def cu_seqlens(lengths, device=None) -> torch.Tensor:
    """int32 ``[S + 1]`` boundaries of packed segments of the given lengths."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + int(length))
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def rotary_tables(
    max_positions: int, head_dim: int, base: float = 10000.0, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face Llama rotary tables ``cos, sin: [max_positions, head_dim]`` of ``dtype``.

    ``rotate_half`` layout: ``inv_freq = 1 / base^(arange(0, head_dim, 2) / head_dim)``,
    ``emb = cat(t * inv_freq, t * inv_freq)``, so both halves of the head dim use the same
    frequencies. Computed in float64 so that large positions keep their precision before the one
    rounding to ``dtype``.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# chunk_pool and tree_topk inputs


def paper_tree_lengths(num_chunks: int, chunk_size: int = 1024) -> list[int]:
    """Lengths of the 4 preserved nodes per chunk of the paper's tree (h=3, b=2, k=1):
    ``512, 256, 128, 128`` for 1024-token chunks."""
    per_chunk = [chunk_size // 2, chunk_size // 4, chunk_size // 8, chunk_size // 8]
    return per_chunk * num_chunks


def _generator(seed: int, generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed) if generator is None else generator


def chunk_pool_input(
    lengths,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device=None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [sum(lengths), heads, head_dim]`` and its int32 ``cu_seqlens: [len(lengths) + 1]``: the
    keys (or values) of the segments to pool. ``generator``, when given, replaces a fresh one
    seeded with ``seed`` (to draw several inputs from one stream)."""
    gen = _generator(seed, generator)
    x = torch.randn(sum(lengths), heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    return x, cu_seqlens(lengths, device)


def tree_topk_input(
    batch: int,
    chunks: int,
    nodes: int,
    dim: int,
    dtype: torch.dtype = torch.float32,
    device=None,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``query: [batch, dim]`` and ``node_emb: [batch, chunks, nodes, dim]``, drawn in that order
    (``generator`` as in :func:`chunk_pool_input`)."""
    gen = _generator(seed, generator)
    query = torch.randn(batch, dim, generator=gen).to(device=device, dtype=dtype)
    node_emb = torch.randn(batch, chunks, nodes, dim, generator=gen).to(device=device, dtype=dtype)
    return query, node_emb


# ---------------------------------------------------------------------------------------------
# cross_inject_attention inputs and the PyTorch peer


@dataclass(frozen=True)
class AttentionInputs:
    """Packed inputs of ``cross_inject_attention`` with the paper's chunk positions (Eq. 2): a key
    from context chunk ``i`` has rotary position ``i``, every query has position ``num_chunks``.

    ``B`` sequences, ``Nq``/``Nk`` query/key tokens in all, ``Hq`` query heads, ``Hk`` KV heads
    (``Hq`` a multiple of ``Hk``), head dim ``D``, ``P`` rotary table rows.
    """

    q: torch.Tensor  # [Nq, Hq, D]
    k: torch.Tensor  # [Nk, Hk, D]
    v: torch.Tensor  # [Nk, Hk, D]
    cu_q: torch.Tensor  # int32 [B + 1]
    cu_k: torch.Tensor  # int32 [B + 1]
    q_pos: torch.Tensor  # int32 [Nq]
    k_pos: torch.Tensor  # int32 [Nk]
    cos: torch.Tensor  # float32 [P, D]
    sin: torch.Tensor  # float32 [P, D]
    q_bounds: tuple[int, ...]  # cu_q and cu_k as Python ints, for per-sequence loops
    k_bounds: tuple[int, ...]

    @property
    def scale(self) -> float:
        """The softmax scale, ``D ** -0.5`` (the ops' default)."""
        return self.q.shape[2] ** -0.5

    def run(self, backend: str, return_lse: bool = False):
        """``cross_inject_attention`` on ``backend``: ``out [Nq, Hq, D]``, and ``lse [Nq, Hq]``
        (float32) with ``return_lse``."""
        return cross_inject_attention(
            self.q, self.k, self.v, self.cu_q, self.cu_k, None, self.q_pos, self.k_pos, self.cos, self.sin,
            return_lse=return_lse, backend=backend,
        )  # fmt: skip

    def split_keys(self) -> tuple[AttentionInputs, AttentionInputs]:
        """The same queries against the first and the second half of each sequence's keys."""
        halves = []
        for part in (0, 1):
            index, lengths = [], []
            for lo, hi in zip(self.k_bounds[:-1], self.k_bounds[1:]):
                mid = (lo + hi) // 2
                start, end = (lo, mid) if part == 0 else (mid, hi)
                index.append(torch.arange(start, end))
                lengths.append(end - start)
            index = torch.cat(index).to(self.k.device)
            cu_k = cu_seqlens(lengths, self.k.device)
            k, v, k_pos = self.k[index], self.v[index], self.k_pos[index]
            halves.append(replace(self, k=k, v=v, k_pos=k_pos, cu_k=cu_k, k_bounds=tuple(cu_k.tolist())))
        return halves[0], halves[1]

    def describe(self) -> str:
        (nq, hq, d), (nk, hk, _) = self.q.shape, self.k.shape
        return f"B={len(self.q_bounds) - 1} q {nq}x{hq}x{d} k/v {nk}x{hk}x{d} rotary"

    def forward_flops(self) -> int:
        """``2 * Lq * Lk * D`` per head for each of ``Q K^T`` and ``P V``."""
        hq, d = self.q.shape[1], self.q.shape[2]
        pairs = sum(
            (self.q_bounds[b + 1] - self.q_bounds[b]) * (self.k_bounds[b + 1] - self.k_bounds[b])
            for b in range(len(self.q_bounds) - 1)
        )
        return 4 * pairs * hq * d

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh ``q, k, v`` leaves that require grad (the inputs are left untouched)."""
        return tuple(t.detach().clone().requires_grad_(True) for t in (self.q, self.k, self.v))


def attention_inputs(
    q_lens,
    k_lens,
    q_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    keys_per_chunk: int = 128,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
) -> AttentionInputs:
    """Queries of the recent tokens and the pooled keys/values of the context chunks (128 per
    1024-token chunk in the paper), one entry of ``q_lens``/``k_lens`` per sequence:
    ``q: [sum(q_lens), q_heads, head_dim]``, ``k, v: [sum(k_lens), kv_heads, head_dim]``, drawn in
    that order from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), q_heads, head_dim, generator=gen)
    k = torch.randn(sum(k_lens), kv_heads, head_dim, generator=gen)
    v = torch.randn(sum(k_lens), kv_heads, head_dim, generator=gen)
    num_chunks = [math.ceil(lk / keys_per_chunk) for lk in k_lens]
    q_pos = torch.cat([torch.full((lq,), n, dtype=torch.int32) for lq, n in zip(q_lens, num_chunks)])
    k_pos = torch.cat([(torch.arange(lk) // keys_per_chunk).int() for lk in k_lens])
    # 64 rows covers a 64K-token context; longer contexts need one row per chunk plus the queries'.
    cos, sin = rotary_tables(max(64, max(num_chunks) + 1), head_dim, device=device)
    cu_q, cu_k = cu_seqlens(q_lens, device), cu_seqlens(k_lens, device)
    return AttentionInputs(
        q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), cu_q, cu_k, q_pos.to(device), k_pos.to(device),
        cos, sin, tuple(cu_q.tolist()), tuple(cu_k.tolist()),
    )  # fmt: skip


def sdpa_attention(inp: AttentionInputs, q=None, k=None, v=None) -> torch.Tensor:
    """The torch peer: rotary in PyTorch, then ``scaled_dot_product_attention`` per sequence with
    ``enable_gqa`` (no varlen SDPA on CPU); ``[Nq, Hq, D]``. ``q, k, v`` override the inputs'
    (for autograd)."""
    q = inp.q if q is None else q
    k = inp.k if k is None else k
    v = inp.v if v is None else v
    qr = apply_rotary(q, inp.q_pos, inp.cos, inp.sin).to(q.dtype)
    kr = apply_rotary(k, inp.k_pos, inp.cos, inp.sin).to(k.dtype)
    outs = []
    for b in range(len(inp.q_bounds) - 1):
        qs, ks = slice(inp.q_bounds[b], inp.q_bounds[b + 1]), slice(inp.k_bounds[b], inp.k_bounds[b + 1])
        # [L, H, D] -> [1, H, L, D]
        out = F.scaled_dot_product_attention(
            qr[qs].transpose(0, 1)[None],
            kr[ks].transpose(0, 1)[None],
            v[ks].transpose(0, 1)[None],
            scale=inp.scale,
            enable_gqa=True,
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# reporting


def format_seconds(seconds: float, decimals_s: int = 2) -> str:
    """``12.3 us``, ``4.56 ms``, or seconds with ``decimals_s`` decimals (``1.23 s``)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.{decimals_s}f} s"
