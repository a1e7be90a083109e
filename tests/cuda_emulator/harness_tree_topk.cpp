// csrc/cuda/tree_topk.cu compiled as host C++ against the CPU emulator in include/, behind
// torch.ops.sharedllm_emulated.tree_topk on CPU tensors, with the checks and allocation of the real
// binding. Built by tests/test_cuda_emulated.py.
#include "tree_topk_binding.h"

#include <cuda_runtime.h>

#include "../../csrc/cuda/tree_topk.cu"

namespace {

using namespace sharedllm;
using binding::Tensor;

std::tuple<Tensor, Tensor> topk(const Tensor& query, const Tensor& node_emb, int64_t depth, int64_t k,
                                        int64_t branching, const std::string& score) {
  return binding::run_tree_topk(query, node_emb, depth, k, branching, score, [&](auto tag, const TreeTopkParams& p) {
    cuda::tree_topk<typename decltype(tag)::type>(p, nullptr);
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(SHAREDLLM_EMULATED_OPS, m) {
  m.def("tree_topk(Tensor query, Tensor node_emb, int depth, int k, int branching, str score) -> "
      "(Tensor node_ids, Tensor scores)");
}

STABLE_TORCH_LIBRARY_IMPL(SHAREDLLM_EMULATED_OPS, CPU, m) {
  m.impl("tree_topk", TORCH_BOX(&topk));
}
