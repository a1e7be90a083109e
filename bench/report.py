"""Summarise a pytest-benchmark JSON file as a short markdown table.

    .venv/bin/python -m pytest bench --benchmark-only --benchmark-json=bench/results/cpu.json
    .venv/bin/python bench/report.py bench/results/cpu.json      # prints, writes bench/results/cpu.md

Speed-ups divide medians of the same run (the JSON holds one run): ``vs reference`` is the
pure-PyTorch reference's median over this row's, ``vs torch`` the torch peer's (rotary in PyTorch +
``scaled_dot_product_attention``). Above 1 means this row is faster.

Model prefill rows (``bench/bench_model.py``, ``op == "model"``) go to a second table, with peak
memory, the KV kept after the prefill, and SharedLLM's speed-up and memory ratio against each
baseline of the same group (the baseline's over SharedLLM's: above 1 = SharedLLM is better).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from sharedllm_ops.workloads import format_seconds

# (peer backends, column): the first peer of the tuple that ran in a row's group is its peer.
PEER_COLUMNS = (
    (("reference",), "vs reference"),
    (("torch_sdpa", "torch_copy", "torch_read"), "vs torch peer"),
    (("torch_unfused",), "vs rotary + SDPA"),
    (("cuda",), "vs CUDA kernel"),
)
ROOFLINE = {"copy": "bytes", "matmul": "flops"}  # roofline rows: the measured peaks


def median_of(bench: dict) -> float:
    """The row's median: the GPU timer's (``triton.testing.do_bench``, with an L2 flush or over CUDA-graph
    replays, see ``bench/conftest.py``) where it ran, else pytest-benchmark's."""
    info = bench["extra_info"]
    return info["median_s"] if "median_s" in info else bench["stats"]["median"]


def measured_peaks(data: dict) -> dict:
    """``{"bytes": B/s, "flops": FLOP/s}`` of the run's roofline rows (GPU runs only)."""
    peaks = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info.get("op") == "roofline" and ROOFLINE.get(info.get("pass")) in info:
            unit = ROOFLINE[info["pass"]]
            peaks[unit] = info[unit] / median_of(bench)
    return peaks


def percent_of_peak(info: dict, seconds: float, peaks: dict) -> str:
    for unit in ("flops", "bytes"):
        if unit in info and unit in peaks and info.get("op") != "roofline":
            return f"{100 * info[unit] / seconds / peaks[unit]:.0f}%"
    return ""


def throughput(info: dict, seconds: float) -> str:
    if "flops" in info:
        rate = info["flops"] / seconds
        return f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
    if "bytes" in info:
        return f"{info['bytes'] / seconds / 1e9:.2f} GB/s"
    return ""


def is_model_row(bench: dict) -> bool:
    return bench["extra_info"].get("op") == "model"


def table_rows(data: dict) -> list[list[str]]:
    """One row per op benchmark, in run order (the suites run each group's peers first)."""
    medians: dict[str, dict[str, float]] = defaultdict(dict)  # group -> backend -> median
    for bench in data["benchmarks"]:
        medians[bench["group"]][bench["extra_info"].get("backend", bench["name"])] = median_of(bench)
    rows = []
    peaks = measured_peaks(data)
    for bench in data["benchmarks"]:
        if is_model_row(bench):
            continue
        info, median = bench["extra_info"], median_of(bench)
        backend = info.get("backend", bench["name"])
        shape = info.get("shape", "")
        if "mode" in info:
            shape += f", {info['mode']}"
        speedups = []
        for peers, _ in PEER_COLUMNS:
            peer = next((p for p in peers if p in medians[bench["group"]]), None)
            peer_median = medians[bench["group"]].get(peer)
            speedups.append(f"{peer_median / median:.2f}x" if peer_median and peer != backend else "")
        rows.append(
            [
                info.get("op", bench["group"]),
                info.get("pass", ""),
                shape,
                info.get("dtype", ""),
                backend + (" (graph)" if info.get("timer", "").endswith("(graph)") else ""),
                format_seconds(median, decimals_s=3),
                throughput(info, median),
                percent_of_peak(info, median, peaks),
                *speedups,
            ]
        )
    return rows


