"""tree_topk and tree_spans (docs/DESIGN.md section 3.2): reference vs a brute-force descent, hand-computed trees,
ties, C++ and Triton vs reference, opcheck and input validation."""

import math
from fractions import Fraction

import pytest
import torch
from conftest import DTYPES, assert_close, dtype_id, requires_ext, requires_triton, run_twice

import sharedllm_ops as so
from sharedllm_ops import reference as R
from sharedllm_ops import triton as _triton

TRITON = requires_triton("tree_topk")
# every backend that can run here (the hand-computed checks loop over them)
BACKENDS_HERE = ["reference"] + (["cpp"] if so._ext.loaded else []) + (
    ["triton"] if _triton.has_op("tree_topk") and _triton.runs_on(torch.device("cpu")) else []
)
ALL_BACKENDS = [pytest.param("cpp", marks=requires_ext), "reference", pytest.param("triton", marks=TRITON)]


def _level_offset(level, b):
    return sum(b**l for l in range(1, level))


def _num_nodes(depth, b):
    return sum(b**l for l in range(1, depth + 1))


def brute_force_descent(scores, depth, k, b):
    """The descent of docs/DESIGN.md section 3.2 on one chunk's list of T scores, in plain Python.

    Returns the preserved level-order ids sorted by their first leaf (left to right)."""
    preserved = []  # (first leaf, id)
    expanded = []
    for level in range(1, depth + 1):
        off = _level_offset(level, b)
        if level == 1:
            candidates = list(range(b))
        else:
            candidates = sorted(parent * b + i for parent in expanded for i in range(b))
        if level == depth:
            keep, expanded = candidates, []
        else:
            ranked = sorted(candidates, key=lambda i: (-scores[off + i], i))  # best first, ties: lower id
            expanded, keep = ranked[:k], ranked[k:]
        for i in keep:
            preserved.append((i * b ** (depth - level), off + i))
    preserved.sort()
    return [node for _, node in preserved]


def independent_scores(query, node_emb, score):
    """float64 scores computed with plain Python loops over (b, c, t)."""
    B, C, T, D = node_emb.shape
    q = query.double()
    e = node_emb.double()
    out = torch.empty(B, C, T, dtype=torch.float64)
    for bi in range(B):
        qn = max(math.sqrt(float((q[bi] * q[bi]).sum())), 1e-8)
        for c in range(C):
            for t in range(T):
                dot = float((q[bi] * e[bi, c, t]).sum())
                if score == "dot":
                    out[bi, c, t] = dot
                else:
                    en = max(math.sqrt(float((e[bi, c, t] * e[bi, c, t]).sum())), 1e-8)
                    out[bi, c, t] = dot / (qn * en)
    return out


def check_against_brute_force(node_ids, scores, depth, k, b):
    B, C, _ = scores.shape
    P = R.num_preserved(depth, k, b)
    assert node_ids.dtype == torch.int32 and node_ids.shape == (B, C, P)
    assert scores.dtype == torch.float32
    for bi in range(B):
        for c in range(C):
            expected = brute_force_descent(scores[bi, c].tolist(), depth, k, b)
            assert node_ids[bi, c].tolist() == expected, f"(b={bi}, c={c})"


def assert_tiles_chunk(node_ids, depth, b):
    """The preserved nodes, in the order returned, cover the leaves 0..b^depth-1 exactly once."""
    for row in node_ids.reshape(-1, node_ids.shape[-1]).tolist():
        pos = 0
        for node in row:
            level = next(l for l in range(1, depth + 1) if node < _level_offset(l + 1, b))
            i = node - _level_offset(level, b)
            width = b ** (depth - level)
            assert i * width == pos, f"row {row}: node {node} starts at leaf {i * width}, expected {pos}"
            pos += width
        assert pos == b**depth


# --------------------------------------------------------------------------------------------
# 1. the reference against independent formulations


@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("depth,k,b", [(1, 1, 2), (2, 1, 2), (3, 1, 2), (4, 1, 2), (3, 2, 2), (2, 2, 3), (3, 2, 4), (2, 3, 4)])
def test_reference_matches_brute_force(depth, k, b, score):
    B, C, D = 2, 3, 6
    T = _num_nodes(depth, b)
    query, emb = torch.randn(B, D), torch.randn(B, C, T, D)
    node_ids, scores = R.tree_topk(query, emb, depth, k, b, score)
    assert_close(scores, independent_scores(query, emb, score).float(), dict(atol=1e-5, rtol=1e-5))
    check_against_brute_force(node_ids, scores, depth, k, b)
    assert_tiles_chunk(node_ids, depth, b)


