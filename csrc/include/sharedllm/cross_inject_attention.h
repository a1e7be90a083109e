// cross_inject_attention (docs/DESIGN.md section 3.3): non-causal varlen attention from the decoder's queries to
// the injected (compressed) context keys, with GQA and a fused HF-style rotary embedding.
#pragma once

#include <cstdint>

#include "sharedllm/common.h"

namespace sharedllm {

// Optional fused rotary embedding: x <- x * cos[pos] + rotate_half(x) * sin[pos].
struct RotaryParams {
  const int32_t* q_positions = nullptr;  // [Nq]
  const int32_t* k_positions = nullptr;  // [Nk]
  const float* cos = nullptr;            // [max_pos, D], contiguous float32
  const float* sin = nullptr;            // [max_pos, D], contiguous float32
  int64_t max_pos = 0;                   // rows of cos/sin (the CUDA kernels clamp positions to it)
  bool enabled() const { return cos != nullptr; }
};

struct AttentionParams {
  const void* q;  // [Nq, Hq, D]
  const void* k;  // [Nk, Hk, D]
  const void* v;  // [Nk, Hk, Dv]
  const int32_t* cu_seqlens_q;  // [B + 1]
  const int32_t* cu_seqlens_k;  // [B + 1]
  int64_t batch, num_q_heads, num_kv_heads, head_dim, v_dim;
  int64_t q_row_stride, q_head_stride;  // in elements; the last dim is contiguous
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  float softmax_scale;
  RotaryParams rotary;
  // CUDA: check cu_seqlens and positions on the device first (the bindings' default; see cuda_common.cuh)
  bool check_indices = false;
  // CUDA with rotary (when cuda::rotates_k_once): scratch [Nk, Hk, D], contiguous, of k's dtype, for k
  // rotated once per call (null: the kernels rotate each k tile as they stage it, again for every query
  // tile and head)
  void* k_rotated = nullptr;
};

struct AttentionForwardParams : AttentionParams {
  void* out;   // [Nq, Hq, Dv], contiguous
  float* lse;  // [Nq, Hq], contiguous, natural log
  // CUDA split over the keys (cuda::attention_forward_splits: when the query tiles cannot fill the GPU):
  // num_splits blocks per (query tile, head) each attend to their share of the key tiles and leave their
  // normalised output and log2-sum-exp here; a second kernel merges them into out and lse.
  int num_splits = 1;
  float* split_out = nullptr;  // [num_splits, Nq, Hq, Dv] float32
  float* split_lse = nullptr;  // [num_splits, Nq, Hq] float32, base 2 (-inf: no keys in that share)
};

struct AttentionBackwardParams : AttentionParams {
  const void* grad_out;        // [Nq, Hq, Dv], contiguous
  const void* out;             // [Nq, Hq, Dv], contiguous
  const float* lse;            // [Nq, Hq], contiguous
  const float* grad_lse;       // [Nq, Hq] contiguous, or null
  void* grad_q;                // [Nq, Hq, D], contiguous
  void* grad_k;                // [Nk, Hk, D], contiguous
  void* grad_v;                // [Nk, Hk, Dv], contiguous
  // CUDA split of the dK/dV work (cuda::attention_backward_splits: when key tiles x kv heads cannot fill
  // the GPU): num_splits blocks per (key tile, kv head) each take a share of the (query head, query
  // tile) pairs of its GQA group and leave float32 partial sums here; a second kernel adds them up.
  int num_splits = 1;
  float* split_dk = nullptr;  // [num_splits, Nk, Hk, D] float32, scaled and un-rotated
  float* split_dv = nullptr;  // [num_splits, Nk, Hk, Dv] float32
};

// Rotation of one row (D even) and its transpose, shared by every backend.
SHAREDLLM_HOST_DEVICE inline void rotary_apply(float* x, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}
SHAREDLLM_HOST_DEVICE inline void rotary_apply_transposed(float* g, const float* cos, const float* sin,
                                                          int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = g[i], b = g[i + half];
    g[i] = a * cos[i] + b * sin[i + half];
    g[i + half] = b * cos[i + half] - a * sin[i];
  }
}

namespace cpu {
template <typename T>
void cross_inject_attention_forward(const AttentionForwardParams& p);
template <typename T>
void cross_inject_attention_backward(const AttentionBackwardParams& p);
}  // namespace cpu

namespace cuda {
// The CUDA kernels stage a few float32 rows per warp in shared memory on their general path, which
// bounds D + Dv; the tensor-core path (16-bit, D == Dv in {64, 128}) has no such staging. The
// binding rejects larger head dims and build_info reports the bound as cuda_attention_max_head_dims.
inline constexpr int64_t kMaxHeadDims = 4096;  // D + Dv

// `nq`, `nk`: Nq and Nk (sequence bounds are clamped to them, so unvalidated cu_seqlens cannot
// read out of bounds); `stream` is a cudaStream_t (void* keeps CUDA headers out of this header).
template <typename T>
void cross_inject_attention_forward(const AttentionForwardParams& p, int64_t nq, int64_t nk, void* stream);
// How many blocks share the keys of one (query tile, head) in the forward: 1, or up to kMaxSplits when
// few query tiles would leave most SMs idle (the short decoder against a long compressed context of
// SharedLLM's cross-injection). SHAREDLLM_ATTENTION_SPLITS=n forces n (tests, tuning).
inline constexpr int kMaxSplits = 16;
template <typename T>
int attention_forward_splits(const AttentionParams& p, int64_t nq, int64_t nk);
// How many blocks share the dK/dV work of one (key tile, kv head) in the backward: 1, or up to kMaxSplits
// when few key tiles and kv heads would leave most SMs idle (a short compressed context, few kv heads).
// SHAREDLLM_ATTENTION_BACKWARD_SPLITS=n forces n (tests, tuning).
template <typename T>
int attention_backward_splits(const AttentionParams& p, int64_t nq, int64_t nk);
// Whether the kernels for these params use AttentionParams::k_rotated (the tensor-core path with a rotary):
// the binding allocates the scratch only then.
template <typename T>
bool rotates_k_once(const AttentionParams& p);
// `delta`: float32 [Nq, Hq] scratch for rowsum(dO * O) - grad_lse
template <typename T>
void cross_inject_attention_backward(const AttentionBackwardParams& p, int64_t nq, int64_t nk, float* delta,
                                     void* stream);
}  // namespace cuda

}  // namespace sharedllm
