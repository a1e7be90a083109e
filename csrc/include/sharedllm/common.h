// Shared, torch-free building blocks for the sharedllm kernels: storage types for 16-bit floats,
// their conversions, host/device qualifiers and small math helpers. The kernels (csrc/include,
// csrc/cpu, csrc/cuda) include no torch header: the binding layer in csrc/torch/ maps torch types
// onto these.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SHAREDLLM_HOST_DEVICE __host__ __device__
#else
#define SHAREDLLM_HOST_DEVICE
#endif

// Hot CPU loops are compiled twice, for AVX2 and for the baseline ISA, and picked at load time by
// CPU feature, so one wheel is fast on modern x86 and still runs everywhere. (Not "arch=haswell"
// or "arch=x86-64-v3": those resolve by CPU model or full ISA level and miss many AMD and
// virtualised CPUs. FMA cannot be requested together with AVX2 in one clone.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define SHAREDLLM_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SHAREDLLM_CPU_CLONES
#endif

// Forced inlining for the scalar helpers called from SHAREDLLM_CPU_CLONES loops: GCC does not
// inline a plain `inline` function into a clone built for another ISA, and a call per element
// stops the loop from vectorising.
#if defined(__GNUC__) && !defined(__CUDACC__)
#define SHAREDLLM_INLINE inline __attribute__((always_inline))
#else
#define SHAREDLLM_INLINE inline
#endif

namespace sharedllm {

// IEEE binary16, layout-compatible with at::Half / __half.
struct half_t {
  uint16_t bits;
};
// bfloat16, layout-compatible with at::BFloat16 / __nv_bfloat16.
struct bfloat16_t {
  uint16_t bits;
};

SHAREDLLM_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
SHAREDLLM_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

SHAREDLLM_INLINE float to_float(float x) { return x; }
SHAREDLLM_INLINE float to_float(bfloat16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
SHAREDLLM_INLINE float to_float(half_t x) {
  // exact binary16 -> binary32 conversion (normals, subnormals, inf, nan)
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  // subnormal: value = mant * 2^-24
  const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

template <typename T>
T from_float(float f);

template <>
SHAREDLLM_INLINE float from_float<float>(float f) {
  return f;
}
template <>
SHAREDLLM_INLINE bfloat16_t from_float<bfloat16_t>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bfloat16_t{static_cast<uint16_t>(u >> 16)};
}
template <>
SHAREDLLM_INLINE half_t from_float<half_t>(float f) {
  // binary32 -> binary16, round to nearest even, with overflow to inf and gradual underflow
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return half_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return half_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520
  if (abs < 0x38800000u) {
    // result is subnormal (or zero): scale so that the mantissa lands in the low 10 bits
    const float magnitude = bits_to_float(abs) * 16777216.0f;  // * 2^24
    // nearbyint with round-half-even via the 2^23 trick (exact for magnitude < 2^23)
    const float rounded = (magnitude + 8388608.0f) - 8388608.0f;
    return half_t{static_cast<uint16_t>(sign | static_cast<uint16_t>(rounded))};
  }
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return half_t{static_cast<uint16_t>(sign | h)};
}

// Windows of PyTorch's adaptive pooling: segment rows [start, end) pooled into slot j of P.
SHAREDLLM_HOST_DEVICE inline int64_t pool_window_start(int64_t j, int64_t length, int64_t slots) {
  return (j * length) / slots;
}
SHAREDLLM_HOST_DEVICE inline int64_t pool_window_end(int64_t j, int64_t length, int64_t slots) {
  return ((j + 1) * length + slots - 1) / slots;
}

namespace cuda {
// Shared memory a block may use, static and dynamic together, unless its kernel opts in to more
// (cudaFuncAttributeMaxDynamicSharedMemorySize). The kernels that stay within it launch on every
// GPU; their limits (build_info) follow from it.
inline constexpr int64_t kMaxSharedBytesWithoutOptIn = 48 * 1024;
}  // namespace cuda

}  // namespace sharedllm
