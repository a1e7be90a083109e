// tree_topk (docs/DESIGN.md section 3.2) on CUDA: ONE launch for scoring, descent and sorted emission.
//
// One block per (sequence, chunk). Its warps score the chunk's T nodes (one node per warp at a
// time, lanes striding over D in 16-byte vectors where the layout allows, float32 accumulation, a
// shuffle reduction) into shared memory.
// Then one thread runs the descent, O(T) over the flags in shared memory, and walks the leaves
// left to right to emit the preserved ids in order. The tree is tiny next to the reads of D-wide
// embeddings, so the serial part costs little; no host synchronisation anywhere.
#include <cuda_runtime.h>

#include "sharedllm/cuda_common.cuh"
#include "sharedllm/tree_topk.h"

namespace sharedllm::cuda {
namespace {

constexpr int kThreads = kTreeTopkThreads;
constexpr int kWarps = kThreads / 32;
constexpr unsigned char kExpanded = 1, kPreserved = 2;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) tree_topk_kernel(TreeTopkParams p) {
  SHAREDLLM_DYNAMIC_SHARED(float, shared);
  // the layout of tree_topk_shared_bytes: all dynamic, so that the binding's limit is the block's
  float* query_norm_parts = shared;                                          // [kWarps]
  float* scores = shared + kWarps;                                           // [T]
  unsigned char* flags = reinterpret_cast<unsigned char*>(scores + p.nodes);  // [T]

  const int64_t pair = blockIdx.x;  // b * C + c
  const int64_t b = pair / p.chunks, c = pair % p.chunks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* query = static_cast<const T*>(p.query) + b * p.q_stride;
  const T* emb = static_cast<const T*>(p.node_emb) + b * p.e_batch_stride + c * p.e_chunk_stride;
  const bool cosine = p.score == ScoreMode::kCosine;

  // |q|, once per block
  float q_sq = 0.f;
  for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) {
    const float q = load_float(query[d]);
    q_sq += q * q;
  }
  q_sq = warp_sum(q_sq);
  if (lane == 0) query_norm_parts[warp] = q_sq;
  for (int64_t t = threadIdx.x; t < p.nodes; t += kThreads) flags[t] = 0;
  __syncthreads();
  float q_norm = 0.f;
  for (int w = 0; w < kWarps; ++w) q_norm += query_norm_parts[w];
  q_norm = fmaxf(sqrtf(q_norm), 1e-8f);

  for (int64_t t = warp; t < p.nodes; t += kWarps) {
    const T* e = emb + t * p.e_node_stride;
    float dot = 0.f, e_sq = 0.f;
    // a 32-bit counter (dim < 2^31 - 512, checked on the host): with int64_t, ptxas spilled in <float, 4>
    for (int d = lane * VEC; d < static_cast<int>(p.dim); d += 32 * VEC) {
      float ev[VEC], qv[VEC];
      load_vec<T, VEC>(e + d, ev);
      load_vec<T, VEC>(query + d, qv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot += ev[i] * qv[i], e_sq += ev[i] * ev[i];
    }
    dot = warp_sum(dot);
    e_sq = warp_sum(e_sq);
    if (lane == 0) scores[t] = cosine ? dot / (q_norm * fmaxf(sqrtf(e_sq), 1e-8f)) : dot;
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < p.nodes; t += kThreads) p.scores[pair * p.nodes + t] = scores[t];
  if (threadIdx.x != 0) return;

  // descent: level l holds ids [offset, offset + width); node i's parent is i / b one level up
  const int64_t bf = p.branching;
  int64_t offset = 0, width = bf, parent_offset = -1;
  for (int64_t level = 1; level <= p.depth; ++level) {
    const bool last = level == p.depth;
    for (int64_t i = 0; i < width; ++i) {
      const bool candidate = level == 1 || (flags[parent_offset + i / bf] & kExpanded);
      if (candidate) flags[offset + i] = kPreserved;  // the k best are re-marked expanded below
    }
    if (!last) {
      for (int64_t pick = 0; pick < p.k; ++pick) {
        int64_t best = -1;
        for (int64_t i = 0; i < width; ++i) {  // ascending ids: ">" keeps the lower id on ties
          if (flags[offset + i] == kPreserved && (best < 0 || scores[offset + i] > scores[offset + best])) best = i;
        }
        if (best >= 0) flags[offset + best] = kExpanded;
      }
    }
    parent_offset = offset;
    offset += width;
    width *= bf;
  }
  // emission: walk the leaves left to right; at each, the preserved node that starts there
  int32_t* out = p.node_ids + pair * p.preserved;
  int64_t leaves = 1;
  for (int64_t level = 0; level < p.depth; ++level) leaves *= bf;
  int64_t written = 0;
  for (int64_t leaf = 0; leaf < leaves && written < p.preserved;) {
    int64_t level_offset = 0, span = leaves, level_width = bf;
    bool found = false;
    for (int64_t level = 1; level <= p.depth && !found; ++level) {
      span /= bf;  // leaves under one node of this level
      const int64_t i = leaf / span;
      if (flags[level_offset + i] == kPreserved) {
        out[written++] = static_cast<int32_t>(level_offset + i);
        leaf += span;
        found = true;
      }
      level_offset += level_width;
      level_width *= bf;
    }
    if (!found) ++leaf;  // unreachable for a well-formed descent; keeps the loop finite
  }
}

}  // namespace

template <typename T>
void tree_topk(const TreeTopkParams& p, void* stream) {
  const int64_t blocks = p.batch * p.chunks;
  if (p.dim > INT32_MAX - 32 * 16) throw std::invalid_argument("tree_topk: node_emb.shape[-1] must be below 2**31 - 512");
  const size_t shared = static_cast<size_t>(tree_topk_shared_bytes(p.nodes));
  const auto s = static_cast<cudaStream_t>(stream);
  if (can_vectorize<T>({p.query, p.node_emb}, {p.q_stride, p.e_batch_stride, p.e_chunk_stride, p.e_node_stride},
                       p.dim)) {
    launch_kernel(tree_topk_kernel<T, 16 / sizeof(T)>, static_cast<unsigned>(blocks), kThreads, shared, s, p);
  } else {
    launch_kernel(tree_topk_kernel<T, 1>, static_cast<unsigned>(blocks), kThreads, shared, s, p);
  }
  check_launch("tree_topk");
}

template void tree_topk<float>(const TreeTopkParams&, void*);
template void tree_topk<half_t>(const TreeTopkParams&, void*);
template void tree_topk<bfloat16_t>(const TreeTopkParams&, void*);

}  // namespace sharedllm::cuda
