"""The ``sharedllm-ops`` command (also ``python -m sharedllm_ops``).

    sharedllm-ops info             what was compiled, and which backend of each op can run here
    sharedllm-ops demo             every op on every backend available on the device, at realistic
                                   shapes: error against the reference and median time
    sharedllm-ops demo --quick     the same on tiny shapes (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

import sharedllm_ops as so

from .reference import apply_rotary, num_tree_nodes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest max-abs error against the reference the demo accepts. float32 results differ from the
# reference by summation order only; 16-bit ones also by one rounding step of outputs of order 1.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The compiled backends that can run on each device type, in the order they are shown.
DEVICE_BACKENDS = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
TREE_DEPTH, TREE_BRANCHING = 3, 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sharedllm-ops``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="sharedllm-ops", description="SharedLLM kernels: build info and demo.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="what was compiled and which backends are available now")
    info.add_argument("--json", action="store_true", help="print build_info() as JSON")
    info.set_defaults(handler=run_info)

    demo = commands.add_parser("demo", help="run every op on every available backend, check and time it")
    demo.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda if available, else cpu)",
    )
    demo.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="data dtype (default: float32)")
    demo.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test that takes seconds")
    demo.set_defaults(handler=run_demo_command)

    args = parser.parse_args(argv)
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args.handler(args)


# ---------------------------------------------------------------------------------------------
# info


def run_info(args) -> int:
    info = so.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"sharedllm_ops {info['version']}")
    cuda_now = f"yes ({torch.cuda.get_device_name()})" if info["cuda_available"] else "no"
    print(f"torch         {info['torch']} (CUDA device available: {cuda_now})")
    if info["extension_loaded"]:
        print(
            f"extension     compiled against torch {info['compiled_torch']}, "
            f"CUDA {info['compiled_cuda'] or 'none (CPU-only build)'}, "
            f"archs {info['compiled_archs'] or '-'}, compiler {info['compiler'] or '?'}"
        )
    else:
        print(f"extension     not loaded: {info['extension_error']}")
    backends = ("reference", "cpp", "cuda", "triton")
    print("\nbackends that can run now:")
    rows = [[op] + ["yes" if kinds[b] else "-" for b in backends] for op, kinds in info["kernels"].items()]
    print_table(["op", *backends], rows)
    return 0


# ---------------------------------------------------------------------------------------------
# demo inputs


@dataclass(frozen=True)
class DemoShapes:
    pool_lengths: tuple[int, ...]  # segments pooled by chunk_pool
    pool_heads: int
    pool_head_dim: int
    tokens_per_node: int
    tree_batch: int
    tree_chunks: int
    tree_dim: int
    q_lens: tuple[int, ...]  # one entry per sequence
    k_lens: tuple[int, ...]
    q_heads: int
    kv_heads: int
    head_dim: int
    keys_per_chunk: int  # pooled KV tokens per context chunk: the keys' rotary position is their chunk


# Realistic, and under a minute on 2 CPU cores (the reference attention dominates).
FULL_SHAPES = DemoShapes(
    pool_lengths=(512, 256, 128, 128) * 16,  # 16 chunks of 1024 tokens, the paper's 4 preserved nodes each
    pool_heads=8,
    pool_head_dim=128,
    tokens_per_node=32,
    tree_batch=1,
    tree_chunks=128,  # a 128K-token context
    tree_dim=4096,  # Llama-2-7B's hidden size
    q_lens=(1024,),
    k_lens=(4096,),  # 32 chunks x 128 pooled tokens: a 32K-token context
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    keys_per_chunk=128,
)
# Tiny, with the edge cases: several sequences, an empty segment, nodes shorter than tokens_per_node.
QUICK_SHAPES = DemoShapes(
    pool_lengths=(32, 16, 8, 8, 3, 0),
    pool_heads=2,
    pool_head_dim=16,
    tokens_per_node=4,
    tree_batch=2,
    tree_chunks=3,
    tree_dim=32,
    q_lens=(5, 11),
    k_lens=(40, 24),
    q_heads=4,
    kv_heads=2,
    head_dim=16,
    keys_per_chunk=8,
)


def cu_seqlens(lengths, device) -> torch.Tensor:
    """int32 ``[S + 1]`` boundaries of packed segments of the given lengths."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + int(length))
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def rotary_tables(max_positions: int, head_dim: int, device, base: float = 10000.0):
    """Hugging Face Llama rotary tables ``cos, sin: float32 [max_positions, head_dim]`` (rotate_half layout)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


@dataclass(frozen=True)
class AttentionInputs:
    """Packed ``cross_inject_attention`` inputs with the paper's positions (Eq. 2): a key of context
    chunk ``i`` has rotary position ``i``, every query the number of chunks."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    q_bounds: tuple[int, ...]  # cu_q and cu_k as Python ints, for per-sequence loops
    k_bounds: tuple[int, ...]

    def run(self, backend: str, return_lse: bool = False):
        return so.cross_inject_attention(
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


def attention_inputs(shapes: DemoShapes, device, dtype) -> AttentionInputs:
    """Random q/k/v of ``shapes`` (one key per pooled context token) with the chunk positions."""
    gen = torch.Generator().manual_seed(0)
    nq, nk = sum(shapes.q_lens), sum(shapes.k_lens)
    q = torch.randn(nq, shapes.q_heads, shapes.head_dim, generator=gen)
    k = torch.randn(nk, shapes.kv_heads, shapes.head_dim, generator=gen)
    v = torch.randn(nk, shapes.kv_heads, shapes.head_dim, generator=gen)
    num_chunks = [math.ceil(length / shapes.keys_per_chunk) for length in shapes.k_lens]
    q_pos = torch.cat([torch.full((lq,), n, dtype=torch.int32) for lq, n in zip(shapes.q_lens, num_chunks)])
    k_pos = torch.cat([(torch.arange(lk) // shapes.keys_per_chunk).int() for lk in shapes.k_lens])
    cos, sin = rotary_tables(max(64, max(num_chunks) + 1), shapes.head_dim, device)
    cu_q, cu_k = cu_seqlens(shapes.q_lens, device), cu_seqlens(shapes.k_lens, device)
    return AttentionInputs(
        q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), cu_q, cu_k, q_pos.to(device), k_pos.to(device),
        cos, sin, tuple(cu_q.tolist()), tuple(cu_k.tolist()),
    )  # fmt: skip


def sdpa_attention(inp: AttentionInputs) -> torch.Tensor:
    """The torch peer: rotary in PyTorch, then ``scaled_dot_product_attention`` (GQA) per sequence."""
    q = apply_rotary(inp.q, inp.q_pos, inp.cos, inp.sin).to(inp.q.dtype)
    k = apply_rotary(inp.k, inp.k_pos, inp.cos, inp.sin).to(inp.k.dtype)
    outs = []
    for b in range(len(inp.q_bounds) - 1):
        qs = slice(inp.q_bounds[b], inp.q_bounds[b + 1])
        ks = slice(inp.k_bounds[b], inp.k_bounds[b + 1])
        out = F.scaled_dot_product_attention(  # [L, H, D] -> [1, H, L, D]
            q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None], inp.v[ks].transpose(0, 1)[None], enable_gqa=True
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# demo


@dataclass
class DemoCase:
    """One op at one shape: ``run(backend)`` computes it, ``compare(out, reference_out)`` gives
    ``(max abs error, note)``."""

    op: str
    shape: str
    backends: list[str]  # "reference" first: the others are checked against its output
    run: Callable[[str], object]
    compare: Callable[[object, object], tuple[float, str]]


@dataclass
class DemoResult:
    op: str
    shape: str
    backend: str
    error: float
    note: str
    seconds: float
    speedup: float  # the reference's median time over this backend's


def max_abs_error(out: torch.Tensor, expected: torch.Tensor) -> tuple[float, str]:
    if out.numel() == 0:
        return 0.0, ""
    return (out.float() - expected.float()).abs().max().item(), ""


def compare_tree_topk(out, expected) -> tuple[float, str]:
    """Error of the scores; the node ids must match exactly (a mismatch counts as an infinite error)."""
    (ids, scores), (expected_ids, expected_scores) = out, expected
    mismatched = (ids != expected_ids).any(dim=-1).sum().item()
    if mismatched:
        return math.inf, f"node ids differ in {mismatched} chunks"
    return max_abs_error(scores, expected_scores)[0], "scores; ids match"


def available_backends(op: str, device: torch.device) -> list[str]:
    """The reference, then each compiled backend of ``op`` that can run on ``device``."""
    kernels = so.build_info()["kernels"][op]
    return ["reference"] + [b for b in DEVICE_BACKENDS.get(device.type, ()) if kernels[b]]


def demo_cases(shapes: DemoShapes, device: torch.device, dtype: torch.dtype) -> list[DemoCase]:
    """The four ops at ``shapes``, on random inputs (fixed seed), each with the backends available here."""
    gen = torch.Generator().manual_seed(0)
    cases = []

    x = torch.randn(sum(shapes.pool_lengths), shapes.pool_heads, shapes.pool_head_dim, generator=gen).to(device, dtype)
    cu = cu_seqlens(shapes.pool_lengths, device)
    cases.append(
        DemoCase(
            "chunk_pool",
            f"x {'x'.join(map(str, x.shape))}, {len(shapes.pool_lengths)} segments -> {shapes.tokens_per_node}, mean",
            available_backends("chunk_pool", device),
            lambda backend: so.chunk_pool(x, cu, shapes.tokens_per_node, "mean", backend=backend),
            max_abs_error,
        )
    )

    nodes = num_tree_nodes(TREE_DEPTH, TREE_BRANCHING)
    query = torch.randn(shapes.tree_batch, shapes.tree_dim, generator=gen).to(device, dtype)
    node_emb = torch.randn(shapes.tree_batch, shapes.tree_chunks, nodes, shapes.tree_dim, generator=gen)
    node_emb = node_emb.to(device, dtype)
    cases.append(
        DemoCase(
            "tree_topk",
            f"B={shapes.tree_batch} C={shapes.tree_chunks} T={nodes} D={shapes.tree_dim}, "
            f"h={TREE_DEPTH} b={TREE_BRANCHING}",
            available_backends("tree_topk", device),
            lambda backend: so.tree_topk(query, node_emb, TREE_DEPTH, k=1, branching=TREE_BRANCHING, backend=backend),
            compare_tree_topk,
        )
    )

    attn = attention_inputs(shapes, device, dtype)
    (nq, hq, d), (nk, hk, _) = attn.q.shape, attn.k.shape
    attn_shape = f"B={len(shapes.q_lens)} q {nq}x{hq}x{d} k/v {nk}x{hk}x{d}, rotary"
    attention_backends = available_backends("cross_inject_attention", device)
    cases.append(
        DemoCase(
            "cross_inject_attention",
            attn_shape,
            attention_backends + ["torch_sdpa"],  # stock PyTorch, for scale
            lambda backend: sdpa_attention(attn) if backend == "torch_sdpa" else attn.run(backend),
            max_abs_error,
        )
    )

    # merge_attention's use: attention over two key sets (here each sequence's two halves), merged,
    # must equal the attention over all keys; the backend column is the one of the two attentions.
    first, second = attn.split_keys()

    def split_and_merge(backend: str) -> torch.Tensor:
        out_a, lse_a = first.run(backend, return_lse=True)
        out_b, lse_b = second.run(backend, return_lse=True)
        return so.merge_attention(out_a, lse_a, out_b, lse_b)[0]

    full_attention = {}  # the reference over all keys, computed once, is what the merge must match

    def compare_merge(out, _reference_merge) -> tuple[float, str]:
        if "out" not in full_attention:
            full_attention["out"] = attn.run("reference")
        return max_abs_error(out, full_attention["out"])[0], "vs unsplit attention"

    cases.append(
        DemoCase(
            "merge_attention", "2 key halves of the above, merged", attention_backends, split_and_merge, compare_merge
        )
    )
    return cases


def time_call(fn: Callable[[], object], synchronize: Callable[[], None], budget_s: float, max_runs: int = 5):
    """``(result of the first call, median seconds)``. The first call is a warm-up unless it took
    the whole budget alone (the slow references): then it is the one measurement."""
    start = time.perf_counter()
    result = fn()
    synchronize()
    first = time.perf_counter() - start
    if first >= budget_s:
        return result, first
    times: list[float] = []
    while len(times) < max_runs and sum(times) < budget_s:
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def run_demo(
    device: torch.device, dtype: torch.dtype, quick: bool, log: Callable[[str], None] = print
) -> list[DemoResult]:
    """Every demo case on each of its backends: error against the reference and median time."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    budget_s = 0.05 if quick else 1.0
    results = []
    for case in demo_cases(QUICK_SHAPES if quick else FULL_SHAPES, device, dtype):
        expected = reference_seconds = None
        for backend in case.backends:
            log(f"  {case.op} [{backend}] ...")
            with torch.no_grad():
                out, seconds = time_call(lambda: case.run(backend), synchronize, budget_s)
            if backend == "reference":
                expected, reference_seconds = out, seconds
            error, note = case.compare(out, expected)
            results.append(DemoResult(case.op, case.shape, backend, error, note, seconds, reference_seconds / seconds))
    return results


def run_demo_command(args) -> int:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    size = "tiny" if args.quick else "realistic"
    print(f"sharedllm_ops demo: {size} shapes, {args.dtype}, on {args.device} ({where})", flush=True)
    results = run_demo(device, dtype, args.quick, log=lambda line: print(line, file=sys.stderr, flush=True))
    print_table(
        ["op", "shape", "backend", "max abs err", "median", "vs reference"],
        [
            [
                r.op,
                r.shape,
                r.backend,
                f"{r.error:.2e}" + (f" ({r.note})" if r.note else ""),
                format_seconds(r.seconds),
                f"{r.speedup:.2f}x",
            ]
            for r in results
        ],
    )
    tolerance = TOLERANCE[dtype]
    failed = [r for r in results if not r.error <= tolerance]
    if failed:
        names = ", ".join(f"{r.op} [{r.backend}]" for r in failed)
        print(f"\nFAILED: {names} differ from the reference by more than {tolerance:.0e}")
        return 1
    print(f"\nall {len(results)} results agree with the reference (max abs error <= {tolerance:.0e})")
    return 0


# ---------------------------------------------------------------------------------------------
# formatting


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    raise SystemExit(main())
