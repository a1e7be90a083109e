"""Loads the compiled extension (``sharedllm_ops._C``) once and records what it provides.

Everything here is computed at import time, so that backend dispatch stays a plain Python
lookup that ``torch.compile`` can trace.
"""

from __future__ import annotations

import warnings

import torch

OPS = ("chunk_pool", "tree_topk", "cross_inject_attention")

load_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.sharedllm.*)
except ImportError as exc:  # not built, or built for another torch
    load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "sharedllm_ops: the compiled extension sharedllm_ops._C could not be loaded "
        f"({load_error}); only the reference (and Triton) backends are available. "
        "Build it with `make build` or `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

loaded = load_error is None


def _has_kernel(op: str, key: str) -> bool:
    return loaded and torch._C._dispatch_has_kernel_for_dispatch_key(f"sharedllm::{op}", key)


# {op: {"cpu": bool, "cuda": bool}}: which compiled kernels exist in this build
compiled_kernels = {op: {"cpu": _has_kernel(op, "CPU"), "cuda": _has_kernel(op, "CUDA")} for op in OPS}


def compiled_build_info() -> dict[str, str]:
    """``key -> value`` of what the extension was compiled with (empty if it is not loaded)."""
    if not loaded:
        return {}
    text = torch.ops.sharedllm.build_info()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
