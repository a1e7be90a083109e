// cross_inject_attention (docs/DESIGN.md section 3.3) on CUDA, forward and backward.
//
// Two paths, chosen per call on the host:
// * Tensor cores (fp16/bf16, D == Dv in {64, 128}, 16-byte aligned rows, sm_80+): FlashAttention-2
//   style. A block of 4 warps owns 64 query rows (16 per warp) of one head; key/value tiles are
//   staged in shared memory (rotated as they are loaded); S = Q K^T and O += P V run on
//   mma.sync.m16n8k16 with float32 accumulators in registers, and the online softmax (base 2)
//   works on the accumulator fragments directly, whose layout is also the A-operand layout of
//   the next product, so P never leaves registers. The backward recomputes P from the saved lse:
//   one kernel per (key tile, kv head) accumulates dK/dV over every query of the sequence and
//   every query head of the GQA group, one per (query tile, query head) accumulates dQ; no atomics.
//   The rotary's transpose is applied to dQ/dK in registers before the store.
// * General (any dtype and head dims, any strides): one warp per (row, head), lanes striding over
//   the head dim, one key (or query) at a time. Correct everywhere, fast nowhere; float32 takes it.
//
// Varlen: a block finds its (sequence, first row) by walking cu_seqlens on the device, so nothing
// is read on the host and the launch is graph-capturable. The index values are checked on the device
// first (check_attention_indices); all sequence bounds and rotary positions are clamped as well, so
// that no read leaves its tensor even before the failed check has stopped the work.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <type_traits>

#include "sharedllm/cross_inject_attention.h"
#include "sharedllm/cuda_common.cuh"

namespace sharedllm::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Indexing shared by both paths

// Rows [begin, end) of sequence `seq`, clamped to [0, total].
__device__ __forceinline__ void sequence_rows(const int32_t* cu, int64_t seq, int64_t total, int64_t& begin,
                                              int64_t& end) {
  begin = min(max(static_cast<int64_t>(cu[seq]), int64_t{0}), total);
  end = min(max(static_cast<int64_t>(cu[seq + 1]), begin), total);
}

// The tile-th tile of `rows_per_tile` rows over the sequences, in order; false past the last one.
// A linear walk over cu_seqlens (cached reads, once per block) keeps the host out of the launch.
__device__ bool find_tile(const int32_t* cu, int64_t batch, int64_t total, int64_t rows_per_tile, int64_t tile,
                          int64_t& seq, int64_t& first_row) {
  for (int64_t b = 0; b < batch; ++b) {
    int64_t begin, end;
    sequence_rows(cu, b, total, begin, end);
    const int64_t tiles = (end - begin + rows_per_tile - 1) / rows_per_tile;
    if (tile < tiles) {
      seq = b;
      first_row = begin + tile * rows_per_tile;
      return true;
    }
    tile -= tiles;
  }
  return false;
}

// The rotary of one pair (x[i], x[i + D/2]) in float32, given the cos/sin of both columns: shared by the
// tile loads and rotate_k, so that k rotated once and k rotated tile by tile round identically.
__device__ __forceinline__ void rotate_pair(float& lo, float& hi, float cos_lo, float sin_lo, float cos_hi,
                                            float sin_hi) {
  const float a = lo, b = hi;
  lo = a * cos_lo - b * sin_lo;
  hi = b * cos_hi + a * sin_hi;
}

// cos/sin rows of a position (clamped into the table), or null without rotary (no table, or no positions:
// rows that are already rotated).
__device__ __forceinline__ const float* rotary_row(const float* table, const int32_t* positions, int64_t row,
                                                   const RotaryParams& r, int64_t dim) {
  if (table == nullptr || positions == nullptr) return nullptr;
  const int64_t pos = min(max(static_cast<int64_t>(positions[row]), int64_t{0}), r.max_pos - 1);
  return table + pos * dim;
}

// ---------------------------------------------------------------------------------------------
// General path: one warp per (row, head)

// Element d of a row after the rotary (x*cos + rotate_half(x)*sin), or the plain element.
template <typename T>
__device__ __forceinline__ float rotated_element(const T* x, int64_t d, int64_t dim, const float* cos,
                                                 const float* sin) {
  const float xd = load_float(x[d]);
  if (cos == nullptr) return xd;
  const int64_t half = dim / 2;
  const float partner = d < half ? -load_float(x[d + half]) : load_float(x[d - half]);
  return xd * cos[d] + partner * sin[d];
}

// The warp's dot product of a staged float32 row with row x (rotated when cos/sin are given); every
// lane gets the total.
template <typename T>
__device__ __forceinline__ float warp_dot(const float* staged, const T* x, int64_t dim, const float* cos,
                                          const float* sin, int lane) {
  float sum = 0.f;
  for (int64_t d = lane; d < dim; d += 32) sum += staged[d] * rotated_element(x, d, dim, cos, sin);
  return warp_sum(sum);
}

// acc += a * x (x rotated when cos/sin are given), each lane on its own elements of the row.
template <typename T>
__device__ __forceinline__ void warp_axpy(float* acc, float a, const T* x, int64_t dim, const float* cos,
                                          const float* sin, int lane) {
  for (int64_t d = lane; d < dim; d += 32) acc[d] += a * rotated_element(x, d, dim, cos, sin);
}

// The rotary's transpose applied to a float32 row in shared memory, written to `out` (lane-strided).
template <typename T>
__device__ __forceinline__ void store_unrotated(T* out, const float* g, int64_t dim, float scale, const float* cos,
                                                const float* sin, int lane) {
  const int64_t half = dim / 2;
  for (int64_t d = lane; d < dim; d += 32) {
    float value = g[d];
    if (cos != nullptr)
      value = d < half ? g[d] * cos[d] + g[d + half] * sin[d + half] : g[d] * cos[d] - g[d - half] * sin[d - half];
    out[d] = store_float<T>(value * scale);
  }
}

// The value checks of the default CUDA path (AttentionParams::check_indices): every boundary and position
// the kernels will read, before they run (also in every replay of a captured CUDA graph).
__global__ void check_attention_indices(AttentionParams p, int64_t nq, int64_t nk) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first; i <= p.batch; i += stride) {
    if (!cu_seqlens_entry_ok(p.cu_seqlens_q, i, p.batch, nq))
      SHAREDLLM_DEVICE_FAIL("cross_inject_attention: cu_seqlens_q must start at 0, never decrease and end at q.shape[0]");
    if (!cu_seqlens_entry_ok(p.cu_seqlens_k, i, p.batch, nk))
      SHAREDLLM_DEVICE_FAIL("cross_inject_attention: cu_seqlens_k must start at 0, never decrease and end at k.shape[0]");
  }
  if (p.rotary.cos == nullptr) return;  // no rotary, no positions
  for (int64_t i = first; i < nq; i += stride) {
    const int32_t pos = p.rotary.q_positions[i];
    if (pos < 0 || pos >= p.rotary.max_pos)
      SHAREDLLM_DEVICE_FAIL("cross_inject_attention: q_positions must lie in [0, rotary_cos.shape[0])");
  }
  for (int64_t i = first; i < nk; i += stride) {
    const int32_t pos = p.rotary.k_positions[i];
    if (pos < 0 || pos >= p.rotary.max_pos)
      SHAREDLLM_DEVICE_FAIL("cross_inject_attention: k_positions must lie in [0, rotary_cos.shape[0])");
  }
}

