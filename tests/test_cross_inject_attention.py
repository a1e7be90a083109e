"""cross_inject_attention and merge_attention (docs/DESIGN.md section 3.3): reference vs SDPA / explicit scores,
C++ vs reference over a grid, gradients, opcheck and input validation."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ATTN_TOL,
    DTYPES,
    assert_close,
    assert_finite,
    cu_seqlens,
    dtype_id,
    grad_tol,
    poison_allocator,
    requires_ext,
    requires_triton,
    rotary_tables,
    run_twice,
)

import sharedllm_ops as so
from sharedllm_ops import reference as R

# per sequence: queries and keys; includes a sequence without queries (1), one without keys (2),
# single-token ones (3: one query, 5: one key) and a longer one (4)
LQ = [3, 0, 5, 1, 17, 2]
LK = [4, 3, 0, 7, 40, 1]
# the compiled backends that share a check with the same inputs
KERNELS = [pytest.param("cpp", marks=requires_ext),
           pytest.param("triton", marks=requires_triton("cross_inject_attention"))]


def independent_rope(x, positions, dim, base=10000.0):
    """HF rotary as explicit 2-D rotations of the pairs (i, i + D/2), angles from inv_freq (not the
    tables): x'_i = x_i cos - x_{i+h} sin, x'_{i+h} = x_{i+h} cos + x_i sin."""
    half = dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    theta = positions.double()[:, None] * inv_freq[None, :]  # [N, D/2]
    c, s = theta.cos()[:, None, :], theta.sin()[:, None, :]
    x = x.double()
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def make_inputs(lq, lk, hq, hk, d, dv=None, dtype=torch.float32, layout="contiguous", rotary=False, max_pos=64):
    """q, k, v, cu_q, cu_k and rotary kwargs (dict, empty without rotary)."""
    dv = d if dv is None else dv
    nq, nk = sum(lq), sum(lk)
    if layout == "contiguous":
        q, k, v = torch.randn(nq, hq, d, dtype=dtype), torch.randn(nk, hk, d, dtype=dtype), torch.randn(nk, hk, dv, dtype=dtype)
    elif layout == "fused":  # one fused projection output [N, Hq + 2 Hk, D]
        assert dv == d
        qkv = torch.randn(max(nq, nk), hq + 2 * hk, d, dtype=dtype)
        q, k, v = qkv[:nq, :hq], qkv[:nk, hq : hq + hk], qkv[:nk, hq + hk :]
    elif layout == "padded":  # rows and heads further apart than their sizes
        q = torch.randn(nq, hq + 1, d + 6, dtype=dtype)[:, 1:, 3 : d + 3]
        k = torch.randn(nk, hk, d + 2, dtype=dtype)[:, :, :d]
        v = torch.randn(nk, hk + 2, dv + 9, dtype=dtype)[:, 2:, 1 : dv + 1]
    elif layout == "transposed":  # dense, stored head-major
        q = torch.randn(hq, nq, d, dtype=dtype).transpose(0, 1)
        k = torch.randn(hk, nk, d, dtype=dtype).transpose(0, 1)
        v = torch.randn(hk, nk, dv, dtype=dtype).transpose(0, 1)
    else:
        raise ValueError(layout)
    extra = {}
    if rotary:
        cos, sin = rotary_tables(max_pos, d, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        extra = dict(
            q_positions=torch.randint(0, max_pos, (nq,), dtype=torch.int32),
            k_positions=torch.randint(0, max_pos, (nk,), dtype=torch.int32),
            rotary_cos=cos,
            rotary_sin=sin,
        )
    return q, k, v, cu_seqlens(lq), cu_seqlens(lk), extra


def sdpa_oracle(q, k, v, lq, lk, scale=None, extra=None, use_enable_gqa=True):
    """out, lse in float64, one torch SDPA call per sequence; lse from explicit scores."""
    nq, hq, d = q.shape
    hk, dv = k.shape[1], v.shape[2]
    scale = d**-0.5 if scale is None else scale
    if extra:
        qf = independent_rope(q, extra["q_positions"], d)
        kf = independent_rope(k, extra["k_positions"], d)
    else:
        qf, kf = q.double(), k.double()
    vf = v.double()
    out = torch.zeros(nq, hq, dv, dtype=torch.float64)
    lse = torch.full((nq, hq), -math.inf, dtype=torch.float64)
    q0 = k0 = 0
    for nq_b, nk_b in zip(lq, lk):
        qs, ks = slice(q0, q0 + nq_b), slice(k0, k0 + nk_b)
        q0, k0 = q0 + nq_b, k0 + nk_b
        if nq_b == 0 or nk_b == 0:
            continue
        qb = qf[qs].transpose(0, 1)  # [Hq, Lq, D]
        kb, vb = kf[ks].transpose(0, 1), vf[ks].transpose(0, 1)  # [Hk, Lk, *]
        if use_enable_gqa:
            ob = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)
        else:
            g = hq // hk
            ob = F.scaled_dot_product_attention(
                qb, kb.repeat_interleave(g, dim=0), vb.repeat_interleave(g, dim=0), scale=scale
            )
        out[qs] = ob.transpose(0, 1)
        scores = torch.einsum("qhd,khd->hqk", qf[qs], kf[ks].repeat_interleave(hq // hk, dim=1)) * scale
        lse[qs] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
    return out, lse


def check_empty_sequences(out, lse, lq, lk):
    q0 = 0
    for nq_b, nk_b in zip(lq, lk):
        if nk_b == 0:
            assert torch.count_nonzero(out[q0 : q0 + nq_b]) == 0, "a sequence without keys must give out = 0"
            assert torch.all(lse[q0 : q0 + nq_b] == -math.inf), "a sequence without keys must give lse = -inf"
        else:
            assert torch.isfinite(lse[q0 : q0 + nq_b]).all()
        q0 += nq_b


# --------------------------------------------------------------------------------------------
# 1. the reference against independent formulations


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_reference_matches_sdpa(dtype, hq, hk, rotary):
    d = 16
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, hq, hk, d, dv=12 if not rotary else None, dtype=dtype, rotary=rotary)
    out, lse = R.cross_inject_attention(q, k, v, cq, ck, None, return_lse=True, **extra)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for gqa in (True, False):
        exp_out, exp_lse = sdpa_oracle(q, k, v, LQ, LK, extra=extra, use_enable_gqa=gqa)
        assert_close(out, exp_out, tol)
        torch.testing.assert_close(lse.double(), exp_lse, **tol)  # -inf rows compare equal
    check_empty_sequences(out, lse, LQ, LK)


def test_reference_softmax_scale():
    q, k, v, cq, ck, _ = make_inputs(LQ, LK, 2, 1, 8, dtype=torch.float64)
    for scale in (0.0, 0.1, 3.0):
        out, lse = R.cross_inject_attention(q, k, v, cq, ck, scale, return_lse=True)
        exp_out, exp_lse = sdpa_oracle(q, k, v, LQ, LK, scale=scale)
        assert_close(out, exp_out)
        torch.testing.assert_close(lse, exp_lse)
    # scale 0: uniform weights, lse = log(number of keys)
    out, lse = R.cross_inject_attention(q, k, v, cq, ck, 0.0, return_lse=True)
    assert math.isclose(float(lse[0, 0]), math.log(LK[0]), rel_tol=1e-12)


def test_reference_rotary_helpers_match_independent():
    """apply_rotary against rotations by angles computed from inv_freq; its transpose is the rotation
    by the opposite angles (the negated positions)."""
    d = 10
    cos, sin = rotary_tables(30, d, dtype=torch.float64)
    x = torch.randn(7, 3, d, dtype=torch.float64)
    pos = torch.randint(0, 30, (7,), dtype=torch.int32)
    torch.testing.assert_close(R.apply_rotary(x, pos, cos, sin), independent_rope(x, pos, d))
    torch.testing.assert_close(R.apply_rotary(x, pos, cos, sin, transpose=True), independent_rope(x, -pos, d))
    # position 0 is the identity
    assert_close(R.apply_rotary(x, torch.zeros(7, dtype=torch.int32), cos, sin), x, dict(atol=0, rtol=0))


def test_rotary_is_complex_multiplication():
    """Each pair (x_i, x_{i+D/2}) is the complex number z = x_i + i x_{i+D/2}: rotate_half is z * i, its
    transpose z * (-i), and the rotation by theta z * e^{i theta} (the inverse z * e^{-i theta}); rotations
    keep norms and compose by adding their angles."""
    half = 5
    x = torch.randn(7, 3, 2 * half, dtype=torch.float64)
    z = torch.complex(x[..., :half], x[..., half:])

    def pairs(w):
        return torch.cat((w.real, w.imag), dim=-1)

    def tables(theta):  # both halves of the head dim share the angles (the rotate_half layout)
        return torch.cat((theta.cos(), theta.cos()), -1), torch.cat((theta.sin(), theta.sin()), -1)

    exact = dict(atol=1e-12, rtol=1e-12)
    assert_close(R.rotate_half(x), pairs(z * 1j), exact)
    assert_close(R.rotate_half_transposed(x), pairs(z * -1j), exact)
    a, b = torch.rand(7, 1, half, dtype=torch.float64) * 7, torch.rand(7, 3, half, dtype=torch.float64) * 7
    assert_close(R.rotate(x, *tables(a)), pairs(z * torch.polar(torch.ones_like(a), a)), exact)
    assert_close(R.rotate(x, *tables(a), inverse=True), pairs(z * torch.polar(torch.ones_like(a), -a)), exact)
    assert_close(R.rotate(x, *tables(a)).norm(dim=-1), x.norm(dim=-1), exact)
    assert_close(R.rotate(R.rotate(x, *tables(a)), *tables(b)), R.rotate(x, *tables(a + b)), exact)
    assert_close(R.rotate(R.rotate(x, *tables(a)), *tables(a), inverse=True), x, exact)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_ext), "reference"])
def test_rotary_depends_only_on_relative_positions(backend):
    """Shifting every query and key position by the same amount leaves the scores unchanged."""
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, 4, 2, 32, rotary=True, max_pos=40)
    shifted = dict(extra, q_positions=extra["q_positions"] % 20, k_positions=extra["k_positions"] % 20)
    moved = dict(shifted, q_positions=shifted["q_positions"] + 17, k_positions=shifted["k_positions"] + 17)
    a, la = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend, **shifted)
    b, lb = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend, **moved)
    assert_close(a, b, dict(atol=1e-4, rtol=1e-4))
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    # and the rotary does something: different relative positions change the result
    c = so.cross_inject_attention(q, k, v, cq, ck, backend=backend, **dict(shifted, q_positions=shifted["q_positions"] + 1))
    assert (c - a).abs().max() > 1e-3


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_ext), "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_merge_attention_equals_attention_over_union(backend, dtype):
    """Split each sequence's keys in two, attend to each with return_lse, merge: equals attending
    to all keys. Splits include an empty side (lse = -inf) and sequences without any key."""
    lk = [6, 3, 0, 7, 40, 1]
    split = [0, 3, 0, 2, 23, 1]  # keys of side A per sequence; side A empty for seq 0, B empty for seq 1, 5
    q, k, v, cq, ck, extra = make_inputs(LQ, lk, 4, 2, 32, dtype=dtype, rotary=True)
    idx_a, idx_b = [], []
    k0 = 0
    for n, a in zip(lk, split):
        idx_a += range(k0, k0 + a)
        idx_b += range(k0 + a, k0 + n)
        k0 += n
    idx_a, idx_b = torch.tensor(idx_a, dtype=torch.long), torch.tensor(idx_b, dtype=torch.long)
    kp = extra["k_positions"]

    def attend(idx, lens):
        kw = dict(extra, k_positions=kp[idx].contiguous())
        return so.cross_inject_attention(q, k[idx], v[idx], cq, cu_seqlens(lens), return_lse=True, backend=backend, **kw)

    out_a, lse_a = attend(idx_a, split)
    out_b, lse_b = attend(idx_b, [n - a for n, a in zip(lk, split)])
    assert torch.isinf(lse_a[:3]).all()  # sequence 0 has no keys on side A
    out, lse = so.merge_attention(out_a, lse_a, out_b, lse_b)
    full_out, full_lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend, **extra)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, full_out, ATTN_TOL[dtype])
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    check_empty_sequences(out, lse, LQ, lk)
    assert_finite(out)


def test_merge_attention_both_sides_empty_and_symmetric():
    out_a, out_b = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    lse_a = torch.tensor([[-math.inf, 0.5], [1.0, -math.inf], [-math.inf, -math.inf]])
    lse_b = torch.tensor([[0.3, 0.5], [-math.inf, -math.inf], [-math.inf, 2.0]])
    out_a[2, 0] = 0
    out_b[2, 0] = 0
    out_b[1] = 0
    out, lse = so.merge_attention(out_a, lse_a, out_b, lse_b)
    assert_finite(out)
    assert torch.equal(out[2, 0], torch.zeros(4)) and lse[2, 0] == -math.inf  # nothing on either side
    assert_close(out[0, 0], out_b[0, 0])  # only B
    assert_close(out[1, 0], out_a[1, 0])  # only A
    assert_close(out[0, 1], (out_a[0, 1] + out_b[0, 1]) / 2)  # equal weights
    assert math.isclose(float(lse[0, 1]), 0.5 + math.log(2), rel_tol=1e-6)
    out2, lse2 = so.merge_attention(out_b, lse_b, out_a, lse_a)
    assert_close(out2, out)
    assert torch.equal(lse2, lse)


def test_merge_attention_gradients():
    """merge_attention is differentiable: its gradients match finite differences where lse is finite."""
    out_a, out_b = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    lse_a, lse_b = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    assert torch.autograd.gradcheck(lambda *t: so.merge_attention(*t), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_merge_attention_gradients_with_empty_rows_are_finite(dtype):
    """Where both sides are empty (lse_a = lse_b = -inf, out = 0) the output is the constant 0, so
    the gradients w.r.t. lse_a and lse_b are 0, not NaN (the backward of logaddexp(-inf, -inf),
    which merge_attention once used)."""
    out_a = torch.randn(2, 1, 3, dtype=dtype, requires_grad=True)
    out_b = torch.randn(2, 1, 3, dtype=dtype, requires_grad=True)
    lse_a = torch.tensor([[-math.inf], [0.3]], dtype=dtype, requires_grad=True)
    lse_b = torch.tensor([[-math.inf], [-math.inf]], dtype=dtype, requires_grad=True)
    out, _ = so.merge_attention(out_a, lse_a, out_b, lse_b)
    grads = torch.autograd.grad(out.sum(), (out_a, lse_a, out_b, lse_b))
    for name, g in zip(("out_a", "lse_a", "out_b", "lse_b"), grads):
        assert torch.isfinite(g).all(), f"grad of {name} = {g.flatten().tolist()}"
    assert grads[1][0, 0] == 0 and grads[3][0, 0] == 0


def test_merge_attention_rejects_bad_input():
    o, l = torch.randn(3, 2, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="out_b"):
        so.merge_attention(o, l, torch.randn(3, 2, 5), l)
    with pytest.raises(ValueError, match="lse_b"):
        so.merge_attention(o, l, o, torch.randn(3, 3))
    with pytest.raises(ValueError, match="lse_a"):
        so.merge_attention(o, torch.randn(3), o, l)
    with pytest.raises(ValueError, match="out_a"):
        so.merge_attention(torch.randn(3, 8), l, o, l)
    with pytest.raises(ValueError, match="out_b"):
        so.merge_attention(o, l, o.half(), l)
    with pytest.raises(ValueError, match="lse_a"):
        so.merge_attention(o, l.to("meta"), o, l)
    with pytest.raises(TypeError, match="out_a"):
        so.merge_attention(None, l, o, l)


# --------------------------------------------------------------------------------------------
# 2. the C++ kernel against the reference

CONFIGS = [  # (D, Dv, rotary)
    (64, 64, False),
    (64, 64, True),
    (128, 128, True),
    (40, 40, True),
    (72, 72, False),
    (33, 33, False),
    (32, 48, True),
]


LAYOUT_CONFIGS = [  # a fused qkv projection has one head dim
    pytest.param(layout, d, dv, rotary, id=f"{layout}-d{d}-dv{dv}-{'rot' if rotary else 'plain'}")
    for layout in ("contiguous", "fused", "padded", "transposed")
    for d, dv, rotary in CONFIGS
    if not (layout == "fused" and d != dv)
]


@requires_ext
@pytest.mark.parametrize("layout,d,dv,rotary", LAYOUT_CONFIGS)
@pytest.mark.parametrize("hq,hk", [(2, 2), (6, 2), (8, 1)], ids=["mha", "gqa3", "gqa8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpp_matches_reference(dtype, hq, hk, layout, d, dv, rotary):
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, hq, hk, d, dv, dtype=dtype, layout=layout, rotary=rotary)
    out, lse = run_twice(so.cross_inject_attention, q, k, v, cq, ck, return_lse=True, backend="cpp", **extra)
    ref_out, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="reference", **extra)
    assert out.shape == (sum(LQ), hq, dv) and out.dtype == dtype
    assert lse.shape == (sum(LQ), hq) and lse.dtype == torch.float32
    assert_finite(out)
    assert_close(out, ref_out, ATTN_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    check_empty_sequences(out, lse, LQ, LK)
    # without return_lse: the same output alone
    assert torch.equal(so.cross_inject_attention(q, k, v, cq, ck, backend="cpp", **extra), out)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_ext), "reference",
                                     pytest.param("triton", marks=requires_triton("cross_inject_attention"))])
def test_noncontiguous_index_tensors(backend):
    """cu_seqlens, positions and rotary tables may be strided views (against float64 SDPA with the
    rotary computed from angles)."""
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, 4, 2, 16, rotary=True)
    spread = lambda t: torch.stack((t, torch.full_like(t, -7)), dim=1).flatten()[::2]  # noqa: E731
    views = dict(
        q_positions=spread(extra["q_positions"]),
        k_positions=spread(extra["k_positions"]),
        rotary_cos=torch.cat((extra["rotary_cos"], torch.zeros_like(extra["rotary_cos"])), 1)[:, :16],
        rotary_sin=torch.cat((extra["rotary_sin"], torch.zeros_like(extra["rotary_sin"])), 1)[:, :16],
    )
    assert not any(t.is_contiguous() for t in views.values())
    cqv, ckv = spread(cq), spread(ck)
    assert not cqv.is_contiguous()
    out, lse = so.cross_inject_attention(q, k, v, cqv, ckv, return_lse=True, backend=backend, **views)
    ref_out, ref_lse = sdpa_oracle(q, k, v, LQ, LK, extra=extra)
    assert_close(out, ref_out, ATTN_TOL[torch.float32])
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_broadcast_and_overlapping_kv(dtype, backend):
    """k/v whose rows are broadcast (stride 0), heads broadcast, or rows overlapping in memory
    (row stride < D: the fp32 path must not hand them to the GEMM as a matrix)."""
    lq, lk = [3, 0, 5], [4, 300, 2]
    nq, nk = sum(lq), sum(lk)
    q, cq, ck = torch.randn(nq, 4, 16, dtype=dtype), cu_seqlens(lq), cu_seqlens(lk)
    cases = [
        (torch.randn(1, 2, 16, dtype=dtype).expand(nk, 2, 16), torch.randn(1, 2, 16, dtype=dtype).expand(nk, 2, 16)),
        (torch.randn(nk, 1, 16, dtype=dtype).expand(nk, 2, 16), torch.randn(nk, 1, 16, dtype=dtype).expand(nk, 2, 16)),
        (torch.randn(4 * nk + 16, dtype=dtype).as_strided((nk, 2, 16), (4, 2, 1)),
         torch.randn(3 * nk + 16, dtype=dtype).as_strided((nk, 2, 16), (3, 1, 1))),
    ]
    for k, v in cases:
        out = so.cross_inject_attention(q, k, v, cq, ck, backend=backend)
        assert_close(out, R.cross_inject_attention(q, k, v, cq, ck), ATTN_TOL[dtype])


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpp_multiple_tiles(dtype):
    """Sequences longer than one query tile (256 rows / G) and one key block (256 keys)."""
    lq, lk = [300, 5, 70], [600, 1, 257]
    q, k, v, cq, ck, extra = make_inputs(lq, lk, 8, 2, 32, dtype=dtype, rotary=True, max_pos=1000)
    out, lse = run_twice(so.cross_inject_attention, q, k, v, cq, ck, return_lse=True, backend="cpp", **extra)
    ref_out, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="reference", **extra)
    assert_close(out, ref_out, ATTN_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("magnitude", [10.0, 60.0])
def test_large_scores_are_stable(magnitude, backend):
    """Large logits (peaked softmax): online softmax must not overflow or lose the max."""
    q, k, v, cq, ck, _ = make_inputs([4, 9], [300, 17], 4, 2, 16)
    q = q * magnitude
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend)
    ref_out, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="reference")
    assert_finite(out)
    assert_close(out, ref_out, dict(atol=1e-4, rtol=1e-4))
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("scale", [0.0, 0.05, 1.0])
def test_softmax_scale(scale, backend):
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, 4, 2, 16, rotary=True)
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, scale, return_lse=True, backend=backend, **extra)
    ref_out, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, scale, return_lse=True, backend="reference", **extra)
    assert_close(out, ref_out, ATTN_TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float16])
def test_rotary_table_dtype(table_dtype, backend):
    """Rotary tables in another float dtype than q are accepted and used as the same values."""
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, 4, 2, 16, rotary=True)
    extra = dict(extra, rotary_cos=extra["rotary_cos"].to(table_dtype), rotary_sin=extra["rotary_sin"].to(table_dtype))
    out = so.cross_inject_attention(q, k, v, cq, ck, backend=backend, **extra)
    ref = so.cross_inject_attention(q, k, v, cq, ck, backend="reference", **extra)
    assert_close(out, ref, ATTN_TOL[torch.float32])


@requires_ext
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_degenerate_shapes(backend):
    # no queries at all
    q, k, v, cq, ck, _ = make_inputs([0, 0], [3, 2], 2, 1, 8)
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)
    # no keys at all
    q, k, v, cq, ck, _ = make_inputs([3, 2], [0, 0], 2, 1, 8)
    out, lse = run_twice(so.cross_inject_attention, q, k, v, cq, ck, return_lse=True, backend=backend)
    assert torch.count_nonzero(out) == 0 and (lse == -math.inf).all()
    # no sequences
    q, k, v, cq, ck, _ = make_inputs([], [], 2, 1, 8)
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 8)


@requires_ext
def test_auto_backend_is_cpp_on_cpu():
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, 4, 2, 16, rotary=True)
    assert so.ops.resolve_backend("cross_inject_attention", "auto", q.device, dict(q=q, k=k, v=v)) == "cpp"
    assert torch.equal(
        so.cross_inject_attention(q, k, v, cq, ck, **extra),
        so.cross_inject_attention(q, k, v, cq, ck, backend="cpp", **extra),
    )


# --------------------------------------------------------------------------------------------
# 3. gradients


def _grads(backend, q, k, v, cq, ck, extra, grad_out, grad_lse):
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = so.cross_inject_attention(qr, kr, vr, cq, ck, return_lse=True, backend=backend, **extra)
    loss = 0.0
    if grad_out is not None:
        loss = loss + (out.float() * grad_out.float()).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * grad_lse).sum()
    # (through the lse alone, the reference graph does not use v: its gradient is zero)
    dq, dk, dv = torch.autograd.grad(loss, (qr, kr, vr), allow_unused=True, materialize_grads=True)
    return dq, dk, dv


@requires_ext
@pytest.mark.parametrize("through", ["out", "out+lse", "lse"])
@pytest.mark.parametrize("hq,hk,layout", [(4, 4, "contiguous"), (6, 2, "fused"), (8, 1, "padded")], ids=["mha", "gqa3-fused", "gqa8-padded"])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpp_gradients_match_reference(dtype, rotary, hq, hk, layout, through):
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, hq, hk, 32, dtype=dtype, layout=layout, rotary=rotary)
    grad_out = torch.randn(sum(LQ), hq, 32, dtype=dtype) if "out" in through else None
    grad_lse = torch.randn(sum(LQ), hq) if "lse" in through else None
    poison_allocator()
    got = _grads("cpp", q, k, v, cq, ck, extra, grad_out, grad_lse)
    ref = _grads("reference", q, k, v, cq, ck, extra, grad_out, grad_lse)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert g.dtype == dtype and g.shape == r.shape
        assert_finite(g, name)
        assert_close(g, r, grad_tol(dtype, float(r.abs().max())), msg=name)
    # keys of the sequence without queries, queries of the sequence without keys: zero gradient
    assert torch.count_nonzero(got[1][4:7]) == 0 and torch.count_nonzero(got[2][4:7]) == 0
    assert torch.count_nonzero(got[0][3:8]) == 0
    if through == "lse":
        assert torch.count_nonzero(got[2]) == 0  # the lse does not depend on v


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpp_gradients_multiple_tiles(dtype):
    lq, lk = [300, 5, 70], [600, 1, 257]
    q, k, v, cq, ck, extra = make_inputs(lq, lk, 8, 2, 32, dtype=dtype, rotary=True, max_pos=1000)
    grad_out, grad_lse = torch.randn(sum(lq), 8, 32, dtype=dtype), torch.randn(sum(lq), 8)
    got = _grads("cpp", q, k, v, cq, ck, extra, grad_out, grad_lse)
    ref = _grads("reference", q, k, v, cq, ck, extra, grad_out, grad_lse)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert_close(g, r, grad_tol(dtype, float(r.abs().max())), msg=name)


@requires_ext
@pytest.mark.parametrize("threads", [1, 64], ids=["one_pass_dq", "two_pass_dq"])
def test_cpp_gradients_both_backward_schedules(threads):
    """The backward accumulates dQ in its dK/dV pass when (sequences x kv heads) can keep every
    thread busy, and in a second pass otherwise; the thread count picks one, both must agree."""
    lq, lk = [300, 0, 70], [600, 40, 0]
    q, k, v, cq, ck, extra = make_inputs(lq, lk, 6, 2, 32, rotary=True, max_pos=1000)
    grad_out, grad_lse = torch.randn(sum(lq), 6, 32), torch.randn(sum(lq), 6)
    ref = _grads("reference", q, k, v, cq, ck, extra, grad_out, grad_lse)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _grads("cpp", q, k, v, cq, ck, extra, grad_out, grad_lse)
    finally:
        torch.set_num_threads(before)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert_close(g, r, grad_tol(torch.float32, float(r.abs().max())), msg=name)


@requires_ext
def test_cpp_backward_op_direct_is_deterministic_and_written():
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, 6, 2, 16, rotary=True)
    args_rot = (extra["q_positions"], extra["k_positions"], extra["rotary_cos"], extra["rotary_sin"])
    out, lse = torch.ops.sharedllm.cross_inject_attention(q, k, v, cq, ck, 0.25, *args_rot)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    for gl in (grad_lse, None):
        dq, dk, dv = run_twice(
            torch.ops.sharedllm.cross_inject_attention_backward, grad_out, gl, q, k, v, out, lse, cq, ck, 0.25, *args_rot
        )
        for g in (dq, dk, dv):
            assert_finite(g)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ro, rl = R.cross_inject_attention(qr, kr, vr, cq, ck, 0.25, *args_rot, return_lse=True)
        loss = (ro * grad_out).sum() + ((torch.where(torch.isfinite(rl), rl, 0) * gl).sum() if gl is not None else 0)
        for g, r in zip((dq, dk, dv), torch.autograd.grad(loss, (qr, kr, vr))):
            assert_close(g, r, grad_tol(torch.float32, float(r.abs().max())))


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_reference_gradcheck_float64(rotary):
    lq, lk = [2, 0, 3], [3, 2, 1]  # every sequence with queries has keys: lse finite
    q, k, v, cq, ck, extra = make_inputs(lq, lk, 2, 1, 4, dtype=torch.float64, rotary=rotary, max_pos=8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        out, lse = R.cross_inject_attention(q, k, v, cq, ck, 0.7, return_lse=True, **extra)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@requires_ext
def test_cpp_rejects_float64_naming_the_argument():
    q, k, v, cq, ck, _ = make_inputs(LQ, LK, 2, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\bq\b.*float32"):
        so.cross_inject_attention(q, k, v, cq, ck, backend="cpp")
    with pytest.raises(ValueError, match=r"\bq\b.*float32"):
        torch.ops.sharedllm.cross_inject_attention(q, k, v, cq, ck, 0.3, None, None, None, None)


# --------------------------------------------------------------------------------------------
# 4. opcheck


def _op_args(q, k, v, cq, ck, extra, scale=0.3):
    rot = (extra["q_positions"], extra["k_positions"], extra["rotary_cos"], extra["rotary_sin"]) if extra else (None,) * 4
    return (q, k, v, cq, ck, scale) + rot


@requires_ext
@pytest.mark.parametrize("layout", ["contiguous", "fused", "padded"])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_opcheck_forward(rotary, layout):
    q, k, v, cq, ck, extra = make_inputs([3, 0, 5, 2], [4, 3, 0, 6], 4, 2, 16, layout=layout, rotary=rotary)
    if layout == "fused":  # keep the views of one tensor, as a fused projection would give them
        base = q._base.requires_grad_()
        q, k, v = base[: q.shape[0], :4], base[: k.shape[0], 4:6], base[: k.shape[0], 6:]
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.sharedllm.cross_inject_attention.default, _op_args(q, k, v, cq, ck, extra))


@requires_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_opcheck_forward_16bit(dtype):
    q, k, v, cq, ck, extra = make_inputs([3, 0, 5, 2], [4, 3, 0, 6], 4, 2, 16, dtype=dtype, rotary=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.sharedllm.cross_inject_attention.default, _op_args(q, k, v, cq, ck, extra))


@requires_ext
@pytest.mark.parametrize("with_grad_lse", [True, False], ids=["grad_lse", "no_grad_lse"])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_opcheck_backward(rotary, with_grad_lse):
    q, k, v, cq, ck, extra = make_inputs([3, 0, 5, 2], [4, 3, 0, 6], 4, 2, 16, rotary=rotary)
    args = _op_args(q, k, v, cq, ck, extra)
    out, lse = torch.ops.sharedllm.cross_inject_attention(*args)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    torch.library.opcheck(
        torch.ops.sharedllm.cross_inject_attention_backward.default, (torch.randn_like(out), grad_lse) + args[:3] + (out, lse) + args[3:]
    )


@requires_ext
@pytest.mark.parametrize("layout", ["padded", "transposed"])
def test_opcheck_backward_noncontiguous_inputs(layout):
    """Regression for layout="transposed": the fake kernel of cross_inject_attention_backward once
    returned ``torch.empty_like(q/k/v)``, which keeps the strides of a dense non-contiguous q (here
    [H, N, D].transpose(0, 1)), while the C++ kernel returns contiguous gradients: test_faketensor
    reported a stride mismatch, and torch.compile of the backward failed its stride assertion."""
    q, k, v, cq, ck, extra = make_inputs([3, 0, 5, 2], [4, 3, 0, 6], 4, 2, 16, layout=layout)
    args = _op_args(q, k, v, cq, ck, extra)
    out, lse = torch.ops.sharedllm.cross_inject_attention(*args)
    torch.library.opcheck(
        torch.ops.sharedllm.cross_inject_attention_backward.default,
        (torch.randn_like(out), torch.randn_like(lse)) + args[:3] + (out, lse) + args[3:],
    )


# --------------------------------------------------------------------------------------------
# 5. bad inputs

_LQ, _LK, _HQ, _HK, _D = [2, 0, 3], [3, 2, 1], 4, 2, 8


def _good(rotary=False):
    q, k, v, cq, ck, extra = make_inputs(_LQ, _LK, _HQ, _HK, _D, rotary=rotary, max_pos=16)
    a = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, softmax_scale=None)
    a.update(extra or dict(q_positions=None, k_positions=None, rotary_cos=None, rotary_sin=None))
    return a


def _i32(*vals):
    return torch.tensor(vals, dtype=torch.int32)


NQ, NK = sum(_LQ), sum(_LK)
COS, SIN = rotary_tables(16, _D)
ROT = dict(q_positions=torch.zeros(NQ, dtype=torch.int32), k_positions=torch.zeros(NK, dtype=torch.int32), rotary_cos=COS, rotary_sin=SIN)

BAD = [
    ("q_rank2", dict(q=torch.randn(NQ, _HQ * _D)), ValueError, r"\bq\b.*\[Nq, Hq, D\]"),
    ("k_rank4", dict(k=torch.randn(NK, _HK, _D, 1)), ValueError, r"\bk\b.*\[Nk, Hk, D\]"),
    ("v_rank2", dict(v=torch.randn(NK, _D)), ValueError, r"\bv\b.*\[Nk, Hk, Dv\]"),
    ("q_float64", dict(q=torch.randn(NQ, _HQ, _D, dtype=torch.float64), k=torch.randn(NK, _HK, _D, dtype=torch.float64),
                       v=torch.randn(NK, _HK, _D, dtype=torch.float64)), ValueError, r"\bq\b.*float32"),
    ("q_int", dict(q=torch.ones(NQ, _HQ, _D, dtype=torch.int32)), ValueError, r"\bq\b.*float32"),
    ("k_dtype_mismatch", dict(k=torch.randn(NK, _HK, _D, dtype=torch.float16)), ValueError, r"\bk\b.*dtype of q"),
    ("v_dtype_mismatch", dict(v=torch.randn(NK, _HK, _D, dtype=torch.bfloat16)), ValueError, r"\bv\b.*dtype of q"),
    ("q_last_stride", dict(q=torch.randn(NQ, _HQ, 2 * _D)[..., ::2]), ValueError, r"\bq\b.*stride 1"),
    ("k_last_stride", dict(k=torch.randn(NK, _HK, 2 * _D)[..., ::2]), ValueError, r"\bk\b.*stride 1"),
    ("v_last_stride", dict(v=torch.randn(NK, _HK, 2 * _D)[..., ::2]), ValueError, r"\bv\b.*stride 1"),
    ("k_head_dim", dict(k=torch.randn(NK, _HK, _D + 1)), ValueError, r"\bk\b.*(shape|\[2\])"),
    ("v_rows", dict(v=torch.randn(NK + 1, _HK, _D)), ValueError, r"\b(k|v)\b.*shape"),
    ("v_heads", dict(v=torch.randn(NK, _HK + 1, _D)), ValueError, r"\b(k|v)\b.*shape"),
    ("head_dim_zero", dict(q=torch.randn(NQ, _HQ, 0), k=torch.randn(NK, _HK, 0)), ValueError, r"head dims.*q\.shape\[2\] = 0"),
    ("gqa_ratio", dict(q=torch.randn(NQ, 3, _D)), ValueError, r"q\.shape\[1\] = 3.*k\.shape\[1\] = 2"),
    ("no_kv_heads", dict(k=torch.randn(NK, 0, _D), v=torch.randn(NK, 0, _D)), ValueError, r"k\.shape\[1\] = 0"),
    ("cu_q_int64", dict(cu_seqlens_q=torch.tensor([0, 2, 2, 5])), ValueError, r"cu_seqlens_q.*int32"),
    ("cu_k_int64", dict(cu_seqlens_k=torch.tensor([0, 3, 5, 6])), ValueError, r"cu_seqlens_k.*int32"),
    ("cu_q_rank2", dict(cu_seqlens_q=_i32(0, 2, 2, 5).reshape(2, 2)), ValueError, r"cu_seqlens_q"),
    ("cu_q_first", dict(cu_seqlens_q=_i32(1, 2, 2, 5)), ValueError, r"cu_seqlens_q\[0\]"),
    ("cu_k_first", dict(cu_seqlens_k=_i32(-1, 3, 5, 6)), ValueError, r"cu_seqlens_k\[0\]"),
    ("cu_q_decreasing", dict(cu_seqlens_q=_i32(0, 3, 2, 5)), ValueError, r"cu_seqlens_q.*non-decreasing"),
    ("cu_k_decreasing", dict(cu_seqlens_k=_i32(0, 5, 3, 6)), ValueError, r"cu_seqlens_k.*non-decreasing"),
    ("cu_q_last", dict(cu_seqlens_q=_i32(0, 2, 2, 4)), ValueError, r"cu_seqlens_q\[-1\].*q\.shape\[0\]"),
    ("cu_k_last", dict(cu_seqlens_k=_i32(0, 3, 5, 7)), ValueError, r"cu_seqlens_k\[-1\].*k\.shape\[0\]"),
    ("num_sequences", dict(cu_seqlens_k=_i32(0, 3, 6)), ValueError, r"cu_seqlens_q and cu_seqlens_k.*same number"),
    ("rotary_only_cos", dict(rotary_cos=COS), ValueError, r"rotary_cos, rotary_sin, q_positions and k_positions"),
    ("rotary_no_positions", dict(rotary_cos=COS, rotary_sin=SIN), ValueError, r"q_positions"),
    ("rotary_no_k_positions", dict(ROT, k_positions=None), ValueError, r"k_positions"),
    ("rotary_odd_dim", dict(q=torch.randn(NQ, _HQ, 7), k=torch.randn(NK, _HK, 7), **dict(ROT, rotary_cos=COS[:, :7], rotary_sin=SIN[:, :7])),
     ValueError, r"even head dim.*7"),
    ("rotary_cos_width", dict(ROT, rotary_cos=torch.randn(16, _D + 2), rotary_sin=torch.randn(16, _D + 2)), ValueError, r"rotary_cos"),
    ("rotary_sin_shape", dict(ROT, rotary_sin=SIN[:8]), ValueError, r"rotary_sin"),
    ("rotary_cos_rank", dict(ROT, rotary_cos=COS.flatten()), ValueError, r"rotary_cos"),
    ("rotary_cos_int", dict(ROT, rotary_cos=torch.ones(16, _D, dtype=torch.int32)), ValueError, r"rotary_cos"),
    ("q_positions_beyond_table", dict(ROT, q_positions=_i32(0, 1, 16, 2, 3)), ValueError, r"q_positions.*\[0, 16\).*16"),
    ("k_positions_beyond_table", dict(ROT, k_positions=_i32(0, 1, 2, 3, 4, 99)), ValueError, r"k_positions.*\[0, 16\)"),
    ("q_positions_negative", dict(ROT, q_positions=_i32(0, -1, 2, 2, 3)), ValueError, r"q_positions.*-1"),
    ("k_positions_negative", dict(ROT, k_positions=_i32(-5, 1, 2, 3, 4, 5)), ValueError, r"k_positions.*-5"),
    ("q_positions_int64", dict(ROT, q_positions=torch.zeros(NQ, dtype=torch.int64)), ValueError, r"q_positions.*int32"),
    ("k_positions_length", dict(ROT, k_positions=torch.zeros(NK + 1, dtype=torch.int32)), ValueError, r"k_positions"),
    ("q_positions_rank2", dict(ROT, q_positions=torch.zeros(NQ, 1, dtype=torch.int32)), ValueError, r"q_positions"),
]
META = [
    ("k_meta_device", dict(k=torch.randn(NK, _HK, _D, device="meta")), ValueError, r"\bk\b.*device"),
    ("v_meta_device", dict(v=torch.randn(NK, _HK, _D, device="meta")), ValueError, r"\bv\b.*device"),
    ("cu_k_meta_device", dict(cu_seqlens_k=_i32(0, 3, 5, 6).to("meta")), ValueError, r"cu_seqlens_k.*device"),
    ("cos_meta_device", dict(ROT, rotary_cos=COS.to("meta")), ValueError, r"rotary_cos.*(device|cpu)"),
    ("q_positions_meta_device", dict(ROT, q_positions=torch.zeros(NQ, dtype=torch.int32, device="meta")), ValueError, r"q_positions.*device"),
]
PUBLIC_ONLY = [
    ("q_not_tensor", dict(q=None), TypeError, r"\bq\b"),
    ("q_positions_not_tensor", dict(ROT, q_positions=[0] * NQ), TypeError, r"q_positions"),
]


def _call_public(a, backend):
    return so.cross_inject_attention(
        a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["softmax_scale"], a["q_positions"],
        a["k_positions"], a["rotary_cos"], a["rotary_sin"], return_lse=True, backend=backend,
    )


def _call_op(a):
    scale = 0.5 if a["softmax_scale"] is None else a["softmax_scale"]
    return torch.ops.sharedllm.cross_inject_attention(
        a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], scale, a["q_positions"], a["k_positions"],
        a["rotary_cos"], a["rotary_sin"],
    )


ALL_PUBLIC = BAD + META + PUBLIC_ONLY


def test_good_arguments_are_good():
    """The arguments the bad cases start from pass every check and give outputs of the right shape."""
    calls = [lambda a: _call_public(a, "reference")]
    if so._ext.loaded:
        calls += [lambda a: _call_public(a, "cpp"), _call_op]
    for rotary in (False, True):
        for call in calls:
            out, lse = call(_good(rotary))
            assert out.shape == (NQ, _HQ, _D) and lse.shape == (NQ, _HQ)
            assert_finite(out)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_ext), "reference"])
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in ALL_PUBLIC], ids=[c[0] for c in ALL_PUBLIC])
def test_public_rejects_bad_input(backend, change, exc, match):
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        _call_public(a, backend)


@pytest.mark.parametrize("backend", ["gpu", "CPP", "flash"])
def test_public_rejects_unknown_backend(backend):
    with pytest.raises(ValueError, match="backend"):
        _call_public(_good(), backend)


@requires_ext
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_op_rejects_bad_input(change, exc, match):
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        _call_op(a)


@requires_ext
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in META], ids=[c[0] for c in META])
def test_op_rejects_device_mismatch_in_cpu_kernel(change, exc, match):
    """The CPU kernel's own device checks (reached by redispatching straight to it)."""
    a = {**_good(), **change}
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    scale = 0.5
    with pytest.raises(exc, match=match):
        torch.ops.sharedllm.cross_inject_attention.default.redispatch(
            keyset, a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], scale, a["q_positions"],
            a["k_positions"], a["rotary_cos"], a["rotary_sin"],
        )


