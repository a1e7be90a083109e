import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: float32 for every 16/32-bit input, float64 for float64
    (so that ``torch.autograd.gradcheck`` can run on them)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
