"""The fragment layouts the tensor-core kernels rely on, checked against the PTX ISA rather than against
the emulator's own code: ``ldmatrix.sync.aligned.m8n8.x4{,.trans}.shared.b16`` run by the emulated
``ldmatrix_x4`` of ``sharedllm/cuda_common.cuh`` on a 32-row tile whose element (R, c) is ``8 R + c``,
lane l passing the address of tile row ``(5 l + 3) % 32``.

The specification (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): with ``.x4``, threads
8i..8i+7 give the addresses of rows 0..7 of matrix i; each thread receives one 32-bit register per
matrix holding two 16-bit elements, thread l getting, of an 8x8 matrix, row ``l / 4`` and columns
``2 (l % 4)`` and ``2 (l % 4) + 1`` (the lower column in the lower half), which is also the
``mma.m16n8k16`` fragment layout; ``.trans`` delivers the matrix transposed: thread l gets column
``l / 4``, rows ``2 (l % 4)`` and ``2 (l % 4) + 1``.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_emulated import emulated  # noqa: F401  (the emulated build, a fixture)


def row_of_lane(lane: int) -> int:
    return (5 * lane + 3) % 32  # the tile row lane `lane` gives the address of (harness_fragments.cpp)


def element(matrix: int, row: int, col: int) -> int:
    """Element (row, col) of matrix i: row `row` of matrix i is the row whose address lane 8 i + row gave."""
    return 8 * row_of_lane(8 * matrix + row) + col


def expected_registers(trans: bool) -> torch.Tensor:
    """int32 [32 lanes, 4 registers], written from the specification's formulas."""
    out = torch.empty(32, 4, dtype=torch.int64)
    for lane in range(32):
        for matrix in range(4):
            if trans:
                low, high = element(matrix, 2 * (lane % 4), lane // 4), element(matrix, 2 * (lane % 4) + 1, lane // 4)
            else:
                low, high = element(matrix, lane // 4, 2 * (lane % 4)), element(matrix, lane // 4, 2 * (lane % 4) + 1)
            out[lane, matrix] = low | (high << 16)
    return out.to(torch.int32)


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_ldmatrix_x4_gives_each_lane_the_ptx_fragment(emulated, trans):  # noqa: F811
    got = emulated.ldmatrix_x4(torch.empty(0), trans)
    expected = expected_registers(trans)
    mismatch = (got != expected).nonzero().tolist()
    assert not mismatch, f"lanes/registers differing from the PTX ISA layout: {mismatch[:8]}"


def test_the_two_layouts_differ():
    """A transposing load must not pass for a plain one (guards the expectations above)."""
    assert not torch.equal(expected_registers(False), expected_registers(True))