void launch_index_checks(const AttentionParams& p, int64_t nq, int64_t nk, cudaStream_t stream) {
  if (!p.check_indices) return;
  launch_kernel(check_attention_indices, check_blocks(std::max({p.batch + 1, nq, nk})), kCheckThreads, 0, stream, p, nq, nk);
  check_launch("cross_inject_attention (index checks)");
}

// k with the rotary applied, into p.k_rotated ([Nk, Hk, D] contiguous): the float32 arithmetic and the
// rounding to T of load_tile's fused rotation, once per call instead of once per (query tile, head).
template <typename T>
__global__ void rotate_k(AttentionParams p, int64_t nk) {
  const int64_t half = p.head_dim / 2, items = nk * p.num_kv_heads * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += stride) {
    const int64_t col = i % half, row_head = i / half, head = row_head % p.num_kv_heads, row = row_head / p.num_kv_heads;
    const T* x = static_cast<const T*>(p.k) + row * p.k_row_stride + head * p.k_head_stride;
    const float* cs = rotary_row(p.rotary.cos, p.rotary.k_positions, row, p.rotary, p.head_dim);
    const float* sn = rotary_row(p.rotary.sin, p.rotary.k_positions, row, p.rotary, p.head_dim);
    float lo = load_float(x[col]), hi = load_float(x[col + half]);
    rotate_pair(lo, hi, cs[col], sn[col], cs[col + half], sn[col + half]);
    T* out = static_cast<T*>(p.k_rotated) + row_head * p.head_dim;
    out[col] = store_float<T>(lo);
    out[col + half] = store_float<T>(hi);
  }
}

// The parameters for tensor-core kernels that only need k rotated (the forward, the backward's dQ): k rotated
// once into p.k_rotated, which they then read as k without positions (load_tile stages it as it is).
// Without scratch or rotary: p itself. (The general path keeps rotating k in float32, row by row.)
template <typename T, typename Params>
Params with_k_rotated_once(const Params& p, int64_t nk, cudaStream_t stream) {
  if (p.k_rotated == nullptr || p.rotary.cos == nullptr || nk == 0) return p;
  const int64_t items = nk * p.num_kv_heads * (p.head_dim / 2);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, 8192));
  launch_kernel(rotate_k<T>, blocks, 256, 0, stream, static_cast<const AttentionParams&>(p), nk);
  check_launch("cross_inject_attention (k rotation)");
  Params rotated = p;
  rotated.k = p.k_rotated;
  rotated.k_row_stride = p.num_kv_heads * p.head_dim;
  rotated.k_head_stride = p.head_dim;
  rotated.rotary.k_positions = nullptr;
  return rotated;
}

template <typename T>
__global__ void attention_forward_general(AttentionForwardParams p, int64_t nq, int64_t nk) {
  SHAREDLLM_DYNAMIC_SHARED(float, shared);
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * warps + warp;  // row * Hq + head
  if (item >= nq * p.num_q_heads) return;  // whole warps only: nothing below syncs the block
  const int64_t row = item / p.num_q_heads, head = item % p.num_q_heads;
  const int64_t kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const int64_t D = p.head_dim, Dv = p.v_dim;
  float* q_row = shared + warp * (D + Dv);  // rotated q, pre-scaled for base-2 softmax
  float* acc = q_row + D;

  const RotaryParams& r = p.rotary;
  const T* q = static_cast<const T*>(p.q) + row * p.q_row_stride + head * p.q_head_stride;
  const float* q_cos = rotary_row(r.cos, r.q_positions, row, r, D);
  const float* q_sin = rotary_row(r.sin, r.q_positions, row, r, D);
  const float scale_log2 = p.softmax_scale * kLog2e;
  for (int64_t d = lane; d < D; d += 32) q_row[d] = rotated_element(q, d, D, q_cos, q_sin) * scale_log2;
  for (int64_t d = lane; d < Dv; d += 32) acc[d] = 0.f;
  __syncwarp();

  int64_t k_begin, k_end;
  sequence_rows(p.cu_seqlens_k, segment_of_row(p.cu_seqlens_q, p.batch, row), nk, k_begin, k_end);
  float m = -INFINITY, l = 0.f;
  for (int64_t j = k_begin; j < k_end; ++j) {
    const T* k = static_cast<const T*>(p.k) + j * p.k_row_stride + kv_head * p.k_head_stride;
    const float* k_cos = rotary_row(r.cos, r.k_positions, j, r, D);
    const float* k_sin = rotary_row(r.sin, r.k_positions, j, r, D);
    const float s = warp_dot(q_row, k, D, k_cos, k_sin, lane);
    const float m_new = fmaxf(m, s);
    const float ref = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m - ref), prob = exp2f(s - ref);
    l = l * alpha + prob;
    m = m_new;
    const T* v = static_cast<const T*>(p.v) + j * p.v_row_stride + kv_head * p.v_head_stride;
    for (int64_t d = lane; d < Dv; d += 32) acc[d] = acc[d] * alpha + prob * load_float(v[d]);
  }
  T* out = static_cast<T*>(p.out) + item * Dv;
  const float inv = l > 0.f ? 1.f / l : 0.f;  // a sequence without keys gives out = 0
  for (int64_t d = lane; d < Dv; d += 32) out[d] = store_float<T>(acc[d] * inv);
  if (lane == 0) p.lse[item] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
}

// delta = rowsum(dO * O) - grad_lse: with it, dS = P * (dP - delta) covers the gradients of both
// outputs (d lse / d s = P).
template <typename T>
__global__ void attention_backward_delta(AttentionBackwardParams p, int64_t items, float* delta) {
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (item >= items) return;
  const T* go = static_cast<const T*>(p.grad_out) + item * p.v_dim;
  const T* o = static_cast<const T*>(p.out) + item * p.v_dim;
  float sum = 0.f;
  for (int64_t d = lane; d < p.v_dim; d += 32) sum += load_float(go[d]) * load_float(o[d]);
  sum = warp_sum(sum);
  if (lane == 0) delta[item] = sum - (p.grad_lse != nullptr ? p.grad_lse[item] : 0.f);
}

