"""``sharedllm-ops ops``: the kernel check (``kernel_check.py``) as a command: every op on every
backend available on the device, a table of errors and times, and exit status 1 past ``TOLERANCE``."""

from __future__ import annotations

import argparse
import sys

import torch

from ..dtypes import DTYPES
from ..workloads import format_seconds
from .kernel_check import TOLERANCE, run_kernel_check
from .table import print_table

HELP = "run every op on every available backend, check and time it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda if available, else cpu)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="data dtype (default: float32)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test that takes seconds")


def run(args: argparse.Namespace) -> int:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    size = "tiny" if args.quick else "realistic"
    print(f"sharedllm_ops ops: {size} shapes, {args.dtype}, on {args.device} ({where})", flush=True)
    results = run_kernel_check(device, dtype, args.quick, log=lambda line: print(line, file=sys.stderr, flush=True))
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
