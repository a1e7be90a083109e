"""Dispatch at each backend's limits: ``auto`` takes the first backend that can take the call and falls
back past the last; a backend asked for by name that cannot take it raises a clear error.

The GPU backends are resolved for ``torch.device("cuda")`` without a GPU: dispatch reads only the
device type and the call's shapes (meta tensors here), and the limits are set to known values, so
every rule is exercised on the CPU. ``test_gpu.py`` runs the kernels themselves at the limits.
"""

import warnings

import pytest
import torch
from conftest import requires_ext, requires_triton

import sharedllm_ops as so
from sharedllm_ops import _ext
from sharedllm_ops import triton as so_triton
from sharedllm_ops.core import dispatch
from sharedllm_ops.triton import tree_topk as triton_tree_topk

GPU = torch.device("cuda")
TRITON_MAX_NODES = triton_tree_topk.MAX_NODES
CUDA_MAX_NODES = 2000  # a stand-in limit above Triton's, as on sm_90 (the real one is 9824)
CUDA_MAX_HEAD_DIMS = 4096


@pytest.fixture
def gpu_build(monkeypatch):
    """A build with every CUDA and Triton kernel, known CUDA limits, and no warning recorded yet."""
    monkeypatch.setattr(_ext, "compiled_kernels", {op: {"cpu": True, "cuda": True} for op in dispatch.OPS})
    monkeypatch.setattr(_ext, "CUDA_TREE_TOPK_MAX_NODES", CUDA_MAX_NODES)
    monkeypatch.setattr(_ext, "CUDA_ATTENTION_MAX_HEAD_DIMS", CUDA_MAX_HEAD_DIMS)
    monkeypatch.setattr(so_triton, "_registered", set(dispatch.OPS))
    monkeypatch.setattr(dispatch, "_warned", set())


def tree_args(nodes: int) -> dict:
    return dict(query=torch.empty(1, 8, device="meta"), node_emb=torch.empty(1, 1, nodes, 8, device="meta"))


def attention_args(d: int, dv: int) -> dict:
    return dict(q=torch.empty(4, 2, d, device="meta"), k=torch.empty(4, 2, d, device="meta"),
                v=torch.empty(4, 2, dv, device="meta"))


