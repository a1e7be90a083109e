// torch.ops.sharedllm.tree_topk on CPU.
#include "ops.h"
#include "tree_topk_binding.h"

namespace sharedllm::binding {

std::tuple<Tensor, Tensor> tree_topk_cpu(const Tensor& query, const Tensor& node_emb, int64_t depth,
                                                 int64_t k, int64_t branching, const std::string& score) {
  return run_tree_topk(query, node_emb, depth, k, branching, score, [](auto tag, const TreeTopkParams& p) {
    cpu::tree_topk<typename decltype(tag)::type>(p);
  });
}

}  // namespace sharedllm::binding
