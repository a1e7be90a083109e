"""Plain-text tables of the commands' output (``info``, ``ops``)."""

from __future__ import annotations


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns as wide as their widest cell, a dashed rule under the header."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * width for width in widths))
