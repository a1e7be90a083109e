// The CUDA kernels of the sharedllm ops (schemas in registration.cpp). Compiled only in CUDA builds.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(sharedllm, CUDA, m) {
  m.impl("chunk_pool", &sharedllm::binding::chunk_pool_cuda);
  m.impl("chunk_pool_backward", &sharedllm::binding::chunk_pool_backward_cuda);
  m.impl("tree_topk", &sharedllm::binding::tree_topk_cuda);
  m.impl("cross_inject_attention", &sharedllm::binding::cross_inject_attention_cuda);
  m.impl("cross_inject_attention_backward", &sharedllm::binding::cross_inject_attention_backward_cuda);
}
