"""Public API: build_info, backend names, dispatch rules and the reference fallback (docs/DESIGN.md section 4)."""

import importlib.util
import re
import warnings

import pytest
import torch
from conftest import cu_seqlens, requires_ext, rotary_tables

import sharedllm_ops as so
from sharedllm_ops import _ext
from sharedllm_ops import triton as _triton
from sharedllm_ops.core import dispatch as _dispatch
from sharedllm_ops.triton import _runtime as _triton_runtime

OPS = ("chunk_pool", "tree_topk", "cross_inject_attention")


def _calls(backend):
    """One small call per public op with the given backend, keyed by op name (same inputs every time)."""
    torch.manual_seed(1)
    x, cu = torch.randn(7, 2, 8), cu_seqlens([3, 0, 4])
    query, emb = torch.randn(2, 8), torch.randn(2, 3, 6, 8)
    q, k, v = torch.randn(5, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    cq, ck = cu_seqlens([2, 3]), cu_seqlens([4, 2])
    return {
        "chunk_pool": lambda: so.chunk_pool(x, cu, 3, backend=backend),
        "tree_topk": lambda: so.tree_topk(query, emb, 2, backend=backend),
        "cross_inject_attention": lambda: so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend),
    }


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


# --------------------------------------------------------------------------------------------
# build_info


def test_build_info_contents():
    info = so.build_info()
    expected_keys = {
        "version", "torch", "extension_loaded", "extension_error", "compiled_torch", "compiled_cuda",
        "compiled_archs", "compiler", "cuda_available", "kernels", "build",
    }
    assert expected_keys <= set(info)
    assert info["version"] == so.__version__
    assert info["torch"] == torch.__version__
    assert info["extension_loaded"] is _ext.loaded
    assert info["extension_error"] == _ext.load_error
    assert info["cuda_available"] is torch.cuda.is_available()
    assert set(info["kernels"]) == set(OPS)
    for op, kinds in info["kernels"].items():
        assert set(kinds) == {"reference", "cpp", "cuda", "triton"}, op
        assert kinds["reference"] is True
        assert kinds["cpp"] == _ext.compiled_kernels[op]["cpu"]
        if not torch.cuda.is_available():
            assert kinds["cuda"] is False and kinds["triton"] is False, op


@requires_ext
def test_build_info_of_the_loaded_extension():
    info = so.build_info()
    assert info["extension_error"] is None
    # built through torch's stable ABI: any torch from 2.10 on loads it, whatever it was built with
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["compiled_torch"])
    assert info["build"]["built_with_torch"] == info["compiled_torch"]
    assert info["build"]["min_torch"] == "2.10" and info["build"]["python_abi"] == "cp310-abi3"
    assert info["build"]["version"].startswith(so.__version__ + "+")
    assert info["build"]["cuda"] == info["compiled_cuda"]
    assert so._C.__file__.endswith(".abi3.so")  # the limited-API binary, not a per-Python one
    assert info["compiler"]
    if info["compiled_cuda"] is not None:
        assert re.fullmatch(r"\d+\.\d+", info["compiled_cuda"])
        assert info["compiled_archs"]
    else:
        assert info["compiled_archs"] is None
    for op in OPS:
        assert info["kernels"][op]["cpp"] is True


