// Eight floats as one GCC vector, for the hot CPU loops (compiled under SHAREDLLM_CPU_CLONES).
// Written on vectors directly because GCC does not vectorise float reductions (sum, max) without
// -ffast-math, and turns some of them into huge gather code instead. In the baseline clone each
// operation is split into two SSE halves.
#pragma once

#include <cstdint>
#include <cstring>

#include "sharedllm/common.h"

namespace sharedllm::cpu {

typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
constexpr int kLanes = 8;

SHAREDLLM_INLINE vec8 splat8(float x) { return vec8{x, x, x, x, x, x, x, x}; }

SHAREDLLM_INLINE vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SHAREDLLM_INLINE vec8 load8(const bfloat16_t* p) {
  u16x8 raw;
  std::memcpy(&raw, p, sizeof(raw));
  return reinterpret_cast<vec8>(__builtin_convertvector(raw, ivec8) << 16);
}
SHAREDLLM_INLINE vec8 load8(const half_t* p) {
  vec8 v;
  for (int t = 0; t < kLanes; ++t) v[t] = to_float(p[t]);
  return v;
}
SHAREDLLM_INLINE void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }

SHAREDLLM_INLINE float horizontal_sum(vec8 v) {
  float total = 0.0f;
  for (int t = 0; t < kLanes; ++t) total += v[t];
  return total;
}
SHAREDLLM_INLINE float horizontal_max(vec8 v) {
  float best = v[0];
  for (int t = 1; t < kLanes; ++t) best = v[t] > best ? v[t] : best;
  return best;
}

}  // namespace sharedllm::cpu
