"""Loads the compiled extension (``sharedllm_ops._C``) once, records what it provides, registers the
fake kernels and autograd of its ops, and declares its backends (``cpp``, ``cuda``) to dispatch,
with the CUDA kernels' limits as the extension reports them.

Everything here is computed at import time, so that backend dispatch stays a plain Python
lookup that ``torch.compile`` can trace.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from .core import registration
from .core.dispatch import OPS, Backend, Problem, register_backend
from .core.versions import major_minor
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


def _limit(info: dict[str, str], key: str) -> int | None:
    value = info.get(key)
    return int(value) if value else None


# the CUDA kernels' limits, as compiled (None: an extension too old to say, or none loaded);
# the build info is read once for both
_compiled = compiled_build_info()
CUDA_TREE_TOPK_MAX_NODES = _limit(_compiled, "cuda_tree_topk_max_nodes")
CUDA_ATTENTION_MAX_HEAD_DIMS = _limit(_compiled, "cuda_attention_max_head_dims")


def _missing_extension_reason() -> str:
    if loaded:
        return "the extension has no kernel for this op"
    return f"the compiled extension is not loaded ({load_error})"


def _cpp_problem(op: str, device: torch.device) -> Problem | None:
    if device.type != "cpu":
        return Problem(ValueError, f"runs on CPU tensors, got tensors on {device}")
    if not compiled_kernels[op]["cpu"]:
        return Problem(RuntimeError, f"is not available: {_missing_extension_reason()}")
    return None


def _cuda_problem(op: str, device: torch.device) -> Problem | None:
    if device.type != "cuda":
        return Problem(ValueError, f"runs on CUDA tensors, got tensors on {device}")
    if not compiled_kernels[op]["cuda"]:
        return Problem(RuntimeError, f"is not available for {op}: this build has no CUDA kernel for it")
    return None


def _cpp_supports(op: str, args: dict) -> str | None:
    return None  # the C++ kernels take every valid call


def _cuda_supports(op: str, args: dict) -> str | None:
    """The CUDA tree_topk keeps a chunk's node scores in shared memory; the general path of the CUDA
    attention stages float32 rows of q and v per warp in shared memory."""
    if op == "tree_topk" and CUDA_TREE_TOPK_MAX_NODES is not None:
        nodes = args["node_emb"].shape[2]
        if nodes > CUDA_TREE_TOPK_MAX_NODES:
            return f"the CUDA kernel takes trees of up to {CUDA_TREE_TOPK_MAX_NODES} nodes, got {nodes}"
    if op == "cross_inject_attention" and CUDA_ATTENTION_MAX_HEAD_DIMS is not None:
        head_dims = args["q"].shape[2] + args["v"].shape[2]
        if head_dims > CUDA_ATTENTION_MAX_HEAD_DIMS:
            return (f"the CUDA kernel takes head dims with q.shape[2] + v.shape[2] <= {CUDA_ATTENTION_MAX_HEAD_DIMS}, "
                    f"got {head_dims}")
    return None


register_backend(Backend("cpp", _cpp_problem, _cpp_supports))
register_backend(Backend("cuda", _cuda_problem, _cuda_supports))
if loaded:
    registration.register_chunk_pool("sharedllm")
    registration.register_tree_topk("sharedllm")
    registration.register_cross_inject_attention("sharedllm")
