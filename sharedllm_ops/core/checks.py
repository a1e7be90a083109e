"""Argument checks of the ops, one message per error, shared by the public functions
(``sharedllm_ops.ops``) and the Triton custom ops; the C++ bindings repeat them in C++ for direct
``torch.ops.sharedllm`` calls.

``check_<op>_arguments`` read shapes, dtypes, strides and devices only (no tensor values), so they
cost nothing on the GPU and trace under ``torch.compile``. The ``*_values`` checks read values (one
device-to-host copy); the reference and Triton backends run them, the C++/CUDA kernels check values
themselves.
"""

from __future__ import annotations

import torch

from ..reference.chunk_pool import POOL_MODES
from ..reference.tree_topk import SCORE_MODES, num_tree_nodes

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name: str, shape: str, rank: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have shape {shape} ({rank} dims), got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def check_float(t, name: str, shape: str, rank: int) -> None:
    check_tensor(t, name, shape, rank, FLOAT_DTYPES)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dimension, got strides {t.stride()}")


def check_same(t, ref, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_devices(ref: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) lives on ``ref``'s device. Also run by the fake
    kernels, where a tensor on the meta device would otherwise select them silently."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on the device of the data ({ref.device}), got {t.device}")


def check_index(t, name: str, shape: str, device: torch.device) -> None:
    check_tensor(t, name, shape, 1, (torch.int32,))
    if t.device != device:
        raise ValueError(f"{name} must be on the device of the data ({device}), got {t.device}")


def check_cu_seqlens(cu, name: str, device: torch.device) -> None:
    check_index(cu, name, "[S + 1]", device)
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have at least one element (it starts with 0)")


def check_cu_seqlens_values(cu: torch.Tensor, total: int, name: str, total_name: str) -> None:
    """Value checks for the reference backend (the kernels do their own)."""
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}] = {values[i]} < {name}[{i-1}] = {values[i-1]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {values[-1]}")


def check_positions_values(pos: torch.Tensor, max_pos: int, name: str) -> None:
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= max_pos):
        raise ValueError(
            f"{name} must lie in [0, {max_pos}) (the rows of the rotary table), "
            f"got values in [{int(pos.min())}, {int(pos.max())}]"
        )


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(value, name: str, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


# ---------------------------------------------------------------------------------------------
# per op


def check_chunk_pool_arguments(x, cu_seqlens, tokens_per_node, mode) -> None:
    """``x [N, H, D]`` float, ``cu_seqlens`` int32 ``[S + 1]`` on x's device, ``tokens_per_node >= 1``."""
    check_float(x, "x", "[N, H, D]", 3)
    check_cu_seqlens(cu_seqlens, "cu_seqlens", x.device)
    check_int(tokens_per_node, "tokens_per_node", 1)
    check_choice(mode, "mode", POOL_MODES)


def check_chunk_pool_backward_arguments(grad_out, cu_seqlens, num_rows, tokens_per_node, mode) -> None:
    """``grad_out [S * P, H, D]`` for ``S`` segments of ``cu_seqlens`` and ``P = tokens_per_node``."""
    check_float(grad_out, "grad_out", "[S * P, H, D]", 3)
    check_cu_seqlens(cu_seqlens, "cu_seqlens", grad_out.device)
    check_int(tokens_per_node, "tokens_per_node", 1)
    check_int(num_rows, "num_rows", 0)
    check_choice(mode, "mode", POOL_MODES)
    rows = (cu_seqlens.shape[0] - 1) * tokens_per_node
    if grad_out.shape[0] != rows:
        raise ValueError(f"grad_out must have shape [S * P = {rows}, H, D], got {tuple(grad_out.shape)}")


def check_tree_topk_arguments(query, node_emb, depth, k, branching, score) -> None:
    """``query [B, D]``, ``node_emb [B, C, T, D]`` with ``T = b + ... + b^depth``, ``1 <= k <= b``."""
    check_float(query, "query", "[B, D]", 2)
    check_float(node_emb, "node_emb", "[B, C, T, D]", 4)
    check_same(node_emb, query, "node_emb", "query")
    check_int(depth, "depth", 1)
    check_int(branching, "branching", 2)
    check_int(k, "k", 1, branching)
    check_choice(score, "score", SCORE_MODES)
    B, D = query.shape
    if node_emb.shape[0] != B or node_emb.shape[3] != D:
        raise ValueError(f"node_emb must have shape [B={B}, C, T, D={D}], got {tuple(node_emb.shape)}")
    T = num_tree_nodes(depth, branching)
    if node_emb.shape[2] != T:
        raise ValueError(
            f"node_emb.shape[2] must be the number of tree nodes b + ... + b^depth = {T} "
            f"(depth={depth}, branching={branching}), got {node_emb.shape[2]}"
        )


def check_tree_spans_arguments(node_ids, chunk_lens, depth, branching) -> None:
    check_tensor(node_ids, "node_ids", "[B, C, P]", 3, (torch.int32, torch.int64))
    check_tensor(chunk_lens, "chunk_lens", "[B, C]", dtypes=(torch.int32, torch.int64))
    check_int(depth, "depth", 1)
    check_int(branching, "branching", 2)


def check_cross_inject_attention_arguments(
    q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos, rotary_sin
) -> None:
    """Shapes, dtypes, strides and devices of ``cross_inject_attention`` (see the public function)."""
    check_float(q, "q", "[Nq, Hq, D]", 3)
    check_float(k, "k", "[Nk, Hk, D]", 3)
    check_float(v, "v", "[Nk, Hk, Dv]", 3)
    check_same(k, q, "k", "q")
    check_same(v, q, "v", "q")
    Nq, Hq, D = q.shape
    Nk, Hk, Dv = v.shape
    if k.shape[0] != Nk or k.shape[1] != Hk or k.shape[2] != D:
        raise ValueError(f"k must have shape [Nk={Nk}, Hk={Hk}, D={D}] (from v and q), got {tuple(k.shape)}")
    if D < 1 or Dv < 1:
        raise ValueError(f"head dims must be >= 1, got q.shape[2] = {D} and v.shape[2] = {Dv}")
    if Hk < 1 or Hq % Hk != 0:
        raise ValueError(
            f"the number of query heads (q.shape[1] = {Hq}) must be a multiple of the number of kv heads (k.shape[1] = {Hk})"
        )
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}"
        )
    rotary = (q_positions, k_positions, rotary_cos, rotary_sin)
    if any(t is not None for t in rotary):
        if any(t is None for t in rotary):
            raise ValueError("the fused rotary needs all of rotary_cos, rotary_sin, q_positions and k_positions")
        if D % 2:
            raise ValueError(f"the fused rotary needs an even head dim, got q.shape[2] = {D}")
        check_tensor(rotary_cos, "rotary_cos", "[max_pos, D]", 2)
        check_tensor(rotary_sin, "rotary_sin", "[max_pos, D]", 2)
        if rotary_cos.shape[1] != D or rotary_sin.shape != rotary_cos.shape:
            raise ValueError(
                f"rotary_cos and rotary_sin must both have shape [max_pos, D={D}], got "
                f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
            )
        for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
            if not t.is_floating_point() or t.device != q.device:
                raise ValueError(f"{name} must be a floating-point tensor on {q.device}, got {t.dtype} on {t.device}")
        # shape strings stay constant: formatting Nq into them would specialise a dynamic size
        check_index(q_positions, "q_positions", "[Nq]", q.device)
        check_index(k_positions, "k_positions", "[Nk]", q.device)
        if q_positions.shape[0] != Nq or k_positions.shape[0] != Nk:
            raise ValueError(
                f"q_positions and k_positions must have shapes [{Nq}] and [{Nk}], got "
                f"{tuple(q_positions.shape)} and {tuple(k_positions.shape)}"
            )


