"""Triton kernels (DESIGN section 4). None has landed yet: the ops report themselves unavailable,
so ``backend="auto"`` skips Triton and ``backend="triton"`` raises a clear error."""

from __future__ import annotations

_KERNELS: dict[str, object] = {}


def has_op(op: str) -> bool:
    return op in _KERNELS


def unavailable_reason(op: str) -> str:
    return "the Triton kernels are not implemented yet"
