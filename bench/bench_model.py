"""Model prefill: SharedLLM against full attention, a streaming baseline and an encoder-decoder
baseline, at growing context lengths (``bench/baselines.py`` has the four methods).

Each case reads a context of ``Lc`` tokens followed by ``Ld`` decoder tokens (batch 1, random token
ids), keeps what the method keeps for generation, and returns the logits of the last decoder position:

* ``full_attention``: the stock model over ``[context; decoder]`` in one pass.
* ``streaming``: StreamingLLM, sink 4 + recent window, read in blocks of ``window`` tokens.
* ``encoder_decoder``: a CEPE-like proxy (context encoded in independent 1024-token chunks by the
  model's own layers, every decoder layer cross-attends to all of it, uncompressed). Its encoder is
  the full model, an upper bound on CEPE's small encoder: SharedLLM's ratio against it is an upper
  bound on its ratio against CEPE (see ``build_encoder_decoder``).
* ``sharedllm``: the paper's configuration (1024-token chunks, trees of height 3, 32 KV rows per node,
  query-aware retrieval), with 1/8 of the layers as the lower model (4 of 32 for LLaMA-2-7B).

Cases:

* CPU (always): a SmolLM2-135M-shaped random model in float32 (hidden 576, 9 heads, 3 KV heads, MLP
  1536, vocab 49152) with **8 of its 30 layers** (``SHAREDLLM_BENCH_CPU_LAYERS`` changes it; the
  lower model has ``round(layers / 8)`` layers), contexts 2K, 4K, 8K (``SHAREDLLM_BENCH_CPU_CONTEXTS``,
  comma-separated) + 256 decoder tokens, streaming window 1024, one timed round each: the 30-layer
  model takes about a minute per full-attention call at 2K on 2 cores, several at 8K.
  With 8 layers SharedLLM's retrieval pass (one layer over every tree node: 3x the context) weighs as
  much as 3 of the baselines' 8 layers, against 3 of 32 on LLaMA-2-7B: the CPU ratios understate
  SharedLLM's advantage at the 7B shape.
* GPU (only when CUDA is available, else skipped): a LLaMA-2-7B-shaped random model in bfloat16
  (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000), contexts 32K and 128K + 4096 decoder
  tokens (LLaMA-2's window), streaming window 4096; full attention at 128K keeps a 66 GiB KV cache.
  Select with ``-k gpu`` (``-k cpu`` for the CPU cases).

Peak memory (``peak_memory_bytes``) is what the prefill allocates on top of the weights and inputs
(activations, KV caches, compressed context), measured in the timed call itself: on CUDA
``torch.cuda.max_memory_allocated`` (no overhead); on CPU, where torch keeps no allocator
statistics, by counting live tensor storages op by op (``baselines.peak_memory``: the first timed
call runs under it, slower by a Python callback per op, ~0.1 ms for ~1-6K ops per call, 1-2% at
these sizes; scratch memory freed inside an op is not seen). ``kv_state_bytes`` is the KV kept for
generation after the prefill, computed from the shapes. On the ``sharedllm`` row,
``speedup_vs_<baseline>`` divides that baseline's median by SharedLLM's and
``memory_ratio_vs_<baseline>`` its peak memory by SharedLLM's (same run). On CPU, ``process_cpu_s``
is the process's CPU seconds in the last call (with T torch threads on T idle cores, about T x the
wall time: much less means the cores were shared). ``SHAREDLLM_BENCH_THREADS`` sets torch's thread
count for the CPU cases (restored after them; recorded as ``torch_threads``): on a 2-core machine
shared with other work, 2 threads wait on each other at every op, which penalises the methods that
run many small ops (streaming's blocks) far more than the others; 1 thread is then the fairer
setting. Every case checks that its
logits are finite, and building the models checks that streaming with a window over the whole input
equals full attention.

    .venv/bin/python -m pytest bench/bench_model.py --benchmark-only -k cpu --benchmark-json=bench/results/model_cpu.json
    .venv/bin/python bench/report.py bench/results/model_cpu.json
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import pytest
import torch

from . import baselines as B
from .conftest import dtype_name

# SharedLLM last: its ratios need the baselines' medians of the same run
BACKENDS = ("full_attention", "streaming", "encoder_decoder", "sharedllm")
BASELINES = BACKENDS[:-1]
SINK = 4
ENCODER_CHUNK = 1024


@dataclass(frozen=True)
class Setting:
    device: str
    name: str  # the model shape, in words
    shape: dict
    dtype: torch.dtype
    layers: int
    contexts: tuple
    decoder: int
    window: int  # streaming window (sink included)
    pedantic: dict

    @property
    def lower_layers(self) -> int:
        return max(1, round(self.layers / 8))  # the paper: 4 of LLaMA-2-7B's 32 layers


CPU_LAYERS = int(os.environ.get("SHAREDLLM_BENCH_CPU_LAYERS", "8"))
CPU_CONTEXTS = tuple(int(c) for c in os.environ.get("SHAREDLLM_BENCH_CPU_CONTEXTS", "2048,4096,8192").split(","))
CPU = Setting(
    device="cpu", name=f"SmolLM2-135M shape, {CPU_LAYERS} of 30 layers", shape=B.SMOLLM2_135M_SHAPE,
    dtype=torch.float32, layers=CPU_LAYERS, contexts=CPU_CONTEXTS, decoder=256, window=1024,
    pedantic=dict(rounds=1, iterations=1, warmup_rounds=0),
)
GPU = Setting(
    device="cuda", name="LLaMA-2-7B shape", shape=B.LLAMA2_7B_SHAPE, dtype=torch.bfloat16, layers=32,
    contexts=(32768, 131072), decoder=4096, window=4096,
    pedantic=dict(rounds=2, iterations=1, warmup_rounds=1),
)
GPU_PEDANTIC_128K = dict(rounds=1, iterations=1, warmup_rounds=1)


class Suite:
    """One set of weights and the four methods around it, on one device."""

    def __init__(self, setting: Setting):
        self.setting = setting
        s = setting
        self.base = B.random_llama(s.shape, dtype=s.dtype, device=s.device, num_hidden_layers=s.layers)
        encdec_base, sharedllm_base = B.share_weights(self.base), B.share_weights(self.base)
        self.weights_bytes = B.model_bytes(self.base)
        self.encoder_decoder = B.build_encoder_decoder(encdec_base, chunk_size=ENCODER_CHUNK)
        self.sharedllm = B.build_sharedllm(sharedllm_base, num_injected_layers=s.lower_layers)
        cfg = self.base.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_row_bytes = 2 * cfg.num_key_value_heads * head_dim * s.dtype.itemsize
        self.medians: dict = {}  # (context, backend) -> (median s, peak bytes)
        self.sanity_check()

    def prefill(self, backend: str, context_ids, decoder_ids, stats: dict):
        if backend == "full_attention":
            return B.prefill_full(self.base, context_ids, decoder_ids)
        if backend == "streaming":
            return B.prefill_streaming(self.base, context_ids, decoder_ids, sink=SINK, window=self.setting.window)
        if backend == "encoder_decoder":
            return B.prefill_encoder_decoder(self.encoder_decoder, context_ids, decoder_ids, stats)
        return B.prefill_sharedllm(self.sharedllm, context_ids, decoder_ids, stats)

    def inputs(self, context: int):
        gen = torch.Generator().manual_seed(context)
        vocab = self.base.config.vocab_size
        ids = torch.randint(0, vocab, (1, context + self.setting.decoder), generator=gen).to(self.setting.device)
        return ids[:, :context], ids[:, context:]

    def sanity_check(self):
        """Cheap checks at a tiny size, which also warm every path up: streaming with a window
        longer than the input is full attention, and every method's logits are finite."""
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, self.base.config.vocab_size, (1, 96), generator=gen).to(self.setting.device)
        ctx, dec = ids[:, :64], ids[:, 64:]
        full = B.prefill_full(self.base, ctx, dec)
        whole = B.prefill_streaming(self.base, ctx, dec, sink=SINK, window=128)
        tol = 1e-4 if self.setting.dtype == torch.float32 else 5e-2
        if not torch.allclose(full, whole, atol=tol, rtol=tol):
            raise AssertionError(f"streaming with a window over the whole input differs from full attention "
                                 f"by {(full - whole).abs().max().item():.3g}")
        for backend in BACKENDS:
            check_logits(backend, self.prefill(backend, ctx, dec, {}), self.base.config.vocab_size)

    def kv_state_bytes(self, backend: str, context: int, stats: dict) -> int:
        """Bytes of the KV the method keeps after the prefill (what generation reads at every step)."""
        s, L, Ld = self.setting, self.setting.layers, self.setting.decoder
        rows = {
            "full_attention": L * (context + Ld),
            "streaming": L * min(s.window, context + Ld),
            "encoder_decoder": L * (stats.get("compressed_tokens", context) + Ld),
            "sharedllm": s.lower_layers * stats.get("compressed_tokens", 0) + L * Ld,
        }[backend]
        return rows * self.kv_row_bytes


