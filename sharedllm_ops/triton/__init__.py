"""Triton kernels (DESIGN section 4): the portable GPU path, one module per op.

Each module registers its op as ``torch.ops.sharedllm_triton.<op>`` with ``torch.library.custom_op``
(plus a fake kernel and autograd), so the kernels trace under ``torch.compile``. They run on CUDA
tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported (that is
how CI tests them). ``backend="auto"`` picks them on GPU when the CUDA extension lacks a kernel.
"""

from __future__ import annotations

import os

import torch

OPS = ("chunk_pool", "tree_topk", "cross_inject_attention")
_registered: set[str] = set()
_import_error: str | None = None
_interpreter_problem: str | None = None  # set once below: the versions do not change while running


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


try:
    import triton  # noqa: F401
except Exception as e:  # noqa: BLE001 - any import failure means "no Triton backend"
    _import_error = f"triton could not be imported ({type(e).__name__}: {e})"
else:
    try:  # importing a module registers its op (interpreting() above must exist by then)
        from . import chunk_pool as _chunk_pool  # noqa: F401

        _registered.add("chunk_pool")
        from . import tree_topk as _tree_topk  # noqa: F401

        _registered.add("tree_topk")
        from . import cross_inject_attention as _cross_inject_attention  # noqa: F401

        _registered.add("cross_inject_attention")
    except Exception as e:  # noqa: BLE001
        _import_error = f"a Triton kernel module failed to import ({type(e).__name__}: {e})"


def has_op(op: str) -> bool:
    """Whether the Triton kernel of ``op`` is registered (Triton imports and the kernel compiled in)."""
    return op in _registered


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these versions, or None. Triton < 3.7
    converts loaded scalars with ``int(array)``, which NumPy >= 2.4 rejects for 1-element arrays
    (triton-lang/triton issue 9171): every kernel with a data-dependent loop bound would fail with a
    bare TypeError."""
    from .._ext import major_minor

    triton_mm, numpy_mm = major_minor(triton_version), major_minor(numpy_version)
    if triton_mm is None or numpy_mm is None:
        return None  # a version we cannot read: do not guess
    if triton_mm < (3, 7) and numpy_mm >= (2, 4):
        return (f"Triton's CPU interpreter in triton {triton_version} does not work with numpy "
                f"{numpy_version}: install numpy<2.4 or triton>=3.7")
    return None


try:
    import numpy
    import triton
except Exception:  # noqa: BLE001 - a failed Triton import is recorded in _import_error above
    pass
else:
    _interpreter_problem = interpreter_problem(triton.__version__, numpy.__version__)


def cpu_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here, or None when they can (interpreter)."""
    if not interpreting():
        return f"Triton runs on CPU tensors only with TRITON_INTERPRET=1 (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})"
    return _interpreter_problem


def launch_error(device: torch.device) -> str:
    """The end of the error for tensors on ``device`` that Triton cannot launch on: where it runs,
    and on CPU why not here."""
    why = cpu_unavailable_reason() if device.type == "cpu" else None
    return (f"runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
            + (f": {why}" if why else ""))


def runs_on(device: torch.device) -> bool:
    """Triton launches on CUDA tensors, and on CPU tensors only under a working interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_unavailable_reason() is None)


def unavailable_reason(op: str) -> str:
    if _import_error is not None:
        return _import_error
    return f"sharedllm_ops has no Triton kernel for {op}"