template <typename T>
__global__ void attention_backward_dq_general(AttentionBackwardParams p, int64_t nq, int64_t nk,
                                              const float* delta) {
  SHAREDLLM_DYNAMIC_SHARED(float, shared);
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * warps + warp;  // row * Hq + head
  if (item >= nq * p.num_q_heads) return;
  const int64_t row = item / p.num_q_heads, head = item % p.num_q_heads;
  const int64_t kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const int64_t D = p.head_dim, Dv = p.v_dim;
  float* q_row = shared + warp * (2 * D + Dv);
  float* go_row = q_row + D;
  float* dq = go_row + Dv;

  const RotaryParams& r = p.rotary;
  const T* q = static_cast<const T*>(p.q) + row * p.q_row_stride + head * p.q_head_stride;
  const float* q_cos = rotary_row(r.cos, r.q_positions, row, r, D);
  const float* q_sin = rotary_row(r.sin, r.q_positions, row, r, D);
  const T* go = static_cast<const T*>(p.grad_out) + item * Dv;
  for (int64_t d = lane; d < D; d += 32) q_row[d] = rotated_element(q, d, D, q_cos, q_sin), dq[d] = 0.f;
  for (int64_t d = lane; d < Dv; d += 32) go_row[d] = load_float(go[d]);
  __syncwarp();

  const float scale_log2 = p.softmax_scale * kLog2e;
  const float lse_log2 = p.lse[item] * kLog2e, row_delta = delta[item];
  int64_t k_begin, k_end;
  sequence_rows(p.cu_seqlens_k, segment_of_row(p.cu_seqlens_q, p.batch, row), nk, k_begin, k_end);
  for (int64_t j = k_begin; j < k_end; ++j) {
    const T* k = static_cast<const T*>(p.k) + j * p.k_row_stride + kv_head * p.k_head_stride;
    const T* v = static_cast<const T*>(p.v) + j * p.v_row_stride + kv_head * p.v_head_stride;
    const float* k_cos = rotary_row(r.cos, r.k_positions, j, r, D);
    const float* k_sin = rotary_row(r.sin, r.k_positions, j, r, D);
    const float s = warp_dot(q_row, k, D, k_cos, k_sin, lane);
    const float dp = warp_dot<T>(go_row, v, Dv, nullptr, nullptr, lane);
    const float ds = exp2f(s * scale_log2 - lse_log2) * (dp - row_delta);
    warp_axpy(dq, ds, k, D, k_cos, k_sin, lane);
  }
  __syncwarp();  // the transpose of the rotary reads the other half of the row
  store_unrotated(static_cast<T*>(p.grad_q) + item * D, dq, D, p.softmax_scale, q_cos, q_sin, lane);
}

template <typename T>
__global__ void attention_backward_dkdv_general(AttentionBackwardParams p, int64_t nq, int64_t nk,
                                                const float* delta) {
  SHAREDLLM_DYNAMIC_SHARED(float, shared);
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * warps + warp;  // key row * Hk + kv head
  if (item >= nk * p.num_kv_heads) return;
  const int64_t row = item / p.num_kv_heads, kv_head = item % p.num_kv_heads;
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const int64_t D = p.head_dim, Dv = p.v_dim;
  float* k_row = shared + warp * 2 * (D + Dv);
  float* v_row = k_row + D;
  float* dk = v_row + Dv;
  float* dv = dk + D;

  const RotaryParams& r = p.rotary;
  const T* k = static_cast<const T*>(p.k) + row * p.k_row_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + row * p.v_row_stride + kv_head * p.v_head_stride;
  const float* k_cos = rotary_row(r.cos, r.k_positions, row, r, D);
  const float* k_sin = rotary_row(r.sin, r.k_positions, row, r, D);
  for (int64_t d = lane; d < D; d += 32) k_row[d] = rotated_element(k, d, D, k_cos, k_sin), dk[d] = 0.f;
  for (int64_t d = lane; d < Dv; d += 32) v_row[d] = load_float(v[d]), dv[d] = 0.f;
  __syncwarp();

  const float scale_log2 = p.softmax_scale * kLog2e;
  int64_t q_begin, q_end;
  sequence_rows(p.cu_seqlens_q, segment_of_row(p.cu_seqlens_k, p.batch, row), nq, q_begin, q_end);
  for (int64_t head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    for (int64_t i = q_begin; i < q_end; ++i) {
      const T* q = static_cast<const T*>(p.q) + i * p.q_row_stride + head * p.q_head_stride;
      const T* go = static_cast<const T*>(p.grad_out) + (i * p.num_q_heads + head) * Dv;
      const float* q_cos = rotary_row(r.cos, r.q_positions, i, r, D);
      const float* q_sin = rotary_row(r.sin, r.q_positions, i, r, D);
      const float s = warp_dot(k_row, q, D, q_cos, q_sin, lane);
      const float dp = warp_dot<T>(v_row, go, Dv, nullptr, nullptr, lane);
      const int64_t q_item = i * p.num_q_heads + head;
      const float prob = exp2f(s * scale_log2 - p.lse[q_item] * kLog2e);
      const float ds = prob * (dp - delta[q_item]);
      warp_axpy<T>(dv, prob, go, Dv, nullptr, nullptr, lane);
      warp_axpy(dk, ds, q, D, q_cos, q_sin, lane);
    }
  }
  __syncwarp();
  store_unrotated(static_cast<T*>(p.grad_k) + item * D, dk, D, p.softmax_scale, k_cos, k_sin, lane);
  T* dv_out = static_cast<T*>(p.grad_v) + item * Dv;
  for (int64_t d = lane; d < Dv; d += 32) dv_out[d] = store_float<T>(dv[d]);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, half_t>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// D[16x8] += A[16x16] B[16x8], float32 accumulators. Per lane (g = lane / 4, t = lane % 4):
//   a[0..3] = A(g, 2t..2t+1), A(g+8, 2t..), A(g, 2t+8..), A(g+8, 2t+8..)
//   b0, b1  = B(2t..2t+1, g), B(2t+8..2t+9, g)
//   c[0..3] = C(g, 2t), C(g, 2t+1), C(g+8, 2t), C(g+8, 2t+1)
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(SHAREDLLM_CUDA_EMULATOR)
  emulator::mma_m16n8k16<T>(c, a, b0, b1);  // tests/cuda_emulator: the same layout, run on the CPU
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, half_t>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host never picks this path below sm_80
#endif
}

// A shared-memory tile of ROWS rows x D 16-bit columns, rows padded by 8 elements (16 bytes): the 8 rows
// an ldmatrix phase reads (16 bytes each) then start in 8 distinct groups of 4 banks, and every row
// address stays 16-byte aligned.
template <int D>
struct SmemTile {
  static constexpr int kStride = D + 8;
};

template <int D>
__device__ __forceinline__ uint32_t load_pair(const uint16_t* tile, int row, int col) {  // (row, col..col+1)
  return *reinterpret_cast<const uint32_t*>(tile + row * SmemTile<D>::kStride + col);
}

// The B operands of n-tiles nt and nt + 1 at k-step kk (b[0..1] and b[2..3]), from a row-major tile whose rows
// are the n index: one ldmatrix of rows (nt + quarter / 2) * 8 + .., columns kk * 16 + (quarter % 2) * 8.
template <int D>
__device__ __forceinline__ void load_b_pairs(uint32_t (&b)[4], const uint16_t* tile, int nt, int kk, int lane) {
  const int quarter = lane / 8;
  ldmatrix_x4<false>(b, tile + ((nt + quarter / 2) * 8 + lane % 8) * SmemTile<D>::kStride + kk * 16 + (quarter % 2) * 8);
}

// A fragment of rows [row0, row0 + 16) x columns [col0, col0 + 16) of a row-major tile: one ldmatrix of
// its four 8x8 quarters (top left, bottom left, top right, bottom right = a[0..3]).
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* tile, int row0, int col0, int lane) {
  const int quarter = lane / 8;
  ldmatrix_x4<false>(a, tile + (row0 + (quarter % 2) * 8 + lane % 8) * SmemTile<D>::kStride + col0 + (quarter / 2) * 8);
}

