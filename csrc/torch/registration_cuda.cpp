// The CUDA kernels of the sharedllm ops (schemas in registration.cpp). Compiled only in CUDA builds.
#include "ops.h"

STABLE_TORCH_LIBRARY_IMPL(sharedllm, CUDA, m) {
  m.impl("chunk_pool", TORCH_BOX(&sharedllm::binding::chunk_pool_cuda));
  m.impl("chunk_pool_backward", TORCH_BOX(&sharedllm::binding::chunk_pool_backward_cuda));
  m.impl("tree_topk", TORCH_BOX(&sharedllm::binding::tree_topk_cuda));
  m.impl("cross_inject_attention", TORCH_BOX(&sharedllm::binding::cross_inject_attention_cuda));
  m.impl("cross_inject_attention_backward", TORCH_BOX(&sharedllm::binding::cross_inject_attention_backward_cuda));
}
