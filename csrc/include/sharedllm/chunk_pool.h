// chunk_pool (docs/DESIGN.md section 3.1): pool every segment of a packed [N, H, D] tensor to P rows.
#pragma once

#include <cstdint>

#include "sharedllm/common.h"

namespace sharedllm {

enum class PoolMode : int { kMean = 0, kFirst = 1 };

struct ChunkPoolParams {
  const void* x;                // [N, H, D], last dim contiguous
  void* out;                    // [S * P, H, D]
  const int32_t* cu_seqlens;    // [S + 1], validated by the caller or, on CUDA, by check_indices
  int64_t num_segments;         // S
  int64_t tokens_per_node;      // P
  int64_t num_heads, head_dim;  // H, D
  int64_t x_row_stride, x_head_stride;      // in elements
  int64_t out_row_stride, out_head_stride;  // in elements
  PoolMode mode;
  bool check_indices = false;  // CUDA: check cu_seqlens on the device first (see cuda_common.cuh)
};

struct ChunkPoolBackwardParams {
  const void* grad_out;  // [S * P, H, D]
  void* grad_x;          // [N, H, D]
  const int32_t* cu_seqlens;
  int64_t num_segments, tokens_per_node, num_heads, head_dim;
  int64_t go_row_stride, go_head_stride;
  int64_t gx_row_stride, gx_head_stride;
  PoolMode mode;
  bool check_indices = false;
};

// The output slots whose window contains segment row r: j in [first, last] (empty if first > last).
// mean: start_j <= r < end_j  <=>  floor(r*P/L) <= j <= ceil((r+1)*P/L) - 1
// first: start_j == r         <=>  ceil(r*P/L) <= j <= ceil((r+1)*P/L) - 1
SHAREDLLM_HOST_DEVICE inline void pool_slots_of_row(int64_t r, int64_t length, int64_t slots, PoolMode mode,
                                                    int64_t* first, int64_t* last) {
  const int64_t lo = mode == PoolMode::kMean ? (r * slots) / length : (r * slots + length - 1) / length;
  int64_t hi = ((r + 1) * slots + length - 1) / length - 1;
  if (hi > slots - 1) hi = slots - 1;
  *first = lo;
  *last = hi;
}

namespace cpu {
template <typename T>
void chunk_pool_forward(const ChunkPoolParams& p);
template <typename T>
void chunk_pool_backward(const ChunkPoolBackwardParams& p);
}  // namespace cpu

namespace cuda {
// `num_rows` is N (segment bounds are clamped to it); `stream` is a cudaStream_t (void* keeps CUDA
// headers out of this header)
template <typename T>
void chunk_pool_forward(const ChunkPoolParams& p, int64_t num_rows, void* stream);
template <typename T>
void chunk_pool_backward(const ChunkPoolBackwardParams& p, int64_t num_rows, void* stream);
}  // namespace cuda

}  // namespace sharedllm
