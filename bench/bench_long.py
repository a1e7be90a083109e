"""Long-context compression: throughput and peak memory of ``compress_context`` from 8K to 1M tokens.

The embedded SmolLM2-135M-Instruct with the shipped injector (8 injected layers, chunks of 1024,
trees of height 3, 32 rows per node, ``retrieval="query"``) compresses one context of N tokens,
batch 1, with a short question driving the retrieval. Each size runs in a fresh process, so the
peak resident memory it reports is its own (interpreter, torch, weights, the compression's
activations, the compressed K/V), read from the kernel (``VmHWM``, else ``ru_maxrss``). Per size:
``compress_s`` and ``tokens_per_s`` of one call after a 2K warm-up; ``peak_rss`` over the process's
life, ``compress_peak_rss`` in the call alone (the high-water mark is reset before it where Linux
allows), ``baseline_rss`` once the model is loaded; ``kv_bytes``, the compressed keys and values
kept; ``ctx.stats`` (stage seconds, passes, embedded nodes); on CUDA ``gpu_peak_bytes``.
The context is real text: standard-library ``.py`` files (no tests, no ``text.EVAL_MODULES``),
tokenized once and cached in the temporary folder for every process to share.

As a script (prints the table; ``--output`` also writes it, as markdown and JSON)::

    .venv/bin/python -m bench.bench_long --sizes 8192 32768 131072 524288 1048576 --output bench/results/long_cpu.md
    python -m bench.bench_long --device cuda --dtype bfloat16 --sizes 8192 32768 131072   # the GPU rows

With pytest-benchmark (``pytest bench --benchmark-only -k long``): 8K only by default;
``SHAREDLLM_BENCH_LONG_SIZES=8192,131072`` (comma-separated) picks the sizes. The timed call is the
compression alone: the fresh process loads the model, warms up, then waits for a go signal.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import inspect
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ALL_SIZES = (8192, 32768, 131072, 524288, 1048576)
SIZES_VARIABLE = "SHAREDLLM_BENCH_LONG_SIZES"
QUESTION = "Which function in this code parses its arguments, and what does it return?"
WARMUP_TOKENS = 2048
TARGETS = {131072: 3e9, 1048576: 6e9}  # issue 15: peak RSS under 3 GB at 128K, 6 GB at 1M (float32, CPU)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


def sizes_from_env() -> tuple[int, ...]:
    """The pytest cases' context lengths: ``$SHAREDLLM_BENCH_LONG_SIZES`` (comma-separated), else 8K."""
    value = os.environ.get(SIZES_VARIABLE, "8192")
    sizes = tuple(int(s) for s in value.split(",") if s.strip().isdigit())
    if len(sizes) != len(value.split(",")) or min(sizes) < 1:
        raise ValueError(f"{SIZES_VARIABLE} must be comma-separated positive token counts (8192,131072), got {value!r}")
    return sizes


SIZES = sizes_from_env()


# ---------------------------------------------------------------------------------------------
# the text


def corpus_files() -> list[Path]:
    """Standard-library ``.py`` files, sorted: no test folders, no installed packages, no evaluation module."""
    from sharedllm_ops.model.text import EVAL_MODULES, stdlib_dir

    root = stdlib_dir()
    return [path for path in sorted(root.rglob("*.py"))
            if _SKIPPED_DIRS.isdisjoint(path.relative_to(root).parts[:-1])
            and str(path.relative_to(root)) not in EVAL_MODULES]


def corpus_ids(tokens: int) -> Path:
    """A file holding at least ``tokens`` token ids (int32 ``[N]``) of ``corpus_files()``, built once
    per Python version and reused by every process (written whole, then renamed into place)."""
    folder = Path(tempfile.gettempdir()) / "sharedllm_bench_long"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    cached = sorted((int(p.stem.rsplit("-", 1)[1]), p) for p in folder.glob(f"ids-{tag}-*.pt"))
    if cached and cached[-1][0] >= tokens:
        return next(path for count, path in cached if count >= tokens)
    from sharedllm_ops.model.pretrained import load_base_model
    from sharedllm_ops.model.text import tokenize_text

    _, tokenizer = load_base_model()
    pieces, total = [], 0
    for path in corpus_files():
        pieces.append(tokenize_text(tokenizer, path.read_text(encoding="utf-8", errors="replace") + "\n\n").int())
        total += pieces[-1].numel()
        if total >= tokens:
            break
    if total < tokens:
        raise RuntimeError(f"the standard library holds {total} tokens of text, fewer than the {tokens} asked for")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ids-{tag}-{total}.pt"
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(torch.cat(pieces), partial)
    os.replace(partial, path)
    return path