def check_logits(backend: str, logits: torch.Tensor, vocab: int) -> None:
    if logits.shape != (1, vocab):
        raise AssertionError(f"{backend}: logits of shape {tuple(logits.shape)}, expected (1, {vocab})")
    if not bool(torch.isfinite(logits).all()):
        raise AssertionError(f"{backend}: non-finite logits")


def release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def cpu_suite():
    threads = os.environ.get("SHAREDLLM_BENCH_THREADS")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        suite = Suite(CPU)
        yield suite
        del suite
        release_memory("cpu")
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def gpu_suite():
    suite = Suite(GPU)
    yield suite
    del suite
    release_memory("cuda")


def run_case(suite: Suite, context: int, backend: str, timed, benchmark, session_medians, pedantic: dict):
    s = suite.setting
    context_ids, decoder_ids = suite.inputs(context)
    stats: dict = {}
    peak = {"bytes": 0, "method": ""}
    release_memory(s.device)

    def call():
        start = time.process_time()
        # on CUDA every call measures (free, and synchronises for the timing); on CPU the first one
        if s.device == "cuda" or not peak["method"]:
            logits, mem = B.peak_memory(lambda: suite.prefill(backend, context_ids, decoder_ids, stats), s.device)
            peak["bytes"], peak["method"] = max(peak["bytes"], mem.peak_bytes), mem.method
        else:
            logits = suite.prefill(backend, context_ids, decoder_ids, stats)
        peak["process_cpu_s"] = time.process_time() - start
        return logits

    group = f"model prefill {s.device} {context}+{s.decoder} {dtype_name(s.dtype)}"
    info = {
        "op": "model",
        "pass": "prefill",
        "shape": f"context {context} + decoder {s.decoder}, {s.name}",
        "dtype": dtype_name(s.dtype),
        "device": torch.cuda.get_device_name() if s.device == "cuda" else "cpu",
        "model": s.name,
        "layers": s.layers,
        "context_tokens": context,
        "decoder_tokens": s.decoder,
        "weights_bytes": suite.weights_bytes,
        "torch_threads": torch.get_num_threads(),
    }
    if backend == "streaming":
        info.update(sink=SINK, window=s.window)
    if backend == "encoder_decoder":
        info.update(encoder_chunk=ENCODER_CHUNK, cross_attention_layers=s.layers)
    if backend == "sharedllm":
        cfg = suite.sharedllm.config
        info.update(lower_layers=cfg.num_injected_layers, chunk_size=cfg.chunk_size, tree_depth=cfg.tree_depth,
                    tokens_per_node=cfg.tokens_per_node, retrieval=cfg.retrieval)
    logits = timed(call, group=group, backend=backend, info=info, pedantic=pedantic)
    check_logits(backend, logits, suite.base.config.vocab_size)

    extra = benchmark.extra_info
    extra["peak_memory_bytes"] = peak["bytes"]
    extra["memory_method"] = peak["method"]
    extra["kv_state_bytes"] = suite.kv_state_bytes(backend, context, stats)
    if s.device == "cpu":  # CPU seconds of the process in the last call: a hint of how contended the cores were
        extra["process_cpu_s"] = round(peak["process_cpu_s"], 3)
    if stats:  # the wrapper's context path in the last call: sizes and stage seconds
        extra["context_path"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()}
    median = session_medians.get((group, backend), (None, None))[0]
    if median is not None:
        suite.medians[(context, backend)] = (median, peak["bytes"])
    if backend == "sharedllm" and median is not None:
        for other in BASELINES:
            if (context, other) in suite.medians:
                other_median, other_peak = suite.medians[(context, other)]
                extra[f"speedup_vs_{other}"] = round(other_median / median, 3)
                if peak["bytes"]:
                    extra[f"memory_ratio_vs_{other}"] = round(other_peak / peak["bytes"], 3)
    del logits
    release_memory(s.device)


CPU_CASES = [(c, b) for c in CPU.contexts for b in BACKENDS]
GPU_CASES = [(c, b) for c in GPU.contexts for b in BACKENDS]


def case_id(case) -> str:
    context, backend = case
    size = f"{context // 1024}k" if context % 1024 == 0 else str(context)
    return f"{size}-{backend}"


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_model_prefill_cpu(cpu_suite, case, timed, benchmark, session_medians):
    context, backend = case
    run_case(cpu_suite, context, backend, timed, benchmark, session_medians, CPU.pedantic)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU cases (LLaMA-2-7B shape, bf16, 8K-128K): no CUDA device")
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_model_prefill_gpu(gpu_suite, case, timed, benchmark, session_medians):
    context, backend = case
    pedantic = GPU_PEDANTIC_128K if context >= 131072 else GPU.pedantic
    run_case(gpu_suite, context, backend, timed, benchmark, session_medians, pedantic)
