// The binding of tree_topk shared by its CPU and CUDA implementations: argument checks, output
// allocation and kernel parameters. Each backend passes its launcher,
// `launch(KernelTag<T>{}, const TreeTopkParams&)`.
#pragma once

#include <tuple>

#include "checks.h"
#include "sharedllm/tree_topk.h"

namespace sharedllm::binding {

template <typename Launch>
std::tuple<Tensor, Tensor> run_tree_topk(const Tensor& query, const Tensor& node_emb, int64_t depth,
                                                 int64_t k, int64_t branching, const std::string& score,
                                                 Launch&& launch) {
  check_tree_topk_args(query, node_emb, depth, k, branching, score);
  const int64_t B = query.size(0), D = query.size(1), C = node_emb.size(1), T = node_emb.size(2);
  const int64_t P = tree_num_preserved(depth, k, branching);
  Tensor node_ids = new_tensor({B, C, P}, ScalarType::Int, query);
  Tensor scores = new_tensor({B, C, T}, ScalarType::Float, query);
  if (B == 0 || C == 0) return {node_ids, scores};
  dispatch_floating(query.scalar_type(), "tree_topk", [&](auto tag) {
    TreeTopkParams p{query.data_ptr(), node_emb.data_ptr(), ptr<int32_t>(node_ids), ptr<float>(scores),
                     B, C, T, D, query.stride(0), node_emb.stride(0), node_emb.stride(1), node_emb.stride(2),
                     depth, k, branching, P, score == "dot" ? ScoreMode::kDot : ScoreMode::kCosine};
    launch(tag, p);
  });
  return {node_ids, scores};
}

}  // namespace sharedllm::binding