// Float32 accumulators (C layout) of a 16 x 16 block, as the A fragment of the next product.
template <typename T>
__device__ __forceinline__ void accumulators_as_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack2<T>(left[0], left[1]);
  a[1] = pack2<T>(left[2], left[3]);
  a[2] = pack2<T>(right[0], right[1]);
  a[3] = pack2<T>(right[2], right[3]);
}

// C[16 x N] += A[16 x D] B^T: A as the warp's fragments per 16-column step, B the rows [0, N) of a
// shared tile (its rows are the columns of C).
template <typename T, int D, int N>
__device__ __forceinline__ void mma_rows_by_tile(float (&c)[N / 8][4], const uint32_t (&a)[D / 16][4],
                                                 const uint16_t* tile, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
      mma16816<T>(c[nt], a[kk], load_pair<D>(tile, nt * 8 + g, kk * 16 + 2 * t),
                  load_pair<D>(tile, nt * 8 + g, kk * 16 + 8 + 2 * t));
  }
}

// C[16 x D] += P[16 x N] B: P as float32 accumulators (rounded to T for the tensor cores), B the rows
// [0, N) of a shared tile.
template <typename T, int D, int N>
__device__ __forceinline__ void mma_accumulators_by_tile(float (&c)[D / 8][4], const float (&p)[N / 8][4],
                                                         const uint16_t* tile, int lane) {
  const int quarter = lane / 8;
#pragma unroll
  for (int j = 0; j < N / 16; ++j) {
    uint32_t a[4];
    accumulators_as_a<T>(a, p[2 * j], p[2 * j + 1]);
#pragma unroll
    for (int nt = 0; nt < D / 8; nt += 2) {
      // transposed b0, b1 of n-tiles nt and nt + 1: tile rows j * 16 + (quarter % 2) * 8 + .., columns
      // (nt + quarter / 2) * 8
      uint32_t b[4];
      ldmatrix_x4<true>(b, tile + (j * 16 + (quarter % 2) * 8 + lane % 8) * SmemTile<D>::kStride +
                               (nt + quarter / 2) * 8);
      mma16816<T>(c[nt], a, b[0], b[1]);
      mma16816<T>(c[nt + 1], a, b[2], b[3]);
    }
  }
}

// Rows [first, first + ROWS) of one head (rows >= end zero-filled) into a padded shared tile,
// through 16-byte loads, optionally rotated (in float32, then rounded to T like the reference's
// 16-bit path). `positions`/`cos`/`sin` are null without rotary.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(uint16_t* tile, const T* base, int64_t row_stride, int64_t first,
                                          int64_t end, const int32_t* positions, const RotaryParams& r) {
  constexpr int kVec = 8;
  constexpr int kStride = SmemTile<D>::kStride;
  if (r.cos == nullptr || positions == nullptr) {
    constexpr int kChunksPerRow = D / kVec;
    for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += blockDim.x) {
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * kVec;
      uint4 value = make_uint4(0u, 0u, 0u, 0u);
      if (first + row < end) value = *reinterpret_cast<const uint4*>(base + (first + row) * row_stride + col);
      *reinterpret_cast<uint4*>(tile + row * kStride + col) = value;
    }
    return;
  }
  constexpr int kHalf = D / 2, kChunksPerRow = kHalf / kVec;
  for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += blockDim.x) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * kVec;
    float lo[kVec], hi[kVec];
    if (first + row < end) {
      const T* x = base + (first + row) * row_stride;
      load_vec<T, kVec>(x + col, lo);
      load_vec<T, kVec>(x + col + kHalf, hi);
      const float* cs = rotary_row(r.cos, positions, first + row, r, D);
      const float* sn = rotary_row(r.sin, positions, first + row, r, D);
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        rotate_pair(lo[i], hi[i], cs[col + i], sn[col + i], cs[col + kHalf + i], sn[col + kHalf + i]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) lo[i] = hi[i] = 0.f;
    }
    store_vec<T, kVec>(reinterpret_cast<T*>(tile + row * kStride + col), lo);
    store_vec<T, kVec>(reinterpret_cast<T*>(tile + row * kStride + col + kHalf), hi);
  }
}

// Rows [first, first + ROWS) of one head (rows >= end zero-filled) into a padded shared tile by cp.async:
// in flight until the caller commits, waits and syncs. No rotary (k arrives rotated once per call).
template <int D, int ROWS, typename T>
__device__ __forceinline__ void load_tile_async(uint16_t* tile, const T* base, int64_t row_stride, int64_t first,
                                                int64_t end) {
  constexpr int kVec = 8, kChunksPerRow = D / kVec;
  for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += blockDim.x) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * kVec;
    const bool inside = first + row < end;
    cp_async_16(tile + row * SmemTile<D>::kStride + col, inside ? base + (first + row) * row_stride + col : base,
                inside);
  }
}

// The rotary's transpose on accumulators (C layout) of D columns, for the lane's row half `h`
// (rows g or g + 8): column c and c + D/2 sit in the same lane, n-tiles nt and nt + D/16.
template <int D>
__device__ __forceinline__ void unrotate_accumulators(float (&acc)[D / 8][4], int h, const float* cos,
                                                      const float* sin, int lane) {
  if (cos == nullptr) return;
  constexpr int kHalf = D / 2;
  const int t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < D / 16; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = nt * 8 + 2 * t + e;
      const float a = acc[nt][2 * h + e], b = acc[nt + D / 16][2 * h + e];
      acc[nt][2 * h + e] = a * cos[c] + b * sin[c + kHalf];
      acc[nt + D / 16][2 * h + e] = b * cos[c + kHalf] - a * sin[c];
    }
  }
}

// Row half h (rows g / g + 8) of accumulators (C layout) times `scale`, stored as T pairs.
template <typename T, int D>
__device__ __forceinline__ void store_accumulators(T* row, const float (&acc)[D / 8][4], int h, float scale,
                                                   int lane) {
  const int t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
    *reinterpret_cast<uint32_t*>(row + nt * 8 + 2 * t) = pack2<T>(acc[nt][2 * h] * scale, acc[nt][2 * h + 1] * scale);
}

// The same into a float32 row (a split's share of the result).
template <int D>
__device__ __forceinline__ void store_accumulators_f32(float* row, const float (&acc)[D / 8][4], int h, float scale,
                                                       int lane) {
  const int t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    row[nt * 8 + 2 * t] = acc[nt][2 * h] * scale;
    row[nt * 8 + 2 * t + 1] = acc[nt][2 * h + 1] * scale;
  }
}

// The query and key rows of sequence `seq`.
struct SequenceBounds {
  int64_t q_begin, q_end, k_begin, k_end;
};
__device__ __forceinline__ SequenceBounds sequence_bounds(const AttentionParams& p, int64_t seq, int64_t nq,
                                                          int64_t nk) {
  SequenceBounds b;
  sequence_rows(p.cu_seqlens_q, seq, nq, b.q_begin, b.q_end);
  sequence_rows(p.cu_seqlens_k, seq, nk, b.k_begin, b.k_end);
  return b;
}

