"""Triton ``cross_inject_attention`` (docs/DESIGN.md section 3.3), registered as ``sharedllm_triton::cross_inject_attention``.

Forward: FlashAttention-style tiles. One program per (query tile, query head) loads its queries
once, applies the rotary embedding to them in registers, then streams the keys and values of its
sequence in blocks (rotating each key block as it is loaded) with an online softmax in base 2, and
writes ``out`` and the natural-log ``lse``. Varlen packing is a table of (sequence, first row) per
tile, built on the device from ``cu_seqlens`` (no host sync): its size is the bound ``B + N // BLOCK``
known from the shapes, and the few tiles past the real ones point beyond every row and do nothing.
On a GPU the value checks run on the device too (``torch._assert_async``), unless
``SHAREDLLM_HOST_CHECKS=1`` asks for exact, catchable errors, as in the CUDA bindings.

Backward: the rotary is applied once in PyTorch (elementwise), then two kernels without atomics:
one program per (key tile, kv head) accumulates ``dk``/``dv`` over every query of its sequence and
every query head of its GQA group; one per (query tile, query head) accumulates ``dq``. The
gradients of the rotated q/k are rotated back in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.checks import (
    check_cross_inject_attention_arguments,
    check_cross_inject_attention_backward_arguments,
    check_cross_inject_attention_values,
    check_devices,
)
from ..core.registration import register_cross_inject_attention
from ..reference.rotary import apply_rotary
from ._common import check_launch, next_pow2
from ._runtime import autotuning, host_checks, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _query_tile(tile_seq_ptr, tile_row_ptr, cu_q_ptr, cu_k_ptr, BLOCK_M: tl.constexpr):
    """The query rows of this program's tile (and which are in its sequence), and the sequence's keys."""
    tile = tl.program_id(0)
    seq = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    q_end = tl.load(cu_q_ptr + seq + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    k_start = tl.load(cu_k_ptr + seq)
    k_end = tl.where(row0 < q_end, tl.load(cu_k_ptr + seq + 1), k_start)  # a padding tile reads no keys
    return rows, row_ok, k_start, k_end


@triton.jit
def _tile(ptr, rows, row_ok, stride_n, head, stride_h, cols, col_ok):
    """``[len(rows), len(cols)]`` float32 tile of one head (zeros where masked)."""
    offsets = rows[:, None].to(tl.int64) * stride_n + head.to(tl.int64) * stride_h + cols[None, :]
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _probabilities(q, k, lse, row_ok, key_ok, scale_log2, LOW_PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """The forward's softmax probabilities, recomputed from the saved natural-log ``lse``."""
    s = _dot(q, tl.trans(k), LOW_PRECISION, DTYPE) * scale_log2
    p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
    return tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)


