"""chunk_pool (docs/DESIGN.md section 3.1): reference vs independent formulations, C++ and Triton vs reference,
gradients, opcheck and input validation."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    TOL,
    assert_close,
    assert_finite,
    cu_seqlens,
    dtype_id,
    requires_ext,
    requires_triton,
    run_twice,
    strided_like,
)

import sharedllm_ops as so
from sharedllm_ops import reference as R

# empty, single token, shorter than P, equal to P, longer non-divisible, divisible, another empty
LENGTHS = [0, 1, 3, 4, 9, 0, 23, 16, 2]
MODES = ("mean", "first")
TRITON = requires_triton("chunk_pool")


def _segments(x, cu):
    b = cu.tolist()
    return [x[b[s] : b[s + 1]] for s in range(len(b) - 1)]


def _adaptive_mean(seg: torch.Tensor, P: int) -> torch.Tensor:
    """Independent formulation: torch's adaptive_avg_pool1d over the rows of one segment."""
    L, H, D = seg.shape
    if L == 0:
        return seg.new_zeros(P, H, D)
    cols = seg.permute(1, 2, 0).reshape(1, H * D, L)  # [1, C, L]
    pooled = F.adaptive_avg_pool1d(cols, P)  # [1, C, P]
    return pooled.reshape(H, D, P).permute(2, 0, 1)


def _adaptive_first(seg: torch.Tensor, P: int) -> torch.Tensor:
    """Independent formulation of mode="first": adaptive_max_pool1d over a *decreasing* ramp
    returns, for every window, the index of its first row."""
    L, H, D = seg.shape
    if L == 0:
        return seg.new_zeros(P, H, D)
    ramp = -torch.arange(L, dtype=torch.float64).reshape(1, 1, L)
    _, idx = F.adaptive_max_pool1d(ramp, P, return_indices=True)
    return seg[idx.reshape(P)]


