"""Argument checks of the public functions. They read shapes, dtypes, strides and devices only
(no tensor values), so they cost nothing on the GPU and trace under ``torch.compile``; the
kernels themselves validate values such as ``cu_seqlens`` ordering and position ranges."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name: str, shape: str, rank: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have shape {shape} ({rank} dims), got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def check_float(t, name: str, shape: str, rank: int) -> None:
    check_tensor(t, name, shape, rank, FLOAT_DTYPES)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dimension, got strides {t.stride()}")


def check_same(t, ref, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_devices(ref: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) lives on ``ref``'s device. Also run by the fake
    kernels, where a tensor on the meta device would otherwise select them silently."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on the device of the data ({ref.device}), got {t.device}")


def check_index(t, name: str, shape: str, device: torch.device) -> None:
    check_tensor(t, name, shape, 1, (torch.int32,))
    if t.device != device:
        raise ValueError(f"{name} must be on the device of the data ({device}), got {t.device}")


def check_cu_seqlens(cu, name: str, device: torch.device) -> None:
    check_index(cu, name, "[S + 1]", device)
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have at least one element (it starts with 0)")


def check_cu_seqlens_values(cu: torch.Tensor, total: int, name: str, total_name: str) -> None:
    """Value checks for the reference backend (the kernels do their own)."""
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}] = {values[i]} < {name}[{i-1}] = {values[i-1]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {values[-1]}")


def check_positions_values(pos: torch.Tensor, max_pos: int, name: str) -> None:
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= max_pos):
        raise ValueError(
            f"{name} must lie in [0, {max_pos}) (the rows of the rotary table), "
            f"got values in [{int(pos.min())}, {int(pos.max())}]"
        )


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(value, name: str, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