// Thread 0 finds the block's tile; every thread reads it. False: past the last tile.
__device__ __forceinline__ bool block_tile(const int32_t* cu, int64_t batch, int64_t total, int64_t rows_per_tile,
                                           int64_t& seq, int64_t& first_row) {
  __shared__ int64_t found[2];
  if (threadIdx.x == 0) {
    if (!find_tile(cu, batch, total, rows_per_tile, blockIdx.x, found[0], found[1])) found[0] = -1;
  }
  SHAREDLLM_BARRIER(1);  // tests/test_cuda_emulated.py removes it (and 2) to see the race reported
  seq = found[0];
  first_row = found[1];
  return seq >= 0;
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads) attention_forward_mma(AttentionForwardParams p, int64_t nq, int64_t nk) {
  constexpr int kBlockM = 16 * kMmaWarps, kBlockN = 64, kStride = SmemTile<D>::kStride;
  __shared__ __align__(16) uint16_t k_tile[kBlockN * kStride];  // holds the query tile first
  __shared__ __align__(16) uint16_t v_tile[kBlockN * kStride];
  static_assert(kBlockM <= kBlockN, "the query tile is staged in k_tile");

  int64_t seq, q_first;
  if (!block_tile(p.cu_seqlens_q, p.batch, nq, kBlockM, seq, q_first)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t head = blockIdx.y, kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const auto [q_begin, q_end, seq_k_begin, seq_k_end] = sequence_bounds(p, seq, nq, nk);
  const RotaryParams& r = p.rotary;
  // with a split over the keys, block z takes key tiles [z T / S, (z + 1) T / S) of the sequence's T (maybe none)
  const int64_t key_tiles = (seq_k_end - seq_k_begin + kBlockN - 1) / kBlockN, z = blockIdx.z;
  const int64_t k_begin = min(seq_k_end, seq_k_begin + z * key_tiles / p.num_splits * kBlockN);
  const int64_t k_end = min(seq_k_end, seq_k_begin + (z + 1) * key_tiles / p.num_splits * kBlockN);

  load_tile<T, D, kBlockM>(k_tile, static_cast<const T*>(p.q) + head * p.q_head_stride, p.q_row_stride, q_first,
                           q_end, r.q_positions, r);
  __syncthreads();
  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<D>(q_frag[kk], k_tile, warp * 16, kk * 16, lane);
  __syncthreads();

  // FlashAttention-2's pipeline on one K and one V tile: V of a tile lands while S = Q K^T runs, K of
  // the next while O += P V runs (k arrives rotated once per call: no rotary here)
  const T* k_head = static_cast<const T*>(p.k) + kv_head * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + kv_head * p.v_head_stride;
  if (k_begin < k_end) load_tile_async<D, kBlockN>(k_tile, k_head, p.k_row_stride, k_begin, k_end);
  cp_async_commit();
  const float scale_log2 = p.softmax_scale * kLog2e;
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8
  for (int64_t n0 = k_begin; n0 < k_end; n0 += kBlockN) {
    cp_async_wait<0>();
    __syncthreads();  // this tile's K is in for every thread, and every warp is done with the last V
    load_tile_async<D, kBlockN>(v_tile, v_head, p.v_row_stride, n0, k_end);
    cp_async_commit();

    float s[kBlockN / 8][4] = {};
    mma_rows_by_tile<T, D, kBlockN>(s, q_frag, k_tile, lane);
    float row_max[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool key_ok = n0 + nt * 8 + 2 * t + (e & 1) < k_end;
        s[nt][e] = key_ok ? s[nt][e] * scale_log2 : -INFINITY;
        row_max[e / 2] = fmaxf(row_max[e / 2], s[nt][e]);
      }
    }
    float ref[2], row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the 4 lanes of a quad hold one row
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 1));
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 2));
      ref[h] = row_max[h] == -INFINITY ? 0.f : row_max[h];
      const float alpha = exp2f(m[h] - ref[h]);
      m[h] = row_max[h];
      l[h] *= alpha;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) o[nt][2 * h] *= alpha, o[nt][2 * h + 1] *= alpha;
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - ref[e / 2]);
        row_sum[e / 2] += s[nt][e];
      }
    }
    l[0] += row_sum[0];
    l[1] += row_sum[1];
    cp_async_wait<0>();
    SHAREDLLM_BARRIER(2);  // this tile's V is in for every thread, and every warp is done with its K
    if (n0 + kBlockN < k_end) load_tile_async<D, kBlockN>(k_tile, k_head, p.k_row_stride, n0 + kBlockN, k_end);
    cp_async_commit();
    mma_accumulators_by_tile<T, D, kBlockN>(o, s, v_tile, lane);
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const int64_t row = q_first + warp * 16 + g + 8 * h;
    if (row >= q_end) continue;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // a sequence without keys gives out = 0
    const int64_t item = row * p.num_q_heads + head;
    if (p.num_splits > 1) {  // this share's result, merged by combine_splits
      const int64_t slot = static_cast<int64_t>(blockIdx.z) * nq * p.num_q_heads + item;
      store_accumulators_f32<D>(p.split_out + slot * D, o, h, inv, lane);
      if (t == 0) p.split_lse[slot] = l[h] > 0.f ? m[h] + log2f(l[h]) : -INFINITY;
      continue;
    }
    store_accumulators<T, D>(static_cast<T*>(p.out) + item * D, o, h, inv, lane);
    if (t == 0) p.lse[item] = l[h] > 0.f ? (m[h] + log2f(l[h])) * kLn2 : -INFINITY;
  }
}

// The split forward's last step: out and lse of every (row, head) from its shares, weighted by each
// share's sum of exponentials (a share without keys weighs nothing; no keys at all gives out = 0).
template <typename T>
__global__ void combine_splits(AttentionForwardParams p, int64_t nq) {
  const int64_t dim = p.v_dim, rows = nq * p.num_q_heads, share_stride = rows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * dim; i += stride) {
    const int64_t item = i / dim, col = i % dim;
    float top = -INFINITY;
    for (int z = 0; z < p.num_splits; ++z) top = fmaxf(top, p.split_lse[z * share_stride + item]);
    float total = 0.f, acc = 0.f;
    if (top != -INFINITY) {
      for (int z = 0; z < p.num_splits; ++z) {
        const float weight = exp2f(p.split_lse[z * share_stride + item] - top);
        total += weight;
        acc += weight * p.split_out[(z * share_stride + item) * dim + col];
      }
    }
    static_cast<T*>(p.out)[i] = store_float<T>(top == -INFINITY ? 0.f : acc / total);
    if (col == 0) p.lse[item] = top == -INFINITY ? -INFINITY : (top + log2f(total)) * kLn2;
  }
}

