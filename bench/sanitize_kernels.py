"""Every compiled kernel instantiation once, at tiny shapes: the workload ``compute-sanitizer`` checks
in ``bench/gpu_check.sh`` (memcheck, racecheck, synccheck).

Covers, per GPU backend (``cuda``, ``triton``): ``chunk_pool`` in both modes on the vectorised and
the scalar path; ``tree_topk`` with both scores; ``cross_inject_attention`` forward and backward on
the tensor-core path (head dims 64 and 128) and the general one (an odd head dim, float32),
with and without rotary, with grouped-query heads and an empty sequence; every dtype. Each case
is compared with the reference on the same device, so a kernel that reads out of bounds and still
"passes" the sanitizer is caught by its values too. Tiny shapes keep the sanitizer's 10-100x
slowdown to seconds.

    python bench/sanitize_kernels.py               # on the GPU
    python bench/sanitize_kernels.py --dry-run     # the same cases on the CPU with the cpp backend
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import sharedllm_ops as so
from sharedllm_ops import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _cu(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu.to(device)


def _close(name, got, expected, dtype, failures):
    got, expected = got.detach().float(), expected.detach().float()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    error = float((got - expected).abs().max()) if got.numel() else 0.0
    if got.shape != expected.shape or not error <= TOLERANCE[dtype] * scale:
        failures.append(f"{name}: max error {error:.3g} (shape {tuple(got.shape)} vs {tuple(expected.shape)})")


def chunk_pool_cases(backend, device, dtype, failures):
    cases = 0
    for head_dim in (64, 7):  # vectorised rows, then the scalar path
        x = torch.randn(37, 3, head_dim, device=device).to(dtype).requires_grad_()
        cu = _cu([0, 20, 17], device)
        for mode in ("mean", "first"):
            out = so.chunk_pool(x, cu, 4, mode, backend=backend)
            grad = torch.randn_like(out)
            (dx,) = torch.autograd.grad(out, x, grad)
            xr = x.detach().float().requires_grad_()
            expected = reference.chunk_pool(xr, cu, 4, mode)
            (dxr,) = torch.autograd.grad(expected, xr, grad.float())
            _close(f"chunk_pool {backend} {dtype} D={head_dim} {mode}", out, expected, dtype, failures)
            _close(f"chunk_pool backward {backend} {dtype} D={head_dim} {mode}", dx, dxr, dtype, failures)
            cases += 1
    return cases


def tree_topk_cases(backend, device, dtype, failures):
    cases = 0
    query = torch.randn(5, 32, device=device).to(dtype)
    nodes = torch.randn(5, 1, 14, 32, device=device).to(dtype)  # depth 3, binary: 14 nodes
    for score in ("cosine", "dot"):
        ids, _ = so.tree_topk(query, nodes, 3, k=1, branching=2, score=score, backend=backend)
        expected, _ = reference.tree_topk(query.float(), nodes.float(), 3, k=1, branching=2, score=score)
        if not torch.equal(ids.cpu(), expected.cpu()) and dtype == torch.float32:
            failures.append(f"tree_topk {backend} {dtype} {score}: ids differ")
        cases += 1
    return cases


def attention_cases(backend, device, dtype, failures):
    cases = 0
    head_dims = (64, 128) if dtype != torch.float32 else (64, 40)
    for head_dim in head_dims:
        for rotary in (False, True):
            q_lens, k_lens = [5, 0, 19], [300, 7, 0]  # 5 key tiles: 3 shares of the split all hold keys
            q = torch.randn(sum(q_lens), 4, head_dim, device=device).to(dtype).requires_grad_()
            k = torch.randn(sum(k_lens), 2, head_dim, device=device).to(dtype).requires_grad_()
            v = torch.randn(sum(k_lens), 2, head_dim, device=device).to(dtype).requires_grad_()
            cu_q, cu_k = _cu(q_lens, device), _cu(k_lens, device)
            extra = {}
            if rotary:
                positions = torch.arange(64, dtype=torch.float32, device=device)[:, None]
                freqs = positions * (1e4 ** (-torch.arange(0, head_dim, 2, device=device) / head_dim))[None]
                angles = torch.cat([freqs, freqs], 1)
                extra = dict(q_positions=torch.randint(0, 64, (sum(q_lens),), device=device, dtype=torch.int32),
                             k_positions=torch.randint(0, 64, (sum(k_lens),), device=device, dtype=torch.int32),
                             rotary_cos=angles.cos(), rotary_sin=angles.sin())
            # with rotary, also the forward split over the keys and the backward's split of the dK/dV work
            # (3 shares each, and their combine kernels)
            split_vars = ("SHAREDLLM_ATTENTION_SPLITS", "SHAREDLLM_ATTENTION_BACKWARD_SPLITS")
            for splits in ("1", "3") if rotary else ("1",):
                os.environ.update(dict.fromkeys(split_vars, splits))
                try:
                    out = so.cross_inject_attention(q, k, v, cu_q, cu_k, backend=backend, **extra)
                    grad = torch.randn_like(out)
                    grads = torch.autograd.grad(out, (q, k, v), grad)
                finally:
                    for var in split_vars:
                        del os.environ[var]
                refs = [t.detach().float().requires_grad_() for t in (q, k, v)]
                expected = reference.cross_inject_attention(*refs, cu_q, cu_k, **extra)
                expected_grads = torch.autograd.grad(expected, refs, grad.float())
                name = f"attention {backend} {dtype} D={head_dim} rotary={rotary} splits={splits}"
                _close(name, out, expected, dtype, failures)
                for what, got, ref in zip("qkv", grads, expected_grads):
                    _close(f"{name} d{what}", got, ref, dtype, failures)
                cases += 1
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run the cases on the CPU (cpp backend)")
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    args = parser.parse_args(argv)
    if args.dry_run:
        device, backends = "cpu", ["cpp"]
    elif not torch.cuda.is_available():
        print("sanitize_kernels: no CUDA device (use --dry-run on the CPU)")
        return 2
    else:
        device, backends = "cuda", args.backends
    torch.manual_seed(0)
    failures, counts, start = [], {}, time.perf_counter()
    for backend in backends:
        for dtype in DTYPES:
            for op, run in (("chunk_pool", chunk_pool_cases), ("tree_topk", tree_topk_cases),
                            ("cross_inject_attention", attention_cases)):
                try:
                    counts[op] = counts.get(op, 0) + run(backend, device, dtype, failures)
                except Exception as e:  # one failing op must not hide the others from the sanitizer
                    failures.append(f"{op} {backend} {dtype}: {type(e).__name__}: {e}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_kernels on {device} ({', '.join(backends)}): "
          + ", ".join(f"{op} {n} cases" for op, n in counts.items())
          + f"; {len(failures)} failures; {time.perf_counter() - start:.1f} s")
    for failure in failures:
        print("  FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
