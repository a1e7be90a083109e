"""The ``sharedllm-ops`` command (also ``python -m sharedllm_ops``).

    sharedllm-ops info             what was compiled, and which backend of each op can run here
    sharedllm-ops demo             SharedLLM on SmolLM2-135M and standard-library text: context
                                   sizes, stage times, memory, the perplexity table, a continuation
    sharedllm-ops eval-ppl --text FILE [--model PATH]
                                   the perplexity table for your own model and texts
    sharedllm-ops ops              every op on every backend available on the device, at realistic
                                   shapes: error against the reference and median time
    sharedllm-ops ops --quick      the same on tiny shapes (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import sharedllm_ops as so

from .reference import num_tree_nodes
from .workloads import (
    attention_inputs,
    chunk_pool_input,
    format_seconds,
    paper_tree_lengths,
    sdpa_attention,
    tree_topk_input,
)

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

    model_demo = commands.add_parser("demo", help="SharedLLM on SmolLM2-135M and real text: sizes, times, perplexity")
    model_eval = commands.add_parser("eval-ppl", help="perplexity table (window / SharedLLM / full) for your model and texts")
    add_model_arguments(model_demo, demo=True)
    add_model_arguments(model_eval, demo=False)
    model_demo.set_defaults(handler=lambda args: model_commands().run_demo(args))
    model_eval.set_defaults(handler=lambda args: model_commands().run_eval_ppl(args))

    train = commands.add_parser("train", help="train SharedLLM's cross blocks on text (continual pre-training)")
    add_train_arguments(train)
    train.set_defaults(handler=lambda args: model_commands().run_train(args))

    demo = commands.add_parser("ops", help="run every op on every available backend, check and time it")
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
    if args.command == "ops" and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args.handler(args)


# ---------------------------------------------------------------------------------------------
# demo and eval-ppl (the model; transformers is imported only when they run)


def add_model_arguments(parser: argparse.ArgumentParser, *, demo: bool) -> None:
    """The options shared by ``demo`` and ``eval-ppl``."""
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model folder or a .gguf file (default: the embedded SmolLM2-135M)")
    if demo:
        parser.add_argument("--module", default="inspect.py", help="standard-library module to read (default: inspect.py)")
    else:
        parser.add_argument("--text", nargs="+", required=True, type=Path, help="text files to evaluate on")
    parser.add_argument("--injector", default=None,
                        help="a trained injector folder (save_pretrained / train checkpoint): adds its row"
                             + (" (default: the one shipped for the embedded SmolLM2)" if demo else ""))
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens taken from the start of each text (default: 8192)")
    parser.add_argument("--window", type=int, default=512, help="decoder window (default: 512)")
    parser.add_argument("--last", type=int, default=256, help="tokens scored at the end (default: 256)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="context chunk length (default: 1024)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (default: float32)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``train``: each sets the TrainConfig field of the same name (defaults there)."""
    parser.add_argument("--model", default=None, help="base model folder or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data", nargs="*", default=[],
                        help="text files or folders (default: the standard-library training packages)")
    parser.add_argument("--output", default="runs/sharedllm", help="checkpoint folder (default: runs/sharedllm)")
    for name, kind in (("steps", int), ("batch-size", int), ("grad-accum", int), ("lr", float), ("warmup", int),
                       ("weight-decay", float), ("context-tokens", int), ("min-context-tokens", int),
                       ("decoder-tokens", int), ("top-layers", int), ("seed", int), ("save-every", int)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--trainable", choices=("cross", "cross+top"), default=None)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if --output has checkpoints")
    parser.add_argument("--config", default=None, help="SharedLLMConfig fields as JSON, e.g. '{\"num_injected_layers\": 4}'")
    parser.add_argument("--eval-modules", nargs="*", default=None,
                        help="standard-library modules for the final perplexity table (default: text.EVAL_MODULES; none: skip)")
    parser.add_argument("--skip-full", action="store_true",
                        help="leave full attention (slow) out of the final table; by default it is there where the text fits")


def model_commands():
    try:
        from .model import demo
    except ImportError as e:
        sys.exit(f"sharedllm-ops: the model commands need transformers ({e}); pip install 'sharedllm_ops[model]'")
    return demo


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
    build = info["build"]
    if build:
        print(
            f"build         {build.get('version', '?')} ({build.get('python_abi', '?')}, torch >= "
            f"{build.get('min_torch', '?')}, built with torch {build.get('built_with_torch', '?')}), "
            f"git {build.get('git_revision', '?')}, {build.get('built_at', '?')}"
        )
    else:
        print("build         no record (sharedllm_ops/_build_meta.json is written by setup.py)")
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
    pool_lengths=tuple(paper_tree_lengths(16)),  # 16 chunks of 1024 tokens, the paper's 4 preserved nodes each
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

    x, cu = chunk_pool_input(shapes.pool_lengths, shapes.pool_heads, shapes.pool_head_dim, dtype, device, generator=gen)
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
    query, node_emb = tree_topk_input(
        shapes.tree_batch, shapes.tree_chunks, nodes, shapes.tree_dim, dtype, device, generator=gen
    )
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

    attn = attention_inputs(
        shapes.q_lens, shapes.k_lens, shapes.q_heads, shapes.kv_heads, shapes.head_dim, shapes.keys_per_chunk,
        dtype=dtype, device=device,
    )  # fmt: skip
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
    print(f"sharedllm_ops ops: {size} shapes, {args.dtype}, on {args.device} ({where})", flush=True)
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


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    raise SystemExit(main())