@requires_ext
def test_op_rejects_device_mismatch():
    """A "meta" k with CPU q/v dispatches to the fake kernel, which must reject the device
    mismatch (it once returned uninitialised CPU tensors instead of raising)."""
    a = {**_good(), "k": torch.randn(NK, _HK, _D, device="meta")}
    with pytest.raises((ValueError, RuntimeError), match=r"\bk\b|device"):
        out, _ = _call_op(a)
        pytest.fail(f"no error; returned a {out.device} output of uninitialised memory")


@pytest.mark.parametrize("namespace", [pytest.param("sharedllm", marks=requires_ext),
                                       pytest.param("sharedllm_triton", marks=requires_triton("cross_inject_attention"))])
def test_backward_op_rejects_bad_input(namespace):
    a = _good()
    ops = getattr(torch.ops, namespace)
    out, lse = ops.cross_inject_attention(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 0.5,
                                          None, None, None, None)
    go = torch.randn_like(out)
    base = (a["q"], a["k"], a["v"])
    rest = (a["cu_seqlens_q"], a["cu_seqlens_k"], 0.5, None, None, None, None)
    bwd = ops.cross_inject_attention_backward
    with pytest.raises(ValueError, match=r"grad_out"):
        bwd(go[:-1], None, *base, out, lse, *rest)
    with pytest.raises(ValueError, match=r"grad_out.*dtype of q"):
        bwd(go.half(), None, *base, out, lse, *rest)
    with pytest.raises(ValueError, match=r"\bout\b.*dtype of q"):
        bwd(go, None, *base, out.half(), lse, *rest)
    with pytest.raises(ValueError, match=r"lse.*float32"):
        bwd(go, None, *base, out, lse.double(), *rest)
    with pytest.raises(ValueError, match=r"lse"):
        bwd(go, None, *base, out, lse[:-1], *rest)
    with pytest.raises(ValueError, match=r"grad_lse"):
        bwd(go, torch.randn(3, 3), *base, out, lse, *rest)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\]"):
        bwd(go, None, *base, out, lse, a["cu_seqlens_q"], _i32(0, 1, 2, 3), 0.5, None, None, None, None)
    with pytest.raises(ValueError, match=r"q_positions.*\[0, 16\)"):
        bwd(go, None, *base, out, lse, a["cu_seqlens_q"], a["cu_seqlens_k"], 0.5,
            _i32(0, 1, 99, 2, 3), ROT["k_positions"], COS, SIN)


