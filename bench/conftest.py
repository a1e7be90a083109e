"""Shared pieces of the benchmark suites: collection of ``bench_*.py``, realistic input builders,
and the bookkeeping that turns the medians of one run into speed-up ratios.

Run from the repository root: ``.venv/bin/python -m pytest bench --benchmark-only``
(add ``--benchmark-json=bench/results/cpu.json`` and run ``bench/report.py`` for the markdown table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from sharedllm_ops.reference import apply_rotary

# The backends every benchmark group is compared against, when they were timed in the same run.
PEERS = ("reference", "torch_sdpa")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` as test modules.

    pyproject.toml keeps pytest's default ``python_files`` (``test_*.py``) for tests/, and an ini
    file inside bench/ would be ignored because the rootdir is the repository root, so the suites
    are collected by this hook, which only applies below bench/. Files named on the command line
    are already collected by pytest itself, whatever their name.
    """
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ---------------------------------------------------------------------------------------------
# input builders


def cu_seqlens(lengths) -> torch.Tensor:
    """int32 ``[S + 1]`` boundaries of packed segments of the given lengths."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + int(length))
    return torch.tensor(bounds, dtype=torch.int32)


def rotary_tables(max_positions: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face Llama rotary tables ``cos, sin: float32 [max_positions, head_dim]``.

    ``rotate_half`` layout: both halves of the head dim use the same frequencies.
    Computed in float64 so that large positions keep their precision before rounding.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().float(), emb.sin().float()


def chunk_pool_input(lengths, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [sum(lengths), heads, head_dim]`` and its ``cu_seqlens``: the keys (or values) of the
    segments to pool."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), heads, head_dim, generator=gen).to(dtype)
    return x, cu_seqlens(lengths)


def paper_tree_lengths(num_chunks: int, chunk_size: int = 1024) -> list[int]:
    """Lengths of the 4 preserved nodes per chunk of the paper's tree (h=3, b=2, k=1):
    ``512, 256, 128, 128`` for 1024-token chunks."""
    per_chunk = [chunk_size // 2, chunk_size // 4, chunk_size // 8, chunk_size // 8]
    return per_chunk * num_chunks


def tree_topk_input(batch: int, chunks: int, nodes: int, dim: int, dtype: torch.dtype):
    """``query: [batch, dim]`` and ``node_emb: [batch, chunks, nodes, dim]``."""
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(batch, dim, generator=gen).to(dtype)
    node_emb = torch.randn(batch, chunks, nodes, dim, generator=gen).to(dtype)
    return query, node_emb


@dataclass
class AttentionInputs:
    """Packed inputs of ``cross_inject_attention`` with the paper's chunk positions (Eq. 2): a key
    from context chunk ``i`` has rotary position ``i``, every query has position ``num_chunks``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    q_bounds: list[int]  # cu_q as Python ints, for the per-sequence peer
    k_bounds: list[int]

    @property
    def scale(self) -> float:
        return self.q.shape[2] ** -0.5

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
) -> AttentionInputs:
    """Queries of the recent tokens and the pooled keys/values of the context chunks (128 per
    1024-token chunk in the paper), one entry of ``q_lens``/``k_lens`` per sequence."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(q_lens), q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(sum(k_lens), kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(sum(k_lens), kv_heads, head_dim, generator=gen).to(dtype)
    num_chunks = [math.ceil(lk / keys_per_chunk) for lk in k_lens]
    q_pos = torch.cat([torch.full((lq,), n, dtype=torch.int32) for lq, n in zip(q_lens, num_chunks)])
    k_pos = torch.cat([(torch.arange(lk) // keys_per_chunk).int() for lk in k_lens])
    # 64 rows covers a 64K-token context; longer contexts need one row per chunk plus the queries'.
    cos, sin = rotary_tables(max(64, max(num_chunks) + 1), head_dim)
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    return AttentionInputs(q, k, v, cu_q, cu_k, q_pos, k_pos, cos, sin, cu_q.tolist(), cu_k.tolist())


def sdpa_attention(inp: AttentionInputs, q=None, k=None, v=None) -> torch.Tensor:
    """The torch peer: rotary in PyTorch, then ``scaled_dot_product_attention`` per sequence with
    ``enable_gqa`` (no varlen SDPA on CPU). ``q, k, v`` override the inputs' (for autograd)."""
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
# timing bookkeeping


@pytest.fixture(scope="session")
def session_medians() -> dict:
    """``(group, backend) -> median seconds`` of every benchmark of this run."""
    return {}


@pytest.fixture
def timed(benchmark, session_medians):
    """``timed(fn, group=..., backend=..., info={...}, pedantic=None)`` benchmarks ``fn`` in
    ``group`` and records ``info``, the backend and the speed-up over each peer of the group that
    already ran in this session (so every ratio compares timings of the same run)."""

    def run(fn, *, group: str, backend: str, info: dict, pedantic: dict | None = None):
        benchmark.group = group
        benchmark.extra_info.update(info)
        benchmark.extra_info["backend"] = backend
        result = benchmark.pedantic(fn, **pedantic) if pedantic else benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            median = stats.stats.median
            session_medians[(group, backend)] = median
            for peer in PEERS:
                if peer != backend and (group, peer) in session_medians:
                    benchmark.extra_info[f"speedup_vs_{peer}"] = round(session_medians[(group, peer)] / median, 3)
        return result

    return run


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the timings depend on beyond the CPU: torch, its thread count, the build."""
    import sharedllm_ops

    info = sharedllm_ops.build_info()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["sharedllm_ops"] = {key: info[key] for key in ("version", "compiled_torch", "compiler", "kernels")}
