"""The dtypes the commands and the training loop accept by name (``--dtype float32``)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