def resolve_quietly(op, backend, args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return dispatch.resolve_backend(op, backend, GPU, args)


@pytest.mark.parametrize(("nodes", "expected"), [
    (1, "cuda"), (TRITON_MAX_NODES, "cuda"), (TRITON_MAX_NODES + 1, "cuda"), (CUDA_MAX_NODES, "cuda"),
])
def test_auto_tree_topk_takes_cuda_up_to_its_limit(gpu_build, nodes, expected):
    assert resolve_quietly("tree_topk", "auto", tree_args(nodes)) == expected


def test_auto_tree_topk_past_every_limit_falls_back_to_the_reference_with_both_reasons(gpu_build):
    with pytest.warns(RuntimeWarning, match=rf"tree_topk: cuda: .*up to {CUDA_MAX_NODES} nodes, got {CUDA_MAX_NODES + 1}"
                                            rf"; triton: .*up to {TRITON_MAX_NODES} nodes.*reference"):
        assert dispatch.resolve_backend("tree_topk", "auto", GPU, tree_args(CUDA_MAX_NODES + 1)) == "reference"


@pytest.mark.parametrize(("nodes", "expected"), [
    (TRITON_MAX_NODES, "triton"), (TRITON_MAX_NODES + 1, "reference"),
])
def test_auto_tree_topk_without_a_cuda_kernel_uses_triton_up_to_its_limit(gpu_build, monkeypatch, nodes, expected):
    monkeypatch.setitem(_ext.compiled_kernels, "tree_topk", {"cpu": True, "cuda": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.resolve_backend("tree_topk", "auto", GPU, tree_args(nodes)) == expected
    assert len(caught) == (expected == "reference")


@pytest.mark.parametrize(("backend", "nodes", "limit"), [
    ("triton", TRITON_MAX_NODES + 1, TRITON_MAX_NODES), ("cuda", CUDA_MAX_NODES + 1, CUDA_MAX_NODES),
])
def test_explicit_backend_past_its_tree_limit_says_so(gpu_build, backend, nodes, limit):
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot take this tree_topk call: .*up to {limit} "
                                         rf"nodes.*got {nodes}; use backend='auto'"):
        dispatch.resolve_backend("tree_topk", backend, GPU, tree_args(nodes))
    # one node fewer is taken
    assert resolve_quietly("tree_topk", backend, tree_args(limit)) == backend


@pytest.mark.parametrize(("d", "dv", "expected"), [
    (64, 64, "cuda"), (2048, 2048, "cuda"), (2048, 2049, "triton"), (4000, 8, "cuda"), (4089, 8, "triton"),
])
def test_auto_attention_moves_to_triton_past_the_cuda_head_dims(gpu_build, d, dv, expected):
    assert resolve_quietly("cross_inject_attention", "auto", attention_args(d, dv)) == expected


def test_auto_attention_past_the_cuda_head_dims_without_triton_falls_back(gpu_build, monkeypatch):
    monkeypatch.setattr(so_triton, "_registered", set())
    with pytest.warns(RuntimeWarning, match=r"cuda: .*q.shape\[2\] \+ v.shape\[2\] <= 4096, got 4097; triton is not "
                                            r"available.*reference"):
        assert dispatch.resolve_backend("cross_inject_attention", "auto", GPU, attention_args(4096, 1)) == "reference"


def test_explicit_cuda_attention_past_its_head_dims_says_so(gpu_build):
    with pytest.raises(ValueError, match=r"backend='cuda' cannot take this cross_inject_attention call: .*<= 4096, "
                                         r"got 4097"):
        dispatch.resolve_backend("cross_inject_attention", "cuda", GPU, attention_args(4000, 97))


def test_unknown_cuda_limits_are_not_enforced(gpu_build, monkeypatch):
    """An extension that does not report its limits (built before they were exported) is taken at its
    word: its own launcher raises past them."""
    monkeypatch.setattr(_ext, "CUDA_TREE_TOPK_MAX_NODES", None)
    monkeypatch.setattr(_ext, "CUDA_ATTENTION_MAX_HEAD_DIMS", None)
    assert resolve_quietly("tree_topk", "auto", tree_args(10**6)) == "cuda"
    assert resolve_quietly("cross_inject_attention", "auto", attention_args(10**4, 10**4)) == "cuda"


def test_calls_without_arguments_are_resolved_by_device_and_build_only(gpu_build):
    assert resolve_quietly("tree_topk", "auto", None) == "cuda"
    assert resolve_quietly("tree_topk", "triton", None) == "triton"


def test_each_limit_warns_once_per_reason(gpu_build):
    with pytest.warns(RuntimeWarning):
        dispatch.resolve_backend("tree_topk", "auto", GPU, tree_args(CUDA_MAX_NODES + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.resolve_backend("tree_topk", "auto", GPU, tree_args(CUDA_MAX_NODES + 1))


@requires_ext
def test_the_extension_reports_its_cuda_limits():
    """The limits come from the compiled extension (csrc/include), not from a copy in Python."""
    if not _ext.compiled_kernels["tree_topk"]["cuda"]:
        pytest.skip("this build has no CUDA kernels")
    assert _ext.CUDA_TREE_TOPK_MAX_NODES is not None and _ext.CUDA_TREE_TOPK_MAX_NODES > TRITON_MAX_NODES
    assert _ext.CUDA_ATTENTION_MAX_HEAD_DIMS is not None and _ext.CUDA_ATTENTION_MAX_HEAD_DIMS >= 2 * 128


def test_register_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"backend.name must be one of \('cpp', 'cuda', 'triton'\), got 'tpu'"):
        dispatch.register_backend(dispatch.Backend("tpu", lambda op, device: None, lambda op, args: None))


@requires_triton("tree_topk")
def test_public_tree_topk_on_triton_past_its_limit_is_a_clear_error():
    """End to end under the interpreter: depth 9 of a binary tree has 1022 nodes."""
    depth, nodes = 9, 2 ** 10 - 2
    query, emb = torch.randn(1, 8), torch.randn(1, 1, nodes, 8)
    with pytest.raises(ValueError, match=rf"backend='triton' cannot take this tree_topk call: .*got {nodes}"):
        so.tree_topk(query, emb, depth, backend="triton")
    ids, scores = so.tree_topk(query, emb, depth, backend="reference")  # the reference takes it
    assert ids.shape == (1, 1, so.reference.num_preserved(depth, 1, 2)) and scores.shape == (1, 1, nodes)
