// torch.ops.sharedllm.chunk_pool / chunk_pool_backward on CPU.
#include "chunk_pool_binding.h"
#include "ops.h"

namespace sharedllm::binding {

Tensor chunk_pool_cpu(const Tensor& x, const Tensor& cu_seqlens, int64_t tokens_per_node,
                          const std::string& mode) {
  return run_chunk_pool(x, cu_seqlens, tokens_per_node, mode, ValueChecks::kHost,
                        [](auto tag, const ChunkPoolParams& p) {
                          cpu::chunk_pool_forward<typename decltype(tag)::type>(p);
                        });
}

Tensor chunk_pool_backward_cpu(const Tensor& grad_out, const Tensor& cu_seqlens, int64_t num_rows,
                                   int64_t tokens_per_node, const std::string& mode) {
  return run_chunk_pool_backward(grad_out, cu_seqlens, num_rows, tokens_per_node, mode, ValueChecks::kHost,
                                 [](auto tag, const ChunkPoolBackwardParams& p) {
                                   cpu::chunk_pool_backward<typename decltype(tag)::type>(p);
                                 });
}

}  // namespace sharedllm::binding
