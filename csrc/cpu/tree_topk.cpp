// CPU kernel for tree_topk. Each (sequence, chunk) task scores its T nodes (dot product and squared
// norm in one pass over each embedding) and runs its descent on those T scores, which is tiny next
// to reading the embeddings.
#include "sharedllm/tree_topk.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "sharedllm/cpu_runtime.h"
#include "sharedllm/cpu_vec.h"

namespace sharedllm::cpu {
namespace {

template <typename T>
SHAREDLLM_CPU_CLONES void dot_and_sqnorm(const T* e, const float* q, int64_t n, float* dot, float* sqnorm) {
  // four independent accumulators per sum: one would wait on the add latency every step
  vec8 d0 = splat8(0.0f), d1 = d0, d2 = d0, d3 = d0, s0 = d0, s1 = d0, s2 = d0, s3 = d0;
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    const vec8 v0 = load8(e + i), v1 = load8(e + i + kLanes);
    const vec8 v2 = load8(e + i + 2 * kLanes), v3 = load8(e + i + 3 * kLanes);
    d0 += v0 * load8(q + i);
    d1 += v1 * load8(q + i + kLanes);
    d2 += v2 * load8(q + i + 2 * kLanes);
    d3 += v3 * load8(q + i + 3 * kLanes);
    s0 += v0 * v0;
    s1 += v1 * v1;
    s2 += v2 * v2;
    s3 += v3 * v3;
  }
  for (; i + kLanes <= n; i += kLanes) {
    const vec8 v = load8(e + i);
    d0 += v * load8(q + i);
    s0 += v * v;
  }
  float dd = horizontal_sum((d0 + d1) + (d2 + d3)), ss = horizontal_sum((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) {
    const float v = to_float(e[i]);
    dd += v * q[i];
    ss += v * v;
  }
  *dot = dd;
  *sqnorm = ss;
}

// Ranks candidates by score, best first; ties keep the lower id first (stable on ascending ids).
void rank_candidates(std::vector<int64_t>& cand, const float* level_scores) {
  std::stable_sort(cand.begin(), cand.end(),
                   [&](int64_t a, int64_t b) { return level_scores[a] > level_scores[b]; });
}

}  // namespace

template <typename T>
void tree_topk(const TreeTopkParams& p) {
  const T* query = static_cast<const T*>(p.query);
  const T* emb = static_cast<const T*>(p.node_emb);
  const int64_t B = p.batch, C = p.chunks, Tn = p.nodes, D = p.dim;
  const int64_t b = p.branching, h = p.depth;

  // queries in float32 with their norms (B is small)
  std::vector<float> qf(static_cast<size_t>(B * D));
  std::vector<float> q_norm(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    float sq = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = to_float(query[i * p.q_stride + d]);
      qf[i * D + d] = v;
      sq += v * v;
    }
    q_norm[i] = std::max(std::sqrt(sq), 1e-8f);
  }

  // One task per (sequence, chunk): score its T nodes, then descend. One parallel region, since at
  // retrieval sizes (a few MB of embeddings) a second fork/join costs as much as the descent.
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, Tn * D));
  parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> expanded, candidates;
    std::vector<std::pair<int64_t, int32_t>> kept;  // (first leaf, level-order id)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bi = item / C, c = item % C;
      float* scores = p.scores + item * Tn;
      for (int64_t t = 0; t < Tn; ++t) {
        float dot, sq;
        dot_and_sqnorm(emb + bi * p.e_batch_stride + c * p.e_chunk_stride + t * p.e_node_stride, qf.data() + bi * D,
                       D, &dot, &sq);
        scores[t] = p.score == ScoreMode::kDot ? dot : dot / (q_norm[bi] * std::max(std::sqrt(sq), 1e-8f));
      }
      kept.clear();
      expanded.clear();
      int64_t offset = 0, width = b;  // first id and node count of the current level
      for (int64_t level = 1; level <= h; ++level) {
        candidates.clear();
        if (level == 1) {
          for (int64_t i = 0; i < b; ++i) candidates.push_back(i);
        } else {
          std::sort(expanded.begin(), expanded.end());  // children in ascending id order
          for (int64_t parent : expanded)
            for (int64_t i = 0; i < b; ++i) candidates.push_back(parent * b + i);
        }
        int64_t num_expanded = 0;
        if (level < h) {
          rank_candidates(candidates, scores + offset);
          num_expanded = p.k;
        }
        int64_t leaf_width = 1;
        for (int64_t l = level; l < h; ++l) leaf_width *= b;
        expanded.assign(candidates.begin(), candidates.begin() + num_expanded);
        for (size_t i = static_cast<size_t>(num_expanded); i < candidates.size(); ++i)
          kept.emplace_back(candidates[i] * leaf_width, static_cast<int32_t>(offset + candidates[i]));
        offset += width;
        width *= b;
      }
      std::sort(kept.begin(), kept.end());
      int32_t* ids = p.node_ids + item * p.preserved;
      for (int64_t i = 0; i < p.preserved; ++i) ids[i] = kept[static_cast<size_t>(i)].second;
    }
  });
}

template void tree_topk<float>(const TreeTopkParams&);
template void tree_topk<half_t>(const TreeTopkParams&);
template void tree_topk<bfloat16_t>(const TreeTopkParams&);

}  // namespace sharedllm::cpu
