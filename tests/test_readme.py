"""The README's usage example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README.md has no python example"
    scope: dict = {}
    exec(compile(block.group(1), str(README), "exec"), scope)
    assert scope["pooled"].shape == (64, 8, 128)
    assert scope["node_ids"].shape == (2, 16, 4) and scope["node_ids"].dtype == torch.int32
    assert scope["merged"].shape == scope["out"].shape
    assert torch.isfinite(scope["merged"]).all()