@requires_ext
def test_cpp_without_the_blas_symbol():
    """Builds whose torch exports no sgemm_ take the ATen GEMM fallback; force it in a fresh process
    (the choice is made once per process) and check forward and backward against the reference."""
    import subprocess
    import sys

    script = """
import torch, sharedllm_ops as so
from sharedllm_ops import reference as R
torch.manual_seed(0)
cu_q = torch.tensor([0, 70, 70, 90], dtype=torch.int32)
cu_k = torch.tensor([0, 600, 601, 601], dtype=torch.int32)
q = torch.randn(90, 6, 32, requires_grad=True)
k = torch.randn(601, 2, 32, requires_grad=True)
v = torch.randn(601, 2, 16, requires_grad=True)
outs = []
for backend in ("cpp", "reference"):
    o, l = so.cross_inject_attention(q, k, v, cu_q, cu_k, return_lse=True, backend=backend)
    grads = torch.autograd.grad((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum(), (q, k, v))
    outs.append((o, *grads))
for got, ref in zip(*outs):
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-4)
print("ok")
"""
    env = dict(os.environ, SHAREDLLM_OPS_GEMM="aten")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# 6. the Triton kernels (run on CPU tensors under TRITON_INTERPRET=1, set by conftest)

requires_triton_attention = requires_triton("cross_inject_attention")
# the interpreter is slow: one head dim per layout, the odd, rotary and Dv != D cases included
TRITON_CONFIGS = [
    pytest.param("contiguous", 32, 48, True, id="contiguous-d32-dv48-rot"),
    pytest.param("fused", 16, 16, True, id="fused-d16-rot"),
    pytest.param("padded", 33, 33, False, id="padded-d33-plain"),
    pytest.param("transposed", 40, 40, True, id="transposed-d40-rot"),
]


