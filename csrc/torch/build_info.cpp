// torch.ops.sharedllm.build_info(): what this binary was compiled with, as "key=value" lines.
#include "torch_api.h"

#include <sstream>

#include "ops.h"
#include "sharedllm/cross_inject_attention.h"
#include "sharedllm/tree_topk.h"

#ifndef SHAREDLLM_TORCH_VERSION
#define SHAREDLLM_TORCH_VERSION "unknown"
#endif
#ifndef SHAREDLLM_CUDA_ARCHS
#define SHAREDLLM_CUDA_ARCHS ""
#endif

#ifdef SHAREDLLM_WITH_CUDA
namespace sharedllm::cuda {
int compiled_cuda_version();  // csrc/cuda/device_info.cu
}
#endif

namespace sharedllm::binding {

std::string build_info() {
  std::ostringstream s;
  s << "torch_version=" << SHAREDLLM_TORCH_VERSION << "\n";
#ifdef SHAREDLLM_WITH_CUDA
  const int v = sharedllm::cuda::compiled_cuda_version();
  s << "cuda_version=" << v / 1000 << "." << (v % 1000) / 10 << "\n";
  s << "cuda_archs=" << SHAREDLLM_CUDA_ARCHS << "\n";
#else
  s << "cuda_version=\ncuda_archs=\n";
#endif
  s << "compiler=" << __VERSION__ << "\n";
  // the CUDA kernels' limits, for Python's dispatch (sharedllm_ops/_ext.py); properties of the
  // kernels' source, so CPU-only builds report them too
  s << "cuda_attention_max_head_dims=" << cuda::kMaxHeadDims << "\n";
  s << "cuda_tree_topk_max_nodes=" << cuda::tree_topk_max_nodes() << "\n";
  return s.str();
}

}  // namespace sharedllm::binding
