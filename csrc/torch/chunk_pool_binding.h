// The binding of chunk_pool shared by its CPU and CUDA implementations: argument checks, output
// allocation and kernel parameters. Each backend passes its launcher,
// `launch(KernelTag<T>{}, const ChunkPool(Backward)Params&)`, and where cu_seqlens is checked
// (ValueChecks: the CPU binding on the host, the CUDA binding on the device by default).
#pragma once

#include "checks.h"
#include "sharedllm/chunk_pool.h"

namespace sharedllm::binding {

template <typename Launch>
Tensor run_chunk_pool(const Tensor& x, const Tensor& cu_seqlens, int64_t tokens_per_node,
                          const std::string& mode, ValueChecks checks, Launch&& launch) {
  check_chunk_pool_args(x, cu_seqlens, tokens_per_node, "x");
  check_cu_seqlens(cu_seqlens, x.size(0), "cu_seqlens", "x.shape[0]", checks == ValueChecks::kHost);
  const PoolMode pool_mode = parse_pool_mode(mode);
  const int64_t S = cu_seqlens.size(0) - 1;
  Tensor out = new_tensor_like(x, {S * tokens_per_node, x.size(1), x.size(2)});
  if (out.numel() == 0) return out;
  const Tensor cu = as_contiguous(cu_seqlens);
  dispatch_floating(x.scalar_type(), "chunk_pool", [&](auto tag) {
    ChunkPoolParams p{x.data_ptr(), out.data_ptr(), ptr<int32_t>(cu), S, tokens_per_node, x.size(1), x.size(2),
                      x.stride(0), x.stride(1), out.stride(0), out.stride(1), pool_mode,
                      checks == ValueChecks::kDevice};
    launch(tag, p);
  });
  return out;
}

template <typename Launch>
Tensor run_chunk_pool_backward(const Tensor& grad_out, const Tensor& cu_seqlens, int64_t num_rows,
                                   int64_t tokens_per_node, const std::string& mode, ValueChecks checks, Launch&& launch) {
  check_chunk_pool_args(grad_out, cu_seqlens, tokens_per_node, "grad_out");
  SHAREDLLM_CHECK(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  check_cu_seqlens(cu_seqlens, num_rows, "cu_seqlens", "num_rows", checks == ValueChecks::kHost);
  const PoolMode pool_mode = parse_pool_mode(mode);
  const int64_t S = cu_seqlens.size(0) - 1;
  SHAREDLLM_CHECK(grad_out.size(0) == S * tokens_per_node, "grad_out must have ", S * tokens_per_node,
                    " rows (segments x tokens_per_node), got ", grad_out.size(0));
  Tensor grad_x = new_tensor_like(grad_out, {num_rows, grad_out.size(1), grad_out.size(2)});
  if (grad_x.numel() == 0) return grad_x;
  const Tensor cu = as_contiguous(cu_seqlens);
  dispatch_floating(grad_out.scalar_type(), "chunk_pool_backward", [&](auto tag) {
    ChunkPoolBackwardParams p{grad_out.data_ptr(), grad_x.data_ptr(), ptr<int32_t>(cu), S, tokens_per_node,
                              grad_out.size(1), grad_out.size(2), grad_out.stride(0), grad_out.stride(1),
                              grad_x.stride(0), grad_x.stride(1), pool_mode, checks == ValueChecks::kDevice};
    launch(tag, p);
  });
  return grad_x;
}

}  // namespace sharedllm::binding
