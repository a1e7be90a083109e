// torch.ops.sharedllm.tree_topk on CUDA: one launch, no host synchronisation.
#include "checks.h"
#include "cuda_runtime.h"
#include "ops.h"
#include "sharedllm/tree_topk.h"

namespace sharedllm::binding {

std::tuple<at::Tensor, at::Tensor> tree_topk_cuda(const at::Tensor& query, const at::Tensor& node_emb, int64_t depth,
                                                  int64_t k, int64_t branching, c10::string_view score) {
  check_tree_topk_args(query, node_emb, depth, k, branching, score);
  const int64_t B = query.size(0), D = query.size(1), C = node_emb.size(1), T = node_emb.size(2);
  constexpr int64_t kMaxShared = 48 * 1024;  // without opting in to more per block
  TORCH_CHECK_VALUE(cuda::tree_topk_shared_bytes(T) <= kMaxShared, "the CUDA tree_topk keeps a chunk's ", T,
                    " node scores in shared memory and takes trees of up to ", kMaxShared / 5,
                    " nodes; use a smaller depth or branching");
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t P = tree_num_preserved(depth, k, branching);
  at::Tensor node_ids = at::empty({B, C, P}, query.options().dtype(at::kInt));
  at::Tensor scores = at::empty({B, C, T}, query.options().dtype(at::kFloat));
  if (B == 0 || C == 0) return {node_ids, scores};
  SHAREDLLM_DISPATCH_FLOATING(query.scalar_type(), "tree_topk", [&] {
    TreeTopkParams p{query.data_ptr(), node_emb.data_ptr(), node_ids.data_ptr<int32_t>(), scores.data_ptr<float>(),
                     B, C, T, D, query.stride(0), node_emb.stride(0), node_emb.stride(1), node_emb.stride(2),
                     depth, k, branching, P, score == "dot" ? ScoreMode::kDot : ScoreMode::kCosine};
    cuda::tree_topk<typename KernelType<scalar_t>::type>(p, current_stream(query));
  });
  return {node_ids, scores};
}

}  // namespace sharedllm::binding
