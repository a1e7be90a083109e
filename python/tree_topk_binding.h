// The binding of tree_topk shared by its CPU and CUDA implementations: argument checks, output
// allocation and kernel parameters. Each backend passes its launcher,
// `launch(KernelTag<T>{}, const TreeTopkParams&)`.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"
#include "sharedllm/tree_topk.h"

namespace sharedllm::binding {

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> run_tree_topk(const at::Tensor& query, const at::Tensor& node_emb, int64_t depth,
                                                 int64_t k, int64_t branching, c10::string_view score,
                                                 Launch&& launch) {
  check_tree_topk_args(query, node_emb, depth, k, branching, score);
  const int64_t B = query.size(0), D = query.size(1), C = node_emb.size(1), T = node_emb.size(2);
  const int64_t P = tree_num_preserved(depth, k, branching);
  at::Tensor node_ids = at::empty({B, C, P}, query.options().dtype(at::kInt));
  at::Tensor scores = at::empty({B, C, T}, query.options().dtype(at::kFloat));
  if (B == 0 || C == 0) return {node_ids, scores};
  SHAREDLLM_DISPATCH_FLOATING(query.scalar_type(), "tree_topk", [&] {
    TreeTopkParams p{query.data_ptr(), node_emb.data_ptr(), node_ids.data_ptr<int32_t>(), scores.data_ptr<float>(),
                     B, C, T, D, query.stride(0), node_emb.stride(0), node_emb.stride(1), node_emb.stride(2),
                     depth, k, branching, P, score == "dot" ? ScoreMode::kDot : ScoreMode::kCosine};
    launch(KernelTag<typename KernelType<scalar_t>::type>{}, p);
  });
  return {node_ids, scores};
}

}  // namespace sharedllm::binding
