"""Loads the compiled extension (``sharedllm_ops._C``) once and records what it provides.

Everything here is computed at import time, so that backend dispatch stays a plain Python
lookup that ``torch.compile`` can trace.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings

import torch

OPS = ("chunk_pool", "tree_topk", "cross_inject_attention")
MIN_TORCH = (2, 10)  # the stable-ABI target the extension is compiled for


def _read_build_meta() -> dict:
    """What setup.py recorded about the build (version, torch, CUDA, archs, git revision); empty for
    a tree that was never built."""
    try:
        with open(os.path.join(os.path.dirname(__file__), "_build_meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


build_meta = _read_build_meta()


def major_minor(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version such as "2.14.1+cu130", "3.6.0+git1a2b" or "2.4rc1"; None when
    it does not start with a number."""
    parts = ["".join(itertools.takewhile(str.isdigit, part)) for part in version.split("+")[0].split(".")[:2]]
    if not parts[0]:
        return None
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 0


def _cuda_major(version: str | None) -> str | None:
    return version.split(".")[0] if version else None


def _rebuild_hint() -> str:
    return ("Rebuild against this torch with `make build` (or `pip install --no-build-isolation -e .`), "
            "or install the wheel for this torch's CUDA (`python -m sharedllm_ops info` shows both).")


def _built_for() -> str:
    if not build_meta:
        return "unknown (no sharedllm_ops/_build_meta.json)"
    cuda = f"CUDA {build_meta['cuda']}" if build_meta.get("cuda") else "CPU only"
    return (f"{build_meta.get('version', '?')} ({cuda}, archs {build_meta.get('cuda_archs') or '-'}) "
            f"against torch {build_meta.get('built_with_torch', '?')}, for torch >= {build_meta.get('min_torch', '?')}")


def _installed() -> str:
    return f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"


load_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.sharedllm.*)
except ImportError as exc:  # not built, built for a CUDA this torch does not ship, or torch < 2.10
    load_error = f"{type(exc).__name__}: {exc}"
    too_old = "" if (major_minor(torch.__version__) or (0, 0)) >= MIN_TORCH else f" The extension needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}."
    warnings.warn(
        f"sharedllm_ops: the compiled extension sharedllm_ops._C could not be loaded ({load_error}). "
        f"Built: {_built_for()}. Installed: {_installed()}.{too_old} "
        f"Only the reference (and Triton) backends are available. {_rebuild_hint()}",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    # loaded, but compiled for another CUDA major than this torch's: kernels may fail at launch
    built_cuda, torch_cuda = _cuda_major(build_meta.get("cuda")), _cuda_major(torch.version.cuda)
    if built_cuda and torch_cuda and built_cuda != torch_cuda:
        warnings.warn(
            f"sharedllm_ops: the extension was built for another CUDA. Built: {_built_for()}. "
            f"Installed: {_installed()}. "
            f"CUDA {build_meta['cuda']} and {torch.version.cuda} differ in their major version. {_rebuild_hint()}",
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
