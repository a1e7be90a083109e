// torch.ops.sharedllm.chunk_pool / chunk_pool_backward on CUDA.
#include "checks.h"
#include "cuda_runtime.h"
#include "ops.h"
#include "sharedllm/chunk_pool.h"

namespace sharedllm::binding {

at::Tensor chunk_pool_cuda(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t tokens_per_node,
                           c10::string_view mode) {
  check_chunk_pool_args(x, cu_seqlens, tokens_per_node, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  if (!capturing_graph()) check_cu_seqlens(cu_seqlens, x.size(0), "cu_seqlens", "x.shape[0]");
  const PoolMode pool_mode = parse_pool_mode(mode);
  const int64_t S = cu_seqlens.size(0) - 1;
  at::Tensor out = at::empty({S * tokens_per_node, x.size(1), x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor cu = cu_seqlens.contiguous();
  SHAREDLLM_DISPATCH_FLOATING(x.scalar_type(), "chunk_pool", [&] {
    ChunkPoolParams p{x.data_ptr(), out.data_ptr(), cu.data_ptr<int32_t>(), S, tokens_per_node, x.size(1), x.size(2),
                      x.stride(0), x.stride(1), out.stride(0), out.stride(1), pool_mode};
    cuda::chunk_pool_forward<typename KernelType<scalar_t>::type>(p, x.size(0), current_stream(x));
  });
  return out;
}

at::Tensor chunk_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& cu_seqlens, int64_t num_rows,
                                    int64_t tokens_per_node, c10::string_view mode) {
  check_chunk_pool_args(grad_out, cu_seqlens, tokens_per_node, "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  if (!capturing_graph()) check_cu_seqlens(cu_seqlens, num_rows, "cu_seqlens", "num_rows");
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
    cuda::chunk_pool_backward<typename KernelType<scalar_t>::type>(p, num_rows, current_stream(grad_out));
  });
  return grad_x;
}

}  // namespace sharedllm::binding