@requires_triton_attention
@pytest.mark.parametrize("layout,d,dv,rotary", TRITON_CONFIGS)
@pytest.mark.parametrize("hq,hk", [(2, 2), (6, 2)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_matches_reference(dtype, hq, hk, layout, d, dv, rotary):
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, hq, hk, d, dv, dtype=dtype, layout=layout, rotary=rotary)
    out, lse = run_twice(so.cross_inject_attention, q, k, v, cq, ck, return_lse=True, backend="triton", **extra)
    ref_out, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="reference", **extra)
    assert out.shape == (sum(LQ), hq, dv) and out.dtype == dtype
    assert lse.shape == (sum(LQ), hq) and lse.dtype == torch.float32
    assert_finite(out)
    assert_close(out, ref_out, ATTN_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    check_empty_sequences(out, lse, LQ, LK)


@requires_triton_attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_triton_gqa8_and_many_tiles(dtype):
    """8 query heads per kv head; sequences of several query tiles and key blocks (16 rows each
    under the interpreter), including one key and a tile boundary exactly at a sequence's end."""
    lq, lk = [33, 5, 16], [40, 1, 17]
    q, k, v, cq, ck, extra = make_inputs(lq, lk, 8, 1, 16, dtype=dtype, rotary=True, max_pos=100)
    out, lse = run_twice(so.cross_inject_attention, q, k, v, cq, ck, return_lse=True, backend="triton", **extra)
    ref_out, ref_lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="reference", **extra)
    assert_close(out, ref_out, ATTN_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=5e-5, rtol=1e-5)