def model_missing() -> str | None:
    """Why the embedded model cannot be loaded here, or None if it can."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    from sharedllm_ops.model.pretrained import shipped_injector, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        return str(error)
    return None if shipped_injector() is not None else "this installation ships no injector"


# ---------------------------------------------------------------------------------------------
# the measuring process (``--child``): load, warm up, report "ready", wait for "go", compress, report


def memory_kib(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux), or None."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def peak_rss_bytes() -> int:
    hwm = memory_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Resets the kernel's high-water mark of this process (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def pass_kwargs(model, max_pass_tokens: int | None) -> tuple[dict, int | None]:
    """The ``compress_context`` keyword for the pass size, and the pass size in effect (None: one pass)."""
    if "max_pass_tokens" in inspect.signature(model.compress_context).parameters:
        used = model.config.max_pass_tokens if max_pass_tokens is None else max_pass_tokens
        return ({} if max_pass_tokens is None else {"max_pass_tokens": max_pass_tokens}), used
    if max_pass_tokens is not None:  # a compress_context from before group-wise compression
        raise SystemExit("--max-pass-tokens: this version of compress_context has no max_pass_tokens")
    return {}, None


def measure(args) -> None:
    from sharedllm_ops.model import SharedLLMForCausalLM
    from sharedllm_ops.model.pretrained import load_base_model, shipped_injector

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    base, tokenizer = load_base_model(dtype=DTYPES[args.dtype], device=device)
    model = SharedLLMForCausalLM.from_pretrained(shipped_injector(), base).eval()
    gc.collect()
    rss = memory_kib("VmRSS")
    report = {"baseline_rss": None if rss is None else rss * 1024, "load_peak_rss": peak_rss_bytes(),
              "torch_threads": torch.get_num_threads()}
    if cuda:
        report["gpu_weights_bytes"] = torch.cuda.memory_allocated(device)
    ids = torch.load(args.ids, weights_only=True)[: args.size].long()
    if ids.numel() < args.size:
        raise SystemExit(f"{args.ids} holds {ids.numel()} tokens, fewer than {args.size}")
    ids = ids[None].to(device)
    query = tokenizer(QUESTION, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    report["query_tokens"] = query.shape[1]
    kwargs, report["max_pass_tokens"] = pass_kwargs(model, args.max_pass_tokens)
    model.compress_context(ids[:, :WARMUP_TOKENS], query_input_ids=query, **kwargs)
    gc.collect()
    report["setup_peak_rss"] = peak_rss_bytes()  # load + warm-up
    report["peak_reset"] = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    print("ready " + json.dumps(report), flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the benchmark process was not told to go")

    cpu_start, start = time.process_time(), time.perf_counter()
    ctx = model.compress_context(ids, query_input_ids=query, **kwargs)
    if cuda:
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    phase_peak = peak_rss_bytes()
    result = {
        "context_tokens": args.size,
        "compress_s": seconds,
        "tokens_per_s": args.size / seconds,
        "process_cpu_s": cpu_seconds,  # about threads x compress_s when the cores were free
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "compress_peak_rss": phase_peak if report["peak_reset"] else None,
        "peak_rss": max(phase_peak, report["setup_peak_rss"]),
        "kv_bytes": sum(t.numel() * t.element_size() for t in ctx.keys + ctx.values),
        "kv_rows": ctx.keys[0].shape[0],
        "stats": ctx.stats,
    }
    if not all(bool(torch.isfinite(t).all()) for t in ctx.keys + ctx.values):
        raise SystemExit(f"{args.size} tokens: the compressed keys/values are not all finite")
    if cuda:
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    print("result " + json.dumps(result), flush=True)


class Worker:
    """A fresh process measuring one size: started and loaded on creation, timed by :meth:`compress`."""

    def __init__(self, size: int, ids: Path, device: str, dtype: str, max_pass_tokens=None, threads=None):
        command = [sys.executable, "-m", "bench.bench_long", "--child", "--ids", str(ids), "--size", str(size),
                   "--device", device, "--dtype", dtype]
        command += ["--max-pass-tokens", str(max_pass_tokens)] if max_pass_tokens else []
        command += ["--threads", str(threads)] if threads else []
        self.size = size
        # stderr is inherited: warnings and tracebacks of the child show where they happen
        self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.ready = self._read("ready")
        except BaseException as error:  # interrupted while loading, or the process died: leave nothing behind
            self.__exit__(type(error))
            raise

    def _read(self, tag: str) -> dict:
        for line in self.process.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        raise RuntimeError(f"the {self.size}-token benchmark process ended (exit status {self.process.wait()}) "
                           f"before reporting {tag!r}: see its error above")

    def compress(self) -> dict:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return {**self.ready, **self._read("result")}  # the process then exits (untimed: __exit__ waits)

    def __enter__(self):
        return self

    def __exit__(self, error, *details):
        if error is not None and self.process.poll() is None:
            self.process.kill()
        self.process.stdin.close()  # a process still waiting for "go" reads the end of input and exits
        self.process.wait()
        self.process.stdout.close()


# ---------------------------------------------------------------------------------------------
# the table


def gb(n) -> str:
    return "" if n is None else f"{n / 1e9:.2f} GB"


def size_name(size: int) -> str:
    return f"{size // 1048576}M" if size % 1048576 == 0 else f"{size // 1024}K" if size % 1024 == 0 else str(size)


def target_verdict(row: dict) -> str:
    target = TARGETS.get(row["context_tokens"]) if row.get("device", "cpu") == "cpu" else None
    return "" if target is None else f"{'yes' if row['peak_rss'] < target else 'NO'} (< {target / 1e9:.0f} GB)"


def table(rows: list[dict]) -> str:
    cuda = any("gpu_peak_bytes" in row for row in rows)
    head = ["context", "compress", "CPU time", "tokens/s", "peak RSS", "peak RSS in the call", "baseline RSS",
            "K/V kept", "K/V rows", "retrieve", "encode", "pool", "passes", "embedded nodes", "RSS target met"]
    head += ["GPU peak", "GPU weights"] if cuda else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        stats = row["stats"]
        cells = [size_name(row["context_tokens"]), f"{row['compress_s']:.2f} s", f"{row['process_cpu_s']:.1f} s",
                 f"{row['tokens_per_s']:.0f}",
                 gb(row["peak_rss"]), gb(row.get("compress_peak_rss")), gb(row["baseline_rss"]),
                 f"{row['kv_bytes'] / 1e6:.1f} MB", str(row["kv_rows"]),
                 *(f"{stats[k]:.2f} s" if k in stats else "" for k in ("retrieve_s", "encode_s", "pool_s")),
                 str(stats.get("passes", "")), str(stats.get("embedded_nodes", "")), target_verdict(row)]
        cells += [gb(row.get("gpu_peak_bytes")), gb(row.get("gpu_weights_bytes"))] if cuda else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = (re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.M) or [platform.processor()])[0]
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    info["commit"] = git("rev-parse", "--short", "HEAD") + dirty
    return info


def markdown(record: dict) -> str:
    m, s, rows = record["machine"], record["setting"], record["rows"]
    passes = s["max_pass_tokens"] or "none (compress_context has no max_pass_tokens: one pass over the whole context)"
    threads = rows[0]["torch_threads"]
    text = [
        f"# Long-context compression, {s['device']}",
        "",
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']}, commit {m.get('commit', '?')}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']} with {threads} threads, transformers {m['transformers']}, Python {m['python']}  ",
        f"Model: {s['model']}, {s['dtype']}, batch 1, retrieval \"{s['retrieval']}\" with a {s['query_tokens']}-token "
        f"question; max_pass_tokens: {passes}",
        "",
        "One `compress_context` call per size, each size in a fresh process (see bench/bench_long.py). "
        "Peak RSS: the kernel's high-water mark of that process over its whole life (model loading "
        "and a 2K warm-up included); in the call: the high-water mark reset just before the timed call. "
        "Baseline: the RSS once the model is loaded. CPU time: the process's CPU seconds in the call "
        "(about threads x compress when the cores are free). K/V kept: compressed keys and values of all "
        "injected layers. GB = 1e9 bytes.",
    ]
    if record.get("note"):
        text += ["", record["note"]]
    return "\n".join(text + ["", table(rows), ""])


# ---------------------------------------------------------------------------------------------
# script and pytest entry points


def setting(device: str, dtype: str, rows: list[dict]) -> dict:
    from sharedllm_ops.model.config import SharedLLMConfig
    from sharedllm_ops.model.pretrained import shipped_injector

    cfg = SharedLLMConfig.load(shipped_injector())
    return {"device": device, "dtype": dtype, "max_pass_tokens": rows[0]["max_pass_tokens"],
            "retrieval": cfg.retrieval, "query_tokens": rows[0]["query_tokens"], "config": cfg.to_dict(),
            "model": f"SmolLM2-135M-Instruct (embedded) + shipped injector ({cfg.num_injected_layers} injected layers, "
                     f"chunks of {cfg.chunk_size}, depth {cfg.tree_depth}, {cfg.tokens_per_node} rows per node)"}


def ticker(label: str, stop: threading.Event, every: float = 60.0) -> None:
    start = time.perf_counter()
    while not stop.wait(every):
        print(f"    {label}: {time.perf_counter() - start:.0f} s ...", file=sys.stderr, flush=True)


def run_sizes(args) -> list[dict]:
    ids = corpus_ids(max(args.sizes))
    rows = []
    for i, size in enumerate(args.sizes, 1):
        print(f"[{i}/{len(args.sizes)}] {size} tokens: a fresh process loads the model", file=sys.stderr, flush=True)
        stop = threading.Event()
        threading.Thread(target=ticker, args=(f"{size} tokens", stop), daemon=True).start()
        try:
            with Worker(size, ids, args.device, args.dtype, args.max_pass_tokens, args.threads) as worker:
                row = worker.compress()
        finally:
            stop.set()
        row["device"] = args.device
        rows.append(row)
        print(f"    {row['compress_s']:.1f} s, {row['tokens_per_s']:.0f} tokens/s, peak RSS {gb(row['peak_rss'])}, "
              f"K/V {row['kv_bytes'] / 1e6:.1f} MB", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_long", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(ALL_SIZES), help="context lengths in tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-pass-tokens", type=int, help="per-call override of the config's max_pass_tokens")
    parser.add_argument("--threads", type=int, help="torch threads in the measuring processes (default: torch's)")
    parser.add_argument("--output", type=Path, help="write the table here (markdown) and as JSON beside it")
    parser.add_argument("--note", help="a remark for the markdown file (e.g. how busy the machine was)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure(args)
        return 0
    if any(size < 1 for size in args.sizes):
        parser.error(f"--sizes must be positive token counts, got {args.sizes}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    missing = model_missing()
    if missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return 2
    rows = run_sizes(args)
    record = {"command": "python -m bench.bench_long " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "setting": setting(args.device, args.dtype, rows),
              "note": args.note, "targets_bytes": {str(k): v for k, v in TARGETS.items()}, "rows": rows}
    text = markdown(record)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


@pytest.fixture(scope="module")
def long_ids():
    missing = model_missing()
    if missing:
        pytest.skip(f"long-context benchmark: {missing}")
    return corpus_ids(max(SIZES))


def run_case(size: int, device: str, dtype: str, ids: Path, timed, benchmark) -> None:
    with Worker(size, ids, device, dtype) as worker:
        result: dict = {}
        info = {"op": "compress_context", "pass": "long context", "dtype": dtype,
                "shape": f"{size} context tokens, SmolLM2-135M + shipped injector, batch 1",
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        timed(lambda: result.update(worker.compress()), group=f"long context {device} {size} {dtype}",
              backend="sharedllm", info=info, pedantic=dict(rounds=1, iterations=1, warmup_rounds=0))
    benchmark.extra_info.update(result)


@pytest.mark.parametrize("size", SIZES, ids=size_name)
def test_long_compress_cpu(size, long_ids, timed, benchmark):
    run_case(size, "cpu", "float32", long_ids, timed, benchmark)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU rows (bf16): no CUDA device")
@pytest.mark.parametrize("size", SIZES, ids=size_name)
def test_long_compress_gpu(size, long_ids, timed, benchmark):
    run_case(size, "cuda", "bfloat16", long_ids, timed, benchmark)


if __name__ == "__main__":
    sys.exit(main())
