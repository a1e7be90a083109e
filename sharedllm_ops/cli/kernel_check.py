"""The kernel check behind ``sharedllm-ops ops``: every case of ``kernel_cases`` on each of its
backends, its error against the reference and its median time."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .kernel_cases import FULL_SHAPES, QUICK_SHAPES, check_cases

# Largest max-abs error against the reference the check accepts. float32 results differ from the
# reference by summation order only; 16-bit ones also by one rounding step of outputs of order 1.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class CheckResult:
    op: str
    shape: str
    backend: str
    error: float
    note: str
    seconds: float
    speedup: float  # the reference's median time over this backend's


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


def run_kernel_check(
    device: torch.device, dtype: torch.dtype, quick: bool, log: Callable[[str], None] = print
) -> list[CheckResult]:
    """Every op on each backend available on ``device``, at tiny (``quick``) or realistic shapes:
    error against the reference and median time. ``log`` gets a line before each run."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    budget_s = 0.05 if quick else 1.0
    results = []
    for case in check_cases(QUICK_SHAPES if quick else FULL_SHAPES, device, dtype):
        expected = reference_seconds = None
        for backend in case.backends:
            log(f"  {case.op} [{backend}] ...")
            with torch.no_grad():
                out, seconds = time_call(lambda: case.run(backend), synchronize, budget_s)
            if backend == "reference":
                expected, reference_seconds = out, seconds
            error, note = case.compare(out, expected)
            results.append(CheckResult(case.op, case.shape, backend, error, note, seconds, reference_seconds / seconds))
    return results
