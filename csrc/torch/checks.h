// Input validation shared by the CPU and CUDA bindings. Every failure throws std::invalid_argument
// (a ValueError in Python, as from the public functions) whose message names the argument and what was expected.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>

#include "torch_api.h"

#include "sharedllm/chunk_pool.h"
#include "sharedllm/common.h"
#include "sharedllm/tree_topk.h"

namespace sharedllm::binding {

inline void check_rank(const Tensor& t, int64_t rank, const char* name, const char* shape) {
  SHAREDLLM_CHECK(t.dim() == rank, name, " must have shape ", shape, " (", rank, " dims), got ", shape_of(t));
}

inline void check_float_dtype(const Tensor& t, const char* name) {
  const ScalarType d = t.scalar_type();
  SHAREDLLM_CHECK(d == ScalarType::Float || d == ScalarType::Half || d == ScalarType::BFloat16, name,
                    " must be float32, float16 or bfloat16, got ", d);
}

inline void check_same_dtype(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  SHAREDLLM_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                    ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  SHAREDLLM_CHECK(same_device(t, ref), name, " must be on the device of ", ref_name, " (", device_name(ref), "), got ",
                  device_name(t));
}

inline void check_last_dim_contiguous(const Tensor& t, const char* name) {
  const int64_t last = t.dim() - 1;
  SHAREDLLM_CHECK(t.size(last) <= 1 || t.stride(last) == 1, name,
                  " must have stride 1 in its last dimension, got strides ", strides_of(t));
  for (int64_t d = 0; d < t.dim(); ++d)
    SHAREDLLM_CHECK(t.stride(d) >= 0, name, " must not have negative strides, got ", strides_of(t));
}

inline void check_index_tensor(const Tensor& t, const char* name) {
  SHAREDLLM_CHECK(t.scalar_type() == ScalarType::Int, name, " must be int32, got ", t.scalar_type());
}

// Where the index values (cu_seqlens, positions) are checked. On the host: ValueErrors naming the
// argument and the value, at the price of a device-to-host copy and a synchronisation per tensor for CUDA
// data. On the device: a small check kernel before the op's kernels; a bad value stops it with a
// device-side assert naming the argument (sharedllm/cuda_common.cuh).
enum class ValueChecks { kHost, kDevice };

// The CUDA bindings' choice outside CUDA graph capture (cuda_stream.h adds that case): on the device,
// unless SHAREDLLM_HOST_CHECKS=1 asks for the host checks (debugging: exact errors you can catch).
inline ValueChecks cuda_value_checks_outside_graphs() {
  const char* flag = std::getenv("SHAREDLLM_HOST_CHECKS");
  return flag != nullptr && std::string(flag) == "1" ? ValueChecks::kHost : ValueChecks::kDevice;
}

// cu_seqlens: int32 [S + 1], cu[0] == 0, non-decreasing, cu[S] == total. `read_values = false` checks the
// shape only (the values are then checked on the device, see ValueChecks).
inline void check_cu_seqlens(const Tensor& cu, int64_t total, const char* name, const char* total_name,
                             bool read_values = true) {
  check_index_tensor(cu, name);
  check_rank(cu, 1, name, "[S + 1]");
  SHAREDLLM_CHECK(cu.numel() >= 1, name, " must have at least one element (it starts with 0)");
  if (!read_values) return;
  const Tensor host = host_contiguous(cu);
  const int32_t* c = ptr<int32_t>(host);
  SHAREDLLM_CHECK(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  for (int64_t i = 1; i < host.numel(); ++i)
    SHAREDLLM_CHECK(c[i] >= c[i - 1], name, " must be non-decreasing, but ", name, "[", i, "] = ", c[i], " < ",
                      name, "[", i - 1, "] = ", c[i - 1]);
  SHAREDLLM_CHECK(c[host.numel() - 1] == total, name, "[-1] must equal ", total_name, " = ", total, ", got ",
                    c[host.numel() - 1]);
}

inline void check_positions(const Tensor& pos, int64_t n, int64_t max_pos, const char* name,
                            bool read_values = true) {
  check_index_tensor(pos, name);
  SHAREDLLM_CHECK(pos.dim() == 1 && pos.size(0) == n, name, " must have shape [", n, "], got ", shape_of(pos));
  if (n == 0 || !read_values) return;
  const Tensor host = host_contiguous(pos);
  const int32_t* values = ptr<int32_t>(host);
  int64_t lo_v = values[0], hi_v = values[0];
  for (int64_t i = 1; i < n; ++i) lo_v = std::min<int64_t>(lo_v, values[i]), hi_v = std::max<int64_t>(hi_v, values[i]);
  SHAREDLLM_CHECK(lo_v >= 0 && hi_v < max_pos, name, " must lie in [0, ", max_pos,
                    ") (the rows of the rotary table), got values in [", lo_v, ", ", hi_v, "]");
}

// The argument checks of each op, shared by its CPU and CUDA bindings.

inline PoolMode parse_pool_mode(const std::string& mode) {
  if (mode == "mean") return PoolMode::kMean;
  if (mode == "first") return PoolMode::kFirst;
  fail("mode must be \"mean\" or \"first\", got \"", mode, "\"");
}

inline void check_chunk_pool_args(const Tensor& x, const Tensor& cu_seqlens, int64_t tokens_per_node,
                                  const char* x_name) {
  check_rank(x, 3, x_name, "[N, H, D]");
  check_float_dtype(x, x_name);
  check_last_dim_contiguous(x, x_name);
  check_same_device(cu_seqlens, x, "cu_seqlens", x_name);
  SHAREDLLM_CHECK(tokens_per_node >= 1, "tokens_per_node must be >= 1, got ", tokens_per_node);
}

inline void check_tree_topk_args(const Tensor& query, const Tensor& node_emb, int64_t depth, int64_t k,
                                 int64_t branching, const std::string& score) {
  check_rank(query, 2, "query", "[B, D]");
  check_rank(node_emb, 4, "node_emb", "[B, C, T, D]");
  check_float_dtype(query, "query");
  check_same_dtype(node_emb, query, "node_emb", "query");
  check_same_device(node_emb, query, "node_emb", "query");
  check_last_dim_contiguous(query, "query");
  check_last_dim_contiguous(node_emb, "node_emb");
  SHAREDLLM_CHECK(depth >= 1, "depth must be >= 1, got ", depth);
  SHAREDLLM_CHECK(branching >= 2, "branching must be >= 2, got ", branching);
  SHAREDLLM_CHECK(k >= 1 && k <= branching, "k must be in [1, branching = ", branching, "], got ", k);
  SHAREDLLM_CHECK(score == "cosine" || score == "dot", "score must be \"cosine\" or \"dot\", got \"",
                  score, "\"");
  const int64_t B = query.size(0), D = query.size(1), T = node_emb.size(2);
  SHAREDLLM_CHECK(node_emb.size(0) == B, "node_emb.shape[0] must equal query.shape[0] = ", B, ", got ",
                    node_emb.size(0));
  SHAREDLLM_CHECK(node_emb.size(3) == D, "node_emb.shape[3] must equal query.shape[1] = ", D, ", got ",
                    node_emb.size(3));
  const int64_t expected_nodes = tree_num_nodes(depth, branching);
  SHAREDLLM_CHECK(T == expected_nodes, "node_emb.shape[2] must be the number of tree nodes b + ... + b^depth = ",
                    expected_nodes, " for depth ", depth, " and branching ", branching, ", got ", T);
}

}  // namespace sharedllm::binding
