// torch.ops.sharedllm.tree_topk on CUDA: one launch, no host synchronisation.
#include "cuda_stream.h"
#include "ops.h"
#include "tree_topk_binding.h"

namespace sharedllm::binding {

std::tuple<Tensor, Tensor> tree_topk_cuda(const Tensor& query, const Tensor& node_emb, int64_t depth,
                                                  int64_t k, int64_t branching, const std::string& score) {
  const DeviceGuard guard = device_guard(query);
  return run_tree_topk(query, node_emb, depth, k, branching, score, [&](auto tag, const TreeTopkParams& p) {
    constexpr int64_t kMaxNodes = cuda::tree_topk_max_nodes();
    SHAREDLLM_CHECK(p.nodes <= kMaxNodes, "the CUDA tree_topk keeps a chunk's ", p.nodes,
                    " node scores in shared memory and takes trees of up to ", kMaxNodes,
                    " nodes; use a smaller depth or branching, or backend='reference'");
    cuda::tree_topk<typename decltype(tag)::type>(p, current_stream(query));
  });
}

}  // namespace sharedllm::binding
