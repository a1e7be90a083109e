"""The rotary position embedding in Hugging Face's ``rotate_half`` convention: the one source of it
for the reference, the Triton wrappers and the model."""

from __future__ import annotations

import torch

from ._common import compute_dtype


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`rotate_half` (also its inverse): ``[y1, y2] -> [y2, -y1]``."""
    y1, y2 = x.chunk(2, dim=-1)
    return torch.cat((y2, -y1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` already gathered and broadcastable to
    ``x``; ``inverse`` undoes the rotation (``x * cos - rotate_half(x) * sin``)."""
    return x * cos - rotate_half(x) * sin if inverse else x * cos + rotate_half(x) * sin


def apply_rotary(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rotates ``x: [N, H, D]`` by the table rows ``cos/sin[positions]: [N, D]``, in ``dtype`` (default:
    the compute dtype of ``x``). ``transpose`` applies the transposed map (the backward of the rotation)."""
    dtype = dtype or compute_dtype(x.dtype)
    c = cos.to(dtype)[positions.long()][:, None, :]
    s = sin.to(dtype)[positions.long()][:, None, :]
    x = x.to(dtype)
    return x * c + (rotate_half_transposed(x * s) if transpose else rotate_half(x) * s)
