"""Version parsing for the compatibility checks (torch, triton, numpy)."""

from __future__ import annotations

import itertools


def major_minor(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version such as "2.14.1+cu130", "3.6.0+git1a2b" or "2.4rc1"; None when
    it does not start with a number."""
    parts = ["".join(itertools.takewhile(str.isdigit, part)) for part in version.split("+")[0].split(".")[:2]]
    if not parts[0]:
        return None
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 0
