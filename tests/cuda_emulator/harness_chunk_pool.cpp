// csrc/cuda/chunk_pool.cu compiled as host C++ against the CPU emulator in include/, behind
// torch.ops.sharedllm_emulated.chunk_pool(_backward) on CPU tensors, with the checks and allocation
// of the real binding and its choice of where cu_seqlens is checked. Built by tests/test_cuda_emulated.py.
#include "chunk_pool_binding.h"

#include <cuda_runtime.h>

#include "../../csrc/cuda/chunk_pool.cu"

namespace {

using namespace sharedllm;
using binding::Tensor;

Tensor pool(const Tensor& x, const Tensor& cu, int64_t tokens_per_node, const std::string& mode) {
  return binding::run_chunk_pool(x, cu, tokens_per_node, mode, binding::cuda_value_checks_outside_graphs(),
                                 [&](auto tag, const ChunkPoolParams& p) {
    cuda::chunk_pool_forward<typename decltype(tag)::type>(p, x.size(0), nullptr);
  });
}

Tensor pool_backward(const Tensor& grad_out, const Tensor& cu, int64_t num_rows, int64_t tokens_per_node,
                         const std::string& mode) {
  return binding::run_chunk_pool_backward(grad_out, cu, num_rows, tokens_per_node, mode,
                                          binding::cuda_value_checks_outside_graphs(), [&](auto tag, const ChunkPoolBackwardParams& p) {
                                            cuda::chunk_pool_backward<typename decltype(tag)::type>(p, num_rows,
                                                                                                   nullptr);
                                          });
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(SHAREDLLM_EMULATED_OPS, m) {
  m.def("chunk_pool(Tensor x, Tensor cu_seqlens, int tokens_per_node, str mode) -> Tensor");
  m.def("chunk_pool_backward(Tensor grad_out, Tensor cu_seqlens, int num_rows, int tokens_per_node, str mode) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(SHAREDLLM_EMULATED_OPS, CPU, m) {
  m.impl("chunk_pool", TORCH_BOX(&pool));
  m.impl("chunk_pool_backward", TORCH_BOX(&pool_backward));
}
