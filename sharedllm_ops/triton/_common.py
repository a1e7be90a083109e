"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import torch
import triton

from ._runtime import launch_error, runs_on


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def check_launch(name: str, *tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter; anything else is an error
    naming the tensor, not a crash inside the launcher."""
    for t in tensors:
        if t is not None and not runs_on(t.device):
            raise ValueError(f"the Triton kernel of {name} {launch_error(t.device)}")