def _dot_tree(values):
    """query [1, 1] = 1 and node_emb [1, 1, T, 1] = values: with score="dot", the scores are the values."""
    return torch.ones(1, 1), torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1, 1)


def test_reference_hand_computed_paper_tree():
    """b=2, k=1, h=3 (the paper's tree, P=4). Ids: level 1 = 0,1; level 2 = 2..5; level 3 = 6..13."""
    # right-leaning: expand 1 (preserve 0), then level-2 children of 1 are ids 4,5: expand 4 (preserve 5),
    # then level-3 children of level-2 index 2 are ids 10, 11 (both preserved).
    s1 = [0.1, 0.9, 0.0, 0.0, 0.7, 0.2] + [0.0] * 8
    # left-leaning: expand 0 (preserve 1); children 2,3: expand 3 (preserve 2); leaves 8, 9
    s2 = [0.9, 0.1, 0.3, 0.8, 0.0, 0.0] + [0.0] * 8
    query = torch.ones(2, 1)
    emb = torch.tensor([[s1], [s2]], dtype=torch.float32).unsqueeze(-1)  # [2, 1, 14, 1]
    for backend in BACKENDS_HERE:
        node_ids, scores = so.tree_topk(query, emb, 3, 1, 2, "dot", backend=backend)
        assert node_ids.tolist() == [[[0, 10, 11, 5]], [[2, 8, 9, 1]]], backend
        assert_close(scores, emb[..., 0])
    start, length = so.tree_spans(torch.tensor([[[0, 10, 11, 5]], [[2, 8, 9, 1]]], dtype=torch.int32),
                                  torch.tensor([[1024], [1024]]), 3, 2)
    assert start.tolist() == [[[0, 512, 640, 768]], [[0, 256, 384, 512]]]
    assert length.tolist() == [[[512, 128, 128, 256]], [[256, 128, 128, 512]]]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ties_go_to_lower_id(backend):
    # all equal: always expand the leftmost node
    q, e = _dot_tree([0.5] * 14)
    assert so.tree_topk(q, e, 3, score="dot", backend=backend)[0].tolist() == [[[6, 7, 3, 1]]]
    assert so.tree_topk(q, e, 3, k=2, score="dot", backend=backend)[0].tolist() == [[[6, 7, 8, 9, 4, 5]]]
    # level-1 tie, level-2 decided by score (children of 0 are 2, 3): expand 3, keep 2, leaves 8, 9
    q, e = _dot_tree([0.5, 0.5, 0.1, 0.2] + [0.0] * 10)
    assert so.tree_topk(q, e, 3, score="dot", backend=backend)[0].tolist() == [[[2, 8, 9, 1]]]
    # b=4, k=2, h=2, level-1 scores [0.7, 0.3, 0.7, 0.7]: expand 0 and 2 (ties: lower ids first), keep 1, 3
    q, e = _dot_tree([0.7, 0.3, 0.7, 0.7] + [0.0] * 16)
    ids = so.tree_topk(q, e, 2, k=2, branching=4, score="dot", backend=backend)[0].tolist()
    assert ids == [[[4, 5, 6, 7, 1, 12, 13, 14, 15, 3]]]
    # cosine ties: identical embeddings (scaled) score the same
    emb = torch.randn(1, 1, 1, 5).expand(1, 1, 14, 5) * torch.arange(1, 15, dtype=torch.float32).reshape(1, 1, 14, 1)
    ids = so.tree_topk(torch.randn(1, 5), emb.contiguous(), 3, score="cosine", backend=backend)[0]
    assert ids.tolist() == [[[6, 7, 3, 1]]]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_depth_one_preserves_all_level_one_nodes(backend):
    q, e = torch.randn(2, 4), torch.randn(2, 3, 3, 4)
    ids, scores = so.tree_topk(q, e, 1, 1, 3, backend=backend)
    assert ids.tolist() == [[[0, 1, 2]] * 3] * 2 and scores.shape == (2, 3, 3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_vectors_score_zero(backend):
    """The 1e-8 clamp of the norms: a zero query or embedding scores 0 (not NaN) under cosine."""
    q = torch.zeros(1, 4)
    e = torch.randn(1, 1, 6, 4)
    ids, scores = so.tree_topk(q, e, 2, backend=backend)
    # all tie at 0: expand node 0, preserve 1; its children 2, 3 are the last level
    assert torch.equal(scores, torch.zeros(1, 1, 6)) and ids.tolist() == [[[2, 3, 1]]]
    q = torch.randn(1, 4)
    e[0, 0, 1] = 0
    _, scores = so.tree_topk(q, e, 2, backend=backend)
    assert scores[0, 0, 1] == 0 and torch.isfinite(scores).all()


def test_num_preserved_counts_the_descent():
    """P is the length of what the brute-force descent preserves (on random scores), and T the
    geometric series b + ... + b^h in closed form."""
    for b in range(2, 6):
        for k in range(1, b + 1):
            for h in range(1, 6):
                T = (b ** (h + 1) - b) // (b - 1)
                assert R.num_tree_nodes(h, b) == T, (h, b)
                scores = torch.rand(T).tolist()
                assert R.num_preserved(h, k, b) == len(brute_force_descent(scores, h, k, b)), (h, k, b)
    assert R.num_preserved(3, 1, 2) == 4  # the paper's tree


def exact_span(node, L, depth, b):
    """The span of a level-order node id, found by descending from the root: each node's exact
    (rational) interval of [0, L) is split into b equal parts for its children; the token span
    rounds the exact ends down."""
    path = []  # the child index at each level, deepest first
    level = next(l for l in range(1, depth + 1) if node < _level_offset(l + 1, b))
    i = node - _level_offset(level, b)
    for _ in range(level):
        path.append(i % b)
        i //= b
    lo, hi = Fraction(0), Fraction(L)
    for child in reversed(path):
        width = (hi - lo) / b
        lo, hi = lo + child * width, lo + (child + 1) * width
    return math.floor(lo), math.floor(hi)


@pytest.mark.parametrize("depth,b", [(1, 2), (3, 2), (2, 4), (4, 3)])
def test_tree_spans_match_the_exact_descent(depth, b):
    B, C = 2, 5
    T = _num_nodes(depth, b)
    node_ids = torch.randint(0, T, (B, C, 7), dtype=torch.int32)
    chunk_lens = torch.randint(0, 3000, (B, C))
    chunk_lens[0, 0], chunk_lens[0, 1], chunk_lens[1, 0] = 0, 1, b**depth - 1
    start, length = so.tree_spans(node_ids, chunk_lens, depth, b)
    assert start.dtype == torch.int32 and length.dtype == torch.int32
    for bi in range(B):
        for c in range(C):
            L = int(chunk_lens[bi, c])
            for p in range(7):
                s, e = exact_span(int(node_ids[bi, c, p]), L, depth, b)
                assert (int(start[bi, c, p]), int(length[bi, c, p])) == (s, e - s)


@pytest.mark.parametrize("depth,k,b", [(3, 1, 2), (2, 2, 4), (4, 1, 3)])
def test_tree_spans_of_preserved_nodes_tile_the_chunk(depth, k, b):
    T = _num_nodes(depth, b)
    node_ids, _ = R.tree_topk(torch.randn(2, 4), torch.randn(2, 3, T, 4), depth, k, b)
    chunk_lens = torch.tensor([[1024, 5, 0], [7, 1000, 81]])
    start, length = so.tree_spans(node_ids, chunk_lens, depth, b)
    assert (length >= 0).all()
    end = start + length
    assert (start[..., 0] == 0).all()
    assert torch.equal(start[..., 1:], end[..., :-1])
    assert torch.equal(end[..., -1], chunk_lens.to(torch.int32))


def test_tree_spans_int64_and_broadcast():
    ids = torch.tensor([[[0, 10, 11, 5]]])
    start, length = so.tree_spans(ids, torch.tensor([[1000]], dtype=torch.int32), 3)
    assert start.tolist() == [[[0, 500, 625, 750]]] and length.tolist() == [[[500, 125, 125, 250]]]


# --------------------------------------------------------------------------------------------
# 2. the C++ kernel against the reference


def _grid():
    for b in (2, 4):
        for depth in (1, 2, 3, 4):
            for k in range(1, b + 1):
                yield depth, k, b


@requires_ext
@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("depth,k,b", list(_grid()))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpp_matches_reference(dtype, depth, k, b, score):
    B, C, D = 2, 3, 24
    T = _num_nodes(depth, b)
    query = torch.randn(B, D, dtype=dtype)
    emb = torch.randn(B, C, T, D, dtype=dtype)
    ids, scores = run_twice(so.tree_topk, query, emb, depth, k, b, score, backend="cpp")
    ref_ids, ref_scores = so.tree_topk(query, emb, depth, k, b, score, backend="reference")
    assert_close(scores, ref_scores, dict(atol=2e-5, rtol=1e-5))
    assert torch.equal(ids, ref_ids)
    check_against_brute_force(ids, scores, depth, k, b)


KERNELS = [pytest.param("cpp", marks=requires_ext), pytest.param("triton", marks=TRITON)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("D", [1, 33, 64, 128])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "permuted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_head_dims_and_layouts(dtype, layout, D, backend):
    B, C, depth, b = 2, 3, 3, 2
    T = _num_nodes(depth, b)
    if layout == "contiguous":
        query, emb = torch.randn(B, D, dtype=dtype), torch.randn(B, C, T, D, dtype=dtype)
    elif layout == "padded":
        query = torch.randn(B, D + 3, dtype=dtype)[:, 1 : D + 1]
        emb = torch.randn(B + 1, C, T + 2, D + 5, dtype=dtype)[1:, :, 2:, 3 : D + 3]
    else:  # chunks outermost in memory, nodes before batch
        query = torch.randn(B, D, dtype=dtype)
        emb = torch.randn(C, T, B, D, dtype=dtype).permute(2, 0, 1, 3)
    for score in ("cosine", "dot"):
        ids, scores = so.tree_topk(query, emb, depth, 1, b, score, backend=backend)
        ref_ids, ref_scores = so.tree_topk(query, emb, depth, 1, b, score, backend="reference")
        assert_close(scores, ref_scores, dict(atol=1e-4, rtol=1e-5))
        assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("backend", KERNELS)
def test_many_chunks(backend):
    query, emb = torch.randn(2, 16), torch.randn(2, 37, 14, 16)
    ids, scores = so.tree_topk(query, emb, 3, backend=backend)
    ref_ids, ref_scores = so.tree_topk(query, emb, 3, backend="reference")
    assert torch.equal(ids, ref_ids)
    assert_close(scores, ref_scores)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_public_output_is_not_differentiable(backend):
    query = torch.randn(2, 8, requires_grad=True)
    emb = torch.randn(2, 3, 6, 8, requires_grad=True)
    ids, scores = so.tree_topk(query, emb, 2, backend=backend)
    assert not scores.requires_grad and not ids.requires_grad
    assert ids.shape == (2, 3, 3) and scores.shape == (2, 3, 6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("B,C", [(0, 3), (2, 0), (0, 0)])
def test_empty_batch_or_chunks(backend, B, C):
    """No sequences, or sequences without context chunks: empty outputs of the right shape.

    (Regression: the reference once reshaped B*C == 0 scores with -1 and raised.)"""
    query, emb = torch.randn(B, 8), torch.randn(B, C, 14, 8)
    ids, scores = so.tree_topk(query, emb, 3, backend=backend)
    assert ids.shape == (B, C, 4) and ids.dtype == torch.int32
    assert scores.shape == (B, C, 14) and scores.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# 4. opcheck (not differentiable: no autograd to exercise)


@requires_ext
@pytest.mark.parametrize("depth,k,b,score", [(3, 1, 2, "cosine"), (2, 2, 4, "dot"), (1, 1, 2, "cosine")])
def test_opcheck_tree_topk(depth, k, b, score):
    T = _num_nodes(depth, b)
    torch.library.opcheck(
        torch.ops.sharedllm.tree_topk.default, (torch.randn(2, 8), torch.randn(2, 3, T, 8), depth, k, b, score)
    )


# --------------------------------------------------------------------------------------------
# 5. bad inputs


def _good():
    return dict(query=torch.randn(2, 8), node_emb=torch.randn(2, 3, 14, 8), depth=3, k=1, branching=2, score="cosine")


BAD = [
    ("query_rank1", dict(query=torch.randn(8)), ValueError, r"query.*\[B, D\]"),
    ("query_rank3", dict(query=torch.randn(2, 1, 8)), ValueError, r"query"),
    ("emb_rank3", dict(node_emb=torch.randn(2, 14, 8)), ValueError, r"node_emb.*\[B, C, T, D\]"),
    ("query_float64", dict(query=torch.randn(2, 8, dtype=torch.float64),
                           node_emb=torch.randn(2, 3, 14, 8, dtype=torch.float64)), ValueError, r"query.*float32"),
    ("query_int", dict(query=torch.ones(2, 8, dtype=torch.int64)), ValueError, r"query.*float32"),
    ("emb_float64", dict(node_emb=torch.randn(2, 3, 14, 8, dtype=torch.float64)), ValueError, r"node_emb"),
    ("dtype_mismatch", dict(node_emb=torch.randn(2, 3, 14, 8, dtype=torch.float16)), ValueError,
     r"node_emb.*dtype of query"),
    ("query_stride", dict(query=torch.randn(2, 16)[:, ::2]), ValueError, r"query.*stride 1"),
    ("emb_stride", dict(node_emb=torch.randn(2, 3, 14, 16)[..., ::2]), ValueError, r"node_emb.*stride 1"),
    ("batch_mismatch", dict(node_emb=torch.randn(3, 3, 14, 8)), ValueError, r"node_emb.*(shape|\[0\])"),
    ("dim_mismatch", dict(node_emb=torch.randn(2, 3, 14, 9)), ValueError, r"node_emb.*(shape|\[3\])"),
    ("wrong_T_for_depth", dict(depth=2), ValueError, r"node_emb.shape\[2\].*tree nodes"),
    ("wrong_T_for_branching", dict(branching=3), ValueError, r"node_emb.shape\[2\].*tree nodes"),
    ("k_zero", dict(k=0), ValueError, r"\bk\b"),
    ("k_negative", dict(k=-1), ValueError, r"\bk\b"),
    ("k_above_branching", dict(k=3), ValueError, r"\bk\b.*2"),
    ("depth_zero", dict(depth=0), ValueError, r"depth"),
    ("branching_one", dict(branching=1, k=1), ValueError, r"branching"),
    ("score_unknown", dict(score="l2"), ValueError, r"score"),
    ("emb_meta_device", dict(node_emb=torch.randn(2, 3, 14, 8, device="meta")), ValueError, r"node_emb.*device"),
]
PUBLIC_ONLY = [
    ("k_float", dict(k=1.0), TypeError, r"\bk\b"),
    ("depth_bool", dict(depth=True), TypeError, r"depth"),
    ("query_not_tensor", dict(query=[1.0] * 8), TypeError, r"query"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in BAD + PUBLIC_ONLY], ids=[c[0] for c in BAD + PUBLIC_ONLY])
def test_public_rejects_bad_input(backend, change, exc, match):
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        so.tree_topk(a["query"], a["node_emb"], a["depth"], a["k"], a["branching"], a["score"], backend=backend)


@pytest.mark.parametrize("backend", ["gpu", "Reference", ""])
def test_public_rejects_unknown_backend(backend):
    a = _good()
    with pytest.raises(ValueError, match="backend"):
        so.tree_topk(a["query"], a["node_emb"], 3, backend=backend)


DIRECT = [c for c in BAD if c[0] != "emb_meta_device"]


@requires_ext
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in DIRECT], ids=[c[0] for c in DIRECT])
def test_op_rejects_bad_input(change, exc, match):
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        torch.ops.sharedllm.tree_topk(a["query"], a["node_emb"], a["depth"], a["k"], a["branching"], a["score"])


@requires_ext
def test_op_rejects_device_mismatch_in_cpu_kernel():
    a = _good()
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match=r"node_emb.*device"):
        torch.ops.sharedllm.tree_topk.default.redispatch(keyset, a["query"], a["node_emb"].to("meta"), 3, 1, 2, "cosine")


