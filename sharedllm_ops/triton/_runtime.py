"""Where the Triton kernels can run: CUDA tensors, and CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``) when its versions work together. Imports neither triton nor the kernels,
so every module of the package can use it."""

from __future__ import annotations

import os

import torch

from ..core.versions import major_minor


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def autotuning() -> bool:
    """False when ``SHAREDLLM_TRITON_AUTOTUNE=0``: the attention kernels keep one config instead of tuning."""
    return os.environ.get("SHAREDLLM_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "off")


def host_checks() -> bool:
    """True when ``SHAREDLLM_HOST_CHECKS=1``: check index values on the host (a sync per call, exact
    errors you can catch) instead of on the device, as the CUDA bindings do."""
    return os.environ.get("SHAREDLLM_HOST_CHECKS", "0") == "1"


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run our kernels with these versions, or None. Triton < 3.7
    converts loaded scalars with ``int(array)``, which NumPy >= 2.4 rejects for 1-element arrays
    (triton-lang/triton issue 9171): every kernel with a data-dependent loop bound would fail with a
    bare TypeError."""
    triton_mm, numpy_mm = major_minor(triton_version), major_minor(numpy_version)
    if triton_mm is None or numpy_mm is None:
        return None  # a version we cannot read: do not guess
    if triton_mm < (3, 7) and numpy_mm >= (2, 4):
        return (f"Triton's CPU interpreter in triton {triton_version} does not work with numpy "
                f"{numpy_version}: install numpy<2.4 or triton>=3.7")
    return None


def _installed_interpreter_problem() -> str | None:
    try:
        import numpy
        import triton
    except Exception:  # noqa: BLE001 - a failed Triton import is reported by the package
        return None
    return interpreter_problem(triton.__version__, numpy.__version__)


# read once: the versions do not change while running
interpreter_problem_here: str | None = _installed_interpreter_problem()


def cpu_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here, or None when they can (interpreter)."""
    if not interpreting():
        return f"Triton runs on CPU tensors only with TRITON_INTERPRET=1 (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})"
    return interpreter_problem_here


def launch_error(device: torch.device) -> str:
    """The end of the error for tensors on ``device`` that Triton cannot launch on: where it runs,
    and on CPU why not here."""
    why = cpu_unavailable_reason() if device.type == "cpu" else None
    return (f"runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
            + (f": {why}" if why else ""))


def runs_on(device: torch.device) -> bool:
    """Triton launches on CUDA tensors, and on CPU tensors only under a working interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_unavailable_reason() is None)
