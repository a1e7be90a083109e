// Input validation shared by the CPU and CUDA bindings. Every failure raises a ValueError (via
// TORCH_CHECK_VALUE) whose message names the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "sharedllm/chunk_pool.h"
#include "sharedllm/common.h"
#include "sharedllm/tree_topk.h"

namespace sharedllm::binding {

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have shape ", shape, " (", rank, " dims), got ", t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK_VALUE(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, name,
                    " must be float32, float16 or bfloat16, got ", d);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                    ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                    "), got ", t.device());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have stride 1 in its last dimension, got strides ",
                    t.strides());
  for (int64_t d = 0; d < t.dim(); ++d)
    TORCH_CHECK_VALUE(t.stride(d) >= 0, name, " must not have negative strides, got ", t.strides());
}

inline void check_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

// cu_seqlens: int32 [S + 1], cu[0] == 0, non-decreasing, cu[S] == total. Reading the values costs a
// copy to the host on CUDA and is impossible while a CUDA graph is captured: `read_values = false`
// checks the shape only (the CUDA kernels clamp every bound they read).
inline void check_cu_seqlens(const at::Tensor& cu, int64_t total, const char* name, const char* total_name,
                             bool read_values = true) {
  check_index_tensor(cu, name);
  check_rank(cu, 1, name, "[S + 1]");
  TORCH_CHECK_VALUE(cu.numel() >= 1, name, " must have at least one element (it starts with 0)");
  if (!read_values) return;
  const at::Tensor host = cu.device().is_cpu() ? cu.contiguous() : cu.to(at::kCPU).contiguous();
  const int32_t* c = host.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  for (int64_t i = 1; i < host.numel(); ++i)
    TORCH_CHECK_VALUE(c[i] >= c[i - 1], name, " must be non-decreasing, but ", name, "[", i, "] = ", c[i], " < ",
                      name, "[", i - 1, "] = ", c[i - 1]);
  TORCH_CHECK_VALUE(c[host.numel() - 1] == total, name, "[-1] must equal ", total_name, " = ", total, ", got ",
                    c[host.numel() - 1]);
}

inline void check_positions(const at::Tensor& pos, int64_t n, int64_t max_pos, const char* name,
                            bool read_values = true) {
  check_index_tensor(pos, name);
  TORCH_CHECK_VALUE(pos.dim() == 1 && pos.size(0) == n, name, " must have shape [", n, "], got ", pos.sizes());
  if (n == 0 || !read_values) return;
  const at::Tensor host = pos.device().is_cpu() ? pos.contiguous() : pos.to(at::kCPU).contiguous();
  const auto [lo, hi] = at::aminmax(host);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < max_pos, name, " must lie in [0, ", max_pos,
                    ") (the rows of the rotary table), got values in [", lo_v, ", ", hi_v, "]");
}

// The argument checks of each op, shared by its CPU and CUDA bindings.

inline PoolMode parse_pool_mode(c10::string_view mode) {
  if (mode == "mean") return PoolMode::kMean;
  if (mode == "first") return PoolMode::kFirst;
  TORCH_CHECK_VALUE(false, "mode must be \"mean\" or \"first\", got \"", std::string(mode), "\"");
}

inline void check_chunk_pool_args(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t tokens_per_node,
                                  const char* x_name) {
  check_rank(x, 3, x_name, "[N, H, D]");
  check_float_dtype(x, x_name);
  check_last_dim_contiguous(x, x_name);
  check_same_device(cu_seqlens, x, "cu_seqlens", x_name);
  TORCH_CHECK_VALUE(tokens_per_node >= 1, "tokens_per_node must be >= 1, got ", tokens_per_node);
}

inline void check_tree_topk_args(const at::Tensor& query, const at::Tensor& node_emb, int64_t depth, int64_t k,
                                 int64_t branching, c10::string_view score) {
  check_rank(query, 2, "query", "[B, D]");
  check_rank(node_emb, 4, "node_emb", "[B, C, T, D]");
  check_float_dtype(query, "query");
  check_same_dtype(node_emb, query, "node_emb", "query");
  check_same_device(node_emb, query, "node_emb", "query");
  check_last_dim_contiguous(query, "query");
  check_last_dim_contiguous(node_emb, "node_emb");
  TORCH_CHECK_VALUE(depth >= 1, "depth must be >= 1, got ", depth);
  TORCH_CHECK_VALUE(branching >= 2, "branching must be >= 2, got ", branching);
  TORCH_CHECK_VALUE(k >= 1 && k <= branching, "k must be in [1, branching = ", branching, "], got ", k);
  TORCH_CHECK_VALUE(score == "cosine" || score == "dot", "score must be \"cosine\" or \"dot\", got \"",
                    std::string(score), "\"");
  const int64_t B = query.size(0), D = query.size(1), T = node_emb.size(2);
  TORCH_CHECK_VALUE(node_emb.size(0) == B, "node_emb.shape[0] must equal query.shape[0] = ", B, ", got ",
                    node_emb.size(0));
  TORCH_CHECK_VALUE(node_emb.size(3) == D, "node_emb.shape[3] must equal query.shape[1] = ", D, ", got ",
                    node_emb.size(3));
  const int64_t expected_nodes = tree_num_nodes(depth, branching);
  TORCH_CHECK_VALUE(T == expected_nodes, "node_emb.shape[2] must be the number of tree nodes b + ... + b^depth = ",
                    expected_nodes, " for depth ", depth, " and branching ", branching, ", got ", T);
}

// Pointer cast from torch's 16-bit float types to the layout-compatible csrc storage types.
template <typename T>
struct KernelType {
  using type = T;
};
template <>
struct KernelType<at::Half> {
  using type = sharedllm::half_t;
};
template <>
struct KernelType<at::BFloat16> {
  using type = sharedllm::bfloat16_t;
};

// Tag carrying a csrc kernel type through the generic launcher lambdas of the run_* bindings.
template <typename T>
struct KernelTag {
  using type = T;
};

}  // namespace sharedllm::binding

// AT_DISPATCH over exactly the dtypes the kernels are instantiated for.
#define SHAREDLLM_DISPATCH_FLOATING(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