# --------------------------------------------------------------------------------------------
# 1. the reference against independent formulations


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("P", [1, 3, 4, 7])
def test_reference_mean_is_adaptive_avg_pool(dtype, P):
    cu = cu_seqlens(LENGTHS)
    x = torch.randn(int(cu[-1]), 2, 5, dtype=dtype)
    out = R.chunk_pool(x, cu, P, "mean")
    expected = torch.cat([_adaptive_mean(seg, P) for seg in _segments(x, cu)])
    assert_close(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("P", [1, 3, 4, 7])
def test_reference_first_is_window_start(dtype, P):
    cu = cu_seqlens(LENGTHS)
    x = torch.randn(int(cu[-1]), 2, 5, dtype=dtype)
    out = R.chunk_pool(x, cu, P, "first")
    expected = torch.cat([_adaptive_first(seg, P) for seg in _segments(x, cu)])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_reference_first_matches_authors_decimation(P):
    """With P dividing L, "first" is the authors' ``seg[range(0, L, L // P)]``."""
    lengths = [8, 16, 24, 64]
    cu = cu_seqlens(lengths)
    x = torch.randn(int(cu[-1]), 3, 4)
    out = R.chunk_pool(x, cu, P, "first")
    for s, seg in enumerate(_segments(x, cu)):
        L = seg.shape[0]
        assert torch.equal(out[s * P : (s + 1) * P], seg[list(range(0, L, L // P))])


def test_reference_pool_window_is_torchs_adaptive_window():
    """Against two other formulations: the windows torch's adaptive max pooling picks (its index of
    the max of an increasing ramp is the window's last row, of a decreasing ramp its first), and the
    order definition of floor and ceil (the last start with start*P <= j*L, the first end with
    end*P >= (j+1)*L), which also covers an empty segment."""
    for L in range(0, 20):
        for P in range(1, 9):
            if L > 0:
                ramp = torch.arange(L, dtype=torch.float64).reshape(1, 1, L)
                last_rows = F.adaptive_max_pool1d(ramp, P, return_indices=True)[1].flatten().tolist()
                first_rows = F.adaptive_max_pool1d(-ramp, P, return_indices=True)[1].flatten().tolist()
            for j in range(P):
                start, end = R.pool_window(j, L, P)
                assert start == max(s for s in range(L + 1) if s * P <= j * L), (j, L, P)
                assert end == min(e for e in range(L + 1) if e * P >= (j + 1) * L), (j, L, P)
                if L > 0:
                    assert (start, end - 1) == (first_rows[j], last_rows[j]), (j, L, P)


def test_reference_hand_computed():
    # one segment of 5 rows into P=2: windows [0, 3) and [2, 5)
    x = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1)
    cu = cu_seqlens([5])
    assert R.chunk_pool(x, cu, 2, "mean").flatten().tolist() == [1.0, 3.0]
    assert R.chunk_pool(x, cu, 2, "first").flatten().tolist() == [0.0, 2.0]
    # 2 rows into P=3: windows [0,1), [0,2), [1,2)
    x2 = torch.tensor([2.0, 4.0]).reshape(2, 1, 1)
    assert R.chunk_pool(x2, cu_seqlens([2]), 3, "mean").flatten().tolist() == [2.0, 3.0, 4.0]
    assert R.chunk_pool(x2, cu_seqlens([2]), 3, "first").flatten().tolist() == [2.0, 2.0, 4.0]


# --------------------------------------------------------------------------------------------
# 2. the C++ kernel against the reference


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("P", [4, 7])
@pytest.mark.parametrize("D", [33, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpp_matches_reference(dtype, D, P, mode, layout):
    cu = cu_seqlens(LENGTHS)
    x = strided_like((int(cu[-1]), 3, D), dtype, layout)
    out = run_twice(so.chunk_pool, x, cu, P, mode, backend="cpp")
    expected = so.chunk_pool(x, cu, P, mode, backend="reference")
    assert out.dtype == dtype and out.shape == (len(LENGTHS) * P, 3, D)
    assert_finite(out)
    assert_close(out, expected)
    # empty segments give exact zeros
    for s, n in enumerate(LENGTHS):
        if n == 0:
            assert torch.count_nonzero(out[s * P : (s + 1) * P]) == 0


@requires_ext
@pytest.mark.parametrize("mode", MODES)
def test_cpp_transposed_input(mode):
    cu = cu_seqlens(LENGTHS)
    x = strided_like((int(cu[-1]), 4, 16), torch.float32, "transposed")
    assert_close(so.chunk_pool(x, cu, 5, mode, backend="cpp"), R.chunk_pool(x, cu, 5, mode))


@pytest.mark.parametrize(
    "backend", [pytest.param("cpp", marks=requires_ext), "reference", pytest.param("triton", marks=TRITON)]
)
def test_noncontiguous_cu_seqlens(backend):
    """A strided cu_seqlens, against torch's adaptive average pooling of each segment (forward and
    gradient: the backward kernel reads cu_seqlens too)."""
    cu = cu_seqlens(LENGTHS)
    strided = torch.stack((cu, torch.full_like(cu, -1)), dim=1).flatten()[::2]
    assert not strided.is_contiguous() and torch.equal(strided, cu)
    x = torch.randn(int(cu[-1]), 2, 8)
    grad_out = torch.linspace(-1, 1, len(LENGTHS) * 4 * 2 * 8).reshape(len(LENGTHS) * 4, 2, 8)
    x_got, x_expected = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = so.chunk_pool(x_got, strided, 4, backend=backend)
    expected = torch.cat([_adaptive_mean(seg, 4) for seg in _segments(x_expected, cu)])
    assert_close(got, expected)
    (grad_got,) = torch.autograd.grad(got, x_got, grad_out)
    (grad_expected,) = torch.autograd.grad(expected, x_expected, grad_out)
    assert_close(grad_got, grad_expected)


@requires_ext
@pytest.mark.parametrize("mode", MODES)
def test_cpp_broadcast_and_overlapping_rows(mode):
    """Other strides than a dense layout: rows broadcast (stride 0) or overlapping."""
    cu = cu_seqlens(LENGTHS)
    N = int(cu[-1])
    for x in (torch.randn(1, 3, 8).expand(N, 3, 8), torch.randn(4 * N + 16).as_strided((N, 3, 8), (4, 2, 1))):
        assert_close(so.chunk_pool(x, cu, 4, mode, backend="cpp"), R.chunk_pool(x, cu, 4, mode))


@requires_ext
@pytest.mark.parametrize("mode", MODES)
def test_cpp_long_segments_exact_in_fp32(mode):
    """A long segment pooled to few slots (large windows): still within fp32 rounding."""
    cu = cu_seqlens([1000, 257, 1])
    x = torch.randn(int(cu[-1]), 2, 8)
    assert_close(so.chunk_pool(x, cu, 3, mode, backend="cpp"), R.chunk_pool(x, cu, 3, mode), dict(atol=1e-5, rtol=1e-5))


@pytest.mark.parametrize(
    "backend", [pytest.param("cpp", marks=requires_ext), "reference", pytest.param("triton", marks=TRITON)]
)
@pytest.mark.parametrize("mode", MODES)
def test_degenerate_shapes(backend, mode):
    # no segments at all
    out = so.chunk_pool(torch.randn(0, 2, 3), cu_seqlens([]), 4, mode, backend=backend)
    assert out.shape == (0, 2, 3)
    # only empty segments: zeros, not garbage
    out = run_twice(so.chunk_pool, torch.randn(0, 2, 3), cu_seqlens([0, 0, 0]), 4, mode, backend=backend)
    assert out.shape == (12, 2, 3) and torch.count_nonzero(out) == 0
    # P = 1: one row per segment
    cu = cu_seqlens([3, 0, 5])
    x = torch.randn(8, 1, 2)
    out = so.chunk_pool(x, cu, 1, mode, backend=backend)
    expected = torch.stack(
        [x[0:3].mean(0) if mode == "mean" else x[0], torch.zeros(1, 2), x[3:8].mean(0) if mode == "mean" else x[3]]
    )
    assert_close(out, expected)
    # no heads, or an empty head dim: empty outputs (and gradients) of the right shape
    for shape in ((8, 0, 3), (8, 2, 0)):
        xe = torch.randn(*shape, requires_grad=True)
        out = so.chunk_pool(xe, cu, 4, mode, backend=backend)
        assert out.shape == (12,) + shape[1:]
        (g,) = torch.autograd.grad(out, xe, torch.randn(out.shape))
        assert g.shape == shape


@requires_ext
def test_auto_backend_is_cpp_on_cpu():
    cu = cu_seqlens(LENGTHS)
    x = torch.randn(int(cu[-1]), 2, 8)
    assert so.ops.resolve_backend("chunk_pool", "auto", x.device, dict(x=x)) == "cpp"
    assert torch.equal(so.chunk_pool(x, cu, 4), so.chunk_pool(x, cu, 4, backend="cpp"))


# --------------------------------------------------------------------------------------------
# 3. gradients


KERNELS = [pytest.param("cpp", marks=requires_ext), pytest.param("triton", marks=TRITON)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradient_matches_reference(dtype, mode, layout, backend):
    cu = cu_seqlens(LENGTHS)
    P = 5
    x = strided_like((int(cu[-1]), 2, 33), dtype, layout)
    grad_out = torch.randn(len(LENGTHS) * P, 2, 33, dtype=dtype)
    grads = {}
    for name in (backend, "reference"):
        xr = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(so.chunk_pool(xr, cu, P, mode, backend=name), xr, grad_out)
        grads[name] = g
    assert grads[backend].dtype == dtype and grads[backend].shape == x.shape
    assert_finite(grads[backend], "grad_x")
    assert_close(grads[backend], grads["reference"])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_gradient_noncontiguous_grad_out(mode, backend):
    """The incoming gradient may be any view (here a broadcast and a transpose)."""
    cu = cu_seqlens(LENGTHS)
    P = 4
    x = torch.randn(int(cu[-1]), 2, 6)
    for grad_out in (
        torch.randn(1, 1, 6).expand(len(LENGTHS) * P, 2, 6),
        torch.randn(6, 2, len(LENGTHS) * P).permute(2, 1, 0),
    ):
        g = []
        for name in (backend, "reference"):
            xr = x.clone().requires_grad_()
            g.append(torch.autograd.grad(so.chunk_pool(xr, cu, P, mode, backend=name), xr, grad_out)[0])
        assert_close(g[0], g[1])


@requires_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpp_backward_op_direct(dtype, mode):
    """torch.ops.sharedllm.chunk_pool_backward is the vector-Jacobian product of the reference."""
    cu = cu_seqlens(LENGTHS)
    N, P = int(cu[-1]), 3
    x = torch.randn(N, 2, 40, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(len(LENGTHS) * P, 2, 40, dtype=dtype)
    (expected,) = torch.autograd.grad(R.chunk_pool(x, cu, P, mode), x, grad_out)
    got = run_twice(torch.ops.sharedllm.chunk_pool_backward, grad_out, cu, N, P, mode)
    assert_finite(got, "grad_x")
    assert_close(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradcheck_float64(mode):
    cu = cu_seqlens([0, 1, 3, 7, 2])
    x = torch.randn(int(cu[-1]), 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: R.chunk_pool(t, cu, 4, mode), (x,))


@requires_ext
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize("mode", MODES)
def test_cpp_gradcheck_float32(mode):
    """The C++ backward is the exact transpose of the forward (a linear map), checked numerically."""
    cu = cu_seqlens([0, 1, 3, 7, 2])
    x = torch.randn(int(cu[-1]), 2, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: so.chunk_pool(t, cu, 4, mode, backend="cpp"), (x,), eps=1e-2, atol=1e-3, rtol=1e-3
    )


# --------------------------------------------------------------------------------------------
# 4. opcheck


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_chunk_pool(mode, layout):
    cu = cu_seqlens([0, 1, 3, 7, 2])
    x = strided_like((int(cu[-1]), 2, 8), torch.float32, layout).requires_grad_()
    torch.library.opcheck(torch.ops.sharedllm.chunk_pool.default, (x, cu, 4, mode))


@requires_ext
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_chunk_pool_backward(mode):
    cu = cu_seqlens([0, 1, 3, 7, 2])
    grad_out = torch.randn(5 * 4, 2, 8)
    torch.library.opcheck(torch.ops.sharedllm.chunk_pool_backward.default, (grad_out, cu, int(cu[-1]), 4, mode))


# --------------------------------------------------------------------------------------------
# 5. bad inputs


def _good():
    cu = cu_seqlens([2, 0, 3])
    return dict(x=torch.randn(5, 2, 4), cu_seqlens=cu, tokens_per_node=2, mode="mean")


def _bad_cases():
    """(id, change to the good arguments, exception, regex the message must match)."""
    x = torch.randn(5, 2, 4)
    return [
        ("x_rank2", dict(x=torch.randn(5, 8)), ValueError, r"\bx\b.*\[N, H, D\]"),
        ("x_rank4", dict(x=torch.randn(5, 2, 4, 1)), ValueError, r"\bx\b"),
        ("x_float64", dict(x=x.double()), ValueError, r"\bx\b.*float32"),
        ("x_int", dict(x=torch.ones(5, 2, 4, dtype=torch.int32)), ValueError, r"\bx\b.*float32"),
        ("x_last_stride", dict(x=torch.randn(5, 2, 8)[:, :, ::2]), ValueError, r"\bx\b.*stride 1"),
        ("x_not_tensor", dict(x=[[1.0]]), TypeError, r"\bx\b"),
        ("cu_int64", dict(cu_seqlens=torch.tensor([0, 2, 2, 5])), ValueError, r"cu_seqlens.*int32"),
        ("cu_rank2", dict(cu_seqlens=cu_seqlens([2, 0, 3]).reshape(1, 4)), ValueError, r"cu_seqlens"),
        ("cu_empty", dict(cu_seqlens=torch.zeros(0, dtype=torch.int32)), ValueError, r"cu_seqlens"),
        ("cu_first_nonzero", dict(cu_seqlens=torch.tensor([1, 2, 2, 5], dtype=torch.int32)), ValueError,
         r"cu_seqlens\[0\]"),
        ("cu_decreasing", dict(cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), ValueError,
         r"cu_seqlens.*non-decreasing"),
        ("cu_last_short", dict(cu_seqlens=torch.tensor([0, 2, 2, 4], dtype=torch.int32)), ValueError,
         r"cu_seqlens\[-1\]"),
        ("cu_last_long", dict(cu_seqlens=torch.tensor([0, 2, 2, 9], dtype=torch.int32)), ValueError,
         r"cu_seqlens\[-1\]"),
        ("cu_negative", dict(cu_seqlens=torch.tensor([0, -2, 2, 5], dtype=torch.int32)), ValueError,
         r"cu_seqlens.*non-decreasing"),
        ("cu_meta_device", dict(cu_seqlens=cu_seqlens([2, 0, 3]).to("meta")), ValueError, r"cu_seqlens.*device"),
        ("P_zero", dict(tokens_per_node=0), ValueError, r"tokens_per_node"),
        ("P_negative", dict(tokens_per_node=-3), ValueError, r"tokens_per_node"),
        ("P_float", dict(tokens_per_node=2.0), TypeError, r"tokens_per_node"),
        ("mode_unknown", dict(mode="max"), ValueError, r"mode"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize(
    "backend", [pytest.param("cpp", marks=requires_ext), "reference", pytest.param("triton", marks=TRITON)]
)
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_public_rejects_bad_input(backend, change, exc, match):
    args = {**_good(), **change}
    with pytest.raises(exc, match=match):
        so.chunk_pool(args["x"], args["cu_seqlens"], args["tokens_per_node"], args["mode"], backend=backend)


@pytest.mark.parametrize("backend", ["gpu", "CPP", "", None])
def test_public_rejects_unknown_backend(backend):
    a = _good()
    with pytest.raises(ValueError, match="backend"):
        so.chunk_pool(a["x"], a["cu_seqlens"], 2, backend=backend)


# The C++ validation, reached directly (the public function never lets these through).
DIRECT = [c for c in BAD if c[0] not in ("x_not_tensor", "P_float", "cu_meta_device")]


@requires_ext
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in DIRECT], ids=[c[0] for c in DIRECT])
def test_op_rejects_bad_input(change, exc, match):
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        torch.ops.sharedllm.chunk_pool(a["x"], a["cu_seqlens"], a["tokens_per_node"], a["mode"])


@requires_ext
def test_op_rejects_device_mismatch_in_cpu_kernel():
    """The CPU kernel's own device check (reached by redispatching straight to it)."""
    a = _good()
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match=r"cu_seqlens.*device"):
        torch.ops.sharedllm.chunk_pool.default.redispatch(keyset, a["x"], a["cu_seqlens"].to("meta"), 2, "mean")
    go = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens.*device"):
        torch.ops.sharedllm.chunk_pool_backward.default.redispatch(
            keyset, go, a["cu_seqlens"].to("meta"), 5, 2, "mean"
        )


@requires_ext
def test_op_rejects_device_mismatch():
    """With x on CPU and cu_seqlens on "meta", the dispatcher picks the Meta kernel, i.e. the fake
    implementation, which must reject the device mismatch (it once returned an uninitialised CPU
    tensor)."""
    a = _good()
    with pytest.raises((ValueError, RuntimeError), match=r"cu_seqlens|device"):
        out = torch.ops.sharedllm.chunk_pool(a["x"], a["cu_seqlens"].to("meta"), 2, "mean")
        pytest.fail(f"no error; returned a {out.device} tensor of uninitialised memory")


@requires_ext
def test_backward_op_rejects_bad_input():
    cu = cu_seqlens([2, 0, 3])
    go = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match=r"grad_out.*rows"):
        torch.ops.sharedllm.chunk_pool_backward(torch.randn(7, 2, 4), cu, 5, 2, "mean")
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\].*num_rows"):
        torch.ops.sharedllm.chunk_pool_backward(go, cu, 6, 2, "mean")
    with pytest.raises(ValueError, match=r"grad_out.*float32"):
        torch.ops.sharedllm.chunk_pool_backward(go.double(), cu, 5, 2, "mean")
    with pytest.raises(ValueError, match=r"grad_out.*\[N, H, D\]"):
        torch.ops.sharedllm.chunk_pool_backward(torch.randn(6, 8), cu, 5, 2, "mean")
    with pytest.raises(ValueError, match=r"tokens_per_node"):
        torch.ops.sharedllm.chunk_pool_backward(go, cu, 5, 0, "mean")
    with pytest.raises(ValueError, match=r"mode"):
        torch.ops.sharedllm.chunk_pool_backward(go, cu, 5, 2, "sum")


@requires_ext
def test_error_messages_state_expectation():
    """Messages say what was expected and what was got, not only the name."""
    a = _good()
    with pytest.raises(ValueError) as info:
        torch.ops.sharedllm.chunk_pool(a["x"], torch.tensor([0, 2, 2, 4], dtype=torch.int32), 2, "mean")
    msg = str(info.value)
    assert re.search(r"x\.shape\[0\] = 5", msg) and "got 4" in msg


# --------------------------------------------------------------------------------------------
# 6. the Triton kernel against the reference (CPU tensors, Triton's interpreter: tiny shapes)

# (P, D, layout): in float32 every pair of P in {4, 7}, D in {33 (odd: a masked block), 64 (a power
# of two)} and both layouts appears once; the 16-bit dtypes take two of them, which still hold every
# value of each (the interpreter is slow)
TRITON_SHAPES = [(4, 33, "contiguous"), (7, 64, "padded"), (4, 64, "padded"), (7, 33, "contiguous")]
TRITON_CASES = [
    (dtype, *shape) for dtype in DTYPES for shape in (TRITON_SHAPES if dtype == torch.float32 else TRITON_SHAPES[:2])
]


@TRITON
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "dtype,P,D,layout", TRITON_CASES, ids=[f"{dtype_id(t)}-P{p}-D{d}-{lay}" for t, p, d, lay in TRITON_CASES]
)
def test_triton_matches_reference(dtype, P, D, layout, mode):
    cu = cu_seqlens(LENGTHS)
    x = strided_like((int(cu[-1]), 2, D), dtype, layout)
    # poisoned outputs in float32 (which elements are written does not depend on the dtype)
    call = run_twice if dtype == torch.float32 else (lambda fn, *a, **kw: fn(*a, **kw))
    out = call(so.chunk_pool, x, cu, P, mode, backend="triton")
    expected = so.chunk_pool(x, cu, P, mode, backend="reference")
    assert out.dtype == dtype and out.shape == (len(LENGTHS) * P, 2, D)
    assert_finite(out)
    if mode == "first":  # a copy of input rows: exact in every dtype
        assert torch.equal(out, expected)
    else:
        assert_close(out, expected)
    # empty segments give exact zeros
    for s, n in enumerate(LENGTHS):
        if n == 0:
            assert torch.count_nonzero(out[s * P : (s + 1) * P]) == 0


@TRITON
@pytest.mark.parametrize("mode", MODES)
def test_triton_other_strides(mode):
    """Head-major storage, broadcast rows (stride 0) and overlapping rows."""
    cu = cu_seqlens(LENGTHS)
    N = int(cu[-1])
    for x in (
        strided_like((N, 2, 16), torch.float32, "transposed"),
        torch.randn(1, 2, 8).expand(N, 2, 8),
        torch.randn(4 * N + 16).as_strided((N, 2, 8), (4, 2, 1)),
    ):
        assert_close(so.chunk_pool(x, cu, 3, mode, backend="triton"), R.chunk_pool(x, cu, 3, mode))


@TRITON
def test_triton_long_segments_exact_in_fp32():
    """A long segment pooled to few slots (windows of hundreds of rows): within fp32 rounding."""
    cu = cu_seqlens([1000, 257, 1])
    x = torch.randn(int(cu[-1]), 1, 8)
    assert_close(so.chunk_pool(x, cu, 3, "mean", backend="triton"), R.chunk_pool(x, cu, 3, "mean"))


@requires_ext
@TRITON
def test_auto_prefers_cpp_over_triton_on_cpu():
    """Under the interpreter Triton could run on CPU tensors, but auto still picks the C++ kernel."""
    from sharedllm_ops.core.dispatch import resolve_backend

    assert resolve_backend("chunk_pool", "auto", torch.device("cpu")) == "cpp"
    cu = cu_seqlens(LENGTHS)
    x = torch.randn(int(cu[-1]), 2, 8)
    assert so.ops.resolve_backend("chunk_pool", "auto", x.device, dict(x=x)) == "cpp"
    assert torch.equal(so.chunk_pool(x, cu, 4), so.chunk_pool(x, cu, 4, backend="cpp"))


@TRITON
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_backward_op_direct(dtype, mode):
    """torch.ops.sharedllm_triton.chunk_pool_backward is the vector-Jacobian product of the reference,
    and writes every row of grad_x (rows in no window of "first" get exact zeros)."""
    cu = cu_seqlens(LENGTHS)
    N, P = int(cu[-1]), 3
    x = torch.randn(N, 2, 40, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(len(LENGTHS) * P, 2, 40, dtype=dtype)
    (expected,) = torch.autograd.grad(R.chunk_pool(x, cu, P, mode), x, grad_out)
    call = run_twice if dtype == torch.float32 else (lambda fn, *a, **kw: fn(*a, **kw))
    got = call(torch.ops.sharedllm_triton.chunk_pool_backward, grad_out, cu, N, P, mode)
    assert got.dtype == dtype
    assert_finite(got, "grad_x")
    assert_close(got, expected)
    if mode == "first":
        assert torch.equal(got == 0, expected == 0)


@TRITON
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize("mode", MODES)
def test_triton_gradcheck_float32(mode):
    """The backward is the transpose of the forward (a linear map), checked numerically (fast mode:
    a few forward calls instead of two per input element)."""
    cu = cu_seqlens([0, 1, 3, 7, 2])
    x = torch.randn(int(cu[-1]), 2, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: so.chunk_pool(t, cu, 4, mode, backend="triton"), (x,), eps=1e-2, atol=1e-3, rtol=1e-3,
        fast_mode=True,
    )


@TRITON
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
@pytest.mark.parametrize("mode", MODES)
def test_triton_opcheck_chunk_pool(mode, layout):
    cu = cu_seqlens([0, 1, 3, 7, 2])
    x = strided_like((int(cu[-1]), 2, 8), torch.float32, layout).requires_grad_()
    torch.library.opcheck(torch.ops.sharedllm_triton.chunk_pool.default, (x, cu, 4, mode))


@TRITON
@pytest.mark.parametrize("mode", MODES)
def test_triton_opcheck_chunk_pool_backward(mode):
    cu = cu_seqlens([0, 1, 3, 7, 2])
    grad_out = torch.randn(5 * 4, 2, 8)
    torch.library.opcheck(
        torch.ops.sharedllm_triton.chunk_pool_backward.default, (grad_out, cu, int(cu[-1]), 4, mode)
    )


@TRITON
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in DIRECT], ids=[c[0] for c in DIRECT])
def test_triton_op_rejects_bad_input(change, exc, match):
    """The Triton op reached directly validates like the C++ op (the public function checks most of
    these before dispatching)."""
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        torch.ops.sharedllm_triton.chunk_pool(a["x"], a["cu_seqlens"], a["tokens_per_node"], a["mode"])


@TRITON
def test_triton_op_rejects_device_mismatch():
    """A "meta" cu_seqlens with a CPU x dispatches to the fake kernel, which must reject it."""
    a = _good()
    with pytest.raises(ValueError, match=r"cu_seqlens.*device"):
        torch.ops.sharedllm_triton.chunk_pool(a["x"], a["cu_seqlens"].to("meta"), 2, "mean")
    with pytest.raises(ValueError, match=r"cu_seqlens.*device"):
        torch.ops.sharedllm_triton.chunk_pool_backward(torch.randn(6, 2, 4), a["cu_seqlens"].to("meta"), 5, 2, "mean")


@TRITON
def test_triton_backward_op_rejects_bad_input():
    cu = cu_seqlens([2, 0, 3])
    go = torch.randn(6, 2, 4)
    op = torch.ops.sharedllm_triton.chunk_pool_backward
    with pytest.raises(ValueError, match=r"grad_out.*S \* P = 6.*\(7, 2, 4\)"):
        op(torch.randn(7, 2, 4), cu, 5, 2, "mean")
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\].*num_rows = 6"):
        op(go, cu, 6, 2, "mean")
    with pytest.raises(ValueError, match=r"cu_seqlens.*non-decreasing"):
        op(go, torch.tensor([0, 3, 2, 5], dtype=torch.int32), 5, 2, "mean")
    with pytest.raises(ValueError, match=r"grad_out.*float32"):
        op(go.double(), cu, 5, 2, "mean")
    with pytest.raises(ValueError, match=r"grad_out.*\[S \* P, H, D\]"):
        op(torch.randn(6, 8), cu, 5, 2, "mean")
    with pytest.raises(ValueError, match=r"tokens_per_node"):
        op(go, cu, 5, 0, "mean")
    with pytest.raises(ValueError, match=r"mode"):
        op(go, cu, 5, 2, "sum")
    with pytest.raises(ValueError, match=r"cu_seqlens.*int32"):
        op(go, cu.long(), 5, 2, "mean")