@requires_triton_attention
def test_triton_matches_independent_sdpa_oracle():
    """Against float64 SDPA with the rotary computed from angles, not from our tables."""
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, 6, 2, 16, rotary=True)
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="triton", **extra)
    ref_out, ref_lse = sdpa_oracle(q, k, v, LQ, LK, extra=extra)
    assert_close(out, ref_out.float(), ATTN_TOL[torch.float32])
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)


@requires_triton_attention
def test_triton_degenerate_shapes():
    q, k, v, cq, ck, _ = make_inputs([0, 0], [3, 2], 2, 1, 8)
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="triton")
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)
    q, k, v, cq, ck, _ = make_inputs([3, 2], [0, 0], 2, 1, 8)
    out, lse = run_twice(so.cross_inject_attention, q, k, v, cq, ck, return_lse=True, backend="triton")
    assert torch.count_nonzero(out) == 0 and (lse == -math.inf).all()
    q, k, v, cq, ck, _ = make_inputs([], [], 2, 1, 8)
    out, lse = so.cross_inject_attention(q, k, v, cq, ck, return_lse=True, backend="triton")
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)


TRITON_GRAD_CASES = [  # every dtype and head layout through out+lse; out and lse alone once (interpreter time)
    pytest.param(dtype, hq, hk, layout, rotary, "out+lse", id=f"{dtype_id(dtype)}-{name}-out+lse")
    for dtype in DTYPES
    for hq, hk, layout, rotary, name in [(4, 4, "contiguous", True, "mha-rot"), (6, 2, "fused", False, "gqa3-fused"),
                                         (8, 1, "padded", True, "gqa8-padded-rot")]
] + [pytest.param(torch.float32, 6, 2, "transposed", True, through, id=f"fp32-gqa3-transposed-rot-{through}")
     for through in ("out", "lse")]


