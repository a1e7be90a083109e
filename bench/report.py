"""Summarise a pytest-benchmark JSON file as a short markdown table.

    .venv/bin/python -m pytest bench --benchmark-only --benchmark-json=bench/results/cpu.json
    .venv/bin/python bench/report.py bench/results/cpu.json      # prints, writes bench/results/cpu.md

Speed-ups divide medians of the same run (the JSON holds one run): ``vs reference`` is the
pure-PyTorch reference's median over this row's, ``vs torch`` the torch peer's (rotary in PyTorch +
``scaled_dot_product_attention``). Above 1 means this row is faster.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from sharedllm_ops.workloads import format_seconds

PEER_COLUMNS = (("reference", "vs reference"), ("torch_sdpa", "vs torch peer"))


def throughput(info: dict, seconds: float) -> str:
    if "flops" in info:
        return f"{info['flops'] / seconds / 1e9:.1f} GFLOP/s"
    if "bytes" in info:
        return f"{info['bytes'] / seconds / 1e9:.2f} GB/s"
    return ""


def table_rows(data: dict) -> list[list[str]]:
    """One row per benchmark, in run order (the suites run each group's peers first)."""
    medians: dict[str, dict[str, float]] = defaultdict(dict)  # group -> backend -> median
    for bench in data["benchmarks"]:
        medians[bench["group"]][bench["extra_info"].get("backend", bench["name"])] = bench["stats"]["median"]
    rows = []
    for bench in data["benchmarks"]:
        info, median = bench["extra_info"], bench["stats"]["median"]
        backend = info.get("backend", bench["name"])
        shape = info.get("shape", "")
        if "mode" in info:
            shape += f", {info['mode']}"
        speedups = []
        for peer, _ in PEER_COLUMNS:
            peer_median = medians[bench["group"]].get(peer)
            speedups.append(f"{peer_median / median:.2f}x" if peer_median and peer != backend else "")
        rows.append(
            [
                info.get("op", bench["group"]),
                info.get("pass", ""),
                shape,
                info.get("dtype", ""),
                backend,
                format_seconds(median, decimals_s=3),
                throughput(info, median),
                *speedups,
            ]
        )
    return rows


def render(data: dict) -> str:
    header = ["op", "pass", "shape", "dtype", "backend", "median", "throughput"] + [c for _, c in PEER_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(data)]
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    commit = data.get("commit_info", {})
    context = [
        f"Run {data.get('datetime', '?')}, commit {str(commit.get('id', '?'))[:10]}"
        + (" (uncommitted changes)" if commit.get("dirty") else ""),
        f"CPU: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; "
        f"torch {machine.get('torch', '?')} with {machine.get('torch_threads', '?')} threads; "
        f"Python {machine.get('python_version', '?')}.",
        "Median time per call. Throughput: FLOPs (attention; backward = 2.5x forward, FlashAttention's "
        "convention) or bytes read + written (chunk_pool, tree_topk) per second. Speed-ups divide the "
        "medians of this same run; above 1 = this backend is faster.",
    ]
    return "# Benchmarks\n\n" + "\n".join(context) + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", default="bench/results/cpu.json", help="pytest-benchmark JSON file")
    parser.add_argument("-o", "--output", help="markdown file to write (default: the JSON's path with .md)")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    text = render(data)
    output = Path(args.output) if args.output else Path(args.json).with_suffix(".md")
    output.write_text(text)
    print(text)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
