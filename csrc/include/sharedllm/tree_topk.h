// tree_topk (docs/DESIGN.md section 3.2): score every node of every chunk's tree against the sequence's query,
// descend level by level keeping the k best, and emit the preserved nodes left to right.
#pragma once

#include <cstdint>

#include "sharedllm/common.h"

namespace sharedllm {

enum class ScoreMode : int { kCosine = 0, kDot = 1 };

struct TreeTopkParams {
  const void* query;     // [B, D]
  const void* node_emb;  // [B, C, T, D]
  int32_t* node_ids;     // [B, C, P], contiguous
  float* scores;         // [B, C, T], contiguous
  int64_t batch, chunks, nodes, dim;  // B, C, T, D
  int64_t q_stride;                   // row stride of query
  int64_t e_batch_stride, e_chunk_stride, e_node_stride;
  int64_t depth, k, branching, preserved;  // h, k, b, P
  ScoreMode score;
};

// Number of non-root nodes b + b^2 + ... + b^h, and preserved nodes per chunk.
SHAREDLLM_HOST_DEVICE inline int64_t tree_num_nodes(int64_t depth, int64_t branching) {
  int64_t total = 0, width = 1;
  for (int64_t l = 1; l <= depth; ++l) total += (width *= branching);
  return total;
}
SHAREDLLM_HOST_DEVICE inline int64_t tree_num_preserved(int64_t depth, int64_t k, int64_t branching) {
  if (depth == 1) return branching;
  return (branching - k) + (depth - 2) * (k * branching - k) + k * branching;
}

namespace cpu {
template <typename T>
void tree_topk(const TreeTopkParams& p);
}  // namespace cpu

namespace cuda {
// One block of kTreeTopkThreads threads per chunk.
inline constexpr int kTreeTopkThreads = 256;
// Shared memory one block needs for a tree of `nodes` nodes, all of it dynamic: a float per warp
// (the query norm's partial sums), then a float score and a flag byte per node.
constexpr int64_t tree_topk_shared_bytes(int64_t nodes) {
  return (kTreeTopkThreads / 32 + nodes) * static_cast<int64_t>(sizeof(float)) + nodes;
}
// The largest tree the CUDA tree_topk takes (its shared memory needs no opt-in); the binding
// rejects larger ones and build_info reports it as cuda_tree_topk_max_nodes.
constexpr int64_t tree_topk_max_nodes() {
  return (kMaxSharedBytesWithoutOptIn - tree_topk_shared_bytes(0)) / (static_cast<int64_t>(sizeof(float)) + 1);
}
static_assert(tree_topk_shared_bytes(tree_topk_max_nodes()) <= kMaxSharedBytesWithoutOptIn &&
              tree_topk_shared_bytes(tree_topk_max_nodes() + 1) > kMaxSharedBytesWithoutOptIn);
template <typename T>
void tree_topk(const TreeTopkParams& p, void* stream);
}  // namespace cuda

}  // namespace sharedllm
