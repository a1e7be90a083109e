"""Triton kernels (docs/DESIGN.md section 4): the portable GPU path, one module per op.

Each module registers its op as ``torch.ops.sharedllm_triton.<op>`` with ``torch.library.custom_op``
(plus a fake kernel and autograd from ``sharedllm_ops.core.registration``), so the kernels trace
under ``torch.compile``, and says which calls it takes (``supports``). This package declares the
``triton`` backend to ``sharedllm_ops.core.dispatch``. The kernels run on CUDA tensors, and on CPU
tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported (that is how CI tests them).
``backend="auto"`` picks them on GPU when the CUDA extension lacks a kernel or cannot take a call.
"""

from __future__ import annotations

import torch

from ..core.dispatch import OPS, Backend, Problem, register_backend
from ._runtime import cpu_unavailable_reason, interpreter_problem, interpreting, launch_error, runs_on

_kernels: dict = {}  # op -> its kernel module
_import_error: str | None = None

try:
    import triton  # noqa: F401
except Exception as e:  # noqa: BLE001 - any import failure means "no Triton backend"
    _import_error = f"triton could not be imported ({type(e).__name__}: {e})"
else:
    try:  # importing a module registers its op
        from . import chunk_pool as _chunk_pool

        _kernels["chunk_pool"] = _chunk_pool
        from . import tree_topk as _tree_topk

        _kernels["tree_topk"] = _tree_topk
        from . import cross_inject_attention as _cross_inject_attention

        _kernels["cross_inject_attention"] = _cross_inject_attention
    except Exception as e:  # noqa: BLE001
        _import_error = f"a Triton kernel module failed to import ({type(e).__name__}: {e})"

_registered: set[str] = set(_kernels)


def has_op(op: str) -> bool:
    """Whether the Triton kernel of ``op`` is registered (Triton imports and the kernel compiled in)."""
    return op in _registered


def unavailable_reason(op: str) -> str:
    if _import_error is not None:
        return _import_error
    return f"sharedllm_ops has no Triton kernel for {op}"


def _problem(op: str, device: torch.device) -> Problem | None:
    if not has_op(op):
        return Problem(RuntimeError, f"is not available for {op}: {unavailable_reason(op)}")
    if not runs_on(device):
        return Problem(ValueError, launch_error(device))
    return None


def _supports(op: str, args: dict) -> str | None:
    return _kernels[op].supports(args) if op in _kernels else None


register_backend(Backend("triton", _problem, _supports))

__all__ = ["OPS", "cpu_unavailable_reason", "has_op", "interpreter_problem", "interpreting", "launch_error",
           "runs_on", "unavailable_reason"]
