// torch.ops.sharedllm.tree_topk on CPU.
#include "sharedllm/tree_topk.h"

#include "checks.h"
#include "ops.h"

namespace sharedllm::binding {

std::tuple<at::Tensor, at::Tensor> tree_topk_cpu(const at::Tensor& query, const at::Tensor& node_emb, int64_t depth,
                                                 int64_t k, int64_t branching, c10::string_view score) {
  check_rank(query, 2, "query", "[B, D]");
  check_rank(node_emb, 4, "node_emb", "[B, C, T, D]");
  check_float_dtype(query, "query");
  check_same_dtype(node_emb, query, "node_emb", "query");
  check_same_device(node_emb, query, "node_emb", "query");
  check_last_dim_contiguous(query, "query");
  check_last_dim_contiguous(node_emb, "node_emb");
  TORCH_CHECK_VALUE(depth >= 1, "depth must be >= 1, got ", depth);
  TORCH_CHECK_VALUE(branching >= 2, "branching must be >= 2, got ", branching);
  TORCH_CHECK_VALUE(k >= 1 && k <= branching, "k must be in [1, branching = ", branching, "], got ", k);
  TORCH_CHECK_VALUE(score == "cosine" || score == "dot", "score must be \"cosine\" or \"dot\", got \"",
                    std::string(score), "\"");
  const int64_t B = query.size(0), D = query.size(1), C = node_emb.size(1), T = node_emb.size(2);
  TORCH_CHECK_VALUE(node_emb.size(0) == B, "node_emb.shape[0] must equal query.shape[0] = ", B, ", got ",
                    node_emb.size(0));
  TORCH_CHECK_VALUE(node_emb.size(3) == D, "node_emb.shape[3] must equal query.shape[1] = ", D, ", got ",
                    node_emb.size(3));
  const int64_t expected_nodes = tree_num_nodes(depth, branching);
  TORCH_CHECK_VALUE(T == expected_nodes, "node_emb.shape[2] must be the number of tree nodes b + ... + b^depth = ",
                    expected_nodes, " for depth ", depth, " and branching ", branching, ", got ", T);
  const int64_t P = tree_num_preserved(depth, k, branching);
  at::Tensor node_ids = at::empty({B, C, P}, query.options().dtype(at::kInt));
  at::Tensor scores = at::empty({B, C, T}, query.options().dtype(at::kFloat));
  if (B == 0 || C == 0) return {node_ids, scores};
  SHAREDLLM_DISPATCH_FLOATING(query.scalar_type(), "tree_topk", [&] {
    TreeTopkParams p{query.data_ptr(), node_emb.data_ptr(), node_ids.data_ptr<int32_t>(), scores.data_ptr<float>(),
                     B, C, T, D, query.stride(0), node_emb.stride(0), node_emb.stride(1), node_emb.stride(2),
                     depth, k, branching, P, score == "dot" ? ScoreMode::kDot : ScoreMode::kCosine};
    cpu::tree_topk<typename KernelType<scalar_t>::type>(p);
  });
  return {node_ids, scores};
}

}  // namespace sharedllm::binding