@requires_ext
def test_op_rejects_device_mismatch():
    """A "meta" node_emb with a CPU query dispatches to the fake kernel, which must reject the
    device mismatch (it once returned uninitialised CPU tensors)."""
    a = _good()
    with pytest.raises((ValueError, RuntimeError), match=r"node_emb|device"):
        ids, _ = torch.ops.sharedllm.tree_topk(a["query"], a["node_emb"].to("meta"), 3, 1, 2, "cosine")
        pytest.fail(f"no error; returned {ids.device} node ids of uninitialised memory")


def test_tree_spans_rejects_bad_input():
    ids = torch.zeros(1, 1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="node_ids"):
        so.tree_spans(ids.float(), torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="node_ids"):
        so.tree_spans(ids[0], torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="chunk_lens"):
        so.tree_spans(ids, torch.tensor([[8.0]]), 3)
    with pytest.raises(ValueError, match="depth"):
        so.tree_spans(ids, torch.tensor([[8]]), 0)
    with pytest.raises(ValueError, match="branching"):
        so.tree_spans(ids, torch.tensor([[8]]), 3, 1)


# --------------------------------------------------------------------------------------------
# 6. the Triton kernel against the reference (CPU tensors, Triton's interpreter: tiny shapes)


@TRITON
@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("depth,k,b", list(_grid()))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_matches_reference(dtype, depth, k, b, score):
    """D = 24 is one block of the head dim for small trees and two (the second masked) for the
    340-node tree (b=4, depth=4), whose node block is 512 wide."""
    B, C, D = 2, 2, 24
    T = _num_nodes(depth, b)
    query = torch.randn(B, D, dtype=dtype)
    emb = torch.randn(B, C, T, D, dtype=dtype)
    # poisoned outputs once per tree shape (the writes do not depend on the dtype or the score)
    poisoned = dtype == torch.float32 and score == "cosine"
    call = run_twice if poisoned else (lambda fn, *a, **kw: fn(*a, **kw))
    ids, scores = call(so.tree_topk, query, emb, depth, k, b, score, backend="triton")
    ref_ids, ref_scores = so.tree_topk(query, emb, depth, k, b, score, backend="reference")
    assert_close(scores, ref_scores, dict(atol=2e-5, rtol=1e-5))
    assert torch.equal(ids, ref_ids)
    check_against_brute_force(ids, scores, depth, k, b)