// dQ for 64 query rows of one head: S and dP = dO V^T per key tile, dS = P (dP - delta), dQ += dS K.
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads)
    attention_backward_dq_mma(AttentionBackwardParams p, int64_t nq, int64_t nk, const float* delta) {
  constexpr int kBlockM = 16 * kMmaWarps, kBlockN = 32, kStride = SmemTile<D>::kStride;
  __shared__ __align__(16) uint16_t row_tile[kBlockM * kStride];  // q, then dO
  __shared__ __align__(16) uint16_t k_tile[kBlockN * kStride];
  __shared__ __align__(16) uint16_t v_tile[kBlockN * kStride];

  int64_t seq, q_first;
  if (!block_tile(p.cu_seqlens_q, p.batch, nq, kBlockM, seq, q_first)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t head = blockIdx.y, kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const auto [q_begin, q_end, k_begin, k_end] = sequence_bounds(p, seq, nq, nk);
  const RotaryParams& r = p.rotary;

  uint32_t q_frag[D / 16][4], go_frag[D / 16][4];
  load_tile<T, D, kBlockM>(row_tile, static_cast<const T*>(p.q) + head * p.q_head_stride, p.q_row_stride, q_first,
                           q_end, r.q_positions, r);
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<D>(q_frag[kk], row_tile, warp * 16, kk * 16, lane);
  __syncthreads();
  load_tile<T, D, kBlockM>(row_tile, static_cast<const T*>(p.grad_out) + head * D, p.num_q_heads * D, q_first, q_end,
                           nullptr, r);
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<D>(go_frag[kk], row_tile, warp * 16, kk * 16, lane);

  const float scale_log2 = p.softmax_scale * kLog2e;
  float lse_log2[2], row_delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = q_first + warp * 16 + g + 8 * h;
    const bool ok = row < q_end;
    lse_log2[h] = ok ? p.lse[row * p.num_q_heads + head] * kLog2e : 0.f;
    row_delta[h] = ok ? delta[row * p.num_q_heads + head] : 0.f;
  }
  float dq[D / 8][4] = {};
  for (int64_t n0 = k_begin; n0 < k_end; n0 += kBlockN) {
    load_tile<T, D, kBlockN>(k_tile, static_cast<const T*>(p.k) + kv_head * p.k_head_stride, p.k_row_stride, n0,
                             k_end, r.k_positions, r);
    load_tile<T, D, kBlockN>(v_tile, static_cast<const T*>(p.v) + kv_head * p.v_head_stride, p.v_row_stride, n0,
                             k_end, nullptr, r);
    __syncthreads();
    float s[kBlockN / 8][4] = {}, dp[kBlockN / 8][4] = {};
    mma_rows_by_tile<T, D, kBlockN>(s, q_frag, k_tile, lane);
    mma_rows_by_tile<T, D, kBlockN>(dp, go_frag, v_tile, lane);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool key_ok = n0 + nt * 8 + 2 * t + (e & 1) < k_end;
        const float prob = key_ok ? exp2f(s[nt][e] * scale_log2 - lse_log2[e / 2]) : 0.f;
        s[nt][e] = prob * (dp[nt][e] - row_delta[e / 2]);  // dS
      }
    }
    mma_accumulators_by_tile<T, D, kBlockN>(dq, s, k_tile, lane);
    __syncthreads();
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = q_first + warp * 16 + g + 8 * h;
    if (row >= q_end) continue;
    unrotate_accumulators<D>(dq, h, rotary_row(r.cos, r.q_positions, row, r, D),
                             rotary_row(r.sin, r.q_positions, row, r, D), lane);
    store_accumulators<T, D>(static_cast<T*>(p.grad_q) + (row * p.num_q_heads + head) * D, dq, h, p.softmax_scale,
                             lane);
  }
}