@requires_triton_attention
@pytest.mark.parametrize("dtype,hq,hk,layout,rotary,through", TRITON_GRAD_CASES)
def test_triton_gradients_match_reference(dtype, hq, hk, layout, rotary, through):
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, hq, hk, 16, dtype=dtype, layout=layout, rotary=rotary)
    grad_out = torch.randn(sum(LQ), hq, 16, dtype=dtype) if "out" in through else None
    grad_lse = torch.randn(sum(LQ), hq) if "lse" in through else None
    poison_allocator()
    got = _grads("triton", q, k, v, cq, ck, extra, grad_out, grad_lse)
    ref = _grads("reference", q, k, v, cq, ck, extra, grad_out, grad_lse)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert g.dtype == dtype and g.shape == r.shape
        assert_finite(g, name)
        assert_close(g, r, grad_tol(dtype, float(r.abs().max())), msg=name)
    # keys of the sequence without queries, queries of the sequence without keys: zero gradient
    assert torch.count_nonzero(got[1][4:7]) == 0 and torch.count_nonzero(got[2][4:7]) == 0
    assert torch.count_nonzero(got[0][3:8]) == 0
    if through == "lse":
        assert torch.count_nonzero(got[2]) == 0


@requires_triton_attention
def test_triton_gradients_many_tiles():
    lq, lk = [33, 0, 17], [40, 9, 17]
    q, k, v, cq, ck, extra = make_inputs(lq, lk, 6, 2, 16, rotary=True, max_pos=100)
    grad_out, grad_lse = torch.randn(sum(lq), 6, 16), torch.randn(sum(lq), 6)
    got = _grads("triton", q, k, v, cq, ck, extra, grad_out, grad_lse)
    ref = _grads("reference", q, k, v, cq, ck, extra, grad_out, grad_lse)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert_close(g, r, grad_tol(torch.float32, float(r.abs().max())), msg=name)