@requires_ext
@TRITON
def test_auto_prefers_cpp_over_triton_on_cpu():
    """Under the interpreter Triton could run on CPU tensors, but auto still picks the C++ kernel."""
    from sharedllm_ops.core.dispatch import resolve_backend

    assert resolve_backend("tree_topk", "auto", torch.device("cpu")) == "cpp"
    query, emb = torch.randn(2, 8), torch.randn(2, 3, 14, 8)
    for got, want in zip(so.tree_topk(query, emb, 3), so.tree_topk(query, emb, 3, backend="cpp")):
        assert torch.equal(got, want)


@TRITON
@pytest.mark.parametrize("depth,k,b,score", [(3, 1, 2, "cosine"), (2, 2, 4, "dot"), (1, 1, 2, "cosine")])
def test_triton_opcheck_tree_topk(depth, k, b, score):
    T = _num_nodes(depth, b)
    torch.library.opcheck(
        torch.ops.sharedllm_triton.tree_topk.default, (torch.randn(2, 8), torch.randn(2, 3, T, 8), depth, k, b, score)
    )


@TRITON
@pytest.mark.parametrize("change,exc,match", [c[1:] for c in DIRECT], ids=[c[0] for c in DIRECT])
def test_triton_op_rejects_bad_input(change, exc, match):
    a = {**_good(), **change}
    with pytest.raises(exc, match=match):
        torch.ops.sharedllm_triton.tree_topk(a["query"], a["node_emb"], a["depth"], a["k"], a["branching"], a["score"])


@TRITON
def test_triton_op_rejects_device_mismatch():
    """A "meta" node_emb with a CPU query dispatches to the fake kernel, which must reject it."""
    a = _good()
    with pytest.raises(ValueError, match=r"node_emb.*device"):
        torch.ops.sharedllm_triton.tree_topk(a["query"], a["node_emb"].to("meta"), 3, 1, 2, "cosine")
