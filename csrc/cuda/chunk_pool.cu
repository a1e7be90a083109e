// chunk_pool (docs/DESIGN.md section 3.1) on CUDA: memory-bound, one pass over the input.
//
// Forward: block x = one output row (segment s, slot j); its threads cover (head, 16-byte vector
// of D) pairs and sum the rows of the window in float32. No atomics: every output element has
// exactly one writer. Backward: block x = one input row; it finds its segment by binary search in
// cu_seqlens and gathers the (at most ceil(P/L) + 1) slots whose window holds the row.
// Segment bounds are clamped to [0, N] so that even unvalidated cu_seqlens (CUDA-graph capture,
// where the binding cannot read them) never index out of bounds.
#include <cuda_runtime.h>

#include "sharedllm/chunk_pool.h"
#include "sharedllm/cuda_common.cuh"

namespace sharedllm::cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ void segment_bounds(const int32_t* cu, int64_t seg, int64_t total, int64_t* start,
                                               int64_t* length) {
  const int64_t lo = min(max(static_cast<int64_t>(cu[seg]), int64_t{0}), total);
  const int64_t hi = min(max(static_cast<int64_t>(cu[seg + 1]), lo), total);
  *start = lo;
  *length = hi - lo;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) chunk_pool_forward_kernel(ChunkPoolParams p, int64_t total_rows) {
  const int64_t row_out = blockIdx.x;
  const int64_t P = p.tokens_per_node;
  const int64_t seg = row_out / P, j = row_out % P;
  const int64_t vecs_per_head = p.head_dim / VEC;
  const int64_t lane = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (lane >= p.num_heads * vecs_per_head) return;
  const int64_t h = lane / vecs_per_head, d = (lane % vecs_per_head) * VEC;
  int64_t seg_start, length;
  segment_bounds(p.cu_seqlens, seg, total_rows, &seg_start, &length);
  const int64_t start = pool_window_start(j, length, P), end = pool_window_end(j, length, P);
  const T* x = static_cast<const T*>(p.x) + h * p.x_head_stride + d;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  if (p.mode == PoolMode::kMean) {
    for (int64_t r = start; r < end; ++r) {
      float row[VEC];
      load_vec<T, VEC>(x + (seg_start + r) * p.x_row_stride, row);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += row[i];
    }
    const float inv = 1.f / static_cast<float>(max(end - start, int64_t{1}));  // empty segment: 0
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] *= inv;
  } else if (length > 0) {
    load_vec<T, VEC>(x + (seg_start + start) * p.x_row_stride, acc);
  }
  T* out = static_cast<T*>(p.out) + row_out * p.out_row_stride + h * p.out_head_stride + d;
  store_vec<T, VEC>(out, acc);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) chunk_pool_backward_kernel(ChunkPoolBackwardParams p, int64_t num_rows) {
  const int64_t row = blockIdx.x;
  const int64_t P = p.tokens_per_node;
  const int64_t vecs_per_head = p.head_dim / VEC;
  const int64_t lane = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (lane >= p.num_heads * vecs_per_head) return;
  const int64_t h = lane / vecs_per_head, d = (lane % vecs_per_head) * VEC;
  const int64_t seg = segment_of_row(p.cu_seqlens, p.num_segments, row);
  int64_t seg_start, length;
  segment_bounds(p.cu_seqlens, seg, num_rows, &seg_start, &length);
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  const int64_t r = row - seg_start;
  if (length > 0 && r >= 0 && r < length) {
    int64_t first, last;
    pool_slots_of_row(r, length, P, p.mode, &first, &last);
    const T* g = static_cast<const T*>(p.grad_out) + h * p.go_head_stride + d;
    for (int64_t j = first; j <= last; ++j) {
      float slot[VEC];
      load_vec<T, VEC>(g + (seg * P + j) * p.go_row_stride, slot);
      const float w = p.mode == PoolMode::kMean
                          ? 1.f / static_cast<float>(pool_window_end(j, length, P) - pool_window_start(j, length, P))
                          : 1.f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += w * slot[i];
    }
  }
  T* gx = static_cast<T*>(p.grad_x) + row * p.gx_row_stride + h * p.gx_head_stride + d;
  store_vec<T, VEC>(gx, acc);
}