def test_import_without_the_extension_warns_once_and_falls_back_to_the_reference():
    """A _C that cannot load (simulated by an import hook, in a fresh process) costs one warning at
    import that says what was built, what is installed and how to rebuild; the reference backend
    still runs, auto falls back to it with its own warning, and backend='cpp' says why it cannot."""
    import json
    import subprocess
    import sys

    code = """
import importlib.abc, json, sys, warnings
class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sharedllm_ops._C":
            raise ImportError("undefined symbol: simulated")
        return None
sys.meta_path.insert(0, HideExtension())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, sharedllm_ops as so
report = {"import_warnings": [(w.category.__name__, str(w.message)) for w in caught if "sharedllm_ops" in str(w.message)]}
report["extension_loaded"] = so.build_info()["extension_loaded"]
x = torch.arange(40, dtype=torch.float32).reshape(10, 2, 2)
cu = torch.tensor([0, 4, 10], dtype=torch.int32)
reference = so.chunk_pool(x, cu, 2, backend="reference")
report["reference"] = reference[:, 0, 0].tolist()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report["auto_equals_reference"] = torch.equal(so.chunk_pool(x, cu, 2), reference)
report["auto_warnings"] = [str(w.message) for w in caught]
try:
    so.chunk_pool(x, cu, 2, backend="cpp")
    report["cpp_error"] = None
except RuntimeError as exc:
    report["cpp_error"] = str(exc)
print(json.dumps(report))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert len(report["import_warnings"]) == 1, report["import_warnings"]
    category, message = report["import_warnings"][0]
    assert category == "RuntimeWarning"
    assert "sharedllm_ops._C" in message
    assert "could not be loaded (ImportError: undefined symbol: simulated)" in message
    assert f"Installed: torch {torch.__version__}" in message
    assert "Rebuild" in message and "make build" in message
    if _ext.build_meta:
        assert f"Built: {_ext.build_meta['version']}" in message
    assert report["extension_loaded"] is False
    # rows 0..3 and 4..9 of x[:, 0, 0] = 0, 4, ..., 36, pooled to 2: means of rows {0,1}, {2,3}, {4,5,6}, {7,8,9}
    assert report["reference"] == [2.0, 10.0, 20.0, 32.0]
    assert report["auto_equals_reference"]
    assert any("reference" in w for w in report["auto_warnings"]), report["auto_warnings"]
    assert report["cpp_error"] is not None and "not loaded" in report["cpp_error"]


@requires_ext
def test_ops_are_registered_with_fake_and_autograd():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("chunk_pool", "chunk_pool_backward", "tree_topk", "cross_inject_attention", "cross_inject_attention_backward"):
        assert has(f"sharedllm::{op}", "CPU"), op
        assert has(f"sharedllm::{op}", "Meta"), f"{op} has no fake/meta kernel"
    for op in ("chunk_pool", "cross_inject_attention"):
        assert has(f"sharedllm::{op}", "Autograd"), f"{op} has no registered autograd"


def test_public_exports():
    assert so.BACKENDS == ("auto", "reference", "cpp", "cuda", "triton")
    for name in so.__all__:
        assert hasattr(so, name), name


# --------------------------------------------------------------------------------------------
# backend names and dispatch rules


@pytest.mark.parametrize("backend", ["gpu", "torch", "Auto", "", None, 1])
def test_resolve_backend_rejects_unknown_names(backend):
    with pytest.raises(ValueError, match=r"backend must be one of .*auto.*reference.*cpp.*cuda.*triton"):
        _dispatch.resolve_backend("chunk_pool", backend, torch.device("cpu"))


@pytest.mark.parametrize("op", OPS)
def test_public_ops_reject_unknown_backend(op):
    with pytest.raises(ValueError, match="backend"):
        _calls("nope")[op]()


@pytest.mark.parametrize("op", OPS)
def test_cuda_backend_on_cpu_tensors_is_a_value_error(op):
    with pytest.raises(ValueError, match=r"backend='cuda'.*CUDA tensors.*cpu"):
        _calls("cuda")[op]()


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_on_cpu_without_interpreter_is_a_value_error(op, monkeypatch):
    """A registered Triton kernel runs on CPU tensors only in Triton's interpreter: without it,
    backend='triton' says so (instead of failing inside Triton's launcher)."""
    monkeypatch.setattr(_triton, "_registered", set(OPS))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _triton.interpreting() and not _triton.runs_on(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"backend='triton'.*TRITON_INTERPRET=1.*cpu"):
        _calls("triton")[op]()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize(("triton_version", "numpy_version", "broken"), [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.0", False), ("3.8.0", "2.4.0rc1", False),
])
def test_triton_interpreter_with_an_incompatible_numpy_is_named(triton_version, numpy_version, broken, monkeypatch):
    """triton < 3.7's interpreter fails with numpy >= 2.4 (measured: triton 3.6.0 of torch 2.11 with
    numpy 2.4.6): the CPU path is then unavailable with the fix in the message, not a bare TypeError."""
    monkeypatch.setattr(_triton_runtime, "interpreter_problem_here", _triton.interpreter_problem(triton_version, numpy_version))
    monkeypatch.setattr(_triton, "_registered", set(OPS))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _triton.runs_on(torch.device("cpu")) is not broken
    if broken:
        with pytest.raises(ValueError, match=r"backend='triton'.*triton 3\.6\.0.*numpy 2\.4\.6.*numpy<2\.4"):
            _calls("triton")["chunk_pool"]()


@pytest.mark.parametrize(("version", "expected"), [
    ("2.14.1+cu130", (2, 14)), ("3.6.0+git1a2b", (3, 6)), ("2.4.0rc1", (2, 4)), ("3.6rc1", (3, 6)), ("3", (3, 0)),
    ("2.15.0a0+gitabc", (2, 15)), ("weird", None), ("", None),
])
def test_major_minor_reads_release_local_and_prerelease_versions(version, expected):
    assert _ext.major_minor(version) == expected


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_without_kernel_names_the_op(op, monkeypatch):
    monkeypatch.setattr(_triton, "_registered", {o for o in OPS if o != op})
    assert not _triton.has_op(op)
    with pytest.raises(RuntimeError, match=rf"backend='triton' is not available for {op}\b"):
        _calls("triton")[op]()
    # auto never picks a missing Triton kernel (on CPU it takes the C++ kernel or the reference)
    assert _dispatch.resolve_backend(op, "auto", torch.device("cpu")) in ("cpp", "reference")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("op", ["chunk_pool", "tree_topk"])
def test_triton_ops_are_registered(op):
    """With Triton installed, the kernels of chunk_pool and tree_topk are registered custom ops
    with a fake (meta) kernel; build_info reports them as usable exactly when CUDA is."""
    assert _triton.has_op(op), _triton.unavailable_reason(op)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in (op, f"{op}_backward") if op == "chunk_pool" else (op,):
        assert hasattr(torch.ops.sharedllm_triton, name), name
        assert has(f"sharedllm_triton::{name}", "Meta"), f"{name} has no fake kernel"
    assert so.build_info()["kernels"][op]["triton"] is torch.cuda.is_available()


@requires_ext
@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_picks_cpp_without_warning(op, monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.resolve_backend(op, "auto", torch.device("cpu")) == "cpp"
        auto = _as_tuple(_calls("auto")[op]())
    cpp = _as_tuple(_calls("cpp")[op]())
    for a, b in zip(auto, cpp):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_reference_backend_never_warns(op):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _calls("reference")[op]()
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("op", OPS)
def test_auto_falls_back_to_reference_with_one_warning(op, monkeypatch):
    """Without a compiled kernel, auto uses the reference and warns once per op."""
    monkeypatch.setattr(_ext, "compiled_kernels", {o: {"cpu": False, "cuda": False} for o in OPS})
    monkeypatch.setattr(_dispatch, "_warned", set())
    call = _calls("auto")[op]
    with pytest.warns(RuntimeWarning, match=rf"sharedllm_ops\.{op}: .*reference") as record:
        got = _as_tuple(call())
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    ref = _as_tuple(_calls("reference")[op]())
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        call()
        call()
    # the other ops warn for themselves
    for other in OPS:
        if other != op:
            with pytest.warns(RuntimeWarning, match=rf"sharedllm_ops\.{other}"):
                _calls("auto")[other]()
    # build_info reflects what is there
    assert so.build_info()["kernels"][op]["cpp"] is False


@pytest.mark.parametrize("op", OPS)
def test_explicit_cpp_without_kernel_raises(op, monkeypatch):
    monkeypatch.setattr(_ext, "compiled_kernels", {o: {"cpu": False, "cuda": False} for o in OPS})
    with pytest.raises(RuntimeError, match=r"backend='cpp' is not available"):
        _calls("cpp")[op]()


def test_fallback_warning_says_why_when_extension_missing(monkeypatch):
    monkeypatch.setattr(_ext, "compiled_kernels", {o: {"cpu": False, "cuda": False} for o in OPS})
    monkeypatch.setattr(_ext, "loaded", False)
    monkeypatch.setattr(_ext, "load_error", "ImportError: simulated")
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"not loaded.*simulated"):
        _calls("auto")["chunk_pool"]()
    with pytest.raises(RuntimeError, match=r"not loaded.*simulated"):
        _calls("cpp")["chunk_pool"]()
    info = so.build_info()
    assert info["extension_loaded"] is False and info["extension_error"] == "ImportError: simulated"


def test_auto_on_other_device_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"no kernel for device type 'meta'"):
        assert _dispatch.resolve_backend("chunk_pool", "auto", torch.device("meta")) == "reference"


@requires_ext
def test_cpp_backend_rejects_non_cpu_device():
    with pytest.raises(ValueError, match=r"backend='cpp' runs on CPU tensors"):
        _dispatch.resolve_backend("chunk_pool", "cpp", torch.device("meta"))


@requires_ext
def test_public_cpp_rotary_call_works_end_to_end():
    """A smoke test of the full argument surface through the public function."""
    cos, sin = rotary_tables(8, 8)
    q, k, v = torch.randn(5, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    out, lse = so.cross_inject_attention(
        q, k, v, cu_seqlens([2, 3]), cu_seqlens([4, 2]), 0.3,
        torch.arange(5, dtype=torch.int32), torch.arange(6, dtype=torch.int32), cos, sin, return_lse=True, backend="cpp",
    )
    assert out.shape == (5, 4, 8) and lse.shape == (5, 4) and torch.isfinite(out).all()
