// The binding of chunk_pool shared by its CPU and CUDA implementations: argument checks, output
// allocation and kernel parameters. Each backend passes its launcher,
// `launch(KernelTag<T>{}, const ChunkPool(Backward)Params&)`; `read_values = false` skips the check
// that reads cu_seqlens on the host (the CUDA binding while a graph is captured).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "sharedllm/chunk_pool.h"

namespace sharedllm::binding {

template <typename Launch>
at::Tensor run_chunk_pool(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t tokens_per_node,
                          c10::string_view mode, bool read_values, Launch&& launch) {
  check_chunk_pool_args(x, cu_seqlens, tokens_per_node, "x");
  check_cu_seqlens(cu_seqlens, x.size(0), "cu_seqlens", "x.shape[0]", read_values);
  const PoolMode pool_mode = parse_pool_mode(mode);
  const int64_t S = cu_seqlens.size(0) - 1;
  at::Tensor out = at::empty({S * tokens_per_node, x.size(1), x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor cu = cu_seqlens.contiguous();
  SHAREDLLM_DISPATCH_FLOATING(x.scalar_type(), "chunk_pool", [&] {
    ChunkPoolParams p{x.data_ptr(), out.data_ptr(), cu.data_ptr<int32_t>(), S, tokens_per_node, x.size(1), x.size(2),
                      x.stride(0), x.stride(1), out.stride(0), out.stride(1), pool_mode};
    launch(KernelTag<typename KernelType<scalar_t>::type>{}, p);
  });
  return out;
}

template <typename Launch>
at::Tensor run_chunk_pool_backward(const at::Tensor& grad_out, const at::Tensor& cu_seqlens, int64_t num_rows,
                                   int64_t tokens_per_node, c10::string_view mode, bool read_values, Launch&& launch) {
  check_chunk_pool_args(grad_out, cu_seqlens, tokens_per_node, "grad_out");
  TORCH_CHECK_VALUE(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  check_cu_seqlens(cu_seqlens, num_rows, "cu_seqlens", "num_rows", read_values);
  const PoolMode pool_mode = parse_pool_mode(mode);
  const int64_t S = cu_seqlens.size(0) - 1;
  TORCH_CHECK_VALUE(grad_out.size(0) == S * tokens_per_node, "grad_out must have ", S * tokens_per_node,
                    " rows (segments x tokens_per_node), got ", grad_out.size(0));
  at::Tensor grad_x = at::empty({num_rows, grad_out.size(1), grad_out.size(2)}, grad_out.options());
  if (grad_x.numel() == 0) return grad_x;
  const at::Tensor cu = cu_seqlens.contiguous();
  SHAREDLLM_DISPATCH_FLOATING(grad_out.scalar_type(), "chunk_pool_backward", [&] {
    ChunkPoolBackwardParams p{grad_out.data_ptr(), grad_x.data_ptr(), cu.data_ptr<int32_t>(), S, tokens_per_node,
                              grad_out.size(1), grad_out.size(2), grad_out.stride(0), grad_out.stride(1),
                              grad_x.stride(0), grad_x.stride(1), pool_mode};
    launch(KernelTag<typename KernelType<scalar_t>::type>{}, p);
  });
  return grad_x;
}

}  // namespace sharedllm::binding