// dK, dV for 64 key rows of one kv head, over every query of the sequence and every query head of
// the GQA group: S^T = K Q^T and dP^T = V dO^T per query tile, dV += P^T dO, dK += dS^T Q. With a
// split, block z takes the (query head, query tile) pairs [z W / S, (z + 1) W / S) of the group's W
// and leaves its float32 partial sums for sum_dkdv_splits.
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads)
    attention_backward_dkdv_mma(AttentionBackwardParams p, int64_t nq, int64_t nk, const float* delta) {
  constexpr int kBlockN = 16 * kMmaWarps, kBlockM = 32, kStride = SmemTile<D>::kStride;
  SHAREDLLM_DYNAMIC_SHARED(uint16_t, dkdv_shared);
  uint16_t* k_tile = dkdv_shared;             // [kBlockN, kStride]
  uint16_t* v_tile = k_tile + kBlockN * kStride;  // [kBlockN, kStride]
  uint16_t* q_tile = v_tile + kBlockN * kStride;  // [kBlockM, kStride]
  uint16_t* go_tile = q_tile + kBlockM * kStride;  // [kBlockM, kStride]
  float* lse_log2 = reinterpret_cast<float*>(go_tile + kBlockM * kStride);  // [kBlockM]
  float* row_delta = lse_log2 + kBlockM;                                     // [kBlockM]

  int64_t seq, k_first;
  if (!block_tile(p.cu_seqlens_k, p.batch, nk, kBlockN, seq, k_first)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t kv_head = blockIdx.y, group = p.num_q_heads / p.num_kv_heads;
  const auto [q_begin, q_end, k_begin, k_end] = sequence_bounds(p, seq, nq, nk);
  const RotaryParams& r = p.rotary;

  load_tile<T, D, kBlockN>(k_tile, static_cast<const T*>(p.k) + kv_head * p.k_head_stride, p.k_row_stride, k_first,
                           k_end, r.k_positions, r);
  load_tile<T, D, kBlockN>(v_tile, static_cast<const T*>(p.v) + kv_head * p.v_head_stride, p.v_row_stride, k_first,
                           k_end, nullptr, r);
  const float scale_log2 = p.softmax_scale * kLog2e;
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const int64_t q_tiles = (q_end - q_begin + kBlockM - 1) / kBlockM, pairs = group * q_tiles, z = blockIdx.z;
  for (int64_t pair = z * pairs / p.num_splits; pair < (z + 1) * pairs / p.num_splits; ++pair) {
    const int64_t head = kv_head * group + pair / q_tiles, m0 = q_begin + pair % q_tiles * kBlockM;
    load_tile<T, D, kBlockM>(q_tile, static_cast<const T*>(p.q) + head * p.q_head_stride, p.q_row_stride, m0, q_end,
                             r.q_positions, r);
    load_tile<T, D, kBlockM>(go_tile, static_cast<const T*>(p.grad_out) + head * D, p.num_q_heads * D, m0, q_end,
                             nullptr, r);
    for (int i = threadIdx.x; i < kBlockM; i += blockDim.x) {
      const bool ok = m0 + i < q_end;
      lse_log2[i] = ok ? p.lse[(m0 + i) * p.num_q_heads + head] * kLog2e : INFINITY;  // P = 0 off the sequence
      row_delta[i] = ok ? delta[(m0 + i) * p.num_q_heads + head] : 0.f;
    }
    __syncthreads();

    float s[kBlockM / 8][4] = {}, dp[kBlockM / 8][4] = {};  // S^T, dP^T: rows = keys, columns = queries
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t k_frag[4], v_frag[4];
      load_a<D>(k_frag, k_tile, warp * 16, kk * 16, lane);
      load_a<D>(v_frag, v_tile, warp * 16, kk * 16, lane);
#pragma unroll
      for (int nt = 0; nt < kBlockM / 8; nt += 2) {
        uint32_t q_b[4], go_b[4];
        load_b_pairs<D>(q_b, q_tile, nt, kk, lane);
        load_b_pairs<D>(go_b, go_tile, nt, kk, lane);
        mma16816<T>(s[nt], k_frag, q_b[0], q_b[1]);
        mma16816<T>(s[nt + 1], k_frag, q_b[2], q_b[3]);
        mma16816<T>(dp[nt], v_frag, go_b[0], go_b[1]);
        mma16816<T>(dp[nt + 1], v_frag, go_b[2], go_b[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int query = nt * 8 + 2 * t + (e & 1);
        const float prob = exp2f(s[nt][e] * scale_log2 - lse_log2[query]);
        s[nt][e] = prob;                                     // P^T
        dp[nt][e] = prob * (dp[nt][e] - row_delta[query]);  // dS^T
      }
    }
    mma_accumulators_by_tile<T, D, kBlockM>(dv, s, go_tile, lane);
    mma_accumulators_by_tile<T, D, kBlockM>(dk, dp, q_tile, lane);
    __syncthreads();  // before the next query tile overwrites the shared tiles
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = k_first + warp * 16 + g + 8 * h;
    if (row >= k_end) continue;
    unrotate_accumulators<D>(dk, h, rotary_row(r.cos, r.k_positions, row, r, D),
                             rotary_row(r.sin, r.k_positions, row, r, D), lane);
    if (p.num_splits > 1) {  // this share's part, added up by sum_dkdv_splits
      const int64_t slot = (z * nk + row) * p.num_kv_heads + kv_head;
      store_accumulators_f32<D>(p.split_dk + slot * D, dk, h, p.softmax_scale, lane);
      store_accumulators_f32<D>(p.split_dv + slot * D, dv, h, 1.f, lane);
      continue;
    }
    store_accumulators<T, D>(static_cast<T*>(p.grad_k) + (row * p.num_kv_heads + kv_head) * D, dk, h,
                             p.softmax_scale, lane);
    store_accumulators<T, D>(static_cast<T*>(p.grad_v) + (row * p.num_kv_heads + kv_head) * D, dv, h, 1.f, lane);
  }
}

// The split dK/dV's last step: grad_k and grad_v as the sums of the shares' parts (D == Dv on this path).
template <typename T>
__global__ void sum_dkdv_splits(AttentionBackwardParams p, int64_t nk) {
  const int64_t items = nk * p.num_kv_heads * p.head_dim, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += stride) {
    float dk = 0.f, dv = 0.f;
    for (int z = 0; z < p.num_splits; ++z) dk += p.split_dk[z * items + i], dv += p.split_dv[z * items + i];
    static_cast<T*>(p.grad_k)[i] = store_float<T>(dk);
    static_cast<T*>(p.grad_v)[i] = store_float<T>(dv);
  }
}

template <int D>
constexpr size_t dkdv_shared_bytes() {
  return (2 * 64 + 2 * 32) * SmemTile<D>::kStride * sizeof(uint16_t) + 2 * 32 * sizeof(float);
}

// ---------------------------------------------------------------------------------------------
// Host side

int current_device_major() {
  int device = 0, major = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return major;
}

// The tensor-core path: 16-bit, D == Dv in {64, 128}, rows and heads on 16-byte boundaries, sm_80+.
template <typename T>
bool use_tensor_cores(const AttentionParams& p) {
  if (p.head_dim != p.v_dim || (p.head_dim != 64 && p.head_dim != 128)) return false;
  return can_vectorize<T>({p.q, p.k, p.v}, {p.q_row_stride, p.q_head_stride, p.k_row_stride, p.k_head_stride,
                                            p.v_row_stride, p.v_head_stride},
                          p.head_dim) &&
         current_device_major() >= 8;
}

// Warps per block of a general-path kernel staging `floats_per_warp` float32 values per warp.
struct GeneralLaunch {
  unsigned blocks, threads;
  size_t shared;
};
// The largest staging, 2 * (D + Dv) floats per warp (dk, dv), fits one warp at the binding's limit.
static_assert(2 * kMaxHeadDims * sizeof(float) <= kMaxSharedBytesWithoutOptIn);
GeneralLaunch general_launch(int64_t items, int64_t floats_per_warp) {
  constexpr size_t kMaxShared = kMaxSharedBytesWithoutOptIn;
  const size_t per_warp = static_cast<size_t>(floats_per_warp) * sizeof(float);
  int warps = 4;
  while (warps > 1 && per_warp * warps > kMaxShared) --warps;
  if (per_warp > kMaxShared) throw std::invalid_argument("cross_inject_attention: head dims too large for CUDA");
  return {static_cast<unsigned>((items + warps - 1) / warps), static_cast<unsigned>(32 * warps), per_warp * warps};
}

unsigned tile_blocks(int64_t rows, int64_t batch, int64_t rows_per_tile) {
  // >= the real tile count, the sum of ceil(length / rows_per_tile) over the sequences; exact for one
  return static_cast<unsigned>((rows + (rows_per_tile - 1) * batch) / rows_per_tile);
}

template <typename T, int D>
void launch_forward_mma(const AttentionForwardParams& p, int64_t nq, int64_t nk, cudaStream_t stream) {
  // the kernel copies k tiles as they are: with a rotary, k must come rotated (with_k_rotated_once)
  if (p.rotary.cos != nullptr && p.rotary.k_positions != nullptr && nk > 0)
    throw std::invalid_argument("cross_inject_attention: the tensor-core forward needs k rotated once per call "
                                "(AttentionParams::k_rotated)");
  const dim3 grid(tile_blocks(nq, p.batch, 16 * kMmaWarps), static_cast<unsigned>(p.num_q_heads),
                  static_cast<unsigned>(p.num_splits));
  launch_kernel(attention_forward_mma<T, D>, grid, kMmaThreads, 0, stream, p, nq, nk);
  if (p.num_splits > 1) {
    check_launch("cross_inject_attention_forward");
    const int64_t items = nq * p.num_q_heads * p.v_dim;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, 65535));
    launch_kernel(combine_splits<T>, blocks, 256, 0, stream, p, nq);
  }
}

int multiprocessor_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count;
}

template <typename T, int D>
void launch_backward_mma(const AttentionBackwardParams& p, const AttentionBackwardParams& p_dq, int64_t nq,
                         int64_t nk, const float* delta, cudaStream_t stream) {
  if (nk > 0) {
    constexpr size_t shared = dkdv_shared_bytes<D>();
    auto kernel = attention_backward_dkdv_mma<T, D>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    const dim3 grid(tile_blocks(nk, p.batch, 16 * kMmaWarps), static_cast<unsigned>(p.num_kv_heads),
                    static_cast<unsigned>(p.num_splits));
    launch_kernel(kernel, grid, kMmaThreads, shared, stream, p, nq, nk, delta);
    check_launch("cross_inject_attention_backward (dk, dv)");
    if (p.num_splits > 1) {
      const int64_t items = nk * p.num_kv_heads * D;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, 65535));
      launch_kernel(sum_dkdv_splits<T>, blocks, 256, 0, stream, p, nk);
      check_launch("cross_inject_attention_backward (dk, dv shares)");
    }
  }
  if (nq > 0) {
    const dim3 grid(tile_blocks(nq, p.batch, 16 * kMmaWarps), static_cast<unsigned>(p.num_q_heads));
    launch_kernel(attention_backward_dq_mma<T, D>, grid, kMmaThreads, 0, stream, p_dq, nq, nk, delta);
    check_launch("cross_inject_attention_backward (dq)");
  }
}

}  // namespace

