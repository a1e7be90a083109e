// torch.ops.sharedllm.chunk_pool / chunk_pool_backward on CUDA: checks and allocation shared with
// the CPU binding, the device guard and current stream, index values checked on the device by default.
#include "chunk_pool_binding.h"
#include "cuda_stream.h"
#include "ops.h"

namespace sharedllm::binding {

Tensor chunk_pool_cuda(const Tensor& x, const Tensor& cu_seqlens, int64_t tokens_per_node,
                           const std::string& mode) {
  const DeviceGuard guard = device_guard(x);
  const int64_t num_rows = x.size(0);
  return run_chunk_pool(x, cu_seqlens, tokens_per_node, mode, cuda_value_checks(x),
                        [&](auto tag, const ChunkPoolParams& p) {
                          cuda::chunk_pool_forward<typename decltype(tag)::type>(p, num_rows, current_stream(x));
                        });
}

Tensor chunk_pool_backward_cuda(const Tensor& grad_out, const Tensor& cu_seqlens, int64_t num_rows,
                                    int64_t tokens_per_node, const std::string& mode) {
  const DeviceGuard guard = device_guard(grad_out);
  return run_chunk_pool_backward(grad_out, cu_seqlens, num_rows, tokens_per_node, mode, cuda_value_checks(grad_out),
                                 [&](auto tag, const ChunkPoolBackwardParams& p) {
                                   cuda::chunk_pool_backward<typename decltype(tag)::type>(p, num_rows,
                                                                                          current_stream(grad_out));
                                 });
}

}  // namespace sharedllm::binding