@requires_triton_attention
def test_triton_backward_op_direct_is_deterministic_and_written():
    q, k, v, cq, ck, extra = make_inputs(LQ, LK, 6, 2, 16, rotary=True)
    args_rot = (extra["q_positions"], extra["k_positions"], extra["rotary_cos"], extra["rotary_sin"])
    out, lse = torch.ops.sharedllm_triton.cross_inject_attention(q, k, v, cq, ck, 0.25, *args_rot)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = run_twice(
        torch.ops.sharedllm_triton.cross_inject_attention_backward, grad_out, grad_lse, q, k, v, out, lse, cq, ck, 0.25, *args_rot
    )
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ro, rl = R.cross_inject_attention(qr, kr, vr, cq, ck, 0.25, *args_rot, return_lse=True)
    loss = (ro * grad_out).sum() + (torch.where(torch.isfinite(rl), rl, 0) * grad_lse).sum()
    for g, r in zip((dq, dk, dv), torch.autograd.grad(loss, (qr, kr, vr))):
        assert_finite(g)
        assert_close(g, r, grad_tol(torch.float32, float(r.abs().max())))


@requires_triton_attention
@pytest.mark.parametrize("layout,rotary", [("fused", False), ("transposed", True)], ids=["fused-plain", "transposed-rotary"])
def test_triton_opcheck_forward(layout, rotary):
    q, k, v, cq, ck, extra = make_inputs([3, 0, 5, 2], [4, 3, 0, 6], 4, 2, 16, layout=layout, rotary=rotary)
    if layout == "fused":
        base = q._base.requires_grad_()
        q, k, v = base[: q.shape[0], :4], base[: k.shape[0], 4:6], base[: k.shape[0], 6:]
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.sharedllm_triton.cross_inject_attention.default, _op_args(q, k, v, cq, ck, extra))


