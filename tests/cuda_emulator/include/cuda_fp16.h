// CPU emulator (see cuda_runtime.h): the float16 types and conversions the kernels use.
#pragma once

#include "cuda_runtime.h"

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
inline float __half2float(__half h) { return emulator::half_bits_to_float(h.bits); }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __float2half_rn(float f) { return __half{emulator::float_to_half_bits(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