# ---------------------------------------------------------------------------------------------
# model prefill rows

MODEL_BASELINES = (("full_attention", "full attention"), ("streaming", "streaming"),
                   ("encoder_decoder", "encoder-decoder"))
SHAREDLLM = "sharedllm"


def format_bytes(n) -> str:
    if n is None or n == "":
        return ""
    n = float(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _ratio(num, den) -> str:
    return f"{num / den:.2f}x" if num and den else ""


def _model_groups(data: dict) -> dict:
    """group -> backend -> (median, extra_info), in run order."""
    groups: dict[str, dict] = {}
    for bench in data["benchmarks"]:
        if is_model_row(bench):
            info = bench["extra_info"]
            groups.setdefault(bench["group"], {})[info.get("backend", bench["name"])] = (median_of(bench), info)
    return groups


def _notes(backend: str, info: dict) -> str:
    cpu = ""
    if "process_cpu_s" in info:
        threads = f" with {info['torch_threads']} thread(s)" if "torch_threads" in info else ""
        cpu = f"; CPU {format_seconds(info['process_cpu_s'], decimals_s=1)}{threads}"
    return _method_notes(backend, info) + cpu


def _method_notes(backend: str, info: dict) -> str:
    path = info.get("context_path") or {}

    def stage(key: str) -> str:
        return f"{key[:-2]} {format_seconds(path[key], decimals_s=2)}" if key in path else ""

    if backend == "streaming":
        return f"sink {info.get('sink', '?')}, window {info.get('window', '?')}"
    if backend == "encoder_decoder":
        return (f"cross-attention in {info.get('cross_attention_layers', '?')} layers, "
                f"chunks of {info.get('encoder_chunk', '?')}; {stage('encode_s')}")
    if backend == SHAREDLLM:
        kept = f", {path['compressed_tokens']} KV rows per layer" if "compressed_tokens" in path else ""
        return (f"lower model {info.get('lower_layers', '?')} layer(s){kept}; "
                + ", ".join(x for x in (stage("retrieve_s"), stage("encode_s")) if x))
    return "full causal attention"


def model_table_rows(data: dict) -> list[list[str]]:
    """One row per model benchmark; on baseline rows, SharedLLM's speed-up and memory ratio against it."""
    rows = []
    for group in _model_groups(data).values():
        shared = group.get(SHAREDLLM)
        for backend, (median, info) in group.items():
            peak = info.get("peak_memory_bytes")
            if shared is not None and backend != SHAREDLLM:
                speedup = _ratio(median, shared[0])
                memory = _ratio(peak, shared[1].get("peak_memory_bytes"))
            else:
                speedup = memory = ""
            rows.append([
                info.get("device", ""),
                f"{info.get('context_tokens', '?')} + {info.get('decoder_tokens', '?')}",
                info.get("model", ""),
                info.get("dtype", ""),
                backend + (" (graph)" if info.get("timer", "").endswith("(graph)") else ""),
                format_seconds(median, decimals_s=3),
                format_bytes(peak),
                format_bytes(info.get("kv_state_bytes")),
                speedup,
                memory,
                _notes(backend, info),
            ])
    return rows


def model_summary_rows(data: dict) -> list[list[str]]:
    """Per group: SharedLLM's speed-up (and memory ratio) against each baseline."""
    rows = []
    for group in _model_groups(data).values():
        if SHAREDLLM not in group:
            continue
        median, info = group[SHAREDLLM]
        peak = info.get("peak_memory_bytes")
        cells = []
        for backend, _ in MODEL_BASELINES:
            if backend in group:
                other_median, other_info = group[backend]
                memory = _ratio(other_info.get("peak_memory_bytes"), peak)
                cells.append(_ratio(other_median, median) + (f" ({memory} memory)" if memory else ""))
            else:
                cells.append("")
        rows.append([info.get("device", ""), f"{info.get('context_tokens', '?')} + {info.get('decoder_tokens', '?')}",
                     info.get("model", ""), *cells])
    return rows


def render_model(data: dict) -> str:
    header = ["device", "context + decoder", "model", "dtype", "backend", "median", "peak memory", "KV kept",
              "SharedLLM speed-up", "SharedLLM memory ratio", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in model_table_rows(data)]
    summary = model_summary_rows(data)
    if summary:
        sheader = ["device", "context + decoder", "model"] + [f"SharedLLM vs {name}" for _, name in MODEL_BASELINES]
        lines += ["", "| " + " | ".join(sheader) + " |", "|" + "---|" * len(sheader)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in summary]
    methods = {info.get("memory_method") for group in _model_groups(data).values() for _, info in group.values()}
    memory = {
        "cuda_max_memory_allocated": "on CUDA `torch.cuda.max_memory_allocated` during the call minus what was "
        "allocated before",
        "live_tensor_bytes": "on CPU the peak of the tensor storages the call's ops created, counted op by op "
        "(torch keeps no CPU allocator statistics; scratch memory freed inside an op is not seen)",
    }
    notes = [
        "Prefill of `context` then `decoder` tokens (batch 1, random weights and token ids), keeping what each "
        "method keeps for generation; the logits of the last position are the result. Median time per call.",
        "Peak memory: what the prefill allocates on top of the weights and inputs: "
        + "; ".join(memory[m] for m in sorted(m for m in methods if m in memory)) + ". "
        "KV kept: keys and values held after the prefill (from the shapes). Notes: SharedLLM's and the "
        "encoder-decoder's context-path stages in the last call; on CPU, the process's CPU time in the call "
        "(about threads x median when the cores were free to itself).",
        "SharedLLM speed-up / memory ratio: this baseline's median (peak memory) over SharedLLM's in the same "
        "run; above 1 = SharedLLM is faster (smaller). encoder_decoder is a CEPE-like proxy whose encoder is the "
        "model itself (an upper bound on CEPE's small encoder), so its ratio is an upper bound on SharedLLM's "
        "ratio against CEPE. See bench/bench_model.py.",
    ]
    return "## Model prefill\n\n" + "\n".join(notes) + "\n\n" + "\n".join(lines) + "\n"


def render(data: dict) -> str:
    header = ["op", "pass", "shape", "dtype", "backend", "median", "throughput", "% of measured peak"]
    header += [c for _, c in PEER_COLUMNS]
    rows = table_rows(data)
    keep = [i for i in range(len(header)) if i < 7 or any(row[i] for row in rows)]  # drop empty columns
    header, rows = [header[i] for i in keep], [[row[i] for i in keep] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
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
        "convention) or bytes read + written (chunk_pool, tree_topk) per second; on a GPU, % of the peak "
        "measured in the same run (roofline rows: a 2 GiB device copy, a bf16 8192^3 matmul). Speed-ups "
        "divide the medians of this same run; above 1 = this backend is faster. GPU rows: medians of "
        "triton.testing.do_bench, with the L2 cache flushed before every call, or over CUDA-graph replays "
        "(marked (graph): calls without host synchronisation).",
    ]
    has_ops = any(not is_model_row(bench) for bench in data["benchmarks"])
    has_model = any(is_model_row(bench) for bench in data["benchmarks"])
    if not has_model:
        return "# Benchmarks\n\n" + "\n".join(context) + "\n\n" + "\n".join(lines) + "\n"
    text = "# Benchmarks\n\n" + "\n".join(context[:2])
    if has_ops:
        text += "\n" + context[2] + "\n\n" + "\n".join(lines)
    return text + "\n\n" + render_model(data)


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