@requires_triton_attention
@pytest.mark.parametrize("with_grad_lse", [True, False], ids=["grad_lse", "no_grad_lse"])
def test_triton_opcheck_backward(with_grad_lse):
    q, k, v, cq, ck, extra = make_inputs([3, 0, 5, 2], [4, 3, 0, 6], 4, 2, 16, layout="transposed", rotary=True)
    args = _op_args(q, k, v, cq, ck, extra)
    out, lse = torch.ops.sharedllm_triton.cross_inject_attention(*args)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    torch.library.opcheck(
        torch.ops.sharedllm_triton.cross_inject_attention_backward.default,
        (torch.randn_like(out), grad_lse) + args[:3] + (out, lse) + args[3:],
    )


@requires_triton_attention
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in ALL_PUBLIC], ids=[c[0] for c in ALL_PUBLIC])
def test_triton_public_rejects_bad_input(change, exc, match):
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        _call_public(a, "triton")


def _call_triton_op(a):
    scale = 0.5 if a["softmax_scale"] is None else a["softmax_scale"]
    return torch.ops.sharedllm_triton.cross_inject_attention(
        a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], scale, a["q_positions"], a["k_positions"],
        a["rotary_cos"], a["rotary_sin"],
    )


@requires_triton_attention
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_triton_op_rejects_bad_input(change, exc, match):
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        _call_triton_op(a)


@requires_triton_attention
@pytest.mark.parametrize("block", [1, 4, 16])
def test_triton_tile_table_built_on_the_device_lists_every_tile_then_padding(block):
    """The table against a plain enumeration of each sequence's tiles: the real tiles in order, then
    padding entries (sequence 0, row ``total``) that the kernels skip."""
    from sharedllm_ops.triton.cross_inject_attention import _tiles

    g = torch.Generator().manual_seed(block)
    for lengths in ([], [0], [0, 0, 3], [5, 0, 16, 1, 33], torch.randint(0, 40, (9,), generator=g).tolist()):
        cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
        total = int(cu[-1])
        expected = [(s, r) for s in range(len(lengths)) for r in range(int(cu[s]), int(cu[s + 1]), block)]
        seq, row = _tiles(cu, total, block)
        assert seq.dtype == row.dtype == torch.int32
        assert seq.numel() == row.numel() == len(lengths) + total // block >= len(expected)
        got = list(zip(seq.tolist(), row.tolist()))
        assert got[: len(expected)] == expected
        assert all(entry == (0, total) for entry in got[len(expected):])


@requires_triton_attention
@pytest.mark.parametrize("what, values, match", [
    ("cu_seqlens_q", [1, 3, 6], "cu_seqlens_q must start at 0"),
    ("cu_seqlens_q", [0, 4, 3], "cu_seqlens_q must start at 0, never decrease"),
    ("cu_seqlens_k", [0, 2, 5], r"cu_seqlens_k .*end at k.shape\[0\] = 7"),
    ("k_positions", [0, 1, 2, 3, 4, 5, 64], r"k_positions must lie in \[0, 64\)"),
    ("q_positions", [-1, 0, 0, 0, 0, 0], r"q_positions must lie in \[0, 64\)"),
])
def test_triton_device_value_checks_name_what_is_wrong(what, values, match):
    """The checks a GPU runs without a sync (``torch._assert_async``), raised at once on the CPU."""
    from sharedllm_ops.triton.cross_inject_attention import assert_values_on_device

    q, k = torch.randn(6, 2, 8), torch.randn(7, 1, 8)
    cos = torch.ones(64, 4)
    args = dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 2, 7], dtype=torch.int32),
                q_positions=torch.zeros(6, dtype=torch.int32), k_positions=torch.zeros(7, dtype=torch.int32))
    assert_values_on_device("op", q, k, args["cu_seqlens_q"], args["cu_seqlens_k"], args["q_positions"],
                            args["k_positions"], cos)  # good values pass
    args[what] = torch.tensor(values, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=match):
        assert_values_on_device("op", q, k, args["cu_seqlens_q"], args["cu_seqlens_k"], args["q_positions"],
                                args["k_positions"], cos)