@triton.jit
def _load_rows(ptr, rows, row_ok, stride_n, head_off, cols, col_ok, ROTARY: tl.constexpr, HALF: tl.constexpr,
               pos_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin):
    """``[len(rows), len(cols)]`` float32 rows of one head, rotated by ``cos/sin[pos[row]]`` if ``ROTARY``."""
    base = ptr + rows[:, None].to(tl.int64) * stride_n + head_off
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROTARY:
        # rotate_half: column c reads column c + D/2 negated (first half) or c - D/2 (second half)
        partner = tl.where(cols < HALF, cols + HALF, cols - HALF)
        sign = tl.where(cols < HALF, -1.0, 1.0)
        x_rot = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32) * sign[None, :]
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        c = tl.load(cos_ptr + pos[:, None] * stride_cos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos[:, None] * stride_sin + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x * c + x_rot * s
    return x


@triton.jit
def _dot(a, b, LOW_PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``a @ b`` with float32 accumulation: on 16-bit tensor cores, or exact float32 (no TF32)."""
    if LOW_PRECISION:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_q_ptr, cu_k_ptr, tile_seq_ptr, tile_row_ptr, out_ptr, lse_ptr,
    q_pos_ptr, k_pos_ptr, cos_ptr, sin_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    stride_cos, stride_sin,
    Hq, GROUP, D, DV, scale_log2,
    ROTARY: tl.constexpr, HALF: tl.constexpr, LOW_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows, row_ok, k_start, k_end = _query_tile(tile_seq_ptr, tile_row_ptr, cu_q_ptr, cu_k_ptr, BLOCK_M)
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty

    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    vcols = tl.arange(0, BLOCK_DV)
    dv_ok = vcols < DV
    q = _load_rows(q_ptr, rows, row_ok, stride_qn, head.to(tl.int64) * stride_qh, dcols, d_ok, ROTARY, HALF,
                   q_pos_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin)
    q = q * scale_log2  # scores in base-2 units: exp2 is the fast exponential

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(k_start, k_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < k_end
        k = _load_rows(k_ptr, keys, key_ok, stride_kn, kv_head.to(tl.int64) * stride_kh, dcols, d_ok, ROTARY, HALF,
                       k_pos_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin)
        s = _dot(q, tl.trans(k), LOW_PRECISION, DTYPE)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _tile(v_ptr, keys, key_ok, stride_vn, kv_head, stride_vh, vcols, dv_ok)
        acc = acc * alpha[:, None] + _dot(p, v, LOW_PRECISION, DTYPE)
        m_i = m_new
    has_keys = l_i > 0  # a sequence without keys: out = 0, lse = -inf
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_on + head.to(tl.int64) * stride_oh + vcols[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(lse_ptr + rows.to(tl.int64) * Hq + head, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_q_ptr, cu_k_ptr, tile_seq_ptr, tile_row_ptr,
    dk_ptr, dv_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    Hq, Hk, GROUP, D, DV, scale, scale_log2,
    LOW_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    key0 = tl.load(tile_row_ptr + tile)
    q_start = tl.load(cu_q_ptr + seq)
    k_end = tl.load(cu_k_ptr + seq + 1)
    q_end = tl.where(key0 < k_end, tl.load(cu_q_ptr + seq + 1), q_start)  # a padding tile reads no queries
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty

    keys = key0 + tl.arange(0, BLOCK_N)
    key_ok = keys < k_end
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    vcols = tl.arange(0, BLOCK_DV)
    dv_ok = vcols < DV
    k = _tile(k_ptr, keys, key_ok, stride_kn, kv_head, stride_kh, dcols, d_ok)
    v = _tile(v_ptr, keys, key_ok, stride_vn, kv_head, stride_vh, vcols, dv_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):  # every query head that reads this kv head: no atomics needed
        head = kv_head * GROUP + g
        for m0 in range(q_start, q_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_end
            q = _tile(q_ptr, rows, row_ok, stride_qn, head, stride_qh, dcols, d_ok)
            do = _tile(do_ptr, rows, row_ok, stride_don, head, stride_doh, vcols, dv_ok)
            lse = tl.load(lse_ptr + rows.to(tl.int64) * Hq + head, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + rows.to(tl.int64) * Hq + head, mask=row_ok, other=0.0)
            p = _probabilities(q, k, lse, row_ok, key_ok, scale_log2, LOW_PRECISION, DTYPE)
            dv += _dot(tl.trans(p), do, LOW_PRECISION, DTYPE)
            dp = _dot(do, tl.trans(v), LOW_PRECISION, DTYPE)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds), q, LOW_PRECISION, DTYPE)
    dk = dk * scale
    tl.store(dk_ptr + keys[:, None].to(tl.int64) * (Hk * D) + kv_head * D + dcols[None, :], dk,
             mask=key_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptr + keys[:, None].to(tl.int64) * (Hk * DV) + kv_head * DV + vcols[None, :], dv,
             mask=key_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_q_ptr, cu_k_ptr, tile_seq_ptr, tile_row_ptr, dq_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    Hq, GROUP, D, DV, scale, scale_log2,
    LOW_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows, row_ok, k_start, k_end = _query_tile(tile_seq_ptr, tile_row_ptr, cu_q_ptr, cu_k_ptr, BLOCK_M)
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty

    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    vcols = tl.arange(0, BLOCK_DV)
    dv_ok = vcols < DV
    q = _tile(q_ptr, rows, row_ok, stride_qn, head, stride_qh, dcols, d_ok)
    do = _tile(do_ptr, rows, row_ok, stride_don, head, stride_doh, vcols, dv_ok)
    lse = tl.load(lse_ptr + rows.to(tl.int64) * Hq + head, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + rows.to(tl.int64) * Hq + head, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(k_start, k_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < k_end
        k = _tile(k_ptr, keys, key_ok, stride_kn, kv_head, stride_kh, dcols, d_ok)
        v = _tile(v_ptr, keys, key_ok, stride_vn, kv_head, stride_vh, vcols, dv_ok)
        p = _probabilities(q, k, lse, row_ok, key_ok, scale_log2, LOW_PRECISION, DTYPE)
        dp = _dot(do, tl.trans(v), LOW_PRECISION, DTYPE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds, k, LOW_PRECISION, DTYPE)
    dq = dq * scale
    tl.store(dq_ptr + rows[:, None].to(tl.int64) * (Hq * D) + head * D + dcols[None, :], dq,
             mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# host side


def _tiles(cu: torch.Tensor, total: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(sequence, first row)`` of every ``block``-row tile of every non-empty sequence of
    ``cu`` (``[B + 1]`` boundaries of ``total`` rows), built on ``cu``'s device without reading it on
    the host. The table has ``B + total // block`` entries, a bound on the tiles that the shapes give
    (``sum(ceil(n_b / block)) <= sum(n_b // block + 1)``); the entries past the real tiles are
    ``(0, total)``: rows beyond every sequence, so those programs read and write nothing."""
    B = cu.numel() - 1
    size = B + total // block
    if size == 0:
        return (torch.zeros(0, dtype=torch.int32, device=cu.device),) * 2
    cu = cu.long()
    tiles = (cu[1:] - cu[:-1] + block - 1) // block
    ends = torch.cumsum(tiles, 0)
    t = torch.arange(size, device=cu.device)
    seq = torch.searchsorted(ends, t, right=True)  # the sequence whose tiles cover t, B past the last
    real = seq < B
    seq = seq.clamp(max=B - 1)
    row = cu[seq] + (t - (ends[seq] - tiles[seq])) * block
    return torch.where(real, seq, 0).to(torch.int32), torch.where(real, row, total).to(torch.int32)


def _tile_sizes(D: int, Dv: int, dtype: torch.dtype) -> dict:
    """The tiled block sizes (they shape the tile tables, so they are not autotuned)."""
    BLOCK_D, BLOCK_DV = max(16, next_pow2(D)), max(16, next_pow2(Dv))
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    wide = max(BLOCK_D, BLOCK_DV)
    block = 32 if dtype == torch.float32 or wide > 128 else (128 if wide <= 64 else 64)
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)


def _autotuned(kernel, looped: str):
    """On the GPU, tune the block that each program loops over (never the tiled one), the warps and
    the stages, keyed on head dims and GQA group only: new sequence lengths never trigger a retune.
    ``SHAREDLLM_TRITON_AUTOTUNE=0`` (read at import) keeps one config: no tuning time, as in a short
    GPU check.
    The interpreter runs the kernel as it is (its block sizes come from ``_tile_sizes``)."""
    if interpreting():
        return kernel
    if not autotuning():  # one config, the one the tuner most often picks for D <= 128 on recent GPUs
        configs = [triton.Config({looped: 64}, num_warps=4, num_stages=3)]
    else:
        configs = [triton.Config({looped: n}, num_warps=w, num_stages=st)
                   for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
    return triton.autotune(configs=configs, key=["D", "DV", "GROUP"])(kernel)


def _launch(kernel, looped: str, grid, *args, **meta):
    """Launch ``kernel``: autotuned on the GPU, with ``looped`` = the tiled size under the interpreter."""
    if interpreting():
        return kernel[grid](*args, **meta)
    meta.pop(looped)
    return _TUNED[kernel][grid](*args, **meta)


def _low_precision(dtype: torch.dtype) -> bool:
    # the interpreter computes in NumPy, which has no bfloat16: keep float32 there
    return dtype != torch.float32 and not interpreting()


def _check(q, k, v, cu_q, cu_k, q_pos, k_pos, cos, sin, what: str) -> None:
    """The public function's argument checks, then the value checks the kernels rely on: on the
    host where the tensors are (the interpreter) or ``SHAREDLLM_HOST_CHECKS=1`` asks for it, else
    on the device, without a sync."""
    check_cross_inject_attention_arguments(q, k, v, cu_q, cu_k, q_pos, k_pos, cos, sin)
    check_devices(q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    check_launch(what, q)
    if q.device.type == "cpu" or host_checks():
        check_cross_inject_attention_values(q, k, cu_q, cu_k, q_pos, k_pos, cos)
    else:
        assert_values_on_device(what, q, k, cu_q, cu_k, q_pos, k_pos, cos)


def assert_values_on_device(what: str, q, k, cu_q, cu_k, q_pos, k_pos, cos) -> None:
    """The value checks of ``check_cross_inject_attention_values`` as asynchronous device asserts
    (``torch._assert_async``: a bad value fails a later CUDA call; on the CPU it raises here)."""
    for cu, total, name, total_name in ((cu_q, q.shape[0], "cu_seqlens_q", "q.shape[0]"),
                                        (cu_k, k.shape[0], "cu_seqlens_k", "k.shape[0]")):
        ok = (cu[0] == 0) & (cu[-1] == total) & torch.all(cu[1:] >= cu[:-1])
        torch._assert_async(ok, f"{what}: {name} must start at 0, never decrease and end at {total_name} = {total}")
    if cos is None:
        return
    for pos, name in ((q_pos, "q_positions"), (k_pos, "k_positions")):
        if pos.numel():
            ok = (pos.min() >= 0) & (pos.max() < cos.shape[0])
            torch._assert_async(ok, f"{what}: {name} must lie in [0, {cos.shape[0]}) (the rows of the rotary table)")


_TUNED = {
    _attn_fwd_kernel: _autotuned(_attn_fwd_kernel, "BLOCK_N"),
    _attn_bwd_dkdv_kernel: _autotuned(_attn_bwd_dkdv_kernel, "BLOCK_M"),
    _attn_bwd_dq_kernel: _autotuned(_attn_bwd_dq_kernel, "BLOCK_N"),
}


@torch.library.custom_op("sharedllm_triton::cross_inject_attention", mutates_args=())
def cross_inject_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, q_positions: torch.Tensor | None, k_positions: torch.Tensor | None,
    rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [Nq, Hq, Dv], lse float32 [Nq, Hq])`` (see ``sharedllm_ops.cross_inject_attention``)."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos, rotary_sin,
           "cross_inject_attention")
    cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos, rotary_sin = _dense_indices(
        cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos, rotary_sin)
    Nq, Hq, D = q.shape
    Hk, Dv = v.shape[1], v.shape[2]
    out = torch.empty(Nq, Hq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(Nq, Hq, dtype=torch.float32, device=q.device)
    if Nq == 0 or Hq == 0:
        return out, lse
    rotary = rotary_cos is not None
    blocks = _tile_sizes(D, Dv, q.dtype)
    tile_seq, tile_row = _tiles(cu_seqlens_q, Nq, blocks["BLOCK_M"])
    if tile_seq.numel() == 0:
        return out, lse
    dummy = cu_seqlens_q  # any tensor stands in for the rotary arguments when there is none
    _launch(
        _attn_fwd_kernel, "BLOCK_N", (tile_seq.numel(), Hq),
        q, k, v, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_row, out, lse,
        q_positions if rotary else dummy, k_positions if rotary else dummy,
        rotary_cos if rotary else dummy, rotary_sin if rotary else dummy,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        rotary_cos.stride(0) if rotary else 0, rotary_sin.stride(0) if rotary else 0,
        Hq, Hq // Hk, D, Dv, float(softmax_scale) * LOG2E,
        ROTARY=rotary, HALF=D // 2, LOW_PRECISION=_low_precision(q.dtype), **blocks,
    )
    return out, lse


def _dense_indices(*tensors):
    """The kernels read cu_seqlens and positions with unit stride and table rows with unit column
    stride: copy the (tiny) index tensors that are strided views."""
    return tuple(None if t is None else t.contiguous() if t.dim() == 1 or t.stride(-1) != 1 else t for t in tensors)


@torch.library.custom_op("sharedllm_triton::cross_inject_attention_backward", mutates_args=())
def cross_inject_attention_backward(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, q_positions: torch.Tensor | None, k_positions: torch.Tensor | None,
    rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype."""
    check_cross_inject_attention_backward_arguments(grad_out, grad_lse, q, out, lse, v.shape[2])
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos, rotary_sin,
           "cross_inject_attention_backward")
    cu_seqlens_q, cu_seqlens_k = _dense_indices(cu_seqlens_q, cu_seqlens_k)
    Nq, Hq, D = q.shape
    Nk, Hk, Dv = v.shape
    rotary = rotary_cos is not None
    low = _low_precision(q.dtype)
    work = q.dtype if low else torch.float32
    if rotary:
        q_r = apply_rotary(q, q_positions, rotary_cos, rotary_sin, dtype=torch.float32).to(work)
        k_r = apply_rotary(k, k_positions, rotary_cos, rotary_sin, dtype=torch.float32).to(work)
    else:
        q_r, k_r = q, k
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    # the softmax-backward row term, minus the gradient flowing in through lse
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    lse = lse.float().contiguous()
    delta = delta.contiguous()
    dq = torch.zeros(Nq, Hq, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(Nk, Hk, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(Nk, Hk, Dv, dtype=torch.float32, device=q.device)
    blocks = _tile_sizes(D, Dv, q.dtype)
    scale = float(softmax_scale)
    strides = (q_r.stride(0), q_r.stride(1), k_r.stride(0), k_r.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1))
    key_seq, key_row = _tiles(cu_seqlens_k, Nk, blocks["BLOCK_N"])
    if key_seq.numel() and Hk:
        _launch(
            _attn_bwd_dkdv_kernel, "BLOCK_M", (key_seq.numel(), Hk),
            q_r, k_r, v, grad_out, lse, delta, cu_seqlens_q, cu_seqlens_k, key_seq, key_row, dk, dv, *strides,
            Hq, Hk, Hq // Hk, D, Dv, scale, scale * LOG2E, LOW_PRECISION=low, **blocks,
        )
    query_seq, query_row = _tiles(cu_seqlens_q, Nq, blocks["BLOCK_M"])
    if query_seq.numel() and Hq:
        _launch(
            _attn_bwd_dq_kernel, "BLOCK_N", (query_seq.numel(), Hq),
            q_r, k_r, v, grad_out, lse, delta, cu_seqlens_q, cu_seqlens_k, query_seq, query_row, dq, *strides,
            Hq, Hq // Hk, D, Dv, scale, scale * LOG2E, LOW_PRECISION=low, **blocks,
        )
    if rotary:
        dq = apply_rotary(dq, q_positions, rotary_cos, rotary_sin, transpose=True, dtype=torch.float32)
        dk = apply_rotary(dk, k_positions, rotary_cos, rotary_sin, transpose=True, dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def supports(args: dict) -> str | None:
    """Every valid call: the kernels loop over sequences in blocks and keep whole head dims in
    registers (a limit on very large head dims, if any, is still to be measured on a GPU)."""
    return None


register_cross_inject_attention("sharedllm_triton")

__all__ = ["cross_inject_attention", "cross_inject_attention_backward", "supports"]