template <typename T>
void cross_inject_attention_forward(const AttentionForwardParams& p, int64_t nq, int64_t nk, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (nq == 0 || p.num_q_heads == 0) return;
  launch_index_checks(p, nq, nk, s);
  if constexpr (!std::is_same_v<T, float>) {  // no tensor-core kernels are instantiated for float32
    if (use_tensor_cores<T>(p)) {
      const AttentionForwardParams pk = with_k_rotated_once<T>(p, nk, s);
      if (p.head_dim == 64) launch_forward_mma<T, 64>(pk, nq, nk, s);
      else launch_forward_mma<T, 128>(pk, nq, nk, s);
      check_launch("cross_inject_attention_forward");
      return;
    }
  }
  const GeneralLaunch l = general_launch(nq * p.num_q_heads, p.head_dim + p.v_dim);
  launch_kernel(attention_forward_general<T>, l.blocks, l.threads, l.shared, s, p, nq, nk);
  check_launch("cross_inject_attention_forward");
}

template <typename T>
void cross_inject_attention_backward(const AttentionBackwardParams& p, int64_t nq, int64_t nk, float* delta,
                                     void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t q_items = nq * p.num_q_heads, k_items = nk * p.num_kv_heads;
  launch_index_checks(p, nq, nk, s);
  if (q_items > 0) {
    constexpr int kWarps = 8;
    launch_kernel(attention_backward_delta<T>, static_cast<unsigned>((q_items + kWarps - 1) / kWarps), 32 * kWarps, 0,
                  s, p, q_items, delta);
    check_launch("cross_inject_attention_backward (delta)");
  }
  if constexpr (!std::is_same_v<T, float>) {
    // dO is read as 16-byte vectors too (a contiguous view may still start off a 16-byte boundary)
    if (use_tensor_cores<T>(p) && can_vectorize<T>({p.grad_out}, {}, p.head_dim)) {
      // dQ needs k rotated only; dK/dV stage each k tile once anyway, and un-rotate dK with k's positions
      const AttentionBackwardParams p_dq = q_items > 0 ? with_k_rotated_once<T>(p, nk, s) : p;
      if (p.head_dim == 64) launch_backward_mma<T, 64>(p, p_dq, nq, nk, delta, s);
      else launch_backward_mma<T, 128>(p, p_dq, nq, nk, delta, s);
      return;
    }
  }
  if (k_items > 0) {
    const GeneralLaunch l = general_launch(k_items, 2 * (p.head_dim + p.v_dim));
    launch_kernel(attention_backward_dkdv_general<T>, l.blocks, l.threads, l.shared, s, p, nq, nk, delta);
    check_launch("cross_inject_attention_backward (dk, dv)");
  }
  if (q_items > 0) {
    const GeneralLaunch l = general_launch(q_items, 2 * p.head_dim + p.v_dim);
    launch_kernel(attention_backward_dq_general<T>, l.blocks, l.threads, l.shared, s, p, nq, nk, delta);
    check_launch("cross_inject_attention_backward (dq)");
  }
}

// How many blocks share one block's work: `forced_by` (an environment variable) if set, else enough for two
// blocks per SM where `blocks` would leave SMs idle, with at least 4 of the `units` of work per share on
// average; 1 to kMaxSplits.
namespace {
int split_count(const char* forced_by, int64_t blocks, int64_t units) {
  if (const char* forced = std::getenv(forced_by))
    return static_cast<int>(std::clamp<long>(std::strtol(forced, nullptr, 10), 1, kMaxSplits));
  const int64_t wanted = 2 * static_cast<int64_t>(multiprocessor_count());
  const int64_t splits = std::min((wanted + blocks - 1) / blocks, units / 4);
  return static_cast<int>(std::clamp<int64_t>(splits, 1, kMaxSplits));
}
}  // namespace

template <typename T>
int attention_forward_splits(const AttentionParams& p, int64_t nq, int64_t nk) {
  if constexpr (std::is_same_v<T, float>) {
    return 1;  // the split is in the tensor-core kernel only
  } else {
    if (nq == 0 || nk == 0 || p.num_q_heads == 0 || !use_tensor_cores<T>(p)) return 1;
    // the shares: key tiles (the forward fits three blocks per SM)
    return split_count("SHAREDLLM_ATTENTION_SPLITS",
                       static_cast<int64_t>(tile_blocks(nq, p.batch, 16 * kMmaWarps)) * p.num_q_heads,
                       nk / std::max<int64_t>(p.batch, 1) / 64);
  }
}

template <typename T>
int attention_backward_splits(const AttentionParams& p, int64_t nq, int64_t nk) {
  if constexpr (std::is_same_v<T, float>) {
    return 1;  // the split is in the tensor-core kernel only
  } else {
    if (nq == 0 || nk == 0 || p.num_kv_heads == 0 || !use_tensor_cores<T>(p)) return 1;
    // the shares: (query head, 32-query tile) pairs of the GQA group
    return split_count("SHAREDLLM_ATTENTION_BACKWARD_SPLITS",
                       static_cast<int64_t>(tile_blocks(nk, p.batch, 16 * kMmaWarps)) * p.num_kv_heads,
                       p.num_q_heads / p.num_kv_heads * (nq / std::max<int64_t>(p.batch, 1) / 32));
  }
}

template <typename T>
bool rotates_k_once(const AttentionParams& p) {
  if constexpr (std::is_same_v<T, float>) return false;  // float32 has no tensor-core path
  else return p.rotary.cos != nullptr && use_tensor_cores<T>(p);
}

template int attention_forward_splits<float>(const AttentionParams&, int64_t, int64_t);
template int attention_forward_splits<half_t>(const AttentionParams&, int64_t, int64_t);
template int attention_forward_splits<bfloat16_t>(const AttentionParams&, int64_t, int64_t);
template int attention_backward_splits<float>(const AttentionParams&, int64_t, int64_t);
template int attention_backward_splits<half_t>(const AttentionParams&, int64_t, int64_t);
template int attention_backward_splits<bfloat16_t>(const AttentionParams&, int64_t, int64_t);
template bool rotates_k_once<float>(const AttentionParams&);
template bool rotates_k_once<half_t>(const AttentionParams&);
template bool rotates_k_once<bfloat16_t>(const AttentionParams&);
template void cross_inject_attention_forward<float>(const AttentionForwardParams&, int64_t, int64_t, void*);
template void cross_inject_attention_forward<half_t>(const AttentionForwardParams&, int64_t, int64_t, void*);
template void cross_inject_attention_forward<bfloat16_t>(const AttentionForwardParams&, int64_t, int64_t, void*);
template void cross_inject_attention_backward<float>(const AttentionBackwardParams&, int64_t, int64_t, float*, void*);
template void cross_inject_attention_backward<half_t>(const AttentionBackwardParams&, int64_t, int64_t, float*,
                                                      void*);
template void cross_inject_attention_backward<bfloat16_t>(const AttentionBackwardParams&, int64_t, int64_t, float*,
                                                          void*);

}  // namespace sharedllm::cuda