dim3 grid_for(int64_t rows, int64_t heads, int64_t head_dim, int vec) {
  const int64_t lanes = heads * (head_dim / vec);
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>((lanes + kThreads - 1) / kThreads));
}

// The value check of the default CUDA path (check_indices): cu_seqlens as the kernels will read it.
__global__ void check_pool_cu_seqlens(const int32_t* cu, int64_t num_segments, int64_t num_rows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i <= num_segments; i += stride)
    if (!cu_seqlens_entry_ok(cu, i, num_segments, num_rows))
      SHAREDLLM_DEVICE_FAIL("chunk_pool: cu_seqlens must start at 0, never decrease and end at the number of rows "
                            "(x.shape[0], or num_rows in the backward)");
}

void launch_index_checks(bool check, const int32_t* cu, int64_t num_segments, int64_t num_rows, cudaStream_t stream) {
  if (!check) return;
  launch_kernel(check_pool_cu_seqlens, check_blocks(num_segments + 1), kCheckThreads, 0, stream, cu, num_segments,
                num_rows);
  check_launch("chunk_pool (index checks)");
}

}  // namespace

template <typename T>
void chunk_pool_forward(const ChunkPoolParams& p, int64_t num_rows, void* stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t rows = p.num_segments * p.tokens_per_node;
  const int64_t total = num_rows;  // the kernel clamps segment bounds to the input's rows
  auto s = static_cast<cudaStream_t>(stream);
  launch_index_checks(p.check_indices, p.cu_seqlens, p.num_segments, num_rows, s);
  if (can_vectorize<T>({p.x, p.out}, {p.x_row_stride, p.x_head_stride, p.out_row_stride, p.out_head_stride},
                       p.head_dim)) {
    launch_kernel(chunk_pool_forward_kernel<T, kVec>, grid_for(rows, p.num_heads, p.head_dim, kVec), kThreads, 0, s, p, total);
  } else {
    launch_kernel(chunk_pool_forward_kernel<T, 1>, grid_for(rows, p.num_heads, p.head_dim, 1), kThreads, 0, s, p, total);
  }
  check_launch("chunk_pool_forward");
}

template <typename T>
void chunk_pool_backward(const ChunkPoolBackwardParams& p, int64_t num_rows, void* stream) {
  constexpr int kVec = 16 / sizeof(T);
  auto s = static_cast<cudaStream_t>(stream);
  launch_index_checks(p.check_indices, p.cu_seqlens, p.num_segments, num_rows, s);
  if (can_vectorize<T>({p.grad_out, p.grad_x}, {p.go_row_stride, p.go_head_stride, p.gx_row_stride, p.gx_head_stride},
                       p.head_dim)) {
    launch_kernel(chunk_pool_backward_kernel<T, kVec>, grid_for(num_rows, p.num_heads, p.head_dim, kVec), kThreads, 0, s,
                  p, num_rows);
  } else {
    launch_kernel(chunk_pool_backward_kernel<T, 1>, grid_for(num_rows, p.num_heads, p.head_dim, 1), kThreads, 0, s, p,
                  num_rows);
  }
  check_launch("chunk_pool_backward");
}

template void chunk_pool_forward<float>(const ChunkPoolParams&, int64_t, void*);
template void chunk_pool_forward<half_t>(const ChunkPoolParams&, int64_t, void*);
template void chunk_pool_forward<bfloat16_t>(const ChunkPoolParams&, int64_t, void*);
template void chunk_pool_backward<float>(const ChunkPoolBackwardParams&, int64_t, void*);
template void chunk_pool_backward<half_t>(const ChunkPoolBackwardParams&, int64_t, void*);
template void chunk_pool_backward<bfloat16_t>(const ChunkPoolBackwardParams&, int64_t, void*);

}  // namespace sharedllm::cuda
