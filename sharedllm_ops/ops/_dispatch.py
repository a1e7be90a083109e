"""Backend selection (DESIGN section 4).

``auto`` picks CUDA, then Triton, on GPU tensors and C++ on CPU tensors, and falls back to the
reference where no compiled backend exists (with one warning per op and reason). An explicitly
requested backend that cannot run raises instead.
"""

from __future__ import annotations

import warnings

import torch

from .. import _ext
from .. import triton as _triton

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
_warned: set[tuple[str, str]] = set()


def _fallback(op: str, reason: str) -> str:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"sharedllm_ops.{op}: {reason}; using the (slow) reference backend", RuntimeWarning, stacklevel=3)
    return "reference"


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors on ``device``: one of reference, cpp, cuda, triton."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kernels = _ext.compiled_kernels[op]
    on_gpu = device.type == "cuda"
    if backend == "reference":
        return "reference"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        if not kernels["cpu"]:
            raise RuntimeError(f"backend='cpp' is not available: {_missing_extension_reason()}")
        return "cpp"
    if backend == "cuda":
        if not on_gpu:
            raise ValueError(f"backend='cuda' runs on CUDA tensors, got tensors on {device}")
        if not kernels["cuda"]:
            raise RuntimeError(f"backend='cuda' is not available for {op}: this build has no CUDA kernel for it")
        return "cuda"
    if backend == "triton":
        if not _triton.has_op(op):
            raise RuntimeError(f"backend='triton' is not available for {op}: {_triton.unavailable_reason(op)}")
        if not _triton.runs_on(device):
            raise ValueError(f"backend='triton' {_triton.launch_error(device)}")
        return "triton"
    # auto
    if device.type == "cpu":
        return "cpp" if kernels["cpu"] else _fallback(op, f"no C++ kernel ({_missing_extension_reason()})")
    if on_gpu:
        if kernels["cuda"]:
            return "cuda"
        if _triton.has_op(op) and _triton.runs_on(device):
            return "triton"
        return _fallback(op, "no CUDA or Triton kernel in this build")
    return _fallback(op, f"no kernel for device type {device.type!r}")


def _missing_extension_reason() -> str:
    if _ext.loaded:
        return "the extension has no kernel for this op"
    return f"the compiled extension is not loaded ({_ext.load_error})"