def check_cross_inject_attention_values(q, k, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions, rotary_cos) -> None:
    """The values the kernels index with: boundaries that tile q and k, positions inside the table."""
    check_cu_seqlens_values(cu_seqlens_q, q.shape[0], "cu_seqlens_q", "q.shape[0]")
    check_cu_seqlens_values(cu_seqlens_k, k.shape[0], "cu_seqlens_k", "k.shape[0]")
    if rotary_cos is not None:
        check_positions_values(q_positions, rotary_cos.shape[0], "q_positions")
        check_positions_values(k_positions, rotary_cos.shape[0], "k_positions")


def check_cross_inject_attention_backward_arguments(grad_out, grad_lse, q, out, lse, Dv: int) -> None:
    """The tensors the backward adds to the forward's arguments (checked first)."""
    Nq, Hq = q.shape[0], q.shape[1]
    check_devices(q, grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse)
    check_tensor(grad_out, "grad_out", "[Nq, Hq, Dv]", 3)
    if tuple(grad_out.shape) != (Nq, Hq, Dv) or out.shape != grad_out.shape or tuple(lse.shape) != (Nq, Hq):
        raise ValueError(
            f"grad_out and out must have shape [Nq, Hq, Dv] = {(Nq, Hq, Dv)} and lse [Nq, Hq], got "
            f"{tuple(grad_out.shape)}, {tuple(out.shape)} and {tuple(lse.shape)}"
        )
    check_same(grad_out, q, "grad_out", "q")
    check_same(out, q, "out", "q")
    check_tensor(lse, "lse", "[Nq, Hq]", 2, (torch.float32,))
    if grad_lse is not None:
        check_tensor(grad_lse, "grad_lse", "[Nq, Hq]", 2, (torch.float32,))
        if tuple(grad_lse.shape) != (Nq, Hq):
            raise ValueError(f"grad_lse must have shape [Nq, Hq] = {(Nq, Hq)}, got {tuple(grad_lse.shape)}")


def check_merge_attention_arguments(out_a, lse_a, out_b, lse_b) -> None:
    check_tensor(out_a, "out_a", "[N, H, Dv]", 3)
    check_tensor(out_b, "out_b", "[N, H, Dv]", 3)
    check_tensor(lse_a, "lse_a", "[N, H]", 2)
    check_tensor(lse_b, "lse_b", "[N, H]", 2)
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have the shape of out_a {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    for t, name in ((lse_a, "lse_a"), (lse_b, "lse_b")):
        if t.shape != out_a.shape[:2]:
            raise ValueError(f"{name} must have shape {tuple(out_a.shape[:2])}, got {tuple(t.shape)}")
        if t.device != out_a.device:
            raise ValueError(f"{name} must be on the device of out_a ({out_a.device}), got {t.device}")
    check_same(out_b, out_a, "out_b", "out_a")
