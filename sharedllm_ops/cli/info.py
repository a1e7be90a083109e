"""``sharedllm-ops info``: what was compiled, and which backend of each op can run here."""

from __future__ import annotations

import argparse
import json

import torch

import sharedllm_ops as so

from .table import print_table

HELP = "what was compiled and which backends are available now"
BACKEND_COLUMNS = ("reference", "cpp", "cuda", "triton")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print build_info() as JSON")


def run(args: argparse.Namespace) -> int:
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
    print("\nbackends that can run now:")
    rows = [[op] + ["yes" if kinds[b] else "-" for b in BACKEND_COLUMNS] for op, kinds in info["kernels"].items()]
    print_table(["op", *BACKEND_COLUMNS], rows)
    return 0
