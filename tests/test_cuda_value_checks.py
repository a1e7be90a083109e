"""Where the CUDA bindings check index values (``cu_seqlens``, rotary positions), proved on the CPU
emulator's build of the real bindings and kernels (``tests/test_cuda_emulated.py``).

By default the values are checked on the device: no copy to the host and no synchronisation per call
(the emulated bindings count their host reads: none), and a bad value stops the check kernel with a
device-side assert naming the argument (on a GPU it surfaces at the next synchronisation, as PyTorch's
own device asserts do). ``SHAREDLLM_HOST_CHECKS=1`` checks on the host instead, with ValueErrors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cu_seqlens
from test_cuda_emulated import _attention_case, emulated  # noqa: F401  (the emulated build, a fixture)

HOST_CHECKS = "SHAREDLLM_HOST_CHECKS"


def _attention_args(rotary: bool = True):
    q, k, v, cq, ck, extra = _attention_case([5, 0, 3], [6, 2, 0], 2, 1, 64, 64, torch.bfloat16, rotary)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, softmax_scale=0.125, **extra)


def _forward(ops, a):
    return ops.cross_inject_attention(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["softmax_scale"],
                                      a["q_positions"], a["k_positions"], a["rotary_cos"], a["rotary_sin"])


def _backward(ops, a, out, lse):
    return ops.cross_inject_attention_backward(torch.ones_like(out), None, a["q"], a["k"], a["v"], out, lse,
                                               a["cu_seqlens_q"], a["cu_seqlens_k"], a["softmax_scale"],
                                               a["q_positions"], a["k_positions"], a["rotary_cos"], a["rotary_sin"])


def _every_op_once(ops):
    """Forward and backward of cross_inject_attention (with rotary) and chunk_pool."""
    a = _attention_args()
    out, lse = _forward(ops, a)
    _backward(ops, a, out, lse)
    x, cu = torch.randn(9, 2, 8), cu_seqlens([4, 0, 5])
    pooled = ops.chunk_pool(x, cu, 2, "mean")
    ops.chunk_pool_backward(torch.ones_like(pooled), cu, 9, 2, "mean")
    return a


def test_the_default_path_reads_no_index_values_on_the_host(emulated, monkeypatch):  # noqa: F811
    monkeypatch.delenv(HOST_CHECKS, raising=False)
    probe = torch.empty(0)
    before = emulated.host_value_reads(probe)
    _every_op_once(emulated)
    assert emulated.host_value_reads(probe) == before
    # the counter counts: the host checks read each index tensor of each call once (attention: cu_seqlens_q,
    # cu_seqlens_k, q_positions, k_positions, in the forward and in the backward; chunk_pool: cu_seqlens, twice)
    monkeypatch.setenv(HOST_CHECKS, "1")
    _every_op_once(emulated)
    assert emulated.host_value_reads(probe) == before + 10


BAD_ATTENTION = [
    ("cu_q_first", dict(cu_seqlens_q=cu_seqlens([5, 0, 3]) + 1), "cu_seqlens_q", r"cu_seqlens_q\[0\] must be 0"),
    ("cu_q_decreasing", dict(cu_seqlens_q=torch.tensor([0, 5, 4, 8], dtype=torch.int32)), "cu_seqlens_q",
     r"cu_seqlens_q must be non-decreasing"),
    ("cu_k_last", dict(cu_seqlens_k=torch.tensor([0, 6, 7, 7], dtype=torch.int32)), "cu_seqlens_k",
     r"cu_seqlens_k\[-1\] must equal k.shape\[0\] = 8"),
    ("q_positions_beyond", "q_positions", "q_positions", r"q_positions must lie in \[0, 512\)"),
    ("k_positions_negative", "k_positions", "k_positions", r"k_positions must lie in \[0, 512\).*-1"),
]


def _bad_attention_args(change):
    a = _attention_args()
    if change == "q_positions":
        a["q_positions"] = a["q_positions"].clone()
        a["q_positions"][-1] = 512
    elif change == "k_positions":
        a["k_positions"] = a["k_positions"].clone()
        a["k_positions"][3] = -1
    else:
        a.update(change)
    return a


@pytest.mark.parametrize("change,argument,host_error", [c[1:] for c in BAD_ATTENTION], ids=[c[0] for c in BAD_ATTENTION])
def test_a_bad_attention_index_stops_the_kernel_naming_the_argument(emulated, monkeypatch, change, argument,  # noqa: F811
                                                                     host_error):
    monkeypatch.delenv(HOST_CHECKS, raising=False)
    good = _attention_args()
    out, lse = _forward(emulated, good)
    a = _bad_attention_args(change)
    device_error = rf"device-side assert triggered: cross_inject_attention: {argument} must"
    with pytest.raises(RuntimeError, match=device_error):
        _forward(emulated, a)
    with pytest.raises(RuntimeError, match=device_error):
        _backward(emulated, a, out, lse)
    _forward(emulated, good)  # the emulated context recovers (a GPU's would not)
    monkeypatch.setenv(HOST_CHECKS, "1")
    with pytest.raises(ValueError, match=host_error):
        _forward(emulated, a)
    with pytest.raises(ValueError, match=host_error):
        _backward(emulated, a, out, lse)


@pytest.mark.parametrize("cu,host_error", [([0, 5, 4, 9], "non-decreasing"), ([0, 4, 4, 8], r"cu_seqlens\[-1\]"),
                                           ([1, 4, 4, 9], r"cu_seqlens\[0\]")], ids=["decreasing", "last", "first"])
def test_bad_chunk_pool_boundaries_stop_the_kernel(emulated, monkeypatch, cu, host_error):  # noqa: F811
    monkeypatch.delenv(HOST_CHECKS, raising=False)
    x, bad = torch.randn(9, 2, 8), torch.tensor(cu, dtype=torch.int32)
    device_error = r"device-side assert triggered: chunk_pool: cu_seqlens must start at 0, never decrease"
    with pytest.raises(RuntimeError, match=device_error):
        emulated.chunk_pool(x, bad, 2, "mean")
    with pytest.raises(RuntimeError, match=device_error):
        emulated.chunk_pool_backward(torch.ones(6, 2, 8), bad, 9, 2, "mean")
    monkeypatch.setenv(HOST_CHECKS, "1")
    with pytest.raises(ValueError, match=host_error):
        emulated.chunk_pool(x, bad, 2, "mean")


def test_shape_errors_stay_value_errors_on_the_default_path(emulated, monkeypatch):  # noqa: F811
    monkeypatch.delenv(HOST_CHECKS, raising=False)
    a = _attention_args(rotary=False)
    with pytest.raises(ValueError, match=r"multiple of the number of kv heads"):
        emulated.cross_inject_attention(a["q"][:, :1].expand(8, 3, 64), a["k"].expand(8, 2, 64),
                                        a["v"].expand(8, 2, 64), a["cu_seqlens_q"], a["cu_seqlens_k"], 0.125,
                                        None, None, None, None)
    with pytest.raises(ValueError, match=r"cu_seqlens_q and cu_seqlens_k must describe the same number"):
        emulated.cross_inject_attention(a["q"], a["k"], a["v"], a["cu_seqlens_q"], cu_seqlens([8]), 0.125,
                                        None, None, None, None)
    # an empty rotary table: on the device a null table means no rotary, so the shape check must catch it
    r = _attention_args()
    with pytest.raises(ValueError, match=r"rotary_cos must have at least one row"):
        emulated.cross_inject_attention(r["q"], r["k"], r["v"], r["cu_seqlens_q"], r["cu_seqlens_k"], 0.125,
                                        r["q_positions"], r["k_positions"], r["rotary_cos"][:0], r["rotary_sin"][:0])
