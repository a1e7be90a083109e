// CPU kernels for chunk_pool. Forward: one task per (segment, slot) reads its window once and
// accumulates in float32. Backward: one task per input row gathers the slots whose window holds
// it, so no two tasks write the same element and no atomics are needed.
#include "sharedllm/chunk_pool.h"

#include <algorithm>
#include <vector>

#include "sharedllm/cpu_runtime.h"
#include "sharedllm/cpu_vec.h"

namespace sharedllm::cpu {
namespace {

template <typename T>
SHAREDLLM_CPU_CLONES void accumulate_row(float* acc, const T* row, int64_t n, float weight) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store8(acc + i, load8(acc + i) + weight * load8(row + i));
  for (; i < n; ++i) acc[i] += weight * to_float(row[i]);
}

template <typename T>
SHAREDLLM_CPU_CLONES void store_row(T* dst, const float* acc, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(acc[i] * scale);
}

// Segment index of flat row `row`: the last s with cu[s] <= row (segments may be empty).
int64_t segment_of_row(const int32_t* cu, int64_t num_segments, int64_t row) {
  return std::upper_bound(cu, cu + num_segments + 1, static_cast<int32_t>(row)) - cu - 1;
}

}  // namespace

template <typename T>
void chunk_pool_forward(const ChunkPoolParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t P = p.tokens_per_node, H = p.num_heads, D = p.head_dim;
  parallel_for(0, p.num_segments * P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(H * D));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / P, j = item % P;
      const int64_t seg_start = p.cu_seqlens[s];
      const int64_t L = p.cu_seqlens[s + 1] - seg_start;
      std::fill(acc.begin(), acc.end(), 0.0f);
      float scale = 0.0f;  // empty segment: zeros
      if (L > 0) {
        const int64_t w0 = pool_window_start(j, L, P);
        const int64_t w1 = p.mode == PoolMode::kMean ? pool_window_end(j, L, P) : w0 + 1;
        for (int64_t r = w0; r < w1; ++r) {
          const T* row = x + (seg_start + r) * p.x_row_stride;
          for (int64_t h = 0; h < H; ++h) accumulate_row(acc.data() + h * D, row + h * p.x_head_stride, D, 1.0f);
        }
        scale = 1.0f / static_cast<float>(w1 - w0);
      }
      T* dst = out + item * p.out_row_stride;
      for (int64_t h = 0; h < H; ++h) store_row(dst + h * p.out_head_stride, acc.data() + h * D, D, scale);
    }
  });
}

template <typename T>
void chunk_pool_backward(const ChunkPoolBackwardParams& p) {
  const T* go = static_cast<const T*>(p.grad_out);
  T* gx = static_cast<T*>(p.grad_x);
  const int64_t P = p.tokens_per_node, H = p.num_heads, D = p.head_dim;
  const int64_t num_rows = p.cu_seqlens[p.num_segments];
  parallel_for(0, num_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(H * D));
    int64_t s = segment_of_row(p.cu_seqlens, p.num_segments, begin);
    for (int64_t row = begin; row < end; ++row) {
      while (p.cu_seqlens[s + 1] <= row) ++s;
      const int64_t seg_start = p.cu_seqlens[s];
      const int64_t L = p.cu_seqlens[s + 1] - seg_start;
      const int64_t r = row - seg_start;
      int64_t first, last;
      pool_slots_of_row(r, L, P, p.mode, &first, &last);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = first; j <= last; ++j) {
        const float weight =
            p.mode == PoolMode::kMean ? 1.0f / static_cast<float>(pool_window_end(j, L, P) - pool_window_start(j, L, P))
                                      : 1.0f;
        const T* g = go + (s * P + j) * p.go_row_stride;
        for (int64_t h = 0; h < H; ++h) accumulate_row(acc.data() + h * D, g + h * p.go_head_stride, D, weight);
      }
      T* dst = gx + row * p.gx_row_stride;
      for (int64_t h = 0; h < H; ++h) store_row(dst + h * p.gx_head_stride, acc.data() + h * D, D, 1.0f);
    }
  });
}

#define SHAREDLLM_INSTANTIATE(T)                                  \
  template void chunk_pool_forward<T>(const ChunkPoolParams&); \
  template void chunk_pool_backward<T>(const ChunkPoolBackwardParams&);
SHAREDLLM_INSTANTIATE(float)
SHAREDLLM_INSTANTIATE(half_t)
SHAREDLLM_INSTANTIATE(bfloat16_t)
#undef SHAREDLLM_INSTANTIATE

}  // namespace sharedllm::cpu
