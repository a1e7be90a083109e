"""Backend selection (docs/DESIGN.md section 4).

Each compiled backend declares itself here with :func:`register_backend`: whether it can run an op
on tensors of a device, and ``supports(op, args)``, whether it can take one call (its limits, read
from the call's shapes). The extension loader declares ``cpp`` and ``cuda``, the Triton package
``triton``; this module knows none of them by import.

``auto`` tries the backends of the tensors' device type in order (CPU: cpp; CUDA: cuda, then
triton) and takes the first that can take the call; when none can, it uses the reference, with one
warning per op and reason. An explicitly requested backend that cannot take the call raises a
clear error instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

OPS = ("chunk_pool", "tree_topk", "cross_inject_attention")  # the ops every backend implements
BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
# the order in which auto tries the compiled backends on each device type
AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


@dataclass(frozen=True)
class Problem:
    """Why a backend cannot run: the exception type to raise when it was asked for by name."""

    error: type[Exception]
    reason: str


@dataclass(frozen=True)
class Backend:
    """A compiled backend as dispatch sees it.

    ``problem(op, device)``: None when the backend has a kernel for ``op`` that runs on tensors on
    ``device``, else a :class:`Problem` whose reason completes "backend='<name>' ...".
    ``supports(op, args)``: None when the kernel takes this call, else why not (a limit). ``args``
    maps the op's argument names (``x``, ``node_emb``, ``q``, ``v``, ...) to the call's values.
    """

    name: str
    problem: Callable[[str, torch.device], Problem | None]
    supports: Callable[[str, dict], str | None]


_backends: dict[str, Backend] = {}
_warned: set[tuple[str, str]] = set()


def register_backend(backend: Backend) -> None:
    if backend.name not in BACKENDS[2:]:
        raise ValueError(f"backend.name must be one of {BACKENDS[2:]}, got {backend.name!r}")
    _backends[backend.name] = backend


def _problem(name: str, op: str, device: torch.device) -> Problem | None:
    backend = _backends.get(name)
    if backend is None:
        return Problem(RuntimeError, f"is not available: sharedllm_ops registered no {name!r} backend")
    return backend.problem(op, device)


def resolve_backend(op: str, backend: str, device: torch.device, args: dict | None = None) -> str:
    """The backend that runs ``op`` on tensors on ``device``: one of reference, cpp, cuda, triton.

    ``args`` (the call's arguments by name) lets each backend check its limits; without it only
    the device and the build are considered.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend != "auto":
        problem = _problem(backend, op, device)
        if problem is not None:
            raise problem.error(f"backend={backend!r} {problem.reason}")
        limit = _backends[backend].supports(op, args) if args is not None else None
        if limit is not None:
            raise ValueError(f"backend={backend!r} cannot take this {op} call: {limit}; "
                             "use backend='auto' to fall back to a backend that can")
        return backend
    reasons = []
    for name in AUTO_ORDER.get(device.type, ()):
        problem = _problem(name, op, device)
        if problem is not None:
            reasons.append(f"{name} {problem.reason}")
            continue
        limit = _backends[name].supports(op, args) if args is not None else None
        if limit is None:
            return name
        reasons.append(f"{name}: {limit}")
    if not reasons:
        reasons.append(f"no kernel for device type {device.type!r}")
    return _fallback(op, "; ".join(reasons))


def _fallback(op: str, reason: str) -> str:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"sharedllm_ops.{op}: {reason}; using the (slow) reference backend", RuntimeWarning, stacklevel=4)
    return "reference"


def registered_backends() -> dict[str, Backend]:
    """The compiled backends registered so far, by name."""
    return dict(_backends)
