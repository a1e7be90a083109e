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


def _interpreter_broken() -> str | None:
    """Why Triton's interpreter cannot run our kernels here, or None. Triton < 3.7 converts loaded
    scalars with ``int(array)``, which NumPy >= 2.4 rejects for 1-element arrays (triton-lang/triton
    issue 9171): every kernel with a data-dependent loop bound would fail with a bare TypeError."""
    try:
        import numpy
        import triton
    except ImportError:
        return None

    def version(module) -> tuple[int, int]:  # "3.6.0+git...", "2.4.0rc1" -> (3, 6), (2, 4)
        parts = [int("".join(ch for ch in part if ch.isdigit()) or 0) for part in module.__version__.split(".")[:2]]
        return tuple(parts + [0] * (2 - len(parts)))

    if not (triton.__version__[:1].isdigit() and numpy.__version__[:1].isdigit()):
        return None  # a version we cannot read: do not guess
    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        return (f"Triton's CPU interpreter in triton {triton.__version__} does not work with numpy "
                f"{numpy.__version__}: install numpy<2.4 or triton>=3.7")
    return None


def cpu_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here, or None when they can (interpreter)."""
    if not interpreting():
        return f"Triton runs on CPU tensors only with TRITON_INTERPRET=1 (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})"
    return _interpreter_broken()


def runs_on(device: torch.device) -> bool:
    """Triton launches on CUDA tensors, and on CPU tensors only under a working interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_unavailable_reason() is None)


def unavailable_reason(op: str) -> str:
    if _import_error is not None:
        return _import_error
    return f"sharedllm_ops has no Triton kernel for {op}"
